"""Fast checks of the training pieces: recipes, schedule, EMA, weight search, report synthesis."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrlt.cli.main import build_parser
from cxrlt.contract.ensemble import MEMBERS
from cxrlt.contract.labels import NORMAL_INDEX, TASK1_LABELS
from training.ema import ModelEma
from training.metrics import evaluate_predictions
from training.recipes import RecipeError, list_recipes, load_recipe, recipe_from_dict
from training.schedule import WarmupCosine
from evaluation.tune import MemberLogits, corner, fast_mean_ap, probabilities_with, search_weights, simplex_grid
from training.clip_job import (
    FINDING_TEMPLATES,
    NEUTRAL_SENTENCE,
    NORMAL_SENTENCES,
    class_prompts,
    synthesize_report,
)
from training.zeroshot_proxy import parse_groups, proxy_groups

SERVED = {"projection_router", "clip", *(f"ensemble_{p}_{m}" for p in ("frontal", "lateral") for m in MEMBERS)}


# ------------------------------------------------------------------- recipes


def test_checked_in_recipes_load_and_name_served_models():
    recipes = {name: load_recipe(path) for name, path in list_recipes().items()}
    assert len(recipes) == 10
    assert {r.model for r in recipes.values()} >= SERVED
    for name, recipe in recipes.items():
        assert recipe.profile == "tiny" and recipe.threads == 2
        assert recipe.image_size == (224 if recipe.task == "clip" else 64)
        if recipe.model.startswith("ensemble_"):
            assert recipe.projection == recipe.model.split("_")[1]
            assert recipe.tta == ["identity", "hflip"]
    assert recipes["frontal_cait"].pcam_checkpoint == "ensemble_frontal_pcam.pt"
    assert {r.loss["name"] for r in recipes.values()} == {"asl", "db", "bce", "ce"}
    assert {r.sampler["name"] for r in recipes.values()} == {"repeat_factor", "none"}


def test_profile_overrides_apply_to_their_profile_below_the_command_line():
    tiny = load_recipe("frontal_pcam")
    assert tiny.augment == {"max_rotation": 0.0, "scale": [1.0, 1.0], "max_translate": 0.0, "clahe_p": 0.0}
    assert load_recipe("frontal_pcam", assignments=["profile=paper"]).augment == {}  # the paper's defaults
    assert load_recipe("frontal_pcam", assignments=["augment.clahe_p=0.3"]).augment["clahe_p"] == 0.3
    assert load_recipe("frontal_pcam", overrides={"augment": {"max_rotation": 5.0}}).augment["max_rotation"] == 5.0
    with pytest.raises(RecipeError, match="unknown profile"):
        recipe_from_dict({"model": "ensemble_frontal_pcam", "projection": "frontal",
                          "profile_overrides": {"huge": {"epochs": 1}}}, source="test.yaml")


def test_recipes_extend_a_base_whose_keys_they_replace_whole(tmp_path):
    assert "_shared" not in list_recipes()  # a base, not a recipe
    (tmp_path / "base.yaml").write_text("model: ensemble_frontal_pcam\nprojection: frontal\nepochs: 3\n"
                                        "loss: {name: asl, gamma_neg: 2.0, clip: 0.1}\n")
    (tmp_path / "db.yaml").write_text("extends: base.yaml\nloss: {name: db, beta: 0.99}\n")
    recipe = load_recipe(tmp_path / "db.yaml", assignments=["epochs=5"])
    assert recipe.loss == {"name": "db", "beta": 0.99}  # no ASL parameters left over from the base
    assert recipe.projection == "frontal" and recipe.epochs == 5 and recipe.name == "db"

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="extends itself"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(RecipeError, match="missing.yaml"):
        load_recipe(tmp_path / "orphan.yaml")


def test_recipe_overrides_and_assignments():
    recipe = load_recipe("frontal_pcam", assignments=["optimizer.lr=1e-4", "epochs=3", "profile=paper"])
    assert recipe.optimizer["lr"] == 1e-4 and recipe.epochs == 3 and recipe.image_size == 512
    assert recipe.optimizer["weight_decay"] == 0.05  # untouched keys survive


@pytest.mark.parametrize("data, message", [
    ({"model": "ensemble_frontal_pcam", "projection": "frontal", "lr": 1}, "unknown key"),
    ({"model": "ensemble_frontal_pcam", "projection": "lateral"}, "projection"),
    ({"model": "ensemble_frontal_cait", "projection": "frontal"}, "pcam_checkpoint"),
    ({"model": "ensemble_frontal_pcam", "projection": "frontal", "pcam_checkpoint": "x.pt"}, "pcam_checkpoint"),
    ({"model": "ensemble_frontal_pcam", "projection": "frontal", "loss": {"name": "ce"}}, "loss.name"),
    ({"model": "nonsense"}, "model"),
    ({"task": "projection", "loss": {"name": "ce"}, "tta": ["identity", "hflip"]}, "tta"),
    ({"model": "ensemble_frontal_pcam", "arch": "convnextv2_mlp"}, "must not overwrite"),
    ({"model": "ensemble_frontal_pcam", "projection": "frontal", "augment": {"flip": 1}}, "augment"),
    ({"model": "ensemble_frontal_cait", "projection": "frontal", "pcam_checkpoint": "p.pt", "init_weights": "w.pt"},
     "init_weights"),
])
def test_bad_recipes_are_rejected_with_the_key(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data, source="test.yaml")


def test_model_kwargs_that_change_weights_are_rejected(tmp_path):
    from training.job import TrainingError
    from training.network_job import check_servable
    from networks.factory import create_model

    recipe = recipe_from_dict({"model": "ensemble_frontal_swin", "projection": "frontal",
                               "model_kwargs": {"embed_dim": 48}})
    with pytest.raises(TrainingError, match="change the network's weights"):
        check_servable(create_model(recipe.network_spec(), 30, 64), recipe)
    fine = load_recipe("frontal_cait")
    check_servable(create_model(fine.network_spec(), 30, 64), fine)


# ------------------------------------------------------------- schedule, EMA


def test_warmup_then_cosine():
    schedule = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-6)
    assert schedule(100) == pytest.approx(0.01) and schedule(1000) == pytest.approx(0.01)
    values = [schedule(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_averages_trained_weights_and_copies_frozen_ones():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = ModelEma(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for (name, live), avg in zip(model.state_dict().items(), ema.module.state_dict().values()):
        if name.startswith("0."):
            assert torch.equal(avg, live)  # frozen: copied bit for bit
        else:
            assert torch.allclose(avg, live - 0.5)
    assert ema.updates == 1
    warm = ModelEma(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)


# --------------------------------------------------------------- weight search


def test_fast_map_equals_the_challenge_metric():
    rng = np.random.default_rng(0)
    labels = (rng.random((80, 12)) < 0.2).astype(float)
    labels[:, 0] = 0  # not evaluable
    scores = np.round(rng.random((80, 12)), 1)  # many ties
    scores[:, 3] = 0.5  # all tied
    expected = evaluate_predictions(labels, scores, [str(i) for i in range(12)])["mAP"]
    assert fast_mean_ap(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_simplex_grid_has_the_corners():
    grid = simplex_grid(0.1)
    assert len(grid) == 66
    assert all(math.isclose(sum(w.values()), 1.0) for w in grid)
    for member in MEMBERS:
        assert corner(member) in grid
    assert len(simplex_grid(0.5)) == 6
    with pytest.raises(ValueError):
        simplex_grid(0.3)


def _member_logits(rng, n=60):
    labels = (rng.random((n, 30)) < 0.15).astype(float)
    signal = 4.0 * (labels - 0.5)
    logits = {
        "pcam": signal + rng.normal(0, 2.0, (n, 30)),
        "cait": signal + rng.normal(0, 2.5, (n, 30)),
        "swin": rng.normal(0, 1.0, (n, 30)),  # useless
    }
    projections = ["frontal" if i % 3 else "lateral" for i in range(n)]
    current = {"frontal": {"pcam": 0.4, "cait": 0.2, "swin": 0.4}, "lateral": {"pcam": 0.45, "cait": 0.1, "swin": 0.45}}
    data = MemberLogits([str(i) for i in range(n)], labels, projections, logits, np.zeros((n, 30)), 0.5, current)
    data.served_probabilities = probabilities_with(data, current)
    return data


@pytest.mark.parametrize("limit", [20_000, 10])  # exhaustive, then coordinate ascent
def test_search_never_below_single_members_or_current(limit):
    data = _member_logits(np.random.default_rng(1))
    result = search_weights(data, grid=0.1, exhaustive_limit=limit)
    assert result.method == ("exhaustive" if limit > 1000 else "coordinate ascent")
    assert result.mAP_after >= result.best_single_member_mAP - 1e-12
    assert result.mAP_after >= result.mAP_before - 1e-12
    assert result.changed
    for projection in ("frontal", "lateral"):
        assert result.weights[projection]["swin"] <= 0.2
    assert result.best_single_member == "pcam"


def test_search_refuses_logits_that_do_not_reproduce_the_served_probabilities():
    data = _member_logits(np.random.default_rng(3))
    data.served_probabilities = data.served_probabilities + 0.01
    with pytest.raises(RuntimeError, match="do not reproduce"):
        search_weights(data)


def test_search_keeps_current_weights_when_nothing_is_better():
    data = _member_logits(np.random.default_rng(2))
    for member in MEMBERS:  # identical members: every weighting is the same
        data.logits[member] = data.logits["pcam"].copy()
    data.served_probabilities = probabilities_with(data, data.current)
    result = search_weights(data, grid=0.5)
    assert not result.changed
    assert result.weights == {p: pytest.approx(w) for p, w in data.current.items()}


# --------------------------------------------------------------- zero-shot


def test_reports_mention_positives_only_and_never_held_out_classes():
    rng = np.random.default_rng(0)
    held = ("cardiomegaly", "Nodule")
    for _ in range(200):
        labels = (rng.random(30) < 0.2).astype(float)
        labels[NORMAL_INDEX] = 0
        report = synthesize_report(labels, TASK1_LABELS, rng, held)
        for label, value in zip(TASK1_LABELS, labels):
            mentioned = label.lower() in report
            if label in held:
                assert not mentioned
            elif value and label != "Normal" and not any(label.lower() in other.lower() and other != label
                                                         for other in TASK1_LABELS):
                assert mentioned
    normal = np.zeros(30)
    normal[NORMAL_INDEX] = 1
    assert synthesize_report(normal, TASK1_LABELS, rng) in NORMAL_SENTENCES
    only_held = np.zeros(30)
    only_held[TASK1_LABELS.index("Nodule")] = 1
    assert synthesize_report(only_held, TASK1_LABELS, rng, held) == NEUTRAL_SENTENCE


def test_report_sentences_are_shuffled():
    labels = np.zeros(30)
    labels[[2, 3, 8, 20]] = 1
    orders = {synthesize_report(labels, TASK1_LABELS, np.random.default_rng(s)) for s in range(30)}
    assert len(orders) > 5


def test_prompts_come_from_the_report_templates():
    assert class_prompts("cardiomegaly") == [t.format(finding="cardiomegaly") for t in FINDING_TEMPLATES]
    assert class_prompts("Normal") == list(NORMAL_SENTENCES)


def test_proxy_groups_are_deterministic_and_disjoint(tmp_path):
    from training.synth import write_synthetic_dataset
    from training.job import load_split

    csv_path = write_synthetic_dataset(tmp_path, 300, seed=3, image_size=32)
    data = load_split(csv_path)
    groups = proxy_groups(data)
    assert groups == proxy_groups(load_split(csv_path))
    flat = list(itertools.chain(*groups))
    assert len(groups) == 3 and len(flat) == len(set(flat)) and "Normal" not in flat
    val = data.table.labels[data.val]
    assert all(val[:, TASK1_LABELS.index(c)].sum() > 0 for c in flat)
    assert parse_groups("cardiomegaly, Nodule;Mass") == [["cardiomegaly", "Nodule"], ["Mass"]]
    with pytest.raises(ValueError):
        parse_groups("not a class")


# ------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("command", ["synth-data", "train", "evaluate", "tune-weights", "zeroshot-proxy"])
def test_commands_are_registered(command, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_evaluate_needs_a_source(tmp_path):
    from cxrlt.cli.main import main

    assert main(["evaluate", "--data", str(tmp_path / "x.csv")]) == 1


def test_precision_choice():
    from training.job import TrainingError, autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(TrainingError):
        autocast_dtype(cpu, "fp16")


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    from training.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("small"), 80, seed=5, image_size=32)


def test_job_registry_picks_the_job_by_task(small_csv):
    from training.clip_job import ClipJob
    from training.job import TrainingError, load_split
    from training.jobs import create_job, job_kinds
    from training.network_job import NetworkJob

    assert job_kinds() == ("clip", "multilabel", "projection")
    data = load_split(small_csv)
    router = load_recipe("router")
    assert type(create_job(router, data)) is NetworkJob
    assert type(create_job(load_recipe("frontal_swin"), data)) is NetworkJob
    assert type(create_job(load_recipe("clip_dual_branch"), data)) is ClipJob
    with pytest.raises(TrainingError, match="no training job for task 'segmentation'; known: clip, multilabel, projection"):
        create_job(dataclasses.replace(router, task="segmentation"), data)


@pytest.mark.slow  # builds a repository or trains: tens of seconds on 2 cores
def test_bf16_autocast_training_step_runs_on_cpu(small_csv, tmp_path):
    """The mixed-precision path (as on a GPU) with torch's CPU bf16 autocast."""
    from training.loop import train

    recipe = load_recipe("frontal_swin", assignments=["precision=bf16", "batch_size=16", "cache_images=false"])
    result = train(recipe, small_csv, tmp_path, epochs=1, progress=False, log=lambda line: None)
    row = result.final
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"]) and np.isfinite(row["val_mAP"])
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state["ema_state_dict"].values() if t.is_floating_point())


def test_resume_without_checkpoint_starts_fresh_and_wrong_model_is_refused(small_csv, tmp_path):
    from training.job import TrainingError
    from training.loop import train

    lines = []
    recipe = load_recipe("router", assignments=["batch_size=32"])
    result = train(recipe, small_csv, tmp_path, epochs=1, resume=True, progress=False, log=lines.append)
    assert result.epoch == 1 and any("starting from scratch" in line for line in lines)
    again = train(recipe, small_csv, tmp_path, epochs=1, resume=True, progress=False, log=lines.append)
    assert again.epoch == 1 and "nothing to do" in lines[-1]
    (tmp_path / "ensemble_frontal_swin.pt").write_bytes((tmp_path / "projection_router.pt").read_bytes())
    with pytest.raises(TrainingError, match="was trained for projection_router"):
        train(load_recipe("frontal_swin"), small_csv, tmp_path, epochs=1, resume=True, progress=False, log=lines.append)


# ------------------------------------------------------------ pretrained initialisation


def _imagenet_like_file(spec, path):
    """What a user downloads: the timm variant's weights with a 1000-class classifier."""
    import timm

    kwargs = dict(spec.kwargs)
    if spec.arch.startswith("convnextv2_"):
        kwargs = dict(kwargs["backbone"])
    elif spec.arch == "swinv2":
        kwargs["img_size"] = 64
        kwargs.pop("absolute_pos_embed", None)  # ours, not timm's
    source = timm.create_model(kwargs.pop("variant"), num_classes=1000, **kwargs)
    torch.save(source.state_dict(), path)
    return source.state_dict()


@pytest.mark.parametrize("model", ["ensemble_frontal_swin", "ensemble_frontal_pcam", "projection_router"])
def test_pretrained_file_initialises_everything_but_the_classifier(model, tmp_path):
    from cxrlt.contract.profiles import get_profile
    from networks.factory import create_model

    spec = get_profile("tiny").network_specs()[model]
    source = _imagenet_like_file(spec, tmp_path / "imagenet.pth")
    classes = 2 if model == "projection_router" else 30
    network = create_model(spec, classes, 64, pretrained_file=tmp_path / "imagenet.pth")
    timm_part = network.backbone if spec.arch.startswith("convnextv2_") else network
    loaded = timm_part.state_dict()
    kept = [k for k, v in loaded.items() if k in source and source[k].shape == v.shape]
    assert all(torch.equal(loaded[k], source[k]) for k in kept)
    not_loaded = set(loaded) - set(kept) - {"absolute_pos_embed"}  # the tiny SwinV2's own addition
    assert len(not_loaded) <= 2 and all(loaded[k].shape[0] == classes for k in not_loaded)  # only our classifier


def test_pretrained_file_errors_name_the_problem(tmp_path):
    from cxrlt.contract.profiles import get_profile
    from networks.factory import create_model

    specs = get_profile("tiny").network_specs()
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model(specs["ensemble_frontal_swin"], 30, 64, pretrained_file=tmp_path / "missing.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="pcam_checkpoint"):
        create_model(specs["ensemble_frontal_cait"], 30, 64, pretrained_file=tmp_path / "w.pth")


def test_training_starts_from_init_weights(small_csv, tmp_path):
    """With lr 0 the trained weights stay the initial ones: they must be the file's."""
    from cxrlt.contract.profiles import get_profile
    from training.job import TrainingError
    from training.loop import train

    spec = get_profile("tiny").network_specs()["ensemble_frontal_swin"]
    source = _imagenet_like_file(spec, tmp_path / "imagenet.pth")
    recipe = load_recipe("frontal_swin", assignments=[f"init_weights={tmp_path / 'imagenet.pth'}", "optimizer.lr=0",
                                                      "optimizer.weight_decay=0", "cache_images=false"])
    lines = []
    result = train(recipe, small_csv, tmp_path / "out", epochs=1, progress=False, log=lines.append)
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert payload["info"]["init_weights_sha256"] and any("pretrained weights" in line for line in lines)
    trained = payload["state_dict"]
    assert torch.equal(trained["layers.0.blocks.0.attn.qkv.weight"], source["layers.0.blocks.0.attn.qkv.weight"])
    assert trained["head.fc.weight"].shape[0] == 30
    missing = load_recipe("frontal_swin", assignments=[f"init_weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(TrainingError, match="init_weights .* not found"):
        train(missing, small_csv, tmp_path / "out2", epochs=1, progress=False, log=lines.append)


def test_clip_training_starts_from_an_open_clip_state_dict(small_csv, tmp_path):
    from networks.clip import create_clip

    recipe = load_recipe("clip_dual_branch", assignments=["optimizer.lr=0", "optimizer.weight_decay=0", "cache_images=false"])
    torch.manual_seed(123)
    start = create_clip(recipe.profile_spec.clip.model_name).state_dict()
    torch.save(start, tmp_path / "chexzero_like.pt")
    from training.loop import train

    recipe = load_recipe("clip_dual_branch", assignments=[f"init_weights={tmp_path / 'chexzero_like.pt'}", "optimizer.lr=0",
                                                          "optimizer.weight_decay=0", "cache_images=false"])
    result = train(recipe, small_csv, tmp_path / "out", epochs=1, progress=False, log=lambda line: None)
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    trained = payload["state_dict"]
    key = next(k for k in start if k.endswith("proj") or "conv1.weight" in k)
    served = {k.split("clip.", 1)[-1]: v for k, v in trained.items()}
    assert torch.equal(served[key], start[key]), key


def test_accumulate_steps_must_be_a_positive_integer():
    assert load_recipe("router").accumulate_steps == 1
    assert load_recipe("router", assignments=["accumulate_steps=4"]).accumulate_steps == 4
    with pytest.raises(RecipeError, match="accumulate_steps"):
        load_recipe("router", assignments=["accumulate_steps=0"])
