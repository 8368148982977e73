"""cxrlt.io.reports: JSON, challenge CSV and the DICOM SR round trip."""

from __future__ import annotations

import csv
import dataclasses
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from cxrlt.io import reports
from cxrlt.io.finding_codes import PRIVATE_SCHEME, finding_codes
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.operating_points import ANY_PROJECTION, OperatingPoint, OperatingPoints, parse_policy
from cxrlt.contract.results import Decision, FindingsResult
from cxrlt.contract.study import aggregate_study
from tests.test_dicom_io import make_dicom

REPOSITORY = "ab" * 32


def make_result(image_id: str = "img-1", *, seed: int = 0, random_weights: bool = False,
                projection: str = "frontal") -> FindingsResult:
    rng = np.random.default_rng(seed)
    # Full-precision floats, plus the extremes, so rounding anywhere would show.
    values = rng.random(len(ALL_LABELS))
    values[0], values[-1] = 0.0, 1.0
    return FindingsResult(
        image_id=image_id,
        probabilities={label: float(v) for label, v in zip(ALL_LABELS, values)},
        projection=projection,
        projection_score=0.93,
        hint="PA",
        hint_used=True,
        model_name="cxr_findings",
        model_version="1",
        random_weights=random_weights,
        latency_ms=12.5,
    )


def with_decisions(result: FindingsResult, labels=ALL_LABELS, threshold: float = 0.5) -> FindingsResult:
    """The result as a repository with operating points answers it (a policy with an '=' in it on purpose)."""
    decisions = {label: Decision(result.probabilities[label] >= threshold, threshold, "sensitivity=0.9",
                                 0.9 + i / 1000, 1 / 3 + i / 1000) for i, label in enumerate(labels)}
    return dataclasses.replace(result, decisions=decisions, repository_sha256=REPOSITORY)


@pytest.fixture(scope="module")
def source_dataset() -> pydicom.Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "RG1_UNCR.dcm not found: pydicom-data is a dependency; reinstall the project"
    return pydicom.dcmread(path)


# ------------------------------------------------------------------ JSON


def test_to_json_lists_results_in_contract_order():
    results = [make_result("a", seed=1), make_result("b", seed=2, random_weights=True)]
    data = json.loads(reports.to_json(results))
    assert [item["image_id"] for item in data] == ["a", "b"]
    assert list(data[0]["probabilities"]) == list(ALL_LABELS)
    assert data[0]["probabilities"] == results[0].probabilities
    assert data[1]["random_weights"] is True and data[0]["projection"] == "frontal"


# ------------------------------------------------------------------ CSV


@pytest.mark.parametrize(
    ("task", "labels"), [("task1", TASK1_LABELS), ("task2", TASK2_LABELS), ("all", ALL_LABELS)]
)
def test_challenge_csv_header_and_rows(tmp_path, task, labels):
    results = [make_result("img-1", seed=1), make_result("img-2", seed=2)]
    path = reports.write_challenge_csv(results, tmp_path / f"{task}.csv", task=task)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ImageID", *labels]
    assert len(rows) == 3
    for row, result in zip(rows[1:], results):
        assert row[0] == result.image_id
        assert [float(cell) for cell in row[1:]] == [result.probabilities[label] for label in labels]


def test_challenge_csv_header_is_exactly_the_contract(tmp_path):
    reports.write_challenge_csv([], tmp_path / "empty.csv", task="task1")
    first_line = (tmp_path / "empty.csv").read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("ImageID,Normal,aortic elongation,cardiomegaly,pleural effusion,Nodule,")
    assert first_line.endswith(",sternotomy,calcified densities")
    assert first_line.count(",") == 30


def test_challenge_csv_rejects_unknown_task_and_missing_labels(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'task3'"):
        reports.write_challenge_csv([make_result()], tmp_path / "x.csv", task="task3")
    partial = make_result()
    partial = FindingsResult(**{**partial.__dict__, "probabilities": partial.task1()})
    with pytest.raises(ValueError, match="no probability for 'Scoliosis'"):
        reports.write_challenge_csv([partial], tmp_path / "x.csv", task="all")
    reports.write_challenge_csv([partial], tmp_path / "ok.csv", task="task1")  # task1 alone is fine


# ------------------------------------------------------------------ DICOM SR


def test_sr_round_trip(tmp_path, source_dataset):
    result = make_result(source_dataset.SOPInstanceUID, seed=3)
    path = reports.write_sr(result, source_dataset, tmp_path / "sr.dcm")

    sr = pydicom.dcmread(path)
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    # Filed in the source's study, for the same patient and accession, as a new series.
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert sr[keyword].value == source_dataset[keyword].value, keyword
    assert sr.SeriesInstanceUID != source_dataset.SeriesInstanceUID
    assert sr.Manufacturer == "cxrlt-triton"
    assert sr.SoftwareVersions == reports.SOFTWARE_VERSION
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "NOT FOR CLINICAL USE" not in sr.SeriesDescription
    # The evidence lists the source image.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source_dataset.SOPInstanceUID
    assert evidence.ReferencedSOPClassUID == source_dataset.SOPClassUID

    # The probabilities come back exactly, in contract order.
    findings = reports.read_sr_findings(path)
    assert list(findings) == list(ALL_LABELS)
    assert findings == result.probabilities

    # 36 image-level groups, each naming its finding and referencing the source image.
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert len(groups) == 36
    table = finding_codes()
    assert [(g.finding_type.scheme_designator, g.finding_type.value, g.finding_type.meaning) for g in groups] == [
        (table[label].scheme, table[label].value, table[label].meaning) for label in ALL_LABELS]
    pneumothorax = groups[ALL_LABELS.index("Pneumothorax")].finding_type
    assert (pneumothorax.scheme_designator, pneumothorax.value) == ("SCT", "36118008")
    tracking_uids = {group.tracking_uid for group in groups}
    assert len(tracking_uids) == 36
    for group in groups:
        assert [image.referenced_sop_instance_uid for image in group.source_images] == [source_dataset.SOPInstanceUID]
        (measurement,) = group.get_measurements()
        assert measurement.unit.value == "{probability}" and measurement.unit.scheme_designator == "UCUM"
        (view,) = group.get_qualitative_evaluations()  # no operating points: nothing called present or absent
        assert view.name == codes.DCM.ImageView and view.value == codes.SCT.FrontalProjection
    # The algorithm: the model's name, and (no repository identity in this result) the model version.
    assert _algorithm(pydicom.dcmread(path)) == ("cxr_findings", "1")


def _all_text(dataset: pydicom.Dataset) -> list[str]:
    texts = []
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            texts.append(item.TextValue)
        texts.extend(_all_text(item))
    return texts


def test_sr_states_random_weights_plainly(tmp_path, source_dataset):
    path = reports.write_sr(make_result(random_weights=True), source_dataset, tmp_path / "rw.dcm")
    sr = pydicom.dcmread(path)
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    assert any(text.startswith("NOT FOR CLINICAL USE: random weights") for text in _all_text(sr))

    trained = pydicom.dcmread(reports.write_sr(make_result(), source_dataset, tmp_path / "ok.dcm"))
    assert not any("NOT FOR CLINICAL USE" in text for text in _all_text(trained))
    assert any("Projection frontal" in text for text in _all_text(trained))


def test_sr_lateral_projection_and_pixelless_source(tmp_path, source_dataset):
    """A header-only source (no PixelData, no Type 2 patient fields) still gives a valid SR."""
    header = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
        setattr(header, keyword, source_dataset[keyword].value)
    result = make_result(projection="lateral")
    path = reports.write_sr(result, header, tmp_path / "lat.dcm")
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert all(group.get_qualitative_evaluations()[0].value == codes.SCT.LateralProjection for group in groups)
    assert reports.read_sr_findings(path) == result.probabilities
    assert "PixelData" in source_dataset  # the caller's dataset is left alone


def test_sr_needs_a_dicom_source():
    with pytest.raises(ValueError, match="no StudyInstanceUID"):
        reports.build_sr(make_result(), pydicom.Dataset())


def test_sr_takes_its_uids_and_notes_as_parameters(tmp_path, source_dataset):
    """Deterministic UIDs (derived from the source and the repository) and extra notes, no patching afterwards."""
    result = make_result(source_dataset.SOPInstanceUID, seed=1)
    uids = reports.derived_uids(source_dataset, "ab" * 32)
    assert uids == reports.derived_uids(source_dataset, "ab" * 32) != reports.derived_uids(source_dataset, "cd" * 32)
    first = reports.build_sr(result, source_dataset, uids=uids, notes=["Model repository abab."])
    again = reports.build_sr(result, source_dataset, uids=uids)
    assert first.SOPInstanceUID == uids.sop_instance == first.file_meta.MediaStorageSOPInstanceUID
    assert first.SeriesInstanceUID == uids.series_instance
    path = reports.save_sr(first, tmp_path / "det.dcm")
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    again_groups = hd.sr.srread(reports.save_sr(again, tmp_path / "again.dcm")).content.get_image_measurement_groups()
    assert [g.tracking_uid for g in groups] == [g.tracking_uid for g in again_groups]
    text = " ".join(str(item.TextValue) for item in _items(pydicom.dcmread(path)) if "TextValue" in item)
    assert "Model repository abab." in text and "Projection frontal" in text
    assert any(str(getattr(item, "UID", "")) == uids.device for item in _items(pydicom.dcmread(path)))
    other = reports.build_sr(result, source_dataset)  # no uids: new random ones
    assert other.SOPInstanceUID != first.SOPInstanceUID


def _items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _algorithm(dataset) -> tuple[str, str]:
    """(Algorithm Name, Algorithm Version) of the SR's first measurement group."""
    texts = {str(item.ConceptNameCodeSequence[0].CodeValue): str(item.TextValue)
             for item in _items(dataset) if item.ValueType == "TEXT"}
    return texts["111001"], texts["111003"]


def _called(group) -> list:
    """The group's present/absent evaluations: (name, value)."""
    return [(e.name, e.value) for e in group.get_qualitative_evaluations()
            if e.value in (codes.SCT.Present, codes.SCT.Absent)]


def test_sr_calls_each_finding_at_its_operating_point(tmp_path, source_dataset):
    result = with_decisions(make_result(source_dataset.SOPInstanceUID, seed=5))
    assert {d.positive for d in result.decisions.values()} == {True, False}  # both calls are exercised
    path = reports.write_sr(result, source_dataset, tmp_path / "called.dcm")
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    for label, group in zip(ALL_LABELS, groups):
        expected = codes.SCT.Present if result.decisions[label].positive else codes.SCT.Absent
        assert _called(group) == [(group.finding_type, expected)], label
        assert group.get_qualitative_evaluations()[0].value == codes.SCT.FrontalProjection
    assert codes.SCT.Present.value == "52101004"
    # Policy, threshold, sensitivity and specificity come back exactly, with the probabilities.
    assert reports.read_sr_decisions(path) == result.decisions
    assert reports.read_sr_findings(path) == result.probabilities
    sr = pydicom.dcmread(path)
    assert _algorithm(sr) == ("cxr_findings", REPOSITORY)  # the repository's identity is the version
    assert reports.NO_OPERATING_POINTS not in _all_text(sr)
    assert any("threshold=0.5" == str(item.TextValue) for item in _items(sr) if item.ValueType == "TEXT")


def test_sr_without_operating_points_calls_nothing_and_says_so(tmp_path, source_dataset):
    path = reports.write_sr(make_result(seed=6), source_dataset, tmp_path / "uncalled.dcm")
    sr = pydicom.dcmread(path)
    assert reports.NO_OPERATING_POINTS in _all_text(sr)
    assert not [item for item in _items(sr) if item.ValueType == "CODE"
                and item.ConceptCodeSequence[0].CodeValue in (codes.SCT.Present.value, codes.SCT.Absent.value)]
    assert reports.read_sr_decisions(path) == {}


def test_a_finding_without_an_operating_point_is_not_called(tmp_path, source_dataset):
    result = with_decisions(make_result(seed=7), labels=[label for label in ALL_LABELS if label != "Hernia"])
    path = reports.write_sr(result, source_dataset, tmp_path / "partial.dcm")
    groups = dict(zip(ALL_LABELS, hd.sr.srread(path).content.get_image_measurement_groups()))
    assert _called(groups["Hernia"]) == [] and len(_called(groups["Mass"])) == 1
    assert set(reports.read_sr_decisions(path)) == set(ALL_LABELS) - {"Hernia"}
    assert reports.NO_OPERATING_POINTS not in _all_text(pydicom.dcmread(path))


# ------------------------------------------------------------------ study SR


def study_sources(source_dataset, tmp_path) -> list[pydicom.Dataset]:
    """The study's frontal (the real PA radiograph) and a lateral image made in the same study."""
    lateral = make_dicom(tmp_path / "lateral.dcm", None, StudyInstanceUID=source_dataset.StudyInstanceUID,
                         PatientID=source_dataset.PatientID, PatientName=source_dataset.PatientName, ViewPosition="LL")
    return [source_dataset, pydicom.dcmread(lateral)]


def study_points(labels=ALL_LABELS) -> OperatingPoints:
    point = OperatingPoint(0.4, 0.85, 0.7, (0.8, 0.9), (0.6, 0.8), 40, 400)
    return OperatingPoints(parse_policy("youden"), {label: {ANY_PROJECTION: point} for label in labels})


def make_study(sources, points: OperatingPoints | None):
    images = [dataclasses.replace(make_result(str(source.SOPInstanceUID), seed=i, projection=projection),
                                  study_instance_uid=str(source.StudyInstanceUID), repository_sha256=REPOSITORY,
                                  sop_instance_uid=str(source.SOPInstanceUID))
              for i, (source, projection) in enumerate(zip(sources, ("frontal", "lateral")))]
    return aggregate_study(images, points)


def test_study_sr_reports_the_study_score_and_decision_for_every_image(tmp_path, source_dataset):
    sources = study_sources(source_dataset, tmp_path)
    study = make_study(sources, study_points())
    uids = reports.derived_study_uids(study.study_instance_uid, REPOSITORY)
    path = reports.save_sr(reports.build_study_sr(study, sources, uids=uids), tmp_path / "study.dcm")
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == source_dataset.StudyInstanceUID and sr.SOPInstanceUID == uids.sop_instance
    assert sr.SeriesNumber == 9902
    evidence = {str(ref.ReferencedSOPInstanceUID) for series in sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {str(source.SOPInstanceUID) for source in sources}
    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    assert len(groups) == 36
    for group in groups:
        assert {image.referenced_sop_instance_uid for image in group.source_images} == evidence
        assert all(e.name != codes.DCM.ImageView for e in group.get_qualitative_evaluations())  # no one projection
    assert reports.read_sr_findings(path) == study.probabilities != study.images[0].probabilities
    assert reports.read_sr_decisions(path) == study.decisions and len(study.decisions) == 36
    assert any(text.startswith("Study result of 2 images (1 frontal, 1 lateral)") for text in _all_text(sr))
    assert _algorithm(sr) == ("cxr_findings", REPOSITORY)


def test_study_sr_uids_are_one_per_study_and_repository(tmp_path, source_dataset):
    study_uid = str(source_dataset.StudyInstanceUID)
    uids = reports.derived_study_uids(study_uid, REPOSITORY)
    assert uids == reports.derived_study_uids(study_uid, REPOSITORY)
    assert uids.sop_instance != reports.derived_study_uids(study_uid, "cd" * 32).sop_instance
    assert uids.sop_instance != reports.derived_study_uids("1.2.3", REPOSITORY).sop_instance
    image = reports.derived_uids(source_dataset, REPOSITORY)
    assert uids.sop_instance != image.sop_instance and uids.series_instance != image.series_instance
    assert uids.device == image.device  # one observer device per repository


def test_study_sr_without_points_and_with_foreign_sources(tmp_path, source_dataset):
    sources = study_sources(source_dataset, tmp_path)
    study = make_study(sources, None)
    path = reports.save_sr(reports.build_study_sr(study, sources), tmp_path / "study.dcm")
    assert reports.read_sr_decisions(path) == {}
    assert reports.NO_OPERATING_POINTS in _all_text(pydicom.dcmread(path))
    foreign = pydicom.dcmread(make_dicom(tmp_path / "other.dcm", None))
    with pytest.raises(ValueError, match="not in study"):
        reports.build_study_sr(study, [sources[0], foreign])
    with pytest.raises(ValueError, match="needs the source images"):
        reports.build_study_sr(study, [])


def test_the_sr_names_its_release_and_a_flagged_image_says_so(tmp_path, source_dataset):
    """The answering release's identity is the algorithm version (and its UIDs' seed), its number an
    algorithm parameter; an image the gate flagged (ood_action flag) carries a FLAGGED note."""
    from cxrlt.client.sdk import Repository
    from cxrlt.client.workflow import build_report

    served = Repository("aa" * 32, False, "served repository_sha256")
    result = dataclasses.replace(make_result(source_dataset.SOPInstanceUID), release=2, repository_sha256="bb" * 32,
                                 ood_score=12.5, ood_threshold=8.0, out_of_distribution=True)
    path = tmp_path / "flagged.dcm"
    build_report(result, source_dataset, served).save_as(path)
    assert reports.read_sr_release(path) == (2, "bb" * 32)
    sr = pydicom.dcmread(path)
    assert sr.SOPInstanceUID == reports.derived_uids(source_dataset, "bb" * 32).sop_instance
    assert any(t.startswith("FLAGGED: out-of-distribution score 12.50 is above the gate's threshold 8.00") for t in _all_text(sr))
    plain = tmp_path / "plain.dcm"
    build_report(dataclasses.replace(result, out_of_distribution=False), source_dataset, served).save_as(plain)
    assert not any("FLAGGED" in t for t in _all_text(pydicom.dcmread(plain)))
