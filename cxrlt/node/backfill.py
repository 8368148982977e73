"""Backfill over DICOMweb: classify a study already in the PACS, and optionally store the SRs back.

The study's instances are listed with QIDO-RS, the chest radiographs among them (CR, DX,
Secondary Capture; never SRs or other objects without pixels) retrieved with WADO-RS and
classified by the path every input takes (:func:`cxrlt.client.workflow.classify_image`: the
retrieved dataset is loaded as it is, the SDK's retry policy, the SR with deterministic UIDs),
and with ``store=True`` their SRs sent by STOW-RS to the same DICOMweb service. The SRs are
the DICOM node's: same UIDs, so a backfill after the node (or twice) adds no second SR.

Entries come back in the JSON shape of ``cxrlt classify``: ``result.to_dict()`` plus
``source`` (``dicomweb:<SOPInstanceUID>``), ``sr`` (its UID) and ``stored``; or
``{"source", "error", "attempts"}`` for an image that failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cxrlt.contract.acceptance import IMAGE_SOP_CLASSES

__all__ = ["RADIOGRAPH_SOP_CLASSES", "backfill"]

# What a radiograph can arrive as (CR, DX, Secondary Capture): the one rule set's SOP classes. The
# retrieved instances then pass the same header checks as every other path (load_image).
RADIOGRAPH_SOP_CLASSES = IMAGE_SOP_CLASSES


def _value(entry: dict[str, Any], tag: str) -> str:
    values = entry.get(tag, {}).get("Value") or [""]
    return str(values[0])


async def backfill(dicomweb: str, study: str, url: str, *, store: bool = False, tls: dict[str, Any] | None = None,
                   credentials_file: Path | None = None, timeout_s: float = 60.0, retries: int = 8,
                   deadline_s: float = 120.0, concurrency: int = 2) -> list[dict[str, Any]]:
    """Classify the radiographs of ``study`` at the DICOMweb service root ``dicomweb`` on the server ``url``."""
    import requests

    from cxrlt.client.sdk import AsyncCxrltClient
    from cxrlt.client.workflow import ClassifyFailure, classify_image
    from cxrlt.node.destinations import DestinationError, StowDestination

    web = StowDestination(dicomweb, credentials_file, timeout_s=timeout_s)
    dicomweb_client = web.client()
    try:
        listed = await asyncio.to_thread(dicomweb_client.search_for_instances, study_instance_uid=study)
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise PermissionError(f"{dicomweb} refused the study search (HTTP {exc.response.status_code}): give its "
                                  "USER:PASSWORD in a file with --dicomweb-credentials-file") from None
        raise
    images = [(_value(e, "0020000E"), _value(e, "00080018")) for e in listed
              if _value(e, "00080016") in RADIOGRAPH_SOP_CLASSES]
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def one(client: AsyncCxrltClient, series: str, sop: str) -> dict[str, Any]:
        source = f"dicomweb:{sop}"
        async with semaphore:
            try:
                dataset = await asyncio.to_thread(dicomweb_client.retrieve_instance, study, series, sop)
                done = await classify_image(client, dataset, name=sop, sr=True)
                if store:
                    await asyncio.to_thread(web.send, done.sr)
            except ClassifyFailure as exc:
                return {"source": source, "error": exc.reason, "attempts": exc.attempts}
            except DestinationError as exc:
                return {"source": source, "error": str(exc), "attempts": 0}
            except Exception as exc:  # a WADO-RS error, an odd instance: the others still run
                return {"source": source, "error": f"{type(exc).__name__}: {exc}", "attempts": 0}
            return {**done.result.to_dict(), "source": source, "sr": str(done.sr.SOPInstanceUID), "stored": store}

    async with AsyncCxrltClient(url, timeout_s=timeout_s, retries=retries, deadline_s=deadline_s,
                                **(tls or {})) as client:
        return list(await asyncio.gather(*(one(client, series, sop) for series, sop in images)))
