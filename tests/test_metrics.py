"""Metrics on perfect / random predictions, excluded classes, and ECE by hand."""

import math

import numpy as np
import pytest

from training.metrics import evaluate_predictions, expected_calibration_error, frequency_groups

LABELS = ("a", "b", "c")


def test_perfect_predictions():
    rng = np.random.default_rng(0)
    y = (rng.random((50, 3)) < 0.3).astype(int)
    y[0] = 1
    y[1] = 0
    result = evaluate_predictions(y, y.astype(float), LABELS)
    assert result["mAP"] == pytest.approx(1.0)
    assert result["mAUC"] == pytest.approx(1.0)
    assert result["mF1"] == pytest.approx(1.0)
    assert result["mECE"] == pytest.approx(0.0)
    assert result["excluded"] == [] and result["n_evaluable"] == 3


def test_random_predictions_auc_near_half():
    rng = np.random.default_rng(1)
    y = (rng.random((4000, 3)) < 0.2).astype(int)
    result = evaluate_predictions(y, rng.random((4000, 3)), LABELS)
    assert result["mAUC"] == pytest.approx(0.5, abs=0.03)
    assert result["mAP"] == pytest.approx(0.2, abs=0.03)  # AP of noise = prevalence


def test_class_without_positives_is_excluded_not_crashing():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    p = np.array([[0.9, 0.1, 0.8], [0.2, 0.3, 0.7], [0.7, 0.2, 0.9], [0.1, 0.4, 0.6]])
    result = evaluate_predictions(y, p, LABELS)
    assert result["excluded"] == ["b", "c"]  # b: no positives, c: no negatives
    assert all(math.isnan(result["per_class"]["b"][m]) for m in ("AP", "AUC", "F1", "ECE"))
    assert result["mAP"] == pytest.approx(1.0)  # only class a counts
    none = evaluate_predictions(np.zeros((3, 3)), np.full((3, 3), 0.5), LABELS)
    assert math.isnan(none["mAP"]) and none["n_evaluable"] == 0


def test_ece_by_hand():
    y = [1, 0, 1, 0]
    p = [0.9, 0.9, 0.1, 0.3]
    # 15 bins: 0.9 -> bin 13 (acc 0.5, conf 0.9, 2 of 4), 0.1 -> bin 1 (acc 1, conf 0.1),
    # 0.3 -> bin 4 (acc 0, conf 0.3)
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.1) + 1 / 4 * abs(0 - 0.3)
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_f1_at_threshold():
    y = np.array([[1], [1], [0], [0]])
    p = np.array([[0.6], [0.4], [0.7], [0.1]])  # TP 1, FN 1, FP 1 -> F1 = 0.5
    assert evaluate_predictions(y, p, ("a",))["mF1"] == pytest.approx(0.5)


def test_frequency_groups_and_group_macros():
    labels = tuple("abcdef")
    groups = frequency_groups([600, 5, 300, 50, 1, 100], labels)
    assert groups == {"a": "head", "c": "head", "f": "medium", "d": "medium", "b": "tail", "e": "tail"}
    rng = np.random.default_rng(2)
    y = (rng.random((40, 6)) < 0.5).astype(int)
    result = evaluate_predictions(y, y * 0.8 + 0.1, labels, train_counts=[600, 5, 300, 50, 1, 100])
    assert result["groups"]["tail"]["classes"] == ["b", "e"]
    assert result["groups"]["head"]["mAP"] == pytest.approx(1.0)
    assert result["per_class"]["a"]["group"] == "head"


def test_shape_mismatch_names_the_problem():
    with pytest.raises(ValueError, match="3 labels"):
        evaluate_predictions(np.zeros((2, 2)), np.zeros((2, 2)), LABELS)
