"""Training end to end on the synthetic data set (tiny profile, CPU), trained once per module:

synth-data -> train every recipe -> build-repo --checkpoints (with operating points and
calibration chosen on the validation split, and the out-of-distribution gate fitted on the
training split) -> a real tritonserver -> evaluate (server vs PyTorch) -> tune-weights ->
zero-shot proxy; the gate against non-chest images; plus resume.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlt.cli.main import main
from cxrlt.contract.ensemble import MEMBERS, parse_weights
from cxrlt.contract.labels import PROJECTIONS, TASK1_LABELS
from cxrlt.contract.profiles import PROFILES
from cxrlt.server.launcher import TritonServer, free_port
from cxrlt.contract.manifest import read_manifest
from cxrlt.contract.model_config import config_parameters
from networks.checkpoints import checkpoint_path, read_state_dict
from training.recipes import list_recipes
from tests.serve_process import stop_later

N_IMAGES = 600
# Epochs of the shared run. Recipes not listed run their YAML's epochs; the router and CLIP
# run shorter here to keep the module within its time budget.
EPOCHS = {"router": 2, "clip_dual_branch": 2}
SERVED_ORDER = ("router", "frontal_pcam", "lateral_pcam", "frontal_cait", "lateral_cait",
                "frontal_swin", "lateral_swin", "clip_dual_branch")
# The module's training (`cxrlt train`, `cxrlt zeroshot-proxy`) runs with one torch thread, in two
# chains of about equal work side by side (the `runs` fixture; one in a process of its own): these
# networks are too small for a second thread to halve a step, and two runs of two threads each on
# 2 cores would fight over them.
TRAIN_THREADS = 1
ABLATIONS = ("convnextv2_csra", "convnextv2_mlp")

# Trains every recipe on synthetic data and serves the result: minutes on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def cli(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, f"cxrlt {' '.join(map(str, args))} failed"


def history(out: Path, model: str) -> list[dict[str, str]]:
    with open(out / f"{model}.metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def final(out: Path, model: str) -> dict[str, float]:
    return {k: float(v) for k, v in history(out, model)[-1].items() if v not in ("", None)}


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    cli("synth-data", "--out", out, "--n", N_IMAGES, "--seed", 0, "--image-size", 64)
    return out / "labels.csv"


def train_args(recipes: str | tuple[str, ...], data: Path, out: Path, *extra) -> list[str]:
    """`cxrlt train` of recipes as the shared run trains them: their epochs (EPOCHS, the same for
    each), one torch thread."""
    recipes = (recipes,) if isinstance(recipes, str) else recipes
    (epochs,) = {EPOCHS.get(recipe) for recipe in recipes}
    return ["train", "--config", *recipes, "--data", data, "--out", out, "--no-progress", "--threads", TRAIN_THREADS,
            *(["--epochs", epochs] if epochs else []), *extra]


def side_by_side(elsewhere: list[list], here: list[list]) -> None:
    """Two chains of cxrlt commands, each run in turn: `elsewhere`'s as processes of their own,
    `here`'s meanwhile in this process (as `cli`). A failure names the command and its output."""
    failures: list[str] = []
    running: list[subprocess.Popen] = []
    stop = threading.Event()

    def chain() -> None:
        for args in elsewhere:
            if stop.is_set():
                return
            command = [sys.executable, "-m", "cxrlt", *(str(a) for a in args)]
            running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=dict(os.environ, COLUMNS="200")))
            output = running[-1].communicate()[0]
            if running[-1].returncode != 0:
                failures.append(f"cxrlt {' '.join(map(str, args))} exited {running[-1].returncode}:\n{output[-3000:]}")
                return

    thread = threading.Thread(target=chain)
    thread.start()
    try:
        for args in here:
            cli(*args)
    except BaseException:
        stop.set()
        if running and running[-1].poll() is None:
            running[-1].kill()  # this chain failed: no need to wait for the other
        raise
    finally:
        thread.join()
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def runs(synth_csv, tmp_path_factory) -> dict[str, Path]:
    """Every training run of the module, once: each served network's recipe into one checkpoint
    folder, one epoch of each head ablation, and the zero-shot proxy (one epoch per group)."""
    root = tmp_path_factory.mktemp("runs")
    out = {"checkpoints": root / "checkpoints", "ablations": root / "ablations", "zeroshot_proxy": root / "zeroshot_proxy"}
    checkpoints, data = out["checkpoints"], synth_csv
    side_by_side(
        [train_args(("frontal_pcam", "frontal_cait", "frontal_swin"), data, checkpoints)],
        [train_args(("router", "clip_dual_branch"), data, checkpoints),
         train_args(("lateral_pcam", "lateral_cait", "lateral_swin"), data, checkpoints),
         train_args(ABLATIONS, data, out["ablations"], "--epochs", 1),
         ["zeroshot-proxy", "--data", data, "--epochs", 1, "--out", out["zeroshot_proxy"], "--no-progress",
          "--set", f"threads={TRAIN_THREADS}"]],
    )
    return out


@pytest.fixture(scope="module")
def trained(runs) -> Path:
    """Every served network's recipe, trained once into one checkpoint folder."""
    return runs["checkpoints"]


@pytest.fixture(scope="module")
def repo(trained, synth_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo") / "tiny"
    cli("build-repo", "--profile", "tiny", "--checkpoints", trained, "--out", out, "--operating-points-data", synth_csv,
        "--reference-images", synth_csv)  # the out-of-distribution gate, fitted on the training split
    return out


def served_checkpoints() -> list[str]:
    return list(PROFILES["tiny"].network_specs()) + ["clip"]


# ------------------------------------------------------------------- training


def test_every_served_network_has_a_checkpoint_named_after_it(trained):
    for name in served_checkpoints():
        payload = torch.load(checkpoint_path(trained, name), map_location="cpu", weights_only=True)
        assert {"state_dict", "ema_state_dict", "optimizer", "scheduler", "epoch", "history"} <= set(payload)
        # what build-repo loads is the EMA
        loaded = read_state_dict(checkpoint_path(trained, name))
        for key, tensor in payload["ema_state_dict"].items():
            assert torch.equal(loaded[key], tensor)
        assert (trained / f"{name}.metrics.csv").is_file()


# A class with fewer training positives than this in a member's projection cannot be learned
# from this data set (the 600 images give the lateral members one sternotomy to learn from).
LEARNABLE_POSITIVES = 5


def per_class_validation(checkpoints: Path, data_csv: Path, recipe_name: str) -> dict[str, dict]:
    """{label: {"AP", "train_positives"}} of a trained member on its validation images, through
    the trainer's own validation (EMA weights as served, the recipe's TTA)."""
    from training.metrics import evaluate_predictions
    from training.recipes import load_recipe
    from training.job import load_split
    from training.jobs import create_job

    recipe = load_recipe(recipe_name)
    data = load_split(data_csv, recipe.val_fraction, recipe.split_seed)
    job = create_job(recipe, data)
    job.module.load_state_dict(read_state_dict(checkpoint_path(checkpoints, recipe.model)))
    logits, labels, _ = job.predict(job.module, torch.device("cpu"), None)
    train_positives = data.select(recipe.projection, "train").columns(TASK1_LABELS).sum(axis=0)
    metrics = evaluate_predictions(labels, 1.0 / (1.0 + np.exp(-logits)), TASK1_LABELS)
    return {label: {"AP": row["AP"], "train_positives": int(train_positives[TASK1_LABELS.index(label)])}
            for label, row in metrics["per_class"].items() if row["evaluable"]}


def package_set() -> str:
    """The packages and the CPU a training figure depends on, for a failure message."""
    from importlib import metadata

    names = ("torch", "timm", "numpy", "pillow", "scikit-image", "scikit-learn", "open_clip_torch")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    packages = ", ".join(f"{n} {metadata.version(n)}" for n in names)
    return f"{packages}; {cpu}, torch kernels {torch.backends.cpu.get_cpu_capability()}"


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_members_learn_every_learnable_class(trained, synth_csv, projection):
    """What the recipes guarantee on this data set, seeds fixed: each member, validated as served
    (EMA weights, the recipe's TTA), reaches AP >= 0.8 on average over the classes it had at least
    LEARNABLE_POSITIVES training images of. Measured: PCAM 0.99 / 0.97, CaiT 0.94 / 0.97,
    SwinV2 0.89 / 0.97 (frontal / lateral; trained with one torch thread, as here; 0.82 / 0.86
    with two).

    The all-class mAP is reported, not asserted: the lateral members learn from 163 images and
    are validated on 16, two of whose 9 evaluable classes had 1 and 2 training positives, and
    SwinV2 from scratch is chaotic there. Its figure follows the CPU's float kernels, not the
    packages: timm 1.0.20, 1.0.29 and 1.0.31 give bit-identical SwinV2 weights, outputs and
    gradients, while on one machine and one package set the lateral SwinV2 ends at 0.754 with
    torch's AVX-512 kernels and 0.690 capped at AVX2 (learnable classes: 0.889 and 0.860). CI
    machines differ in CPU (Intel Xeon, AMD EPYC), hence 0.83, 0.69 and 0.58 in past runs. The
    thread count splits the kernels' sums differently too: with one thread it ended at 0.813."""
    results = {m: final(trained, f"ensemble_{projection}_{m}") for m in MEMBERS}
    assert results["pcam"]["val_prevalence_mAP"] < 0.2
    for member in MEMBERS:
        per_class = per_class_validation(trained, synth_csv, f"{projection}_{member}")
        learnable = [c["AP"] for c in per_class.values() if c["train_positives"] >= LEARNABLE_POSITIVES]
        assert len(learnable) >= 6, per_class  # enough classes for the figure to mean something
        assert np.mean(learnable) >= 0.8, (member, f"learnable-class mAP {np.mean(learnable):.3f}", per_class, package_set())
        # The figure in the metrics CSV is the mean over all evaluable classes of the same validation.
        assert np.mean([c["AP"] for c in per_class.values()]) == pytest.approx(results[member]["val_mAP"], abs=1e-4)


def test_router_separates_projections(trained):
    assert final(trained, "projection_router")["val_acc"] >= 0.95


def test_cait_backbone_is_the_frozen_pcam_backbone(trained):
    for projection in PROJECTIONS:
        pcam = read_state_dict(checkpoint_path(trained, f"ensemble_{projection}_pcam"))
        cait = read_state_dict(checkpoint_path(trained, f"ensemble_{projection}_cait"))
        backbone = {k[len("backbone."):]: v for k, v in pcam.items() if k.startswith("backbone.")}
        assert backbone
        for key, tensor in backbone.items():
            assert torch.equal(cait[f"patch_embed.backbone.{key}"], tensor), key


def test_metrics_csv_has_one_row_per_epoch(trained):
    rows = history(trained, "ensemble_frontal_pcam")
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert {"train_loss", "lr", "val_loss", "val_mAP", "val_mAUC", "val_mF1", "val_mECE"} <= set(rows[0])
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


@pytest.mark.parametrize("recipe", ABLATIONS)
def test_head_ablation_recipes_run(recipe, runs):
    row = final(runs["ablations"], recipe)
    assert np.isfinite(row["val_mAP"]) and row["epoch"] == 1
    assert read_state_dict(runs["ablations"] / f"{recipe}.pt")


def test_every_recipe_file_is_exercised(trained):
    exercised = set(SERVED_ORDER) | set(ABLATIONS)
    assert set(list_recipes()) == exercised, "a recipe YAML is not run by any test"


# ------------------------------------------------------------------- resume


def test_resume_reproduces_an_uninterrupted_run(trained, synth_csv, tmp_path):
    """The shared run's router (2 epochs straight) against the same command stopped after
    epoch 1 and resumed (here, in this process: the same thread count gives the same sums)."""
    interrupted = tmp_path / "interrupted"
    cli(*train_args("router", synth_csv, interrupted, "--stop-after-epoch", 1))
    first = torch.load(interrupted / "projection_router.pt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 1
    cli(*train_args("router", synth_csv, interrupted, "--resume"))
    a = torch.load(trained / "projection_router.pt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "projection_router.pt", map_location="cpu", weights_only=True)
    assert b["epoch"] == 2 and len(b["history"]) == 2
    assert b["ema"]["updates"] == a["ema"]["updates"] == b["global_step"] > first["global_step"]
    for key in ("state_dict", "ema_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_train_one_epoch_then_resume_to_two(synth_csv, tmp_path):
    common = ["--config", "router", "--data", synth_csv, "--out", tmp_path, "--no-progress", "--threads", TRAIN_THREADS]
    cli("train", *common, "--epochs", 1)
    one = torch.load(tmp_path / "projection_router.pt", map_location="cpu", weights_only=True)
    cli("train", *common, "--epochs", 2, "--resume")
    two = torch.load(tmp_path / "projection_router.pt", map_location="cpu", weights_only=True)
    assert (one["epoch"], two["epoch"]) == (1, 2)
    steps = one["global_step"]
    assert two["global_step"] > steps
    assert two["ema"]["updates"] == two["global_step"]  # the EMA continued, not restarted
    assert two["optimizer"]["state"][0]["step"] == two["global_step"]
    assert [int(r["epoch"]) for r in two["history"]] == [1, 2]
    assert two["history"][0] == one["history"][0]


# --------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    served = tmp_path_factory.mktemp("served") / "repo"
    shutil.copytree(repo, served)
    triton = TritonServer(served, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log")
    triton.start(timeout=300)
    yield triton
    stop_later(triton.stop)


def test_repository_serves_the_trained_checkpoints(repo, trained):
    manifest = read_manifest(repo)
    assert manifest["random_weights"] is False
    for name, entry in manifest["models"].items():
        expected = "clip" if name == "clip_image_encoder" else name
        assert Path(entry["checkpoint"]) == checkpoint_path(trained, expected)


def test_repository_carries_operating_points_and_calibration(repo):
    """build-repo --operating-points-data: points on the validation split, calibration, and an
    identity that covers the file (what the pipeline configs serve)."""
    from cxrlt.contract.labels import TASK2_LABELS
    from cxrlt.contract.operating_points import OPERATING_POINTS_FILE, OperatingPoints, load_operating_points
    from cxrlt.contract.releases import files_of
    from cxrlt.contract.served import PIPELINE_MODELS
    from exporters.releases import repository_identity, weight_bound_files
    from networks.checkpoints import file_sha256

    points = load_operating_points(files_of(repo))
    assert points is not None and str(points.policy) == "youden" and points.calibrated
    assert points.source["split"] == "val" and points.source["bootstrap"]["resampled"] == "patient"
    assert {"frontal", "lateral"} & set(points.points["Normal"])  # a common finding gets projection points
    assert set(TASK2_LABELS) & set(points.points)  # the synthetic CSV has the zero-shot columns
    mece = points.source["mECE"]
    assert mece["calibrated"] <= mece["uncalibrated"]
    manifest = read_manifest(repo)
    identity = manifest["repository_sha256"]
    assert identity != repository_identity(manifest)  # the points changed it...
    # ...and it covers them, with the repository's other weight-bound files (the gate, ...)
    files = weight_bound_files(files_of(repo))
    assert files[OPERATING_POINTS_FILE] == file_sha256(files_of(repo) / OPERATING_POINTS_FILE)
    assert identity == repository_identity(manifest, files)
    assert identity != repository_identity(manifest, {k: v for k, v in files.items() if k != OPERATING_POINTS_FILE})
    assert manifest["operating_points"]["sha256"] == file_sha256(files_of(repo) / OPERATING_POINTS_FILE)
    for model in PIPELINE_MODELS:
        params = config_parameters(repo / model / "config.pbtxt")
        assert params["repository_sha256"] == identity
        assert OperatingPoints.from_json(params["operating_points"]).policy == points.policy
    assert config_parameters(repo / "cxr_classifier" / "config.pbtxt")["calibrated"] == "true"


def test_served_map_equals_pytorch_map(server, repo, trained, synth_csv, tmp_path):
    cli("evaluate", "--data", synth_csv, "--url", server.endpoints.grpc, "--repo", repo, "--out", tmp_path / "served")
    cli("evaluate", "--data", synth_csv, "--checkpoints", trained, "--profile", "tiny", "--out", tmp_path / "torch")
    served = json.loads((tmp_path / "served" / "metrics.json").read_text())
    direct = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert served["images"] == direct["images"] > 0
    assert abs(served["mAP"] - direct["mAP"]) <= 1e-4
    for metric in ("mAUC", "mF1", "mECE"):
        assert served[metric] == pytest.approx(direct[metric], abs=1e-4)
    for label in TASK1_LABELS:
        a, b = served["per_class"][label]["AP"], direct["per_class"][label]["AP"]
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-4, label
    assert served["projection_accuracy"] >= 0.95
    assert served["mAP"] > 0.5  # the served ensemble, far above prevalence
    assert set(served["groups"]) == {"head", "medium", "tail"}
    assert (tmp_path / "served" / "per_class.csv").is_file()
    # the repository's operating points and calibration, measured on the served validation predictions
    decisions = served["operating_points"]
    assert decisions["stale"] is False and decisions["calibrated"] is True
    assert decisions["mECE_uncalibrated"] == pytest.approx(served["mECE"], abs=1e-9)
    assert decisions["mECE_calibrated"] <= decisions["mECE_uncalibrated"] + 1e-6
    with open(tmp_path / "served" / "predictions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:2] == ["ImageID", TASK1_LABELS[0]] and len(rows) == served["images"] + 1


def test_tune_weights_changes_served_weights_and_beats_single_members(repo, synth_csv, tmp_path):
    tuned = tmp_path / "repo"
    shutil.copytree(repo, tuned)
    config = tuned / "cxr_classifier" / "config.pbtxt"
    before = config_parameters(config)
    cli("tune-weights", "--repo", tuned, "--data", synth_csv, "--grid", 0.1)
    after = config_parameters(config)
    report = json.loads((tuned / "weight_search.json").read_text())
    assert report["changed"] is True
    assert any(before[f"weights_{p}"] != after[f"weights_{p}"] for p in PROJECTIONS)
    for projection in PROJECTIONS:
        weights = parse_weights(after[f"weights_{projection}"])
        assert weights == pytest.approx(report["weights"][projection])
    assert report["mAP_after"] >= report["best_single_member_mAP"] - 1e-12
    assert report["mAP_after"] >= report["mAP_before"] - 1e-12
    assert report["best_single_member_mAP"] == max(report["single_member_mAP"].values())
    # the repository now serves what the search measured (same pipeline, same ONNX files)
    cli("evaluate", "--data", synth_csv, "--repo", tuned, "--engine", "onnxruntime", "--out", tmp_path / "eval")
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert measured["mAP"] == pytest.approx(report["mAP_after"], abs=1e-6)
    assert measured["operating_points"]["stale"] is True  # chosen for the weights tune-weights replaced
    assert read_manifest(tuned)["classifier"]["weights_frontal"] == after["weights_frontal"]


# --------------------------------------------------------------- zero-shot


def test_zeroshot_proxy_reports_three_groups(runs):
    report = json.loads((runs["zeroshot_proxy"] / "zeroshot_proxy.json").read_text())
    groups = report["groups"]
    assert len(groups) == 3
    held = [c for g in groups for c in g["classes"]]
    assert len(held) == len(set(held)) == 9 and "Normal" not in held
    for group in groups:
        assert len(group["classes"]) == 3
        assert 0.0 <= group["zeroshot_mAP"] <= 1.0 and 0.0 < group["chance_mAP"] < 1.0
        assert all(n > 0 for n in group["val_positives"].values())
        state = torch.load(group["checkpoint"], map_location="cpu", weights_only=True)
        assert state["recipe"]["clip"]["holdout"] == group["classes"]
        assert state["extra_state_dict"]["weight"].shape[0] == len(TASK1_LABELS) - 3  # the head: seen only


def test_fine_tuned_clip_is_served(repo, trained):
    manifest = read_manifest(repo)
    assert manifest["models"]["clip_image_encoder"]["checkpoint"] == str(checkpoint_path(trained, "clip"))
    rows = history(trained, "clip")
    assert {"train_contrastive", "train_asl", "val_mAP", "val_zs_seen_mAP"} <= set(rows[-1])


def test_gate_keeps_validation_images_and_scores_non_chest_images_far_out(repo, synth_csv):
    """The gate fitted by build-repo --reference-images on the training split (docs/gate.md): the
    validation images (seen by neither the networks nor the gate) are refused at most 1 % of the time,
    and every set of real non-chest images (scikit-image photographs, pydicom-data's CT, MR, US, NM
    and extremity frames) and of noise and gradients is told apart with AUROC >= 0.98."""
    from cxrlt.contract.ood_gate import GATE_FILE, load_gate
    from evaluation.ood_sets import measure_gate, reference_images
    from cxrlt.contract.releases import files_of
    from cxrlt.contract.served import PIPELINE_MODELS
    from exporters.releases import repository_identity, weight_bound_files

    gate = load_gate(files_of(repo))
    assert gate is not None and gate.meta["reference_images"] == str(synth_csv)
    measured = measure_gate(repo, reference_images(synth_csv, split="val"), real_chest=False)
    assert measured["in_distribution"]["count"] >= 50 and measured["in_distribution"]["refused"] <= 0.01
    for name, figures in measured["sets"].items():
        assert figures["count"] >= 1 and figures["auroc"] >= 0.98, (name, figures)
    assert measured["sets"]["photographs (scikit-image)"]["count"] >= 15
    manifest = read_manifest(repo)
    assert GATE_FILE in weight_bound_files(files_of(repo))
    assert manifest["repository_sha256"] == repository_identity(manifest, weight_bound_files(files_of(repo)))
    assert manifest["ood_gate"]["threshold"] == gate.threshold
    for model in PIPELINE_MODELS:
        params = config_parameters(repo / model / "config.pbtxt")
        assert params["ood_action"] == "refuse" and float(params["ood_threshold"]) == gate.threshold


def test_server_refuses_a_photograph_and_answers_a_chest_image(server, synth_csv):
    """Through the real server: a photograph gets INVALID_ARGUMENT "not a chest radiograph", a
    validation image an answer with its OOD score under the threshold."""
    from cxrlt.client.sdk import CxrltClient, ServerRejected
    from evaluation.ood_sets import photographs, reference_images

    with CxrltClient(server.endpoints.grpc, model="cxr_findings") as client:
        result = client.classify(reference_images(synth_csv, split="val")[0])
        assert result.out_of_distribution is False and result.ood_score <= result.ood_threshold
        with pytest.raises(ServerRejected, match=r"not a chest radiograph \(out-of-distribution score [0-9.]+ > [0-9.]+\)"):
            client.classify(photographs(("camera",))["camera"])


def test_served_decisions_equal_the_reference_at_the_same_operating_points(server, repo, synth_csv):
    """cxr_findings' DECISIONS (through the SDK) are the in-process reference pipeline's probabilities
    (ONNX, the repository's settings) called at the repository's operating points, projection by
    projection; only a probability within 1e-5 of its threshold may fall either way."""
    from cxrlt.client.sdk import CxrltClient
    from cxrlt.contract.labels import ALL_LABELS
    from cxrlt.contract.operating_points import load_operating_points
    from evaluation.ood_sets import reference_images
    from cxrlt.contract.releases import files_of
    from evaluation.reference import ReferencePipeline

    points = load_operating_points(files_of(repo))
    reference = ReferencePipeline(repo, engine="onnxruntime", threads=1)
    images = reference_images(synth_csv, split="val")[:12]
    decided = 0
    with CxrltClient(server.endpoints.grpc, model="cxr_findings") as client:
        for image in images:
            served = client.classify(image)
            probabilities, task1 = reference.findings(image)
            assert served.projection == task1.projection
            expected = points.decide(probabilities[None], ALL_LABELS, [task1.projection])[0]
            thresholds = points.thresholds(ALL_LABELS, [task1.projection])[0]
            for label, want, p, t in zip(ALL_LABELS, expected, probabilities, thresholds):
                if want == -1:
                    assert label not in served.decisions
                    continue
                decided += 1
                if abs(p - t) > 1e-5:
                    assert served.decisions[label].positive == bool(want), (label, p, t)
                assert served.decisions[label].threshold == pytest.approx(t)
    assert decided >= len(images) * 20  # most findings have a point on this data
