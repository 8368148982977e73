"""The node's SR: cxrlt.io.reports' TID 1500 report with identifiers that do not change.

Kept for the names integrators import; the SR is built by the one classify-and-report path,
:func:`cxrlt.client.workflow.build_report` (deterministic UIDs from the source's UIDs and the
served repository's identity, :attr:`cxrlt.client.sdk.ModelInfo.repository`), which
`cxrlt classify --format sr` and the DICOMweb backfill use too.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from cxrlt.client.sdk import REPOSITORY_PARAMETER, Repository, repository_identity
from cxrlt.client.workflow import build_report as build_node_sr
from cxrlt.io.reports import derived_uids

__all__ = ["REPOSITORY_PARAMETER", "Repository", "repository_identity", "sr_uids", "build_node_sr"]


def sr_uids(source: Dataset, repository_sha256: str) -> tuple[str, str]:
    """(SOPInstanceUID, SeriesInstanceUID) of the SR for ``source``: deterministic.

    One SR series per source series and repository; one SR per source instance.
    """
    uids = derived_uids(source, repository_sha256)
    return uids.sop_instance, uids.series_instance
