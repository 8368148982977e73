"""Operating points (evaluation.operating_points): each policy on scores with a known answer,
grouped bootstrap intervals, Platt calibration, and writing them into a repository."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.operating_points import OPERATING_POINTS_FILE, Calibration, OperatingPoints, Policy, parse_policy
from evaluation.operating_points import (MIN_PROJECTION_EXAMPLES, bootstrap_intervals, choose_operating_points,
                                         choose_threshold, decision_metrics, fit_calibration, group_indices, rates,
                                         write_operating_points)
from training.metrics import expected_calibration_error


def clusters(rng, n_pos=40, n_neg=160, overlap=0.0):
    """Positives around 0.8, negatives around 0.2 (overlapping when `overlap` > 0)."""
    y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    spread = 0.05 + overlap
    scores = np.r_[rng.normal(0.8, spread, n_pos), rng.normal(0.2, spread, n_neg)]
    return y, np.clip(scores, 0.001, 0.999)


def test_youden_and_f1_separate_two_clusters():
    y, s = clusters(np.random.default_rng(0))
    for policy in ("youden", "f1"):
        threshold = choose_threshold(y, s, parse_policy(policy))
        assert s[~y].max() < threshold <= s[y].min(), policy
        assert rates(y, s, threshold) == (1.0, 1.0)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_sensitivity_policy_reaches_its_target_with_the_highest_threshold(target):
    y, s = clusters(np.random.default_rng(1), overlap=0.2)
    threshold = choose_threshold(y, s, Policy("sensitivity", target))
    sensitivity, _ = rates(y, s, threshold)
    assert sensitivity >= target
    higher = s[s > threshold]
    assert not higher.size or rates(y, s, higher.min())[0] < target  # the next threshold up falls short


@pytest.mark.parametrize("target", [0.6, 0.8, 0.9])
def test_ppv_policy_reaches_its_target_with_the_lowest_threshold(target):
    y, s = clusters(np.random.default_rng(2), overlap=0.2)
    threshold = choose_threshold(y, s, Policy("ppv", target))
    assert y[s >= threshold].mean() >= target
    lower = s[s < threshold]
    assert not lower.size or y[s >= lower.max()].mean() < target


def test_unreachable_ppv_gives_no_point():
    y = np.array([1, 0, 1, 0, 0, 0], bool)
    s = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.6])  # the top score is a negative: PPV never reaches 1
    assert choose_threshold(y, s, Policy("ppv", 1.0)) is None
    choice = choose_operating_points(y[:, None], s[:, None], ["Normal"], ["frontal"] * 6, policy=Policy("ppv", 1.0))
    assert "Normal" not in choice.points.points and "ppv=1" in choice.missing["Normal"]


def test_grouped_bootstrap_contains_the_estimate_and_widens_with_fewer_patients():
    rng = np.random.default_rng(3)

    def interval(patients: int, images_each: int):
        y, s = clusters(rng, n_pos=patients * images_each // 4, n_neg=patients * images_each * 3 // 4, overlap=0.2)
        order = rng.permutation(len(y))
        y, s = y[order], s[order]
        groups, unit = group_indices([f"P{i % patients}" for i in range(len(y))], len(y))
        assert unit == "patient" and groups.max() + 1 == patients
        threshold = choose_threshold(y, s, Policy("youden"))
        sens, spec = rates(y, s, threshold)
        sens_ci, spec_ci = bootstrap_intervals(y[:, None], ~y[:, None], (s >= threshold)[:, None], groups, 1000, 0)
        assert sens_ci[0, 0] <= sens <= sens_ci[0, 1] and spec_ci[0, 0] <= spec <= spec_ci[0, 1]
        return sens_ci[0, 1] - sens_ci[0, 0], spec_ci[0, 1] - spec_ci[0, 0]

    many, few = interval(400, 2), interval(25, 2)
    assert few[0] > many[0] and few[1] > many[1]


def test_bootstrap_resamples_patients_not_images():
    # Two patients with 50 identical images each: resampling patients sees only 0 %, 50 % or 100 %.
    y = np.r_[np.ones(50, bool), np.ones(50, bool)]
    called = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    groups, unit = group_indices(["a"] * 50 + ["b"] * 50, 100)
    sens_ci, _ = bootstrap_intervals(y[:, None], ~y[:, None], called[:, None], groups, 500, 0)
    assert unit == "patient" and tuple(sens_ci[0]) == (0.0, 1.0)
    by_image, unit = group_indices(["", ""] * 50, 100)
    sens_ci, _ = bootstrap_intervals(y[:, None], ~y[:, None], called[:, None], by_image, 500, 0)
    assert unit == "image" and 0.35 < sens_ci[0, 0] < 0.5 < sens_ci[0, 1] < 0.65
    again, _ = bootstrap_intervals(y[:, None], ~y[:, None], called[:, None], by_image, 500, 0)
    assert np.array_equal(sens_ci, again)  # seeded


def test_platt_fit_reduces_the_ece_of_miscalibrated_scores():
    rng = np.random.default_rng(4)
    truth = rng.uniform(0.02, 0.98, 4000)
    y = rng.random(4000) < truth
    logit = np.log(truth / (1 - truth))
    overconfident = 1 / (1 + np.exp(-(3.0 * logit + 1.0)))
    fit = fit_calibration(y, overconfident)
    assert fit.slope == pytest.approx(1 / 3, abs=0.05) and fit.intercept == pytest.approx(-1 / 3, abs=0.1)
    assert expected_calibration_error(y, fit.apply(overconfident)) < 0.5 * expected_calibration_error(y, overconfident)
    assert fit_calibration(np.ones(5), np.full(5, 0.5)) is None
    separable = fit_calibration(np.r_[np.ones(10), np.zeros(10)], np.r_[np.full(10, 0.9), np.full(10, 0.1)])
    assert np.isfinite(separable.slope) and separable.slope > 0  # Platt's targets keep it finite


def synthetic_validation(n=300, seed=5):
    """Task 1 and Task 2 labels with over-confident scores, routed projections, 3 images per patient."""
    rng = np.random.default_rng(seed)
    labels = ["Normal", "cardiomegaly", "Hernia", "Scoliosis"]
    prevalence = np.array([0.4, 0.2, 0.01, 0.15])
    y = rng.random((n, 4)) < prevalence
    y[:3, 2], y[3:, 2] = True, False  # Hernia: 3 positives, no projection has 5
    logits = np.where(y, 1.0, -1.0) + rng.normal(0, 1.0, y.shape)
    probabilities = 1 / (1 + np.exp(-3 * logits))
    projections = list(rng.choice(["frontal", "lateral"], n))
    patients = [f"P{i // 3}" for i in range(n)]
    return y, probabilities, labels, projections, patients


def test_points_per_projection_only_where_the_data_supports_it():
    y, p, labels, projections, patients = synthetic_validation()
    choice = choose_operating_points(y, p, labels, projections, patients, Policy("youden"), resamples=200)
    points = choice.points
    assert set(points.points["Normal"]) == {"any", "frontal", "lateral"}
    assert set(points.points["Hernia"]) == {"any"}  # 3 positives
    assert set(points.points["Scoliosis"]) == {"any"}  # zero-shot findings: `any` only
    lateral = np.asarray(projections) == "lateral"
    point = points.points["Normal"]["lateral"]
    assert (point.positives, point.negatives) == (int(y[lateral, 0].sum()), int((~y[lateral, 0]).sum()))
    assert min(point.positives, point.negatives) >= MIN_PROJECTION_EXAMPLES
    for by_projection in points.points.values():
        for point in by_projection.values():
            assert point.sensitivity_ci[0] <= point.sensitivity <= point.sensitivity_ci[1]
            assert point.specificity_ci[0] <= point.specificity <= point.specificity_ci[1]
    assert choice.grouped_by == "patient" and choice.units == 100 and points.source["bootstrap"]["resamples"] == 200
    before, after = choice.mECE
    assert after < before and set(points.calibration) <= set(labels)
    # the table round-trips through its file format
    assert OperatingPoints.from_json(points.to_json()).points == points.points


def test_decision_metrics_apply_each_images_projection_point():
    y, p, labels, projections, patients = synthetic_validation()
    choice = choose_operating_points(y, p, labels, projections, patients, Policy("sensitivity", 0.9), resamples=50)
    measured = decision_metrics(y, p, labels, projections, choice.points)
    frontal = np.asarray(projections) == "frontal"
    point = choice.points.points["Normal"]
    called = np.where(frontal, p[:, 0] >= point["frontal"].threshold, p[:, 0] >= point["lateral"].threshold)
    assert measured["per_class"]["Normal"]["sensitivity"] == pytest.approx(called[y[:, 0]].mean())
    assert measured["per_class"]["Normal"]["sensitivity"] >= 0.9
    assert measured["mECE_calibrated"] == pytest.approx(choice.mECE[1])


def fake_repository(tmp_path):
    """A repository skeleton: a manifest, release 1's record and the three pipeline configs (parameters only)."""
    from cxrlt.contract.manifest import MANIFEST
    from cxrlt.contract.releases import write_release
    from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL
    from exporters.releases import repository_identity

    manifest = {"models": {"m": {"onnx_sha256": "0" * 64}}, "text_cache": {"prompts_sha256": "1" * 64},
                "classifier": {"tta_views": "identity"}, "zeroshot": {"temperature": "1.0"}}
    manifest["repository_sha256"] = identity = repository_identity(manifest)
    (tmp_path / MANIFEST).write_text(json.dumps({"profile": "tiny"}))
    write_release(tmp_path, 1, manifest)
    for model in (CLASSIFIER_MODEL, ZEROSHOT_MODEL, FINDINGS_MODEL):
        (tmp_path / model).mkdir(exist_ok=True)
        (tmp_path / model / "config.pbtxt").write_text(
            f'# header\nname: "{model}"\nparameters {{ key: "repository_sha256" value {{ string_value: "{identity}" }} }}\n'
            f'parameters {{ key: "release" value {{ string_value: "1" }} }}\n')
    return identity


def test_writer_updates_the_file_the_configs_and_the_identity(tmp_path):
    from cxrlt.contract.model_config import config_parameters
    from cxrlt.contract.operating_points import load_operating_points
    from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL
    from cxrlt.contract.manifest import read_manifest
    from cxrlt.contract.releases import files_of
    from exporters.releases import repository_identity
    from networks.checkpoints import file_sha256

    before = fake_repository(tmp_path)
    y, p, labels, projections, patients = synthetic_validation()
    points = choose_operating_points(y, p, labels, projections, patients, Policy("f1"), resamples=50).points
    record = write_operating_points(tmp_path, points)
    files = files_of(tmp_path)
    assert load_operating_points(files) == points
    manifest = read_manifest(tmp_path)
    identity = manifest["repository_sha256"]
    assert identity != before and identity == record["repository_sha256"]
    assert identity == repository_identity(manifest, file_sha256(files / OPERATING_POINTS_FILE))
    assert manifest["operating_points"]["sha256"] == file_sha256(files / OPERATING_POINTS_FILE)
    assert manifest["operating_points"]["policy"] == "f1"
    served = {model: config_parameters(tmp_path / model / "config.pbtxt") for model in (CLASSIFIER_MODEL, ZEROSHOT_MODEL, FINDINGS_MODEL)}
    for model, params in served.items():
        assert params["repository_sha256"] == identity
        table = OperatingPoints.from_json(params["operating_points"])
        assert table.policy == points.policy and not table.source
        served_labels = {CLASSIFIER_MODEL: TASK1_LABELS, ZEROSHOT_MODEL: TASK2_LABELS, FINDINGS_MODEL: ALL_LABELS}[model]
        assert set(table.points) == {label for label in points.points if label in served_labels}
        assert params["calibrated"] == ("true" if table.calibration else "false")
    assert set(OperatingPoints.from_json(served[ZEROSHOT_MODEL]["operating_points"]).points) == {"Scoliosis"}
    assert (tmp_path / CLASSIFIER_MODEL / "config.pbtxt").read_text().startswith("# header")
    # another choice changes the file, and the identity follows it
    write_operating_points(tmp_path, OperatingPoints(Policy("youden"), points.points, {"Normal": Calibration(1.0, 0.5)}))
    assert read_manifest(tmp_path)["repository_sha256"] not in (before, identity)


def test_cli_writes_points_into_a_built_repository_and_evaluate_reports_them(tiny_repository, tmp_path, cxrlt, capsys):
    """`cxrlt operating-points` on the tiny repository (random weights) and a synthetic CSV without
    Task 2 columns, then `cxrlt evaluate --repo` with them."""
    import shutil

    import pandas as pd

    from cxrlt.contract.manifest import read_manifest
    from cxrlt.contract.operating_points import load_operating_points
    from cxrlt.contract.releases import files_of

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    assert cxrlt("synth-data", "--out", tmp_path / "synth", "--n", 80, "--seed", 1, "--image-size", 64) == 0
    frame = pd.read_csv(tmp_path / "synth" / "labels.csv", dtype=str)
    task1_only = tmp_path / "synth" / "task1.csv"
    frame.drop(columns=list(TASK2_LABELS)).to_csv(task1_only, index=False)
    before = read_manifest(repo)["repository_sha256"]

    assert cxrlt("operating-points", "--repo", repo, "--data", task1_only, "--split", "all", "--dry-run",
                 "--resamples", 100, "--json", tmp_path / "dry.json") == 0
    assert not (files_of(repo) / OPERATING_POINTS_FILE).exists() and read_manifest(repo)["repository_sha256"] == before
    assert cxrlt("operating-points", "--repo", repo, "--data", task1_only, "--split", "all", "--policy", "sensitivity=0.8",
                 "--resamples", 100) == 0
    printed = " ".join(capsys.readouterr().err.split())  # the rich console writes to stderr, wrapped
    assert "no operating points for the zero-shot findings" in printed and "mECE over" in printed
    points = load_operating_points(files_of(repo))
    assert str(points.policy) == "sensitivity=0.8" and not set(points.points) & set(TASK2_LABELS)
    assert read_manifest(repo)["repository_sha256"] != before
    report = json.loads((tmp_path / "dry.json").read_text())
    assert report["mECE"]["calibrated"] <= report["mECE"]["uncalibrated"]

    assert cxrlt("evaluate", "--data", task1_only, "--repo", repo, "--engine", "onnxruntime", "--split", "all",
                 "--out", tmp_path / "eval") == 0
    measured = json.loads((tmp_path / "eval" / "metrics.json").read_text())["operating_points"]
    assert measured["stale"] is False and measured["policy"] == "sensitivity=0.8"
    assert measured["mECE_uncalibrated"] == pytest.approx(report["mECE"]["uncalibrated"])
    assert measured["mECE_calibrated"] <= measured["mECE_uncalibrated"]
    for label, row in measured["per_class"].items():
        assert row["sensitivity"] >= 0.8, label  # the policy's promise, on the images it was chosen on
