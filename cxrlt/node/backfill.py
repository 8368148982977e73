"""Backfill over DICOMweb: classify a study already in the PACS, and optionally store the SRs back.

The study's instances are listed with QIDO-RS, the chest radiographs among them (CR, DX,
Secondary Capture; never SRs or other objects without pixels) retrieved with WADO-RS,
classified like every other input (:func:`cxrlt.io.images.load_image`, the SDK's retry
policy), and with ``store=True`` their SRs sent by STOW-RS to the same DICOMweb service. The
SRs are the DICOM node's (:func:`cxrlt.node.report.build_node_sr`): same deterministic
UIDs, so a backfill after the node (or twice) adds no second SR.

Entries come back in the JSON shape of ``cxrlt classify``: ``result.to_dict()`` plus
``source`` (``dicomweb:<SOPInstanceUID>``), ``sr`` (its UID) and ``stored``; or
``{"source", "error", "attempts"}`` for an image that failed.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["RADIOGRAPH_SOP_CLASSES", "backfill"]

RADIOGRAPH_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
)


def _value(entry: dict[str, Any], tag: str) -> str:
    values = entry.get(tag, {}).get("Value") or [""]
    return str(values[0])


async def backfill(dicomweb: str, study: str, url: str, *, store: bool = False, tls: dict[str, Any] | None = None,
                   credentials_file: Path | None = None, timeout_s: float = 60.0, retries: int = 8,
                   deadline_s: float = 120.0, concurrency: int = 2) -> list[dict[str, Any]]:
    """Classify the radiographs of ``study`` at the DICOMweb service root ``dicomweb`` on the server ``url``."""
    from cxrlt.client.sdk import AsyncCxrltClient, ClientError
    from cxrlt.io.images import InputError, load_image
    from cxrlt.node.destinations import DestinationError, StowDestination
    from cxrlt.node.report import build_node_sr, read_repository

    web = StowDestination(dicomweb, credentials_file, timeout_s=timeout_s)
    dicomweb_client = web.client()
    listed = await asyncio.to_thread(dicomweb_client.search_for_instances, study_instance_uid=study)
    images = [(_value(e, "0020000E"), _value(e, "00080018")) for e in listed
              if _value(e, "00080016") in RADIOGRAPH_SOP_CLASSES]
    client = AsyncCxrltClient(url, timeout_s=timeout_s, retries=retries, deadline_s=deadline_s, **(tls or {}))
    import tritonclient.grpc.aio as aioclient

    configs = aioclient.InferenceServerClient(url, **(tls or {}))
    semaphore = asyncio.Semaphore(max(1, concurrency))
    try:
        repository = await read_repository(configs, timeout_s=timeout_s)

        async def one(series: str, sop: str, folder: Path) -> dict[str, Any]:
            source = f"dicomweb:{sop}"
            async with semaphore:
                try:
                    dataset = await asyncio.to_thread(dicomweb_client.retrieve_instance, study, series, sop)
                    path = folder / f"{sop}.dcm"
                    await asyncio.to_thread(dataset.save_as, path, enforce_file_format=True)
                    loaded = await asyncio.to_thread(load_image, path)
                    result = await client.classify(loaded.pixels, hint=loaded.hint, image_id=loaded.image_id)
                    sr = await asyncio.to_thread(build_node_sr, result, loaded.dataset, repository)
                    if store:
                        await asyncio.to_thread(web.send, sr)
                except ClientError as exc:
                    return {"source": source, "error": str(exc), "attempts": exc.attempts}
                except (InputError, DestinationError) as exc:
                    return {"source": source, "error": str(exc).replace(f"{folder}/", ""), "attempts": 0}
                except Exception as exc:  # a WADO-RS error, an odd instance: the others still run
                    return {"source": source, "error": f"{type(exc).__name__}: {exc}", "attempts": 0}
                return {**result.to_dict(), "source": source, "sr": str(sr.SOPInstanceUID), "stored": store}

        with tempfile.TemporaryDirectory(prefix="cxrlt-backfill-") as scratch:
            return list(await asyncio.gather(*(one(series, sop, Path(scratch)) for series, sop in images)))
    finally:
        await client.close()
        await configs.close()
