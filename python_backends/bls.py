"""Glue between the pipelines and Triton's Python-backend API (`pb_utils`).

The one place `triton_python_backend_utils` is imported: inside Triton's stub it is the real
module; unit tests install a fake under that name first (tests/fake_pb_utils.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import numpy as np
import triton_python_backend_utils as pb_utils

from cxrlt.contract.ensemble import MEMBERS
from cxrlt.contract.labels import ACCEPTED_HINTS, projection_from_hint
from python_backends.classifier import Infer
from python_backends.in_process import LocalNetworks, member_execution
from python_backends.pipeline_errors import INVALID_INPUT, MemberError, RequestError, ServingError

NETWORK_INPUT = "pixel_values"
# A DICOM ViewPosition (VR CS) is at most 16 characters; anything much longer is not a hint.
MAX_HINT_BYTES = 64
_HINT_TERMS = f"send one of {', '.join(ACCEPTED_HINTS)}, or an empty string for no hint"


def member_timeout_ms(params: Mapping[str, str]) -> int:
    """The budget of one call to another model (`member_timeout_ms` of the config; 0: none)."""
    value = params.get("member_timeout_ms", "0")
    try:
        timeout = int(value)
    except ValueError:
        raise ValueError(f"member_timeout_ms must be a whole number of milliseconds, not {value!r}") from None
    if timeout < 0:
        raise ValueError(f"member_timeout_ms must be >= 0, not {timeout}")
    return timeout


async def call_model(model_name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
                     timeout_ms: int = 0, version: int = -1) -> dict[str, np.ndarray]:
    """Run another model of the server via BLS (`version`: the release's version directory; -1:
    Triton's choice) and return the named outputs.

    A callee's INVALID_ARG stays a request error (the caller's input was bad); any other
    failure names the callee. With `timeout_ms`, the call may wait that long in the callee's
    queue (Triton rejects it after) and as long again computing: a stuck member fails the
    request as unavailable instead of holding this model's instance forever.
    """
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
        model_version=version,
        **({"timeout": timeout_ms * 1000} if timeout_ms else {}),
    )
    if timeout_ms:
        try:
            response = await asyncio.wait_for(request.async_exec(), timeout=2 * timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise MemberError(model_name, f"no answer within {2 * timeout_ms} ms (member_timeout_ms {timeout_ms}); "
                                          "the server is overloaded or the member is stuck", True) from None
    else:
        response = await request.async_exec()
    if response.has_error():
        error = response.error()
        code = error.code() if hasattr(error, "code") else None
        message = error.message()
        if code == pb_utils.TritonError.INVALID_ARG or message.startswith(INVALID_INPUT):
            raise RequestError(message)
        unavailable = code == pb_utils.TritonError.UNAVAILABLE or any(
            phrase in message.lower() for phrase in ("unknown model", "not found", "no available version", "unavailable")
        )
        raise MemberError(model_name, message, unavailable)
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


def make_infer(output_names: Mapping[str, str], default_output: str = "logits", timeout_ms: int = 0,
               max_batch_size: int = 0, version: int = -1) -> Infer:
    """An async `infer(model_name, pixel_values)` for the pipelines, backed by BLS.

    A batch larger than the callee's `max_batch_size` (the pipelines stack every image of a
    dynamic batch) goes as concurrent slices of at most that size and comes back whole.
    """

    async def call(model_name: str, pixels: np.ndarray) -> np.ndarray:
        output_name = output_names.get(model_name, default_output)
        return (await call_model(model_name, {NETWORK_INPUT: pixels}, [output_name], timeout_ms, version))[output_name]

    async def infer(model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if not max_batch_size or len(pixels) <= max_batch_size:
            return await call(model_name, pixels)
        slices = [pixels[start : start + max_batch_size] for start in range(0, len(pixels), max_batch_size)]
        return np.concatenate(await asyncio.gather(*(call(model_name, part) for part in slices)))

    return infer


def member_max_batch_size(params: Mapping[str, str], own_max_batch_size: int) -> int:
    """The network models' `max_batch_size` (parameter `member_max_batch_size`, written by the
    repository builder; a repository from before it shares the calling model's own)."""
    return int(params.get("member_max_batch_size", own_max_batch_size))


def network_infer(args: Mapping[str, str], params: Mapping[str, str], networks: Iterable[str],
                  output_names: Mapping[str, str] | None = None, own_max_batch_size: int = 0, release: int = 1) -> Infer:
    """The `infer` a BLS model's pipeline runs its networks with, as its config says.

    `member_execution: bls` (the default): BLS calls to the network models. `in_process`:
    onnxruntime sessions on the same models' ONNX files inside this stub (see
    python_backends.in_process for the trade), created now so a missing file fails the load.
    """
    if member_execution(params.get("member_execution", "bls")) == "bls":
        return make_infer(output_names or {}, timeout_ms=member_timeout_ms(params),
                          max_batch_size=member_max_batch_size(params, own_max_batch_size), version=release)
    local = LocalNetworks(
        Path(args["model_repository"]).parent,  # the model's directory -> the repository
        intra_op_threads=int(params.get("member_intra_op_threads", "1")),
        providers=params.get("member_execution_provider", "auto"),
        concurrent_calls=len(MEMBERS),  # an image's ensemble members at once, as the network models run them
        release=release,
    )
    return local.load(networks).infer


async def answer_each(requests: Sequence[Any], parse: Callable[[Any], list],
                      run_many: Callable[[list], Awaitable[list]], respond: Callable[[list], Any],
                      fail: Callable[[BaseException], Any] | None = None) -> list:
    """Responses for the requests of one `execute`, their images run together.

    `parse(request)` gives the request's items (one per image) or raises; `run_many(items)`
    gives each item's result or exception; `respond(results)` makes one request's response and
    `fail(error)` a failed one's (default: error_response). A request fails alone, with its own
    first error; the others' answers are unchanged.
    """
    fail = fail or error_response
    spans: list[tuple[int, int] | BaseException] = []
    items: list = []
    for request in requests:
        try:
            mine = parse(request)
        except Exception as exc:
            spans.append(exc)
            continue
        spans.append((len(items), len(items) + len(mine)))
        items.extend(mine)
    try:
        results = await run_many(items) if items else []
    except Exception as exc:  # a fault of the pipeline itself: every request of the batch learns it
        results = [exc] * len(items)
    responses = []
    for span in spans:
        if isinstance(span, BaseException):
            responses.append(fail(span))
            continue
        mine = results[span[0] : span[1]]
        failure = next((r for r in mine if isinstance(r, BaseException)), None)
        if failure is not None:
            responses.append(fail(failure))
            continue
        try:
            responses.append(respond(mine))
        except Exception as exc:
            responses.append(fail(exc))
    return responses


def required_input(request: Any, name: str = "IMAGE") -> np.ndarray:
    """A request's input as numpy; a missing one is the caller's error (Triton lets a request
    without a non-optional input through when the model also has optional ones)."""
    tensor = get_input(request, name)
    if tensor is None:
        raise RequestError(f"the request has no {name} input; send {name} UINT16 [1, H, W] (see docs/contract.md)")
    return tensor.as_numpy()


def optional_strings(tensor: Any, count: int, name: str = "PROJECTION_HINT") -> list[str | None]:
    """An optional BYTES input [B, 1] as one str (or None) per image.

    Refused (RequestError) when the count does not match the images, or a value is not
    UTF-8 text or longer than MAX_HINT_BYTES: a hint is never lost or mangled silently."""
    if tensor is None:
        return [None] * count
    values = tensor.as_numpy().reshape(-1)
    if len(values) != count:
        raise RequestError(f"{name} has {len(values)} values for {count} images; send one per image")
    return [_hint_text(v, name) for v in values]


_STRING_TERMS = {"PROJECTION_HINT": ("a DICOM ViewPosition term has at most 16 characters", _HINT_TERMS),
                 "STUDY_KEY": ("a SHA-256 in hex has 64 characters",
                               "send an opaque key of the study (the SDK sends the SHA-256 of its StudyInstanceUID), or none")}


def _hint_text(value: Any, name: str = "PROJECTION_HINT") -> str:
    limit, terms = _STRING_TERMS[name]
    size = len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8", errors="replace"))
    if size > MAX_HINT_BYTES:
        raise RequestError(f"{name} is {size} bytes long, over the limit of {MAX_HINT_BYTES} ({limit}); {terms}")
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{name} is not UTF-8 text ({value[:16]!r}); {terms}") from None


def projection_hints(tensor: Any, count: int) -> list[str | None]:
    """:func:`optional_strings`, each value also checked as a ViewPosition term."""
    hints = optional_strings(tensor, count)
    for hint in hints:
        try:
            projection_from_hint(hint)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    return hints


def get_input(request: Any, name: str) -> Any:
    """A request's optional input tensor, or None."""
    return pb_utils.get_input_tensor_by_name(request, name)


def response(tensors: Mapping[str, np.ndarray]) -> Any:
    """One request's answer from its output arrays (name -> [B, ...])."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array) for name, array in tensors.items()])


def error_response(exc: BaseException) -> Any:
    """One request's failure, with a code that tells the client whether to fix or retry."""
    if isinstance(exc, RequestError):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(exc, MemberError):
        code = pb_utils.TritonError.UNAVAILABLE if exc.unavailable else pb_utils.TritonError.INTERNAL
    else:
        code = pb_utils.TritonError.INTERNAL
    message = str(exc) if isinstance(exc, (RequestError, MemberError, ServingError)) else f"{type(exc).__name__}: {exc}"
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
