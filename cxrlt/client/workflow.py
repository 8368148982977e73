"""Classify one image and report it: the one path `cxrlt classify`, the DICOM node and the
DICOMweb backfill share.

    load (cxrlt.io.images: a path, the bytes of a file or a pydicom dataset)
      -> classify (the SDK's client: its retries, backoff and error classes)
      -> TID 1500 SR (cxrlt.io.reports) with UIDs derived from the source and the served repository

Every failure comes out as one :class:`ClassifyFailure` (the reason users read, and its kind).
The SR's UIDs depend only on the source image's UIDs and the served repository's identity, so
the same image through the same repository gives the same SR on every path, and a PACS keeps one copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrlt.client.sdk import (AsyncCxrltClient, ClientError, Repository, RequestTimeout, ServerRejected,
                              ServerUnavailable)
from cxrlt.contract.results import FindingsResult

__all__ = ["Classified", "ClassifyFailure", "classify_image", "build_report", "build_study_report", "failure", "reason"]


@dataclasses.dataclass(frozen=True, eq=False)
class Classified:
    """One classified image: its result, its DICOM dataset (None for PNG/JPEG) and its SR (if asked)."""

    result: FindingsResult
    dataset: Any  # pydicom Dataset | None
    sr: Any = None  # highdicom ComprehensiveSR | None


class ClassifyFailure(Exception):
    """An image that could not be classified (or reported); ``str()`` is the reason users read."""

    INPUT = "input"  # the file or dataset is unusable
    REJECTED = "rejected"  # the server refused the image (INVALID_ARGUMENT)
    REPORT = "report"  # the SR could not be built
    SERVER = "server"  # overloaded, timed out or failing: another try later may pass
    UNAVAILABLE = "unavailable"  # the server is gone (not merely overloaded)
    UNEXPECTED = "unexpected"  # anything else (a bug or an odd input the loader did not foresee)

    def __init__(self, reason: str, kind: str, attempts: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.attempts = attempts

    @property
    def retry(self) -> bool:
        """Whether trying again later may help."""
        return self.kind in (self.SERVER, self.UNAVAILABLE, self.UNEXPECTED)

    @property
    def server_trouble(self) -> bool:
        """Whether the server failed (a new connection may help)."""
        return self.kind in (self.SERVER, self.UNAVAILABLE)


def reason(name: str | Path, exc: BaseException) -> str:
    """The error's message without a leading 'NAME: ' (the caller names the input already)."""
    message = str(exc) or type(exc).__name__
    prefix = f"{name}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def failure(exc: BaseException, name: str | Path) -> ClassifyFailure:
    """The one mapping of what loading, classifying and reporting raise to a ClassifyFailure."""
    from cxrlt.io.images import InputError

    if isinstance(exc, ClassifyFailure):
        return exc
    if isinstance(exc, InputError):
        return ClassifyFailure(reason(name, exc), ClassifyFailure.INPUT)
    if isinstance(exc, ServerRejected):
        return ClassifyFailure(f"rejected by the server: {exc.server_message}", ClassifyFailure.REJECTED, exc.attempts)
    if isinstance(exc, ServerUnavailable):  # ServerOverloaded too: the server is there, only busy
        kind = ClassifyFailure.SERVER if exc.overloaded else ClassifyFailure.UNAVAILABLE
        return ClassifyFailure(str(exc), kind, exc.attempts)
    if isinstance(exc, ClientError):
        detail = str(exc)
        if exc.server_message and not isinstance(exc, RequestTimeout):
            detail = f"server error ({exc.status}): {exc.server_message}"
        return ClassifyFailure(detail, ClassifyFailure.SERVER, exc.attempts)
    return ClassifyFailure(f"{type(exc).__name__}: {exc}", ClassifyFailure.UNEXPECTED)


def build_report(result: FindingsResult, source: Any, repository: Repository) -> Any:
    """The SR of ``result``: deterministic UIDs (source x repository), the repository named in its notes.

    A repository with random weights marks the SR NOT FOR CLINICAL USE even when the result
    was not marked (the served flag wins)."""
    from cxrlt.io.reports import build_sr, derived_uids

    if repository.random_weights and not result.random_weights:
        result = dataclasses.replace(result, random_weights=True)
    identity = result.repository_sha256 or repository.sha256  # the release that answered, when the server names it
    note = (f"Model {_release_text(result.release)}{identity} ({repository.source if identity == repository.sha256 else 'RELEASE_SHA256'}). "
            f"Source image {source.SOPInstanceUID}. One SR per image: re-sending the image gives this SR again.")
    notes = [note]
    if result.out_of_distribution:  # ood_action "flag": answered, and the reader is told why to doubt it
        notes.append(f"FLAGGED: out-of-distribution score {result.ood_score:.2f} is above the gate's threshold "
                     f"{result.ood_threshold:.2f}: this image may not be a chest radiograph like those the model was built for.")
    return build_sr(result, source, uids=derived_uids(source, identity), notes=notes)


def _release_text(release: int | None) -> str:
    return f"release {release}, " if release is not None else "repository "


def build_study_report(results: Sequence[FindingsResult], headers: Sequence[Any], repository: Repository,
                       points: Any = None, notes: Sequence[str] = ()) -> Any:
    """The study SR of one study's image ``results`` (their DICOM ``headers`` in the same order): the study
    scores (cxrlt.contract.study.aggregate_study) called at ``points`` (the served OperatingPoints or None).

    Its UIDs derive from the study, the images it covers and the repository: the same images give the
    same SR in every path (the node, ``classify --by-study``), a study that gained an image a new one."""
    from cxrlt.contract.study import aggregate_study
    from cxrlt.io.reports import build_study_sr, derived_study_uids

    study = aggregate_study(results, points)
    if repository.random_weights and not study.random_weights:
        study = dataclasses.replace(study, images=tuple(dataclasses.replace(r, random_weights=True) for r in results))
    images = ",".join(sorted(str(r.sop_instance_uid) for r in results))
    answered = next((r for r in results if r.repository_sha256), None)
    identity = answered.repository_sha256 if answered else repository.sha256
    uids = derived_study_uids(f"{study.study_instance_uid}/{images}", identity)
    note = f"Model {_release_text(answered.release if answered else None)}{identity}. Study of {len(results)} image(s)."
    return build_study_sr(study, headers, uids=uids, notes=[note, *notes])


async def classify_image(client: AsyncCxrltClient, source: Any, *, name: str | Path | None = None,
                         image_id: str | None = None, labels: Sequence[str] | None = None, sr: bool = False,
                         body_parts: Sequence[str] | None = None) -> Classified:
    """Load ``source`` (a path, a file's bytes or a pydicom dataset), classify it, build its SR if ``sr``.

    name: names a source that is not a path in reasons (default: the path, '<bytes>' or the
        dataset's SOPInstanceUID).
    image_id: the result's image_id (default: SOPInstanceUID for DICOM, the file stem otherwise).
    labels: keep only these findings in the result (and the SR).
    body_parts: the BodyPartExamined terms taken as a chest, replacing the default ones of the one rule
        set (cxrlt.contract.acceptance, applied by load_image to every DICOM: modality, SOP class, body part).
    Raises :class:`ClassifyFailure` for every failure.
    """
    label = name if name is not None else _name(source)
    try:
        loaded = await asyncio.to_thread(_load, source, label, body_parts, sr)
        study = str(loaded.dataset.get("StudyInstanceUID", "")) if loaded.dataset is not None else ""
        result = await client.classify(loaded.pixels, hint=loaded.hint, image_id=image_id or loaded.image_id, study_uid=study or None)
        result = dataclasses.replace(result, **_identities(loaded.dataset, label))
        if labels is not None and tuple(labels) != tuple(result.probabilities):
            result = _keep(result, labels)
        if not sr:
            return Classified(result, loaded.dataset)
        repository = await client.repository()
    except Exception as exc:
        raise failure(exc, label) from None
    try:
        report = await asyncio.to_thread(build_report, result, loaded.dataset, repository)
    except Exception as exc:
        raise ClassifyFailure(f"could not build the SR: {type(exc).__name__}: {reason(label, exc)}",
                              ClassifyFailure.REPORT, result.attempts) from None
    return Classified(result, loaded.dataset, report)


def _identities(dataset: Any, source: str | Path) -> dict[str, str | None]:
    """Where a result came from: the source's name and, for DICOM, its study, series and instance UIDs."""
    uids = {field: (str(dataset.get(keyword, "")) or None) if dataset is not None else None
            for field, keyword in (("study_instance_uid", "StudyInstanceUID"), ("series_instance_uid", "SeriesInstanceUID"),
                                   ("sop_instance_uid", "SOPInstanceUID"))}
    return {"source": str(source), **uids}


def _keep(result: FindingsResult, labels: Sequence[str]) -> FindingsResult:
    """``result`` with only the findings ``labels`` (probabilities, calibrated values and decisions)."""
    def only(values: dict | None) -> dict | None:
        return None if values is None else {k: v for k, v in values.items() if k in labels}

    return dataclasses.replace(result, probabilities={k: result.probabilities[k] for k in labels},
                               decisions=only(result.decisions), calibrated_probabilities=only(result.calibrated_probabilities))


def _name(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "SOPInstanceUID", "") or "<dataset>")


def _load(source: Any, name: str | Path, body_parts: Sequence[str] | None, sr: bool):
    from cxrlt.io.images import InputError, load_image

    loaded = load_image(source, name=None if isinstance(source, (str, Path)) else name, body_parts=body_parts)
    if sr and loaded.dataset is None:
        raise InputError(
            f"{name}: SR output needs DICOM input (a {Path(str(name)).suffix or 'non-DICOM'} image has no "
            "study to report into); use --format json or csv for it"
        )
    return loaded
