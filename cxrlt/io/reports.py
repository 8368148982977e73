"""Outputs for classified images: JSON, the challenge submission CSV and DICOM SR.

The SR is a TID 1500 Measurement Report (highdicom ``ComprehensiveSR``) placed in the
source image's study, so a PACS files it next to the radiograph. It holds one image-level
measurement group per finding (30 task-1 then 6 task-2, in contract order), each with the
finding as a coded concept, its probability as a NUM item in UCUM ``{probability}``, the
projection that routed the image, and a reference to the source image.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cxrlt import __version__
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.results import FindingsResult
from cxrlt.io.atomic import atomic_path, write_text_atomic

__all__ = ["MANUFACTURER", "SOFTWARE_VERSION", "NOT_FOR_CLINICAL_USE", "to_json", "challenge_csv", "write_challenge_csv",
           "failures_csv", "SrUids", "derived_uids", "build_sr", "write_sr", "save_sr", "read_sr_findings"]

MANUFACTURER = "cxrlt-triton"
SOFTWARE_VERSION = __version__
NOT_FOR_CLINICAL_USE = (
    "NOT FOR CLINICAL USE: random weights. The served networks were randomly "
    "initialised; these probabilities are not diagnostic."
)

_TASK_COLUMNS = {"task1": TASK1_LABELS, "task2": TASK2_LABELS, "all": ALL_LABELS}

# Private coding scheme for the challenge's findings (no standard code exists for most of
# them). Code values are stable per contract position: T1-01..T1-30, T2-01..T2-06.
CODING_SCHEME = "99CXRLT"
_FINDING_CODES: dict[str, CodedConcept] = {
    label: CodedConcept(f"{task}-{i:02d}", CODING_SCHEME, label)
    for task, labels in (("T1", TASK1_LABELS), ("T2", TASK2_LABELS)) for i, label in enumerate(labels, start=1)
}
_PROBABILITY_UNIT = CodedConcept("{probability}", "UCUM", "probability")
_PROJECTION_CODES = {"frontal": codes.SCT.FrontalProjection, "lateral": codes.SCT.LateralProjection}
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


def _csv(rows: list, columns: list[str], **options) -> str:
    import pandas as pd  # lazy: importing this module stays cheap

    return pd.DataFrame(rows, columns=columns).to_csv(index=False, lineterminator="\r\n", **options)


# ----------------------------------------------------------------------------- DICOM SR


def _evidence(source: Dataset) -> Dataset:
    """Header-only copy of the source with the Type 2 patient/study fields highdicom reads.

    Real PACS objects sometimes omit Type 2 attributes; highdicom reads them as attributes,
    so absent ones become empty rather than an AttributeError.
    """
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:  # leave out PixelData: it is not needed and large
            header.add(copy.deepcopy(element))
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


def build_sr(result: FindingsResult, source_dataset: Dataset, *, uids: SrUids | None = None,
             notes: Sequence[str] = ()) -> hd.sr.ComprehensiveSR:
    """A TID 1500 Measurement Report of ``result`` in the study of ``source_dataset``.

    uids: the SR's UIDs (:func:`derived_uids` for deterministic ones; default: new random UIDs).
    notes: free-text comments added after the standard ones (projection, model, software).
    """
    uids = uids or SrUids(generate_uid(), generate_uid(), generate_uid())
    evidence = _evidence(source_dataset)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=result.model_name or None),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer), procedure_reported=_PROCEDURE,
        imaging_measurements=_measurement_groups(result, evidence, uids.sop_instance),
    )
    _add_notes(report, [*_standard_notes(result), *notes])
    description = "cxrlt findings NOT FOR CLINICAL USE random weights" if result.random_weights else "cxrlt findings"
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=report, series_instance_uid=uids.series_instance,
        series_number=9901,  # high, so the SR sorts after the acquisition series
        sop_instance_uid=uids.sop_instance, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=result.model_name or MANUFACTURER, software_versions=SOFTWARE_VERSION,
        series_description=description[:64],
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=CODING_SCHEME, name="CXR-LT 2026 findings", responsible_organization=MANUFACTURER)],
        is_complete=True,
        is_final=False,  # machine output, nobody has verified it
    )


def _measurement_groups(result: FindingsResult, evidence: Dataset,
                        sr_uid: str) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One image-level group per finding, in contract order; tracking UIDs derived from the SR's UID."""
    source_image = hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=evidence.SOPClassUID,
                                                        referenced_sop_instance_uid=evidence.SOPInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name or MANUFACTURER,
                                              version=result.model_version or SOFTWARE_VERSION)
    projection = _PROJECTION_CODES.get(result.projection)
    evaluations = None if projection is None else [hd.sr.QualitativeEvaluation(name=codes.DCM.ImageView, value=projection)]
    groups = []
    for label in (label for label in ALL_LABELS if label in result.probabilities):
        finding = _FINDING_CODES[label]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=["cxrlt-tracking", sr_uid, finding.value]),
                identifier=f"{finding.value} {label}"[:64]),
            finding_type=finding, algorithm_id=algorithm, source_images=[source_image],
            measurements=[hd.sr.Measurement(name=finding, value=float(result.probabilities[label]),
                                            unit=_PROBABILITY_UNIT, algorithm_id=algorithm)],
            qualitative_evaluations=evaluations,
        ))
    if not groups:
        raise ValueError(f"result for {result.image_id!r} has no probabilities to report")
    return groups


def _standard_notes(result: FindingsResult) -> list[str]:
    hint = f"hint {result.hint}, {'used' if result.hint_used else 'not used'}" if result.hint else "no hint"
    return [*([NOT_FOR_CLINICAL_USE] if result.random_weights else []),
            f"Projection {result.projection} (score {result.projection_score:.3f}, {hint}); "
            f"model {result.model_name} version {result.model_version}; software {MANUFACTURER} {SOFTWARE_VERSION}."]


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


def read_sr_findings(path: str | Path) -> dict[str, float]:
    """Finding -> probability from an SR written by :func:`write_sr` (contract order)."""
    sr = hd.sr.srread(path)
    found: dict[str, float] = {}
    for group in sr.content.get_image_measurement_groups():
        for measurement in group.get_measurements():
            if measurement.unit == _PROBABILITY_UNIT:
                found[measurement.name.meaning] = float(measurement.value)
    return {label: found[label] for label in ALL_LABELS if label in found}
