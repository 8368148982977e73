"""Outputs for classified images: JSON, the challenge submission CSV and DICOM SR.

The SR is a TID 1500 Measurement Report (highdicom ``ComprehensiveSR``) in the style of IHE AI
Results (AIR), placed in the source study so a PACS files it next to the radiographs: one SR per
image (:func:`build_sr`) or one per study (:func:`build_study_sr`). It holds one TID 1501
measurement group per finding (30 task-1 then 6 task-2, in contract order), each with

- the finding, coded in SNOMED CT where a concept exists (cxrlt.io.finding_codes), else privately;
- its probability: a NUM item (TID 300) in UCUM ``{probability}``;
- when the repository has operating points: a CODE qualitative evaluation, the finding Present or
  Absent (SNOMED, DICOM CID 240) at the operating point, and the point itself (policy, threshold,
  and the sensitivity and specificity it achieved on validation data) as TID 4019 Algorithm
  Parameters (TEXT ``name=value``; DICOM defines no coded concept for these in TID 1501);
- the algorithm (TID 4019): the model's name, the answering release's identity as its version and
  its number as the parameter ``release=N``;
- the projection that routed the image (image SRs), and references to the source image(s).

Without operating points the SR calls nothing present or absent and says so in a note.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cxrlt import __version__
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.results import Decision, FindingsResult
from cxrlt.contract.study import StudyResult
from cxrlt.io.atomic import atomic_path, write_text_atomic
from cxrlt.io.finding_codes import PRIVATE_SCHEME, finding_codes, label_for_code
from cxrlt.io.images import header_only

__all__ = ["MANUFACTURER", "SOFTWARE_VERSION", "NOT_FOR_CLINICAL_USE", "to_json", "challenge_csv", "write_challenge_csv",
           "failures_csv", "decisions_csv", "NO_OPERATING_POINTS", "SrUids", "derived_uids", "derived_study_uids", "build_sr",
           "build_study_sr", "write_sr", "save_sr", "read_sr_findings", "read_sr_decisions"]

MANUFACTURER = "cxrlt-triton"
SOFTWARE_VERSION = __version__
NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE: random weights. The served networks were randomly "
    "initialised; these probabilities are not diagnostic."
)
NO_OPERATING_POINTS = "No operating points: no findings are called positive or negative."

_TASK_COLUMNS = {"task1": TASK1_LABELS, "task2": TASK2_LABELS, "all": ALL_LABELS}

_PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
_PROJECTION_CODES = {"frontal": codes.SCT.FrontalProjection, "lateral": codes.SCT.LateralProjection}
# DICOM CID 240 "Present-Absent": the finding called at the operating point.
_PRESENT, _ABSENT = CodedConcept.from_code(codes.SCT.Present), CodedConcept.from_code(codes.SCT.Absent)
_ALGORITHM_PARAMETERS = "111002"  # DCM "Algorithm Parameters" (TID 4019)
_ALGORITHM_VERSION = "111003"  # DCM "Algorithm Version" (TID 4019)
# CID 100 lists only CT/MR/PET procedures; SNOMED CT "Plain chest X-ray" is the closest.
_PROCEDURE = CodedConcept("399208008", "SCT", "Plain chest X-ray")
# The concept TID 1500 uses for its free "Qualitative Evaluations" container.
_QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


# ----------------------------------------------------------------------------- JSON / CSV


def to_json(results: Sequence[FindingsResult]) -> str:
    """A JSON list of ``result.to_dict()``, probabilities in contract order."""
    return json.dumps([result.to_dict() for result in results], indent=2)


def challenge_csv(results: Sequence[FindingsResult], task: str = "all") -> str:
    """The challenge submission CSV: ``ImageID`` then one column per class of ``task`` ('task1' (30
    columns), 'task2' (6) or 'all' (36)), in contract order; repr-exact floats (the metric sees
    every digit), CRLF line ends."""
    try:
        columns = _TASK_COLUMNS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(_TASK_COLUMNS)}") from None
    rows = []
    for result in results:
        missing = [label for label in columns if label not in result.probabilities]
        if missing:
            raise ValueError(
                f"result for {result.image_id!r} has no probability for {missing[0]!r} "
                f"({len(missing)} missing); classify with the model that covers {task}"
            )
        rows.append([result.image_id, *(float(result.probabilities[label]) for label in columns)])
    return _csv(rows, ["ImageID", *columns], float_format=lambda value: repr(float(value)), na_rep="nan")


def write_challenge_csv(results: Sequence[FindingsResult], path: str | Path, task: str = "all") -> Path:
    """Write :func:`challenge_csv` to ``path`` (atomically)."""
    return write_text_atomic(path, challenge_csv(results, task))


def failures_csv(failures: Sequence[tuple[str | Path, str]]) -> str:
    """The inputs that could not be classified, one ``path,reason`` row each (header only: none failed)."""
    return _csv([(str(source), reason) for source, reason in failures], ["path", "reason"])


def decisions_csv(results: Sequence[FindingsResult | StudyResult]) -> str:
    """The decisions at the repository's operating points, beside the challenge CSV: one row per image
    (or per study), naming its source and DICOM identities, then 1 (positive) / 0 per finding; a cell is
    empty where the finding has no operating point (or the repository has none)."""
    rows = []
    for result in results:
        decisions = result.decisions or {}
        if isinstance(result, StudyResult):
            identity = ["", result.study_instance_uid, "", "", "study"]
        else:
            identity = [result.source or result.image_id, result.study_instance_uid or "", result.series_instance_uid or "",
                        result.sop_instance_uid or "", result.projection]
        rows.append([*identity, *(int(decisions[label].positive) if label in decisions else None for label in ALL_LABELS)])
    columns = ["source", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "projection", *ALL_LABELS]
    return _csv(rows, columns, na_rep="", float_format="%.0f")


def _csv(rows: list, columns: list[str], **options) -> str:
    import pandas as pd  # lazy: importing this module stays cheap

    return pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\r\n", **options)


# ----------------------------------------------------------------------------- DICOM SR


def _evidence(source: Dataset) -> Dataset:
    """Header-only copy of the source with the Type 2 patient/study fields highdicom reads.

    Real PACS objects sometimes omit Type 2 attributes; highdicom reads them as attributes,
    so absent ones become empty rather than an AttributeError.
    """
    header = header_only(source)  # PixelData is not needed and large
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        if keyword not in header:
            setattr(header, keyword, "")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in header:
            raise ValueError(
                f"source dataset has no {keyword}; an SR can only reference a DICOM image "
                "from the PACS (PNG inputs have no study to report into)"
            )
    return header


@dataclasses.dataclass(frozen=True)
class SrUids:
    """The UIDs an SR is written with: its instance, its series and the observer device."""

    sop_instance: str
    series_instance: str
    device: str


def derived_uids(source: Dataset, repository_sha256: str) -> SrUids:
    """Deterministic UIDs for the SR of ``source`` classified by the repository ``repository_sha256``.

    One SR per source instance and repository (a re-sent image gives the same SR, which a PACS
    keeps once), one SR series per source series and repository, one device per repository.
    """
    return SrUids(
        sop_instance=generate_uid(entropy_srcs=["cxrlt-sr", str(source.SOPInstanceUID), repository_sha256]),
        series_instance=generate_uid(entropy_srcs=["cxrlt-sr-series", str(source.SeriesInstanceUID), repository_sha256]),
        device=generate_uid(entropy_srcs=["cxrlt-device", repository_sha256]),
    )


def derived_study_uids(study_instance_uid: str, repository_sha256: str) -> SrUids:
    """Deterministic UIDs for the study SR of ``study_instance_uid`` by the repository ``repository_sha256``:
    one study SR (in its own series) per study and repository, the same device as the image SRs."""
    return SrUids(
        sop_instance=generate_uid(entropy_srcs=["cxrlt-study-sr", str(study_instance_uid), repository_sha256]),
        series_instance=generate_uid(entropy_srcs=["cxrlt-study-sr-series", str(study_instance_uid), repository_sha256]),
        device=generate_uid(entropy_srcs=["cxrlt-device", repository_sha256]),
    )


@dataclasses.dataclass(frozen=True)
class _Report:
    """What one SR reports, of an image or of a study."""

    probabilities: Mapping[str, float]
    decisions: Mapping[str, Decision] | None
    algorithm_name: str
    algorithm_version: str  # the repository's identity when known
    random_weights: bool
    projection: str | None  # the image's; None for a study
    notes: list[str]  # the standard ones
    series_number: int
    what: str  # names it in errors
    release: int | None = None  # the release that answered (an algorithm parameter), when the server names it


def _image_report(result: FindingsResult) -> _Report:
    hint = f"hint {result.hint}, {'used' if result.hint_used else 'not used'}" if result.hint else "no hint"
    version = result.repository_sha256 or result.model_version or SOFTWARE_VERSION
    notes = [f"Projection {result.projection} (score {result.projection_score:.3f}, {hint}); "
             f"model {result.model_name} version {result.model_version}; software {MANUFACTURER} {SOFTWARE_VERSION}."]
    return _Report(result.probabilities, result.decisions, result.model_name or MANUFACTURER, version,
                   result.random_weights, result.projection, notes, 9901, f"result for {result.image_id!r}", result.release)


def _study_report(study: StudyResult) -> _Report:
    if not study.images:
        raise ValueError(f"study {study.study_instance_uid!r} has no images")
    first = study.images[0]
    answered = next((image for image in study.images if image.repository_sha256), None)
    version = answered.repository_sha256 if answered else first.model_version or SOFTWARE_VERSION
    views = ", ".join(f"{count} {projection}" for projection, count in study.projections.items())
    notes = [f"Study result of {len(study.images)} images ({views}): per finding the mean of the frontal images' "
             "mean and the lateral images' mean. "
             f"Model {first.model_name} version {first.model_version}; software {MANUFACTURER} {SOFTWARE_VERSION}."]
    return _Report(study.probabilities, study.decisions, first.model_name or MANUFACTURER, version, study.random_weights,
                   None, notes, 9902, f"study {study.study_instance_uid!r}", answered.release if answered else None)


def build_sr(result: FindingsResult, source_dataset: Dataset, *, uids: SrUids | None = None,
             notes: Sequence[str] = ()) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Measurement Report of ``result`` in the study of ``source_dataset``.

    uids: the SR's UIDs (:func:`derived_uids` for deterministic ones; default: new random UIDs).
    notes: free-text comments added after the standard ones (projection, model, software).
    """
    return _build_sr(_image_report(result), [_evidence(source_dataset)], uids, notes)


def build_study_sr(study: StudyResult, sources: Sequence[Dataset], *, uids: SrUids | None = None,
                   notes: Sequence[str] = ()) -> hd.sr.ComprehensiveSR:
    """One TID 1500 Measurement Report for a whole study: per finding the study score and its decision
    (``study.decisions``), each group referencing every image of ``sources`` (the study's DICOM images).

    uids: the SR's UIDs (:func:`derived_study_uids` for deterministic ones; default: new random UIDs).
    """
    if not sources:
        raise ValueError(f"study {study.study_instance_uid!r}: a study SR needs the source images it reports on")
    evidence = [_evidence(source) for source in sources]
    foreign = [str(e.SOPInstanceUID) for e in evidence if str(e.StudyInstanceUID) != study.study_instance_uid]
    if foreign:
        raise ValueError(f"sources {foreign} are not in study {study.study_instance_uid!r}")
    return _build_sr(_study_report(study), evidence, uids, notes)


def _build_sr(report: _Report, evidence: list[Dataset], uids: SrUids | None,
              notes: Sequence[str]) -> hd.sr.ComprehensiveSR:
    uids = uids or SrUids(generate_uid(), generate_uid(), generate_uid())
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=report.algorithm_name),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer), procedure_reported=_PROCEDURE,
        imaging_measurements=_measurement_groups(report, evidence, uids.sop_instance),
    )
    standard = [*([NOT_FOR_CLINICAL_USE] if report.random_weights else []), *report.notes,
                *([NO_OPERATING_POINTS] if report.decisions is None else [])]
    _add_notes(content, [*standard, *notes])
    description = "cxrlt findings NOT FOR CLINICAL USE random weights" if report.random_weights else "cxrlt findings"
    schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="CXR-LT 2026 findings", responsible_organization=MANUFACTURER)]
    private = any(finding_codes()[label].scheme == PRIVATE_SCHEME for label in report.probabilities)
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=content, series_instance_uid=uids.series_instance,
        series_number=report.series_number,  # high, so the SR sorts after the acquisition series
        sop_instance_uid=uids.sop_instance, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=report.algorithm_name, software_versions=SOFTWARE_VERSION,
        series_description=description[:64], coding_schemes=schemes if private else None,
        is_complete=True,
        is_final=False,  # machine output, nobody has verified it
    )


def _operating_point(decision: Decision | None) -> list[str]:
    """The operating point as TID 4019 Algorithm Parameters, ``name=value`` (floats repr-exact); none without one."""
    if decision is None:
        return []
    return [f"policy={decision.policy}", f"threshold={float(decision.threshold)!r}",
            f"sensitivity={float(decision.sensitivity)!r}", f"specificity={float(decision.specificity)!r}"]


def _measurement_groups(report: _Report, evidence: list[Dataset],
                        sr_uid: str) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per finding, in contract order; tracking UIDs derived from the SR's UID and the label."""
    source_images = [hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=e.SOPClassUID,
                                                          referenced_sop_instance_uid=e.SOPInstanceUID)
                     for e in evidence]
    projection = _PROJECTION_CODES.get(report.projection or "")
    view = [] if projection is None else [hd.sr.QualitativeEvaluation(name=codes.DCM.ImageView, value=projection)]
    groups = []
    for label in (label for label in ALL_LABELS if label in report.probabilities):
        code = finding_codes()[label]
        finding = CodedConcept(code.value, code.scheme, code.meaning)
        decision = (report.decisions or {}).get(label)
        parameters = [*([f"release={report.release}"] if report.release is not None else []), *_operating_point(decision)]
        algorithm = hd.sr.AlgorithmIdentification(name=report.algorithm_name, version=report.algorithm_version,
                                                  parameters=parameters or None)
        called = [] if decision is None else [
            hd.sr.QualitativeEvaluation(name=finding, value=_PRESENT if decision.positive else _ABSENT)]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=["cxrlt-tracking", sr_uid, label]),
                identifier=f"{code.value} {label}"[:64]),
            finding_type=finding, algorithm_id=algorithm, source_images=source_images,
            measurements=[hd.sr.Measurement(name=finding, value=float(report.probabilities[label]),
                                            unit=_PROBABILITY_UNIT, algorithm_id=algorithm)],
            qualitative_evaluations=[*view, *called] or None,
        ))
    if not groups:
        raise ValueError(f"{report.what} has no probabilities to report")
    return groups


def _add_notes(report: hd.sr.MeasurementReport, notes: Sequence[str]) -> None:
    """Free-text notes in the "Qualitative Evaluations" container of TID 1500.

    highdicom's MeasurementReport has no argument for that container, so it is appended
    to the content tree highdicom built; any SR viewer shows it with the measurements.
    """
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=codes.DCM.Comment, value=note, relationship_type=contains) for note in notes])
    report[0].ContentSequence.append(container)


def write_sr(result: FindingsResult, source_dataset: Dataset, path: str | Path, *, uids: SrUids | None = None,
             notes: Sequence[str] = ()) -> Path:
    """Build the SR for ``result`` (see :func:`build_sr`) and save it as a DICOM file at ``path``."""
    return save_sr(build_sr(result, source_dataset, uids=uids, notes=notes), path)


def save_sr(report: Dataset, path: str | Path) -> Path:
    """Save a built SR as a DICOM file at ``path`` (atomically)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        report.save_as(temporary, enforce_file_format=True)
    return path


def _groups_by_label(path: str | Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """label -> its measurement group, for an SR written by :func:`write_sr` or :func:`build_study_sr`."""
    groups = {}
    for group in hd.sr.srread(path).content.get_image_measurement_groups():
        finding = group.finding_type
        label = finding and label_for_code(finding.scheme_designator, finding.value, finding.meaning)
        if label:
            groups[label] = group
    return {label: groups[label] for label in ALL_LABELS if label in groups}


def read_sr_findings(path: str | Path) -> dict[str, float]:
    """Finding (label) -> probability from an SR written by :func:`write_sr` (contract order)."""
    found = {}
    for label, group in _groups_by_label(path).items():
        for measurement in group.get_measurements():
            if measurement.unit == _PROBABILITY_UNIT:
                found[label] = float(measurement.value)
    return found


def read_sr_release(path: str | Path) -> tuple[int | None, str]:
    """(the release that answered, the algorithm version: its identity) of an SR written here."""
    group = next(iter(_groups_by_label(path).values()))
    items = [item for item in group[0].ContentSequence if item.ValueType == "TEXT"]
    version = next((str(i.TextValue) for i in items if i.ConceptNameCodeSequence[0].CodeValue == _ALGORITHM_VERSION), "")
    parameters = dict(str(i.TextValue).partition("=")[::2] for i in items
                      if i.ConceptNameCodeSequence[0].CodeValue == _ALGORITHM_PARAMETERS)
    return (int(parameters["release"]) if parameters.get("release", "").isdigit() else None), version


def read_sr_decisions(path: str | Path) -> dict[str, Decision]:
    """Finding (label) -> its decision at the operating point, from an SR written by :func:`write_sr` or
    :func:`build_study_sr`; empty when the SR calls nothing present or absent (no operating points)."""
    decisions = {}
    for label, group in _groups_by_label(path).items():
        called = [e.value for e in group.get_qualitative_evaluations() if e.value in (_PRESENT, _ABSENT)]
        if not called:
            continue
        parameters = dict(str(item.TextValue).partition("=")[::2] for item in group[0].ContentSequence
                          if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == _ALGORITHM_PARAMETERS)
        decisions[label] = Decision(called[0] == _PRESENT, float(parameters["threshold"]), parameters["policy"],
                                    float(parameters["sensitivity"]), float(parameters["specificity"]))
    return decisions
