"""The gRPC client SDK: send a radiograph to Triton, get a :class:`FindingsResult` back.

One client, for asyncio, and a synchronous wrapper over it (:class:`CxrltClient` runs an
:class:`AsyncCxrltClient` on a private event-loop thread, so both behave alike)::

    from cxrlt.client import CxrltClient

    with CxrltClient("127.0.0.1:8001") as client:
        client.wait_until_ready(60)
        result = client.classify_file("chest.dcm")      # DICOM/PNG -> pixels + header hint
        print(result.projection, result.task1()["cardiomegaly"])

    async with AsyncCxrltClient("127.0.0.1:8001") as client:
        result = await client.classify(pixels, hint="PA")

Behaviour (the arguments are :class:`AsyncCxrltClient`'s):

* gRPC ``UNAVAILABLE`` (the server down, restarting, or overloaded: "Exceeds maximum queue
  size", "Request timeout expired") is retried with exponential backoff and equal jitter
  (:func:`backoff_delay`) until ``retries`` attempts, or until the next sleep would end past
  the call's ``deadline_s``; then :class:`ServerUnavailable` (:class:`ServerOverloaded` when the
  server said it was overloaded) says how many attempts in how many seconds and the server's
  last message. A server that never answered (a wrong ``url``) fails at once;
* ``INVALID_ARGUMENT`` (a bad image or hint) is never retried: :class:`ServerRejected`; any other
  server error is :class:`ServerFailed`, a timeout :class:`RequestTimeout`; all are :class:`ClientError`;
* a result records the attempts its call took (``FindingsResult.attempts``); the served
  configs are read once (:meth:`AsyncCxrltClient.model_info`: labels, ``trust_hint``,
  ``random_weights``, every served parameter and the repository's identity, from which SR
  UIDs are derived).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import random
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS, projection_from_hint
from cxrlt.contract.preprocessing import MIN_SERVED_SIDE, downscale_for_sending
from cxrlt.contract.ood_gate import THRESHOLD_PARAMETER as OOD_THRESHOLD_PARAMETER
from cxrlt.contract.operating_points import OperatingPoints, served_operating_points
from cxrlt.contract.releases import CANDIDATE_PARAMETERS, study_key
from cxrlt.contract.results import FindingsResult
from cxrlt.contract.study import decisions_from
from cxrlt.contract.served import (CLASSIFIER_MODEL, FINDINGS_MODEL, PIPELINE_MODELS, SEND_SIZE_SERVED,
                                   ZEROSHOT_MODEL)
from cxrlt.client.shared_memory import Region, RegionPool
from python_backends.triton_params import as_bool, optional_number

__all__ = [
    "DEFAULT_URL", "MODEL_LABELS", "REPOSITORY_PARAMETER", "ClientError", "ServerUnavailable", "ServerOverloaded",
    "ServerRejected", "ServerFailed", "RequestTimeout", "ModelInfo", "Repository", "repository_identity",
    "backoff_delay", "CxrltClient", "AsyncCxrltClient",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "127.0.0.1:8001"
# Served model -> the labels of its PROBABILITIES output, in output order (the contract).
MODEL_LABELS: dict[str, tuple[str, ...]] = {FINDINGS_MODEL: ALL_LABELS, CLASSIFIER_MODEL: TASK1_LABELS,
                                             ZEROSHOT_MODEL: TASK2_LABELS}
# Models that take PROJECTION_HINT and return PROJECTION / PROJECTION_SCORE.
ROUTED_MODELS = (FINDINGS_MODEL, CLASSIFIER_MODEL)

_START_HINT = "start one with `cxrlt serve --repo DIR` (or try `cxrlt demo`)"
# A served config parameter that names the repository outright (when the builder writes one).
REPOSITORY_PARAMETER = "repository_sha256"


# ----------------------------------------------------------------------------- errors


class ClientError(RuntimeError):
    """A request could not be completed. ``status`` is the gRPC code name (e.g. 'UNAVAILABLE')."""

    def __init__(self, message: str, *, url: str, model: str | None = None, status: str | None = None,
                 server_message: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url, self.model, self.status, self.server_message, self.attempts = url, model, status, server_message, attempts


class ServerUnavailable(ClientError):
    """The server could not be reached (or stayed UNAVAILABLE) after every attempt."""

    overloaded = False


class ServerOverloaded(ServerUnavailable):
    """The server stayed overloaded (its queue full or timed out) for every attempt in the deadline."""

    overloaded = True


class ServerRejected(ClientError):
    """The server answered INVALID_ARGUMENT: the input is bad; retrying cannot help."""


class ServerFailed(ClientError):
    """The server answered with an error other than INVALID_ARGUMENT/UNAVAILABLE (e.g. INTERNAL)."""


class RequestTimeout(ClientError):
    """The call did not finish within the per-call timeout (gRPC DEADLINE_EXCEEDED)."""


def _status_name(exc: Exception) -> str:
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    return str(status or "UNKNOWN").rsplit(".", 1)[-1]


def _server_message(exc: Exception) -> str:
    message = exc.message() if callable(getattr(exc, "message", None)) else None
    return str(message or exc)


# What Triton's queue policy answers (UNAVAILABLE) when an entry model's queue is full or a
# request waited past its queue timeout; a BLS model passes its members' answer on.
OVERLOAD_MESSAGES = ("exceeds maximum queue size", "request timeout expired")


def _mentions(message: str, phrases: tuple[str, ...]) -> bool:
    return any(phrase in message.lower() for phrase in phrases)


@dataclasses.dataclass
class _Attempts:
    """One call's retry state: what it does, when it started and must end, the attempts so far."""

    what: str
    started: float  # the client's clock
    deadline: float | None  # the client's clock; None: no overall deadline
    count: int = 0
    timeout: float = 0.0  # the current attempt's RPC timeout
    last_message: str | None = None  # the server's last UNAVAILABLE message


# What gRPC itself says (as UNAVAILABLE) when nothing answered at the address: no server there.
UNREACHED_MESSAGES = ("failed to connect", "connection refused", "dns resolution failed", "name resolution",
                      "no route to host", "network is unreachable", "http1.x server", "errors resolving",
                      "lookup failed")


def backoff_delay(retry: int, backoff_s: float, max_backoff_s: float, rng: random.Random) -> float:
    """The sleep before retry ``retry`` (1: before the 2nd attempt): exponential, capped, equal jitter.

    The one backoff of the project: the SDK's retries and the DICOM node's spool retries use it."""
    ceiling = min(max_backoff_s, backoff_s * 2 ** (retry - 1))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


# ----------------------------------------------------------------------------- model info


@dataclasses.dataclass(frozen=True)
class Repository:
    """The identity of the served model repository (SR UIDs are derived from ``sha256``)."""

    sha256: str
    random_weights: bool  # some served network is randomly initialised: NOT DIAGNOSTIC
    source: str  # where sha256 came from: the served parameter or a hash of the served parameters


def _parameters(config: Any) -> dict[str, str]:
    """A ModelConfig message's parameters (a plain {key: value} mapping passes through)."""
    if isinstance(config, Mapping):
        return dict(config)
    return {key: value.string_value for key, value in config.parameters.items()}


def _flag(parameters: Mapping[str, str], key: str) -> bool:
    try:  # as_bool refuses an empty value as it does an odd one
        return as_bool(parameters.get(key) or "")
    except ValueError:
        return False  # an absent, empty or odd value is not a claim of random weights or of a trusted hint


def repository_identity(configs: Mapping[str, Any]) -> Repository:
    """The repository behind these served configs (model -> ModelConfig message or its parameters).

    The ``repository_sha256`` parameter when the server serves one, else a SHA-256 over the
    pipeline models' served parameters (ensemble weights, preprocessing, TTA, gating, zero-shot
    settings and the ``random_weights`` flag)."""
    parameters = {name: _parameters(config) for name, config in configs.items()}
    random_weights = any(_flag(p, "random_weights") for p in parameters.values())
    served = next((p[REPOSITORY_PARAMETER] for p in parameters.values() if p.get(REPOSITORY_PARAMETER)), None)
    if served:
        return Repository(served.strip().lower(), random_weights, f"served {REPOSITORY_PARAMETER}")
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return Repository(hashlib.sha256(canonical.encode()).hexdigest(), random_weights,
                      "sha256 of the pipeline models' served config parameters")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the client learns once from the served models' configs."""

    name: str
    labels: tuple[str, ...]
    accepts_hint: bool  # the model takes PROJECTION_HINT and returns PROJECTION
    trust_hint: bool  # cxr_classifier routes by a valid hint instead of its router
    random_weights: bool  # some served network is randomly initialised: NOT DIAGNOSTIC
    input_size: int | None = None  # the largest side any served network takes (its preprocess_size)
    # The served config parameters of the pipeline models the server has, by model.
    parameters: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    repository: Repository | None = None  # the served repository's identity (None: no pipeline config read)
    decides: bool = False  # the model answers DECISIONS and CALIBRATED_PROBABILITIES
    operating_points: OperatingPoints | None = None  # the served table (None: the repository has none)
    ood_scored: bool = False  # the model answers OOD_SCORE
    ood_threshold: float | None = None  # the fitted gate's threshold in force (None: no gate fitted)
    names_release: bool = False  # the model answers RELEASE and RELEASE_SHA256 (cxrlt.contract.releases)
    takes_study: bool = False  # the model takes STUDY_KEY (a canary answers whole studies)
    live_release: int | None = None  # the plan's live release, whose parameters the config carries
    # each release's own parameters (operating points, gate threshold, identity), by number
    releases: Mapping[int, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def knows(self, release: int | None) -> bool:
        """Whether these configs describe `release` (else they predate a switch: read them again)."""
        return release is None or release == self.live_release or release in self.releases


def _output_dim(config: Any, name: str) -> int | None:
    for output in config.output:
        if output.name == name:
            return int(output.dims[-1]) if output.dims else None
    return None


def _ood_threshold(parameters: Mapping[str, str]) -> float | None:
    """The served gate's threshold (config parameter ood_threshold; empty or absent: no gate fitted)."""
    return optional_number(parameters.get(OOD_THRESHOLD_PARAMETER, ""))


def _answered_release(response: Any, info: ModelInfo) -> tuple[int | None, str | None]:
    """The RELEASE that answered and its RELEASE_SHA256 (None, None from a server without releases)."""
    if not info.names_release:
        return None, None
    release = int(np.asarray(response.as_numpy("RELEASE")).reshape(-1)[0])
    sha256 = np.asarray(response.as_numpy("RELEASE_SHA256")).reshape(-1)[0]
    return release, (sha256.decode("utf-8") if isinstance(sha256, bytes) else str(sha256)) or None


def _release_repository(info: ModelInfo, sha256: str) -> Repository:
    base = info.repository
    return Repository(sha256.strip().lower(), base.random_weights if base else False, "the answering release's RELEASE_SHA256")


def _ood(response: Any, info: ModelInfo) -> dict[str, Any]:
    """The result's gate fields: OOD_SCORE, the threshold and the flag (none without a fitted gate)."""
    if not info.ood_scored or info.ood_threshold is None:
        return {}
    score = float(np.asarray(response.as_numpy("OOD_SCORE")).reshape(-1)[0])
    if not math.isfinite(score):
        return {}
    return {"ood_score": score, "ood_threshold": info.ood_threshold, "out_of_distribution": score > info.ood_threshold}


def _valid_hint(hint: str | None) -> bool:
    try:
        return projection_from_hint(hint) is not None
    except ValueError:
        return False


def _as_uint16(image: np.ndarray) -> np.ndarray:
    """The server's IMAGE tensor: uint16 [H, W]; 8-bit images are scaled to full range (x 257)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D grayscale array [H, W], got shape {list(image.shape)}")
    if image.dtype == np.uint8:
        return image.astype(np.uint16) * 257
    if image.dtype != np.uint16:
        raise ValueError(
            f"image dtype must be uint16 (or uint8), got {image.dtype}; load files with "
            "cxrlt.io.images.load_image or classify_file"
        )
    return np.ascontiguousarray(image)


def _load(source: Any):
    from cxrlt.io.images import load_image  # pydicom, Pillow: only when files are classified

    return load_image(source)


# ----------------------------------------------------------------------------- the client


class AsyncCxrltClient:
    """The gRPC client (tritonclient.grpc.aio); :class:`CxrltClient` is its synchronous wrapper.

    url: ``host:port`` of Triton's gRPC endpoint.
    timeout_s: the longest one RPC (one attempt) may take.
    retries: attempts in all for a call that meets UNAVAILABLE (1 = never retry).
    backoff_s: the backoff before the 2nd attempt, doubled before each further one up to
        max_backoff_s; each sleep is drawn from [backoff/2, backoff] (equal jitter).
    deadline_s: time budget of one call (one image) over all its attempts and sleeps; each
        attempt's RPC timeout is min(timeout_s, time left). None: only ``retries`` limits.
    seed: seeds the jitter (repeatable sleeps, for tests).
    ssl, root_certificates, private_key, certificate_chain: TLS; the three are PEM *file paths*.
    model: ``cxr_findings`` (36), ``cxr_classifier`` (30) or ``cxr_zeroshot`` (6).
    random_weights: mark every result as random-weights even if the server does not say so
        (the flag is otherwise read from the served config's ``random_weights`` parameter).
    shared_memory: send images through system shared-memory regions registered with the
        server instead of inside the gRPC message; only for a server on this host.
    send_size: for a remote server, downscale each image before sending to at most this many
        pixels on its long side (``"served"``: the largest input size of the served networks,
        from their configs), with the server's own resampling; a 1955 x 1841 radiograph then
        travels as about 100 kB instead of 7 MB. None (default): send every pixel.
    fail_fast: a server that never answered (connection refused, unknown host) fails the call
        at once (default); False retries it like UNAVAILABLE (for a daemon that may start
        before its server).

    The gRPC channel is opened lazily inside the running event loop; use ``async with`` or
    call :meth:`close`. File loading (:meth:`classify_file`) runs in a worker thread.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 deadline_s: float | None = None, max_backoff_s: float = 5.0, seed: int | None = None, ssl: bool = False,
                 root_certificates: str | Path | None = None, private_key: str | Path | None = None,
                 certificate_chain: str | Path | None = None, model: str = FINDINGS_MODEL, random_weights: bool = False,
                 shared_memory: bool = False, send_size: int | str | None = None, fail_fast: bool = True) -> None:
        if model not in MODEL_LABELS:
            raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODEL_LABELS)}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoff_s and max_backoff_s must be >= 0, got {backoff_s} and {max_backoff_s}")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive (or None), got {deadline_s}")
        if send_size not in (None, SEND_SIZE_SERVED) and (not isinstance(send_size, int) or send_size < MIN_SERVED_SIDE):
            raise ValueError(f"send_size must be None, {SEND_SIZE_SERVED!r} or a whole number >= {MIN_SERVED_SIDE}, got {send_size!r}")
        self.send_size = send_size
        self.url = url
        self.timeout_s = float(timeout_s)
        self.retries = max(1, int(retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.fail_fast = bool(fail_fast)
        self._rng = random.Random(seed)
        self._clock: Callable[[], float] = time.monotonic
        self._sleep: Callable[[float], Any] = asyncio.sleep
        self.model = model
        self.labels = MODEL_LABELS[model]
        self._random_weights_override = bool(random_weights)
        pem_files = dict(root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain)
        self._grpc_kwargs = dict(ssl=ssl, **{key: None if path is None else str(path) for key, path in pem_files.items()})
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()  # binds to the running loop only when first waited on (Python >= 3.10)
        self._regions = RegionPool() if shared_memory else None
        self._client: Any = None  # tritonclient.grpc.aio, opened lazily inside the running event loop
        self._answered = False  # the server has answered this client at least once
        import tritonclient.grpc as grpcclient  # InferInput & co

        self._grpcclient = grpcclient

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    def _aio(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as aioclient

            self._client = aioclient.InferenceServerClient(self.url, **self._grpc_kwargs)
        return self._client

    async def close(self) -> None:
        regions = self._regions.drain() if self._regions is not None else []
        if self._client is not None:
            for region in regions:
                try:
                    await self._client.unregister_system_shared_memory(region.name, client_timeout=self.timeout_s)
                except Exception as exc:  # the server may be gone; the memory is freed either way
                    log.warning("could not unregister shared-memory region %s at %s: %s", region.name, self.url, exc)
            await self._client.close()
            self._client = None
        RegionPool.destroy(regions)

    async def __aenter__(self) -> "AsyncCxrltClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- retry policy -------------------------------------------------------------

    def backoff(self, retry: int) -> float:
        """The sleep before retry ``retry`` (1: before the 2nd attempt): exponential, capped, equal jitter."""
        return backoff_delay(retry, self.backoff_s, self.max_backoff_s, self._rng)

    async def _call(self, what: str, function: Callable[[float], Any]) -> tuple[Any, int]:
        """``await function(rpc_timeout)``'s value and the attempts it took, retried as the policy says."""
        now = self._clock()
        state = _Attempts(what, now, None if self.deadline_s is None else now + self.deadline_s)
        while True:
            state.count += 1
            state.timeout = self.timeout_s  # timeout_s, or the time left before the deadline if less
            if state.deadline is not None:
                state.timeout = max(0.001, min(self.timeout_s, state.deadline - self._clock()))
            try:
                value = await function(state.timeout)
            except Exception as exc:
                await self._sleep(self._retry_delay(exc, state))
            else:
                self._answered = True
                return value, state.count

    def _retry_delay(self, exc: Exception, state: _Attempts) -> float:
        """The sleep before the next attempt, or raise: non-gRPC errors as they are, others as ClientError."""
        if not hasattr(exc, "status"):
            raise exc
        if _status_name(exc) != "UNAVAILABLE":  # INVALID_ARGUMENT, INTERNAL, a timeout: never retried
            self._answered = True
            raise self._error(exc, state) from None
        state.last_message = _server_message(exc)
        if self.fail_fast and not self._answered and _mentions(state.last_message, UNREACHED_MESSAGES):
            raise ServerUnavailable(
                f"no Triton server answers at {self.url} ({state.last_message}); {_START_HINT}, or check the "
                "address (--url)", url=self.url, model=self.model, status="UNAVAILABLE",
                server_message=state.last_message, attempts=state.count) from None
        if state.count >= self.retries:
            why = "retries off" if self.retries == 1 else f"all {self.retries} attempts used"
            raise self._error(exc, state, why) from None
        delay = self.backoff(state.count)
        if state.deadline is not None and self._clock() + delay >= state.deadline:
            raise self._error(exc, state, f"the {self.deadline_s:g} s deadline ran out") from None
        log.info("attempt %d/%d to %s at %s failed (UNAVAILABLE: %s); retrying in %.2g s",
                 state.count, self.retries, state.what, self.url, state.last_message, delay)
        return delay

    def _error(self, exc: Exception, state: _Attempts, why: str = "") -> ClientError:
        status = _status_name(exc)
        message = _server_message(exc)
        what, attempts = state.what, state.count
        common = dict(url=self.url, model=self.model, status=status, server_message=message, attempts=attempts)
        tried = f"after {attempts} attempt{'' if attempts == 1 else 's'} in {self._clock() - state.started:.1f} s"
        if status == "UNAVAILABLE":
            if _mentions(message, OVERLOAD_MESSAGES):
                return ServerOverloaded(f"server overloaded: {self.url} could not {what} {tried} ({why}); last: "
                                        f"{message}; lower the load, or allow more time (deadline_s, --deadline-s)",
                                        **common)
            return ServerUnavailable(f"Triton server at {self.url} is unavailable: could not {what} {tried} ({why}); "
                                     f"last: {message}; {_START_HINT}", **common)
        if status == "INVALID_ARGUMENT":
            return ServerRejected(f"{self.url} rejected the request to {what}: {message}", **common)
        if status == "DEADLINE_EXCEEDED":
            cut = state.timeout < self.timeout_s  # the overall deadline, not timeout_s, ended this attempt
            if cut and attempts > 1:
                return RequestTimeout(f"{what} at {self.url} did not finish within the {self.deadline_s:g} s deadline: "
                                      f"{tried}; last: {state.last_message}; lower the load or raise deadline_s "
                                      "(--deadline-s)", **common)
            return RequestTimeout(f"{what} at {self.url} did not finish within {state.timeout:g} s; raise "
                                  f"{'deadline_s' if cut else 'timeout_s'} or check the server's load", **common)
        if status == "NOT_FOUND" or _mentions(message, ("unknown model", "is not found")):
            return ServerFailed(f"{self.url} does not serve model {self.model!r} ({message}); is the repository built "
                                "by `cxrlt build-repo` and every model loaded?", **common)
        return ServerFailed(f"{self.url} failed to {what} ({status}): {message}", **common)

    # --- readiness and the served configs -------------------------------------------

    async def is_ready(self) -> bool:
        """True when the server is up and the model is READY (one try, never raises)."""
        try:
            timeout = min(self.timeout_s, 5.0)
            client = self._aio()
            return bool(await client.is_server_ready(client_timeout=timeout)
                        and await client.is_model_ready(self.model, client_timeout=timeout))
        except Exception:
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> None:
        """Wait until :meth:`is_ready`; raise ServerUnavailable naming the URL after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not await self.is_ready():
            if time.monotonic() >= deadline:
                raise ServerUnavailable(
                    f"Triton server at {self.url} did not become ready with model {self.model!r} within "
                    f"{timeout_s:g} s; {_START_HINT}",
                    url=self.url, model=self.model, status="UNAVAILABLE",
                )
            await asyncio.sleep(poll_s)

    async def model_info(self) -> ModelInfo:
        """The served model's labels, trust_hint, random_weights, parameters and repository (read once)."""
        async with self._info_lock:
            if self._info is None:
                names = (self.model, *(m for m in PIPELINE_MODELS if m != self.model))  # read one after another
                self._info = self._model_info({name: await self._config(name, required=name in self._config_models())
                                               for name in names})
            return self._info

    async def _config(self, name: str, required: bool) -> Any:
        """The served ModelConfig of ``name``; None for a model not required that the server lacks."""
        client = self._aio()
        try:
            response, _ = await self._call(f"read the config of {name}",
                                           lambda timeout: client.get_model_config(name, client_timeout=timeout))
        except (ServerFailed, ServerRejected):
            if required:
                raise
            return None
        return response.config

    async def random_weights(self) -> bool:
        """Whether the served networks are randomly initialised (outputs NOT DIAGNOSTIC)."""
        return (await self.model_info()).random_weights

    async def repository(self) -> Repository:
        """The served repository's identity (from the pipeline models' configs)."""
        info = await self.model_info()
        assert info.repository is not None
        return info.repository

    # --- classification ------------------------------------------------------------

    async def classify(self, image: np.ndarray, hint: str | None = None, image_id: str = "image",
                       study_uid: str | None = None) -> FindingsResult:
        """Classify one uint16 [H, W] MONOCHROME2 image; ``hint`` is a DICOM ViewPosition term,
        ``study_uid`` its StudyInstanceUID (a canary release answers whole studies)."""
        info = await self.model_info()
        pixels = self._pixels(image, info)
        region = await self._region(pixels.nbytes)
        try:
            inputs, hint = self._inputs(pixels, hint, region, study_uid if info.takes_study else None)
            outputs = self._outputs(info)
            client = self._aio()
            timing: dict[str, float] = {}

            async def infer(timeout: float) -> Any:
                start = time.perf_counter()
                response = await client.infer(self.model, inputs, outputs=outputs, client_timeout=timeout)
                timing["ms"] = (time.perf_counter() - start) * 1000.0
                return response

            response, attempts = await self._call(f"classify {image_id!r} with {self.model}", infer)
        finally:
            if region is not None:
                self._regions.release(region)
        if not info.knows(_answered_release(response, info)[0]):  # a release switch since the configs were read
            async with self._info_lock:
                self._info = None
            info = await self.model_info()
        return self._result(response, info, hint, image_id, timing["ms"], attempts)

    async def classify_file(self, source: Any) -> FindingsResult:
        """Load a DICOM/PNG (a path, its bytes or a pydicom dataset) with cxrlt.io.images.load_image
        (hint from the header) and classify it. Raises cxrlt.io.images.InputError for an input the
        service cannot use."""
        loaded = await asyncio.to_thread(_load, source)
        study = str(loaded.dataset.get("StudyInstanceUID", "")) if loaded.dataset is not None else ""
        return await self.classify(loaded.pixels, hint=loaded.hint, image_id=loaded.image_id, study_uid=study or None)

    async def _region(self, byte_size: int) -> Region | None:
        if self._regions is None:
            return None
        region, new = self._regions.acquire(byte_size)
        if new:
            try:
                await self._aio().register_system_shared_memory(region.name, region.key, region.byte_size,
                                                                client_timeout=self.timeout_s)
            except Exception as exc:
                self._regions.discard(region)
                raise ClientError(
                    f"could not register a shared-memory region with {self.url} ({_server_message(exc)}); shared "
                    "memory needs the client on the server's host: drop shared_memory (--shared-memory) for a "
                    "remote server", url=self.url, model=self.model, status=_status_name(exc),
                ) from None
        return region

    def _inputs(self, pixels: np.ndarray, hint: str | None, region: Region | None = None,
                study_uid: str | None = None) -> tuple[list[Any], str | None]:
        image_input = self._grpcclient.InferInput("IMAGE", [1, *pixels.shape], "UINT16")
        if region is None:
            image_input.set_data_from_numpy(pixels[None])
        else:  # the pixels go into the region; the request only names it
            region.attach(image_input, pixels[None])
        inputs = [image_input]
        hint = None if hint is None or not str(hint).strip() else str(hint)
        if hint is not None and self.model in ROUTED_MODELS:
            hint_input = self._grpcclient.InferInput("PROJECTION_HINT", [1, 1], "BYTES")
            hint_input.set_data_from_numpy(np.array([[hint.encode("utf-8")]], dtype=np.object_))
            inputs.append(hint_input)
        if study_uid:  # its SHA-256, never the UID: no identifier reaches the server (docs/contract.md)
            study_input = self._grpcclient.InferInput("STUDY_KEY", [1, 1], "BYTES")
            study_input.set_data_from_numpy(np.array([[study_key(study_uid).encode("ascii")]], dtype=np.object_))
            inputs.append(study_input)
        return inputs, hint

    def _outputs(self, info: ModelInfo) -> list[Any]:
        names = ["PROBABILITIES", "PROJECTION", "PROJECTION_SCORE"] if self.model in ROUTED_MODELS else ["PROBABILITIES"]
        if info.decides and info.operating_points is not None:
            names += ["DECISIONS", "CALIBRATED_PROBABILITIES"]
        if info.ood_scored:
            names.append("OOD_SCORE")
        if info.names_release:
            names += ["RELEASE", "RELEASE_SHA256"]
        return [self._grpcclient.InferRequestedOutput(name) for name in names]

    def _model_info(self, configs: dict[str, Any]) -> ModelInfo:
        config = configs[self.model]
        dim = _output_dim(config, "PROBABILITIES")
        if dim is not None and dim != len(self.labels):
            raise ClientError(
                f"{self.url} serves {self.model} with {dim} probabilities, but the contract says "
                f"{len(self.labels)}; the server and this client are from different versions",
                url=self.url, model=self.model,
            )
        served = {name: _parameters(c) for name, c in configs.items() if c is not None}
        own_config = served[self.model]  # trust_hint: the model's own, else cxr_classifier's (which routes for it)
        own = [served[name] for name in self._config_models() if name in served]  # the model and its callees
        sizes = [int(p["preprocess_size"]) for p in own if p.get("preprocess_size")]
        return ModelInfo(
            name=self.model,
            labels=self.labels,
            accepts_hint=self.model in ROUTED_MODELS,
            trust_hint=_flag(own_config if "trust_hint" in own_config else served.get(CLASSIFIER_MODEL, {}), "trust_hint"),
            random_weights=self._random_weights_override or any(_flag(p, "random_weights") for p in own),
            input_size=max(sizes, default=None),
            parameters=served,
            repository=repository_identity(served),
            decides=_output_dim(config, "DECISIONS") is not None,
            operating_points=self._served_operating_points(own_config),
            ood_scored=_output_dim(config, "OOD_SCORE") is not None,
            ood_threshold=_ood_threshold(own_config),
            names_release=_output_dim(config, "RELEASE") is not None,
            takes_study=any(i.name == "STUDY_KEY" for i in config.input),
            live_release=int(own_config["release"]) if own_config.get("release", "").isdigit() else None,
            releases={int(key[len(CANDIDATE_PARAMETERS):]): json.loads(value) for key, value in own_config.items()
                        if key.startswith(CANDIDATE_PARAMETERS) and key[len(CANDIDATE_PARAMETERS):].isdigit() and value},
        )

    def _release_info(self, info: ModelInfo, release: int | None, sha256: str | None) -> ModelInfo:
        """`info` as release `release` answered: that release's own operating points, gate threshold and
        identity (the config's plain parameters are the live release's)."""
        if release is None or release == info.live_release or release not in info.releases:
            return info if not sha256 else dataclasses.replace(info, repository=_release_repository(info, sha256))
        own = {**info.parameters.get(self.model, {}), **info.releases[release]}
        return dataclasses.replace(info, operating_points=self._served_operating_points(own), ood_threshold=_ood_threshold(own),
                                   random_weights=self._random_weights_override or _flag(own, "random_weights"),
                                   repository=_release_repository(info, sha256 or own.get(REPOSITORY_PARAMETER, "")))

    def _served_operating_points(self, parameters: Mapping[str, str]) -> OperatingPoints | None:
        try:
            return served_operating_points(parameters)
        except ValueError as exc:
            raise ClientError(f"{self.url} serves {self.model} with {exc}", url=self.url, model=self.model) from None

    def _pixels(self, image: np.ndarray, info: ModelInfo) -> np.ndarray:
        """The uint16 image to send: downscaled first when `send_size` asks for it."""
        pixels = _as_uint16(image)
        if self.send_size is None:
            return pixels
        size = info.input_size if self.send_size == SEND_SIZE_SERVED else int(self.send_size)
        if size is None:
            raise ClientError(f"{self.url} does not say the input size of {self.model} (no preprocess_size parameter); "
                              "pass send_size as a number of pixels (--send-size N)", url=self.url, model=self.model)
        return downscale_for_sending(pixels, size)

    def _config_models(self) -> list[str]:
        """The configs the model's own facts come from: the model, and the models it calls."""
        if self.model == FINDINGS_MODEL:
            return [FINDINGS_MODEL, CLASSIFIER_MODEL, ZEROSHOT_MODEL]
        return [self.model]

    def _result(self, response: Any, info: ModelInfo, hint: str | None, image_id: str, latency_ms: float,
                attempts: int = 1) -> FindingsResult:
        probabilities = np.asarray(response.as_numpy("PROBABILITIES"), dtype=np.float64).reshape(-1)
        if probabilities.size != len(self.labels):
            raise ClientError(
                f"{self.url} returned {probabilities.size} probabilities from {self.model}; expected {len(self.labels)}",
                url=self.url, model=self.model,
            )
        if info.accepts_hint:
            raw = response.as_numpy("PROJECTION").reshape(-1)[0]
            projection = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            score = float(response.as_numpy("PROJECTION_SCORE").reshape(-1)[0])
            hint_used = _valid_hint(hint) and info.trust_hint
        else:  # cxr_zeroshot does not route: there is no projection to report
            projection, score, hint_used = "", 0.0, False
        release, sha256 = _answered_release(response, info)
        info = self._release_info(info, release, sha256)
        meta = response.get_response()
        return FindingsResult(
            image_id=image_id,
            probabilities={label: float(p) for label, p in zip(self.labels, probabilities)},
            projection=projection,
            projection_score=score,
            hint=hint,
            hint_used=bool(hint_used),
            model_name=meta.model_name or self.model,
            model_version=meta.model_version,
            random_weights=info.random_weights,
            latency_ms=latency_ms,
            attempts=attempts,
            repository_sha256=info.repository.sha256 if info.repository else None,
            release=release,
            **self._decisions(response, info, projection or None),
            **_ood(response, info),
        )

    def _decisions(self, response: Any, info: ModelInfo, projection: str | None) -> dict[str, Any]:
        """The served DECISIONS with their operating points, and the calibrated probabilities (when served)."""
        points = info.operating_points
        if points is None or not info.decides:
            return {}
        served = np.asarray(response.as_numpy("DECISIONS")).reshape(-1)
        decisions = decisions_from(points, dict(zip(self.labels, served.tolist())), projection)
        calibrated = None
        if points.calibrated:
            values = np.asarray(response.as_numpy("CALIBRATED_PROBABILITIES"), dtype=np.float64).reshape(-1)
            calibrated = {label: float(p) for label, p in zip(self.labels, values)}
        return {"decisions": decisions, "calibrated_probabilities": calibrated}


# ----------------------------------------------------------------------------- sync


def _shut_down(client: AsyncCxrltClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Close the async client on its loop, then stop the loop and its thread (idempotent)."""
    if loop.is_closed():
        return
    if thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=client.timeout_s + 5.0)
        except Exception as exc:  # the server may be gone; the loop stops either way
            log.debug("closing the client of %s: %s", client.url, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
    if not thread.is_alive():
        loop.close()


class CxrltClient:
    """Synchronous client: an :class:`AsyncCxrltClient` (same arguments, attributes, methods and
    results, without ``await``) run on a private event-loop thread. Thread-safe: many threads may
    call one client at once. ``aio`` is the async client itself.
    """

    def __init__(self, url: str = DEFAULT_URL, **options: Any) -> None:
        self.aio = AsyncCxrltClient(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"cxrlt-client {url}", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shut_down, self.aio, self._loop, self._thread)

    def __getattr__(self, name: str) -> Any:
        """The async client's attribute; its coroutine methods run on the loop thread and return their value."""
        if name == "aio":
            raise AttributeError(name)
        value = getattr(self.aio, name)
        if not inspect.iscoroutinefunction(value):
            return value

        @functools.wraps(value)
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._loop.is_closed():
                raise ClientError(f"this client of {self.aio.url} is closed", url=self.aio.url, model=self.aio.model)
            return asyncio.run_coroutine_threadsafe(value(*args, **kwargs), self._loop).result()

        return run

    def __repr__(self) -> str:
        return f"CxrltClient(url={self.aio.url!r}, model={self.aio.model!r})"

    def model_info(self) -> ModelInfo:  # read once; still there after close()
        return self.aio._info or self.__getattr__("model_info")()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "CxrltClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
