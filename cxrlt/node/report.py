"""The node's SR: cxrlt.io.reports' TID 1500 report with identifiers that do not change.

A re-sent image must not produce a second SR, so the SR's SOPInstanceUID (and its series)
are derived from the source's UIDs and the identity of the served model repository:
the same image through the same repository gives the same UIDs (a PACS keeps one copy),
a new repository gives a new SR. The repository identity comes from what the server
serves: the ``repository_sha256`` parameter of ``cxr_findings``' config when the server has
one, else a SHA-256 over the parameters of the three pipeline models' configs (ensemble
weights, preprocessing, TTA, gating, zero-shot settings and the ``random_weights`` flag).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxrlt.contract.results import FindingsResult
from cxrlt.contract.served import PIPELINE_MODELS

__all__ = ["REPOSITORY_PARAMETER", "Repository", "repository_identity", "read_repository", "sr_uids", "build_node_sr"]

# A served config parameter that names the repository outright (when the builder writes one).
REPOSITORY_PARAMETER = "repository_sha256"
_DEVICE_OBSERVER_UID = "121012"
_QUALITATIVE_EVALUATIONS = "C0034375"


@dataclasses.dataclass(frozen=True)
class Repository:
    """What the node knows of the served repository."""

    sha256: str
    random_weights: bool  # some served network is randomly initialised: NOT DIAGNOSTIC
    source: str  # where sha256 came from: the served parameter or a hash of the served parameters


def _parameters(config: Any) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def repository_identity(configs: Mapping[str, Any]) -> Repository:
    """The identity of the repository behind these served configs (ModelConfig messages by model)."""
    parameters = {name: _parameters(config) for name, config in configs.items()}
    random_weights = any(p.get("random_weights", "").strip().lower() in ("1", "true", "yes", "on")
                         for p in parameters.values())
    served = next((p[REPOSITORY_PARAMETER] for p in parameters.values() if p.get(REPOSITORY_PARAMETER)), None)
    if served:
        return Repository(served.strip().lower(), random_weights, f"served {REPOSITORY_PARAMETER}")
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return Repository(hashlib.sha256(canonical.encode()).hexdigest(), random_weights,
                      "sha256 of the pipeline models' served config parameters")


async def read_repository(client: Any, timeout_s: float = 10.0) -> Repository:
    """Read the pipeline models' configs with a tritonclient.grpc.aio client (raises on any failure)."""
    configs = {}
    for name in PIPELINE_MODELS:
        response = await client.get_model_config(name, client_timeout=timeout_s)
        configs[name] = response.config
    return repository_identity(configs)


def sr_uids(source: Dataset, repository_sha256: str) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of the SR for ``source``: deterministic.

    One SR series per source series and repository; one SR per source instance.
    """
    sop = generate_uid(entropy_srcs=["cxrlt-sr", str(source.SOPInstanceUID), repository_sha256])
    series = generate_uid(entropy_srcs=["cxrlt-sr-series", str(source.SeriesInstanceUID), repository_sha256])
    return sop, series


def build_node_sr(result: FindingsResult, source: Dataset, repository: Repository) -> Dataset:
    """cxrlt.io.reports.build_sr with deterministic UIDs and the repository named in its notes."""
    from cxrlt.io.reports import build_sr

    if repository.random_weights and not result.random_weights:
        result = dataclasses.replace(result, random_weights=True)
    sr = build_sr(result, source)
    sop, series = sr_uids(source, repository.sha256)
    sr.SOPInstanceUID = sop
    sr.file_meta.MediaStorageSOPInstanceUID = sop
    sr.SeriesInstanceUID = series
    _set_device_uid(sr, generate_uid(entropy_srcs=["cxrlt-device", repository.sha256]))
    _add_note(sr, f"Model repository {repository.sha256} ({repository.source}). Source image "
                  f"{source.SOPInstanceUID}. One SR per image: re-sending the image gives this SR again.")
    return sr


def _code(item: Dataset) -> str:
    sequence = item.get("ConceptNameCodeSequence") or []
    return str(sequence[0].CodeValue) if sequence else ""


def _set_device_uid(sr: Dataset, uid: str) -> None:
    for item in sr.ContentSequence:
        if _code(item) == _DEVICE_OBSERVER_UID:
            item.UID = uid


def _add_note(sr: Dataset, text: str) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    for item in sr.ContentSequence:
        if _code(item) == _QUALITATIVE_EVALUATIONS:
            item.ContentSequence.append(hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
            return
    raise ValueError("the SR has no Qualitative Evaluations container for its notes")
