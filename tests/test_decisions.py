"""Operating points, decisions and study aggregation (cxrlt.contract), and the node's study book."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from cxrlt.contract.operating_points import (Calibration, OperatingPoint, OperatingPoints, load_operating_points,
                                             parse_policy)
from cxrlt.contract.results import Decision, FindingsResult
from cxrlt.contract.study import aggregate_study, decisions_at, group_by_study


def _point(threshold: float) -> OperatingPoint:
    return OperatingPoint(threshold, 0.8, 0.7, (0.7, 0.9), (0.6, 0.8), 10, 20)


def _result(sop: str, projection: str, normal: float, study: str | None = "1.2.3", **extra) -> FindingsResult:
    return FindingsResult(sop, {"Normal": normal, "cardiomegaly": 1 - normal}, projection, 0.9, None, False, "m", "1",
                          study_instance_uid=study, sop_instance_uid=sop, **extra)


def test_policies_parse_or_say_how_to_write_them():
    assert str(parse_policy("Youden")) == "youden" and str(parse_policy("ppv=0.8")) == "ppv=0.8"
    assert parse_policy("sensitivity=0.95").target == pytest.approx(0.95)
    for bad, message in (("roc", "unknown operating-point policy"), ("sensitivity", "write sensitivity=X"),
                         ("f1=0.3", "write f1"), ("ppv=1.5", r"target must be in \(0, 1\]"), ("ppv=high", "not a number")):
        with pytest.raises(ValueError, match=message):
            parse_policy(bad)


def test_the_table_round_trips_and_a_broken_file_says_what_to_rerun(tmp_path):
    table = OperatingPoints(parse_policy("f1"), {"Normal": {"any": _point(0.3), "lateral": _point(0.6)}},
                            {"Normal": Calibration(1.5, -0.2)}, {"images": 12})
    assert OperatingPoints.from_json(table.to_json()) == table
    assert load_operating_points(tmp_path) is None  # no file: no decisions
    (tmp_path / "operating_points.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="rerun `cxrlt operating-points`"):
        load_operating_points(tmp_path)


def test_study_score_is_the_mean_of_the_frontal_and_lateral_means_called_at_the_any_point():
    table = OperatingPoints(parse_policy("youden"), {"Normal": {"any": _point(0.5), "frontal": _point(0.05)}})
    images = [_result("a", "frontal", 0.1), _result("b", "frontal", 0.3), _result("c", "lateral", 0.8)]
    study = aggregate_study(images, table)
    assert study.probabilities["Normal"] == pytest.approx(((0.1 + 0.3) / 2 + 0.8) / 2)  # 0.5, not the image mean 0.4
    assert study.decisions == {"Normal": Decision(True, 0.5, "youden", 0.8, 0.7)}  # the `any` point, not frontal's
    assert study.projections == {"frontal": 2, "lateral": 1}
    assert aggregate_study(images[:2]).probabilities["Normal"] == pytest.approx(0.2) and aggregate_study(images).decisions is None
    data = study.to_dict()
    assert data["findings"]["Normal"]["positive"] is True and "positive" not in data["findings"]["cardiomegaly"]
    assert [image["sop_instance_uid"] for image in data["images"]] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="images of 2 studies"):
        aggregate_study([*images, _result("d", "frontal", 0.5, study="9.9")])
    grouped = group_by_study([*images, _result("e", "frontal", 0.5, study=None), _result("d", "frontal", 0.5, study="9.9")])
    assert {uid: [r.image_id for r in rs] for uid, rs in grouped.items()} == {"1.2.3": ["a", "b", "c"], "9.9": ["d"]}


def test_a_result_round_trips_through_its_json_with_its_decisions():
    result = _result("a", "frontal", 0.4, decisions={"Normal": Decision(False, 0.5, "ppv=0.8", 0.6, 0.9)},
                     calibrated_probabilities={"Normal": 0.35, "cardiomegaly": 0.6}, repository_sha256="ab" * 32)
    assert FindingsResult.from_dict({**result.to_dict(), "unknown": 1}) == result
    findings = result.to_dict()["findings"]
    assert findings["Normal"] == {"probability": 0.4, "calibrated_probability": 0.35, "positive": False,
                                  "threshold": 0.5, "policy": "ppv=0.8", "sensitivity": 0.6, "specificity": 0.9}


def test_the_node_keeps_a_study_on_disk_until_it_is_quiet_and_reported(tmp_path):
    """What the node holds for a study survives a restart (a new book on the same folder), without pixels."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    from cxrlt.node.studies import StudyBook

    def header(sop: str) -> Dataset:
        dataset = Dataset()
        dataset.SOPInstanceUID, dataset.StudyInstanceUID, dataset.PixelData = sop, "1.2.3", b"\0\0"
        return dataset

    book = StudyBook(tmp_path, quiet_s=0.3)
    first, second = _result("1.1", "frontal", 0.2), _result("1.2", "lateral", 0.6)
    book.add(first, header("1.1"))
    book.add(_result("9.9", "frontal", 0.2, study=None), header("9.9"))  # no study: nothing kept
    assert book.quiet() == [] and book.count() == 1  # not quiet yet
    time.sleep(0.4)
    book.add(second, header("1.2"))  # a new image restarts the quiet period
    assert book.quiet() == []
    time.sleep(0.4)
    restarted = StudyBook(tmp_path, quiet_s=0.3)
    [name] = restarted.quiet()
    results, headers = restarted.load(name)
    assert results == [first, second] and [h.SOPInstanceUID for h in headers] == ["1.1", "1.2"]
    assert all("PixelData" not in h for h in headers)
    restarted.retry_later(name, 60)
    assert restarted.quiet() == []  # waiting for its retry
    restarted.remove(name, results)
    assert restarted.count() == 0 and isinstance(pydicom.__version__, str)


def test_decisions_at_the_points_match_numpy_thresholding():
    table = OperatingPoints(parse_policy("youden"), {"Normal": {"any": _point(0.5), "lateral": _point(0.7)}})
    probabilities = np.array([[0.6, 0.1], [0.6, 0.9]])
    decisions = table.decide(probabilities, ["Normal", "Mass"], ["frontal", "lateral"])
    assert decisions.tolist() == [[1, -1], [0, -1]]


def test_the_decisions_csv_names_each_source_and_leaves_no_decision_empty():
    import pandas as pd
    from io import StringIO

    from cxrlt.contract.labels import ALL_LABELS
    from cxrlt.io.reports import decisions_csv

    table = OperatingPoints(parse_policy("youden"), {"Normal": {"any": _point(0.5)}})
    images = [_result("1.1", "frontal", 0.7, source="a/x.dcm"), _result("1.2", "lateral", 0.2, source="b/x.dcm")]
    images = [dataclasses.replace(r, decisions=decisions_at(table, r.probabilities, r.projection)) for r in images]
    frame = pd.read_csv(StringIO(decisions_csv([*images, aggregate_study(images, table)])), dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["source", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "projection", *ALL_LABELS]
    assert frame["source"].tolist() == ["a/x.dcm", "b/x.dcm", ""] and frame["projection"].tolist() == ["frontal", "lateral", "study"]
    assert frame["Normal"].tolist() == ["1", "0", "0"]  # the study: (0.7 + 0.2) / 2 < 0.5
    assert set(frame["cardiomegaly"]) == {""}  # no operating point: no decision, not a 0
