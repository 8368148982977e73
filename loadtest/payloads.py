"""The images the load test and the benchmark send: loaded and decoded once per process.

A real chest radiograph (pydicom-data's RG1_UNCR.dcm, 1955 x 1841, PA, MONOCHROME1 15-bit,
through the client's own DICOM path) and the synthetic frontal and lateral radiographs of
the repository builder. Each carries the projection hint a PACS would send (the DICOM
ViewPosition for the real one, the projection it was drawn as for the synthetic ones).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SETS = ("all", "real", "synthetic")
# ViewPosition terms for the synthetic projections.
SYNTHETIC_HINTS = {"frontal": "PA", "lateral": "LL"}
# Models that take the optional PROJECTION_HINT input (cxr_zeroshot has none).
HINTED_MODELS = frozenset({"cxr_classifier", "cxr_findings"})
MODELS = ("cxr_classifier", "cxr_zeroshot", "cxr_findings")


@dataclasses.dataclass(frozen=True, eq=False)
class Payload:
    name: str
    pixels: np.ndarray  # uint16 [H, W], MONOCHROME2
    hint: str | None  # DICOM ViewPosition term, or None when unknown

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)


@lru_cache(maxsize=None)
def load_payloads(image_set: str = "all") -> tuple[Payload, ...]:
    """The payloads of one image set, decoded once (cached for the life of the process)."""
    if image_set not in IMAGE_SETS:
        raise ValueError(f"image set must be one of {IMAGE_SETS}, not {image_set!r}")
    payloads: list[Payload] = []
    if image_set in ("all", "real"):
        payloads.extend(_real_payloads(required=image_set == "real"))
    if image_set in ("all", "synthetic"):
        from cxrlt.io.synthetic import synthetic_radiographs

        for projection, pixels in synthetic_radiographs().items():
            payloads.append(Payload(f"synthetic_{projection}", np.ascontiguousarray(pixels, dtype=np.uint16),
                                    SYNTHETIC_HINTS[projection]))
    return tuple(payloads)


def _real_payloads(required: bool) -> list[Payload]:
    try:
        from pydicom.data import get_testdata_file

        from cxrlt.io.images import load_image

        path = get_testdata_file("RG1_UNCR.dcm")
        if path is None:
            raise FileNotFoundError("RG1_UNCR.dcm is not in pydicom-data")
        image = load_image(path)
    except Exception as exc:
        if required:
            raise RuntimeError(f"the real chest X-ray is unavailable ({exc}); install the dev extra (pydicom-data)") from exc
        log.warning("real chest X-ray unavailable (%s); sending the synthetic radiographs only", exc)
        return []
    return [Payload("RG1_UNCR", np.ascontiguousarray(image.pixels, dtype=np.uint16), image.hint)]


def grpc_inputs(payload: Payload, model: str, send_hint: bool = True) -> list:
    """tritonclient.grpc InferInputs for one image (a batch of one): IMAGE and, where the model takes one, the hint."""
    import tritonclient.grpc as grpcclient

    batch = payload.pixels[None]
    image = grpcclient.InferInput("IMAGE", list(batch.shape), "UINT16")
    image.set_data_from_numpy(batch)
    inputs = [image]
    if send_hint and payload.hint and model in HINTED_MODELS:
        hint = grpcclient.InferInput("PROJECTION_HINT", [1, 1], "BYTES")
        hint.set_data_from_numpy(np.array([[payload.hint.encode()]], dtype=np.object_))
        inputs.append(hint)
    return inputs


def output_names(model: str) -> list[str]:
    return ["PROBABILITIES"] if model == "cxr_zeroshot" else ["PROBABILITIES", "PROJECTION"]


def requested_outputs(model: str) -> list:
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(name) for name in output_names(model)]


def request_bytes(payload: Payload, model: str, send_hint: bool = True) -> bytes:
    """One image's serialised ModelInferRequest (Triton's public gRPC protobuf), built once: an open
    loop sends it as it is instead of serialising 7 MB again in its event loop for every request."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="IMAGE", datatype="UINT16", shape=[1, *payload.pixels.shape])
    request.raw_input_contents.append(np.ascontiguousarray(payload.pixels, dtype="<u2").tobytes())
    if send_hint and payload.hint and model in HINTED_MODELS:
        hint = payload.hint.encode()
        request.inputs.add(name="PROJECTION_HINT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(struct.pack("<I", len(hint)) + hint)  # Triton's BYTES: length, then bytes
    for name in output_names(model):
        request.outputs.add(name=name)
    return request.SerializeToString()
