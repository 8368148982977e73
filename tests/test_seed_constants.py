"""The seeds' numbers, written out as literals so that changing one in the product fails here.

Sources: /work/shared/DESIGN.md "Ensemble parameters (defaults from the seeds)" (logit weights
PCAM:SWIN:CAIT 0.40:0.40:0.20 frontal / 0.45:0.45:0.10 lateral, TTA identity + hflip with
+-5 degree rotation and zoom 1.1 / 0.9 selectable, normal gating exponent 0.5, zero-shot scale
5) and "Preprocessing (from the seeds)" (percentile clip 0.5 / 99.5, ImageNet mean/std at 512
in the paper profile; CLIP mean/std at 224, divide by 65535 or 255); the training recipes in
training/configs/*.yaml and the loss defaults of training/losses.py. Where a number travels on
(the builder's default settings -> the served models' config parameters; a recipe -> the
loss module a training job builds), the end of the chain is checked too, without building a
repository or training. torch is imported inside the tests that need it.
"""

from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from cxrlt.contract import ensemble, preprocessing
from cxrlt.contract.labels import NORMAL_INDEX, TASK1_LABELS
from cxrlt.contract.preprocessing import PreprocessConfig
from cxrlt.contract.profiles import get_profile

WEIGHTS = {
    "frontal": {"pcam": 0.40, "swin": 0.40, "cait": 0.20},
    "lateral": {"pcam": 0.45, "swin": 0.45, "cait": 0.10},
}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def test_ensemble_defaults():
    """DESIGN "Ensemble parameters": weights per projection, gating ^0.5, zero-shot scale 5,
    also as the default arguments of the scoring functions."""
    assert ensemble.DEFAULT_WEIGHTS == WEIGHTS
    assert ensemble.DEFAULT_GATING_ALPHA == 0.5
    assert ensemble.DEFAULT_ZEROSHOT_ALPHA == 5.0
    p = np.full(len(TASK1_LABELS), 0.8, dtype=np.float32)
    p[NORMAL_INDEX] = 0.75
    expected = np.full_like(p, 0.8 * 0.25**0.5)
    expected[NORMAL_INDEX] = 0.75
    np.testing.assert_allclose(ensemble.normal_gating(p), expected, rtol=1e-6)
    v = np.array([1.0, 0.0])
    text = np.array([[0.3, 0.0]])  # mean cosine 0.3
    np.testing.assert_allclose(ensemble.zeroshot_scores(v, text)[0], [1 / (1 + math.exp(-5 * 0.3))], rtol=1e-6)


def test_preprocessing_defaults():
    """DESIGN "Preprocessing": Task 1 percentile clip (0.5, 99.5) then ImageNet mean/std; zero-shot
    CLIP (OpenAI) mean/std at 224 after dividing by 65535 (255 when the image's maximum is <= 255);
    the paper profile at 512."""
    assert (list(preprocessing.IMAGENET_MEAN), list(preprocessing.IMAGENET_STD)) == IMAGENET
    assert (list(preprocessing.CLIP_MEAN), list(preprocessing.CLIP_STD)) == CLIP
    task1 = PreprocessConfig(size=512)
    assert (task1.mode, task1.clip_percentiles, list(task1.mean), list(task1.std)) == ("percentile", (0.5, 99.5), *IMAGENET)
    clip = PreprocessConfig.clip()
    assert (clip.size, clip.mode, list(clip.mean), list(clip.std)) == (224, "max", *CLIP)
    assert preprocessing.source_maximum(np.array([[0, 255]], np.uint16)) == 255.0
    assert preprocessing.source_maximum(np.array([[0, 256]], np.uint16)) == 65535.0
    paper = get_profile("paper")
    assert (paper.image_size, paper.clip.image_size) == (512, 224)


# view -> (rotation in degrees of a horizontal ramp's gradient, 1 / scale of the image)
_VIEWS = {"identity": (0.0, 1.0), "hflip": (180.0, 1.0), "rot+5": (-5.0, 1.0), "rot-5": (5.0, 1.0),
          "zoom1.1": (0.0, 1 / 1.1), "zoom0.9": (0.0, 1 / 0.9)}


@pytest.mark.parametrize("view", list(_VIEWS))
def test_tta_views(view):
    """DESIGN "Ensemble parameters": TTA identity + hflip, +-5 degree rotation, zoom 1.1 / 0.9,
    measured on a linear ramp (bilinear resampling keeps it linear away from the borders)."""
    assert preprocessing.TTA_VIEWS == ("identity", "hflip", "rot+5", "rot-5", "zoom1.1", "zoom0.9")
    size = 100
    ramp = np.tile(np.arange(size, dtype=np.float32) / size, (size, 1))
    rows, cols = np.gradient(preprocessing.tta_view(ramp, view).astype(np.float64))
    gy, gx = rows[35:65, 35:65].mean() * size, cols[35:65, 35:65].mean() * size
    angle, scale = _VIEWS[view]
    assert math.degrees(math.atan2(gy, gx)) == pytest.approx(angle, abs=0.05)
    assert math.hypot(gx, gy) == pytest.approx(scale, rel=5e-3)  # Pillow's resampling: within 0.2 %


@pytest.mark.parametrize("profile", ["tiny", "paper"])
def test_served_classifier_parameters(profile):
    """What `cxrlt build-repo` writes into cxr_classifier's and cxr_zeroshot's config.pbtxt by
    default: the builder's settings functions, with the CLI adding nothing unless asked."""
    from cxrlt.cli.commands.build_repo import add_arguments
    from exporters.build_repo import default_classifier_settings, default_zeroshot_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "repo"])
    assert (args.tta, args.gating_alpha) == (None, None)

    spec = get_profile(profile)
    params = default_classifier_settings(spec).to_parameters()
    assert params["tta_views"] == "identity,hflip"
    assert float(params["normal_gating_alpha"]) == 0.5
    assert {p: ensemble.parse_weights(params[f"weights_{p}"]) for p in WEIGHTS} == WEIGHTS
    assert (params["preprocess_size"], params["preprocess_mode"]) == (str(spec.image_size), "percentile")
    assert json.loads(params["preprocess_clip_percentiles"]) == [0.5, 99.5]
    assert (json.loads(params["preprocess_mean"]), json.loads(params["preprocess_std"])) == IMAGENET

    zeroshot = default_zeroshot_settings(spec).to_parameters()
    assert (float(zeroshot["zeroshot_alpha"]), zeroshot["scoring"]) == (5.0, "sigmoid")
    assert (zeroshot["preprocess_size"], zeroshot["preprocess_mode"]) == ("224", "max")
    assert (json.loads(zeroshot["preprocess_mean"]), json.loads(zeroshot["preprocess_std"])) == CLIP


ASL = {"name": "asl", "gamma_neg": 4.0, "gamma_pos": 0.0, "clip": 0.05}
DB = {"name": "db", "beta": 0.9999, "kappa": 0.05, "neg_scale": 2.0}
REPEAT = {"name": "repeat_factor", "threshold": 0.2, "max_repeat": 10.0}
EMA = {"decay": 0.98, "warmup": True}
MEMBER = (ASL, REPEAT, EMA, ["identity", "hflip"])
# recipe -> (loss, sampler, ema, validation TTA), as training/configs/*.yaml state them
RECIPES = {
    **{f"{p}_{m}": MEMBER for p in ("frontal", "lateral") for m in ("pcam", "swin", "cait")},
    "convnextv2_csra": (DB, REPEAT, EMA, ["identity", "hflip"]),
    "convnextv2_mlp": ({"name": "bce"}, REPEAT, EMA, ["identity", "hflip"]),
    "clip_dual_branch": (ASL, {"name": "none"}, EMA, ["identity"]),
    "router": ({"name": "ce", "label_smoothing": 0.0}, {"name": "none"}, EMA, ["identity"]),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe(name):
    """Each recipe's loss, sampler, EMA and validation views through `load_recipe`, and the loss
    module a multi-label or router job builds from it (training.network_job.NetworkJob._loss)."""
    from training.recipes import list_recipes, load_recipe

    assert set(list_recipes()) == set(RECIPES)  # a new recipe gets its row here
    recipe = load_recipe(name)
    loss, sampler, ema, tta = RECIPES[name]
    assert (recipe.loss, recipe.sampler, recipe.ema, recipe.tta) == (loss, sampler, ema, tta)
    if recipe.task == "clip":
        assert recipe.clip["asl_weight"] == 1.5  # L = L_con + 1.5 * L_ASL
        return
    from training.network_job import NetworkJob

    counts = np.arange(1.0, len(TASK1_LABELS) + 1) * 10
    module = NetworkJob._loss(SimpleNamespace(recipe=recipe, train_counts=counts, train_table=range(1000)))
    if loss["name"] == "asl":
        assert (module.gamma_neg, module.gamma_pos, module.clip) == (4.0, 0.0, 0.05)
    elif loss["name"] == "db":
        assert (module.kappa, module.neg_scale) == (0.05, 2.0)
        weights = (1 - 0.9999) / (1 - 0.9999**counts)  # effective numbers (Cui et al.), mean 1
        np.testing.assert_allclose(module.weights.numpy(), weights / weights.mean(), rtol=1e-5)
    elif loss["name"] == "ce":
        assert module.label_smoothing == 0.0
    else:
        assert type(module).__name__ == "BCELoss"


def test_training_defaults():
    """The losses' own defaults (ASL gamma_neg 4 / gamma_pos 1 / clip 0.05; distribution-balanced
    beta 0.9999, kappa 0.05, lambda 2; dual branch alpha 1.5) and the paper's augmentation, which
    the paper profile's recipes use unchanged (hflip 0.5, rotation 20, scale 0.9-1.1, shift 5 %,
    CLAHE 0.3); the router's own augmentation; what a recipe that omits them gets (identity +
    hflip validation, dual-branch weight 1.5)."""
    import inspect

    from training import losses
    from training.data import Augment
    from training.recipes import load_recipe, recipe_from_dict

    def defaults(fn, *names):
        parameters = inspect.signature(fn).parameters
        return tuple(parameters[n].default for n in names)

    assert defaults(losses.AsymmetricLoss, "gamma_neg", "gamma_pos", "clip") == (4.0, 1.0, 0.05)
    assert defaults(losses.DistributionBalancedLoss, "beta", "kappa", "neg_scale") == (0.9999, 0.05, 2.0)
    assert defaults(losses.effective_number_weights, "beta") == (0.9999,)
    assert defaults(losses.DualBranchLoss, "alpha") == (1.5,)
    assert Augment() == Augment(hflip_p=0.5, max_rotation=20.0, scale=(0.9, 1.1), max_translate=0.05, clahe_p=0.3)
    assert load_recipe("frontal_pcam", overrides={"profile": "paper"}).augment == {}
    assert load_recipe("router").augment == {"hflip_p": 0.5, "max_rotation": 10.0, "scale": [0.9, 1.1],
                                             "max_translate": 0.05, "clahe_p": 0.0}
    assert recipe_from_dict({"model": "ensemble_frontal_pcam", "projection": "frontal"}).tta == ["identity", "hflip"]
    assert recipe_from_dict({"task": "clip", "tta": ["identity"]}).clip["asl_weight"] == 1.5
