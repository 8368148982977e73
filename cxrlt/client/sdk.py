"""The gRPC client SDK: send a radiograph to Triton, get a :class:`FindingsResult` back.

Two clients with the same behaviour, one synchronous and one for asyncio::

    from cxrlt.client import CxrltClient

    with CxrltClient("127.0.0.1:8001") as client:
        client.wait_until_ready(60)
        result = client.classify_file("chest.dcm")      # DICOM/PNG -> pixels + header hint
        print(result.projection, result.task1()["cardiomegaly"])

    async with AsyncCxrltClient("127.0.0.1:8001") as client:
        result = await client.classify(pixels, hint="PA")

Behaviour shared by both:

* every RPC carries a timeout: ``timeout_s``, or the time left before the call's overall
  ``deadline_s`` when that is sooner (the deadline covers every attempt and sleep of one
  call, e.g. one image; ``None``: no overall deadline);
* a call that meets gRPC ``UNAVAILABLE`` (server down, restarting, or overloaded: a full
  queue, "Exceeds maximum queue size", or a queue timeout, "Request timeout expired") is
  retried with exponential backoff and equal jitter: before retry k it sleeps a random
  time in ``[b/2, b]``, ``b = min(max_backoff_s, backoff_s * 2**(k-1))`` (``seed`` makes
  it repeatable). It stops at ``retries`` attempts in all or when the next sleep would
  end past the deadline, whichever comes first; then :class:`ServerUnavailable`
  (:class:`ServerOverloaded` when the server said it was overloaded) says how many
  attempts were made in how many seconds and the server's last message;
* a result records the attempts its call took (``FindingsResult.attempts``);
* ``INVALID_ARGUMENT`` (the image or hint is bad) is never retried: :class:`ServerRejected`
  carries Triton's message; any other server error is :class:`ServerFailed`, a deadline
  is :class:`RequestTimeout`; all derive from :class:`ClientError`;
* the served model's config is read once and cached: ``trust_hint`` of ``cxr_classifier``
  (to report whether the hint routed the image) and the ``random_weights`` parameter the
  repository builder writes into every Python model's config.
"""

from __future__ import annotations

import abc

import asyncio
import dataclasses
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS, projection_from_hint
from cxrlt.contract.preprocessing import MIN_SERVED_SIDE, downscale_for_sending
from cxrlt.contract.results import FindingsResult
from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, SEND_SIZE_SERVED, ZEROSHOT_MODEL
from cxrlt.client.shared_memory import Region, RegionPool

__all__ = [
    "DEFAULT_URL",
    "MODEL_LABELS",
    "ClientError",
    "ServerUnavailable",
    "ServerOverloaded",
    "ServerRejected",
    "ServerFailed",
    "RequestTimeout",
    "ModelInfo",
    "CxrltClient",
    "AsyncCxrltClient",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "127.0.0.1:8001"
# Served model -> the labels of its PROBABILITIES output, in output order (the contract).
MODEL_LABELS: dict[str, tuple[str, ...]] = {
    FINDINGS_MODEL: ALL_LABELS,
    CLASSIFIER_MODEL: TASK1_LABELS,
    ZEROSHOT_MODEL: TASK2_LABELS,
}
# Models that take PROJECTION_HINT and return PROJECTION / PROJECTION_SCORE.
_ROUTED_MODELS = (FINDINGS_MODEL, CLASSIFIER_MODEL)

_START_HINT = "start one with `cxrlt serve --model-repository DIR` (or try `cxrlt demo`)"


# ----------------------------------------------------------------------------- errors


class ClientError(RuntimeError):
    """A request could not be completed. ``status`` is the gRPC code name (e.g. 'UNAVAILABLE')."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        model: str | None = None,
        status: str | None = None,
        server_message: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.model = model
        self.status = status
        self.server_message = server_message
        self.attempts = attempts


class ServerUnavailable(ClientError):
    """The server could not be reached (or stayed UNAVAILABLE) after every attempt."""


class ServerOverloaded(ServerUnavailable):
    """The server stayed overloaded (its queue full or timed out) for every attempt in the deadline."""


class ServerRejected(ClientError):
    """The server answered INVALID_ARGUMENT: the input is bad; retrying cannot help."""


class ServerFailed(ClientError):
    """The server answered with an error other than INVALID_ARGUMENT/UNAVAILABLE (e.g. INTERNAL)."""


class RequestTimeout(ClientError):
    """The call did not finish within the per-call timeout (gRPC DEADLINE_EXCEEDED)."""


def _status_name(exc: Exception) -> str:
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    return str(status or "UNKNOWN").rsplit(".", 1)[-1]


def _server_message(exc: Exception) -> str:
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else None
    return str(message or exc)


# What Triton's queue policy answers (UNAVAILABLE) when an entry model's queue is full or a
# request waited past its queue timeout; a BLS model passes its members' answer on.
OVERLOAD_MESSAGES = ("exceeds maximum queue size", "request timeout expired")


def _overloaded(message: str | None) -> bool:
    return message is not None and any(phrase in message.lower() for phrase in OVERLOAD_MESSAGES)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclasses.dataclass
class _Attempts:
    """One call's retry state: what it does, when it started and must end, the attempts so far."""

    what: str
    started: float  # the client's clock
    deadline: float | None  # the client's clock; None: no overall deadline
    count: int = 0
    timeout: float = 0.0  # the current attempt's RPC timeout
    last_message: str | None = None  # the server's last UNAVAILABLE message


# ----------------------------------------------------------------------------- model info


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the client learns once from the served model's config."""

    name: str
    labels: tuple[str, ...]
    accepts_hint: bool  # the model takes PROJECTION_HINT and returns PROJECTION
    trust_hint: bool  # cxr_classifier routes by a valid hint instead of its router
    random_weights: bool  # some served network is randomly initialised: NOT DIAGNOSTIC
    input_size: int | None = None  # the largest side any served network takes (its preprocess_size)


def _parameter(config: Any, key: str) -> str | None:
    parameters = config.parameters
    return parameters[key].string_value if key in parameters else None


def _as_bool(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _output_dim(config: Any, name: str) -> int | None:
    for output in config.output:
        if output.name == name:
            return int(output.dims[-1]) if output.dims else None
    return None


# ----------------------------------------------------------------------------- shared logic


class _ClientBase(abc.ABC):
    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        deadline_s: float | None = None,
        max_backoff_s: float = 5.0,
        seed: int | None = None,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        model: str = FINDINGS_MODEL,
        random_weights: bool = False,
        shared_memory: bool = False,
        send_size: int | str | None = None,
    ) -> None:
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
        self._rng = random.Random(seed)
        self._clock: Callable[[], float] = time.monotonic
        self.model = model
        self.labels = MODEL_LABELS[model]
        self._random_weights_override = bool(random_weights)
        self._grpc_kwargs = dict(
            ssl=ssl,
            root_certificates=None if root_certificates is None else str(root_certificates),
            private_key=None if private_key is None else str(private_key),
            certificate_chain=None if certificate_chain is None else str(certificate_chain),
        )
        self._info: ModelInfo | None = None
        self._regions = RegionPool() if shared_memory else None
        import tritonclient.grpc as grpcclient  # InferInput & co, shared by the sync and aio clients

        self._grpcclient = grpcclient
        self._connect()

    @abc.abstractmethod
    def _connect(self) -> None:
        """Set up the transport (each client kind its own)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, model={self.model!r})"

    # --- retry policy (one implementation; the sync and asyncio loops only sleep and await) ---

    def backoff(self, retry: int) -> float:
        """The sleep before retry ``retry`` (1: before the 2nd attempt): exponential, capped, equal jitter."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return ceiling / 2 + self._rng.uniform(0.0, ceiling / 2)

    def _begin(self, what: str) -> _Attempts:
        now = self._clock()
        return _Attempts(what, now, None if self.deadline_s is None else now + self.deadline_s)

    def _next_attempt(self, state: _Attempts) -> float:
        """Count an attempt; its RPC timeout: timeout_s, or the time left before the deadline if less."""
        state.count += 1
        state.timeout = self.timeout_s
        if state.deadline is not None:
            state.timeout = max(0.001, min(self.timeout_s, state.deadline - self._clock()))
        return state.timeout

    def _retry_delay(self, exc: Exception, state: _Attempts) -> float:
        """The sleep before the next attempt, or raise: non-gRPC errors as they are, others as ClientError."""
        if not hasattr(exc, "status"):
            raise exc
        if _status_name(exc) != "UNAVAILABLE":  # INVALID_ARGUMENT, INTERNAL, a timeout: never retried
            raise self._error(exc, state) from None
        state.last_message = _server_message(exc)
        if state.count >= self.retries:
            why = "retries off" if self.retries == 1 else f"all {self.retries} attempts used"
            raise self._error(exc, state, why) from None
        delay = self.backoff(state.count)
        if state.deadline is not None and self._clock() + delay >= state.deadline:
            raise self._error(exc, state, f"the {self.deadline_s:g} s deadline ran out") from None
        log.info(
            "attempt %d/%d to %s at %s failed (UNAVAILABLE: %s); retrying in %.2g s",
            state.count, self.retries, state.what, self.url, state.last_message, delay,
        )
        return delay

    def _error(self, exc: Exception, state: _Attempts, why: str = "") -> ClientError:
        status = _status_name(exc)
        message = _server_message(exc)
        what, attempts = state.what, state.count
        common = dict(url=self.url, model=self.model, status=status, server_message=message, attempts=attempts)
        tried = f"after {_plural(attempts, 'attempt')} in {self._clock() - state.started:.1f} s"
        if status == "UNAVAILABLE":
            if _overloaded(message):
                return ServerOverloaded(
                    f"server overloaded: {self.url} could not {what} {tried} ({why}); last: {message}; "
                    "lower the load, or allow more time (deadline_s, --deadline-s)",
                    **common,
                )
            return ServerUnavailable(
                f"Triton server at {self.url} is unavailable: could not {what} {tried} ({why}); last: {message}; "
                f"{_START_HINT}",
                **common,
            )
        if status == "INVALID_ARGUMENT":
            return ServerRejected(f"{self.url} rejected the request to {what}: {message}", **common)
        if status == "DEADLINE_EXCEEDED":
            cut = state.timeout < self.timeout_s  # the overall deadline, not timeout_s, ended this attempt
            if cut and attempts > 1:
                return RequestTimeout(
                    f"{what} at {self.url} did not finish within the {self.deadline_s:g} s deadline: {tried}; "
                    f"last: {state.last_message}; lower the load or raise deadline_s (--deadline-s)",
                    **common,
                )
            return RequestTimeout(
                f"{what} at {self.url} did not finish within {state.timeout:g} s; raise "
                f"{'deadline_s' if cut else 'timeout_s'} or check the server's load",
                **common,
            )
        if status == "NOT_FOUND" or "unknown model" in message.lower() or "is not found" in message.lower():
            return ServerFailed(
                f"{self.url} does not serve model {self.model!r} ({message}); is the repository built by "
                "`cxrlt build-repo` and every model loaded?",
                **common,
            )
        return ServerFailed(f"{self.url} failed to {what} ({status}): {message}", **common)

    # --- requests and responses ----------------------------------------------------

    def _inputs(self, grpc_module: Any, pixels: np.ndarray, hint: str | None,
                region: Region | None = None) -> tuple[list[Any], str | None]:
        image_input = grpc_module.InferInput("IMAGE", [1, *pixels.shape], "UINT16")
        if region is None:
            image_input.set_data_from_numpy(pixels[None])
        else:  # the pixels go into the region; the request only names it
            region.attach(image_input, pixels[None])
        inputs = [image_input]
        hint = None if hint is None or not str(hint).strip() else str(hint)
        if hint is not None and self.model in _ROUTED_MODELS:
            hint_input = grpc_module.InferInput("PROJECTION_HINT", [1, 1], "BYTES")
            hint_input.set_data_from_numpy(np.array([[hint.encode("utf-8")]], dtype=np.object_))
            inputs.append(hint_input)
        return inputs, hint

    def _registration_error(self, exc: Exception) -> ClientError:
        return ClientError(
            f"could not register a shared-memory region with {self.url} ({_server_message(exc)}); shared memory "
            "needs the client on the server's host: drop shared_memory (--shared-memory) for a remote server",
            url=self.url, model=self.model, status=_status_name(exc),
        )

    def _outputs(self, grpc_module: Any) -> list[Any]:
        names = ["PROBABILITIES", "PROJECTION", "PROJECTION_SCORE"] if self.model in _ROUTED_MODELS else ["PROBABILITIES"]
        return [grpc_module.InferRequestedOutput(name) for name in names]

    def _model_info(self, configs: dict[str, Any]) -> ModelInfo:
        config = configs[self.model]
        dim = _output_dim(config, "PROBABILITIES")
        if dim is not None and dim != len(self.labels):
            raise ClientError(
                f"{self.url} serves {self.model} with {dim} probabilities, but the contract says "
                f"{len(self.labels)}; the server and this client are from different versions",
                url=self.url, model=self.model,
            )
        random_weights = self._random_weights_override or any(
            _as_bool(_parameter(c, "random_weights")) for c in configs.values() if c is not None
        )
        trust_hint = False
        classifier = configs.get(CLASSIFIER_MODEL)
        if classifier is not None:
            trust_hint = _as_bool(_parameter(classifier, "trust_hint"))
        sizes = [int(v) for c in configs.values() if c is not None for v in [_parameter(c, "preprocess_size")] if v]
        return ModelInfo(
            name=self.model,
            labels=self.labels,
            accepts_hint=self.model in _ROUTED_MODELS,
            trust_hint=trust_hint,
            random_weights=random_weights,
            input_size=max(sizes, default=None),
        )

    def _pixels(self, image: np.ndarray, info: ModelInfo) -> np.ndarray:
        """The uint16 image to send: downscaled first when `send_size` asks for it."""
        pixels = _as_uint16(image)
        if self.send_size is None:
            return pixels
        if self.send_size == SEND_SIZE_SERVED:
            if info.input_size is None:
                raise ClientError(
                    f"{self.url} does not say the input size of {self.model} (no preprocess_size parameter); "
                    "pass send_size as a number of pixels (--send-size N)", url=self.url, model=self.model,
                )
            return downscale_for_sending(pixels, info.input_size)
        return downscale_for_sending(pixels, int(self.send_size))

    def _config_models(self) -> list[str]:
        """The configs to read: the model itself, and the models it calls (their input sizes too)."""
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
            valid_hint = _valid_hint(hint)
            hint_used = valid_hint and info.trust_hint
        else:  # cxr_zeroshot does not route: there is no projection to report
            projection, score, hint_used = "", 0.0, False
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
        )


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


def _load(path: str | Path):
    from cxrlt.io.images import load_image  # pydicom, Pillow: only when files are classified

    return load_image(path)


# ----------------------------------------------------------------------------- sync


class CxrltClient(_ClientBase):
    """Synchronous client (tritonclient.grpc). Thread-safe: one channel, many threads.

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
    """

    def _connect(self) -> None:
        self._client = self._grpcclient.InferenceServerClient(self.url, **self._grpc_kwargs)
        self._lock = threading.Lock()
        self._sleep: Callable[[float], None] = time.sleep

    def close(self) -> None:
        if self._regions is not None:
            regions = self._regions.drain()
            for region in regions:
                try:
                    self._client.unregister_system_shared_memory(region.name, client_timeout=self.timeout_s)
                except Exception as exc:  # the server may be gone; the memory is freed either way
                    log.warning("could not unregister shared-memory region %s at %s: %s", region.name, self.url, exc)
            RegionPool.destroy(regions)
        self._client.close()

    def _region(self, byte_size: int) -> Region | None:
        if self._regions is None:
            return None
        region, new = self._regions.acquire(byte_size)
        if new:
            try:
                self._client.register_system_shared_memory(region.name, region.key, region.byte_size,
                                                           client_timeout=self.timeout_s)
            except Exception as exc:
                self._regions.discard(region)
                raise self._registration_error(exc) from None
        return region

    def __enter__(self) -> "CxrltClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, function: Callable[[float], Any]) -> tuple[Any, int]:
        """``function(rpc_timeout)``'s value and the attempts it took, retried as the policy says."""
        state = self._begin(what)
        while True:
            try:
                return function(self._next_attempt(state)), state.count
            except Exception as exc:
                self._sleep(self._retry_delay(exc, state))

    def is_ready(self) -> bool:
        """True when the server is up and the model is READY (one try, never raises)."""
        try:
            timeout = min(self.timeout_s, 5.0)
            return bool(self._client.is_server_ready(client_timeout=timeout)
                        and self._client.is_model_ready(self.model, client_timeout=timeout))
        except Exception:
            return False

    def wait_until_ready(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> None:
        """Block until :meth:`is_ready`; raise ServerUnavailable naming the URL after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() >= deadline:
                raise ServerUnavailable(
                    f"Triton server at {self.url} did not become ready with model {self.model!r} within "
                    f"{timeout_s:g} s; {_START_HINT}",
                    url=self.url, model=self.model, status="UNAVAILABLE",
                )
            time.sleep(poll_s)

    def model_info(self) -> ModelInfo:
        """The served model's labels, trust_hint and random_weights (read once, then cached)."""
        with self._lock:
            if self._info is None:
                configs = {}
                for name in self._config_models():
                    configs[name], _ = self._call(
                        f"read the config of {name}",
                        lambda timeout, name=name: self._client.get_model_config(name, client_timeout=timeout).config,
                    )
                self._info = self._model_info(configs)
            return self._info

    def random_weights(self) -> bool:
        """Whether the served networks are randomly initialised (outputs NOT DIAGNOSTIC)."""
        return self.model_info().random_weights

    def classify(self, image: np.ndarray, hint: str | None = None, image_id: str = "image") -> FindingsResult:
        """Classify one uint16 [H, W] MONOCHROME2 image; ``hint`` is a DICOM ViewPosition term."""
        info = self.model_info()
        pixels = self._pixels(image, info)
        region = self._region(pixels.nbytes)
        try:
            inputs, hint = self._inputs(self._grpcclient, pixels, hint, region)
            outputs = self._outputs(self._grpcclient)
            timing: dict[str, float] = {}

            def infer(timeout: float) -> Any:
                start = time.perf_counter()
                response = self._client.infer(self.model, inputs, outputs=outputs, client_timeout=timeout)
                timing["ms"] = (time.perf_counter() - start) * 1000.0
                return response

            response, attempts = self._call(f"classify {image_id!r} with {self.model}", infer)
        finally:
            if region is not None:
                self._regions.release(region)
        return self._result(response, info, hint, image_id, timing["ms"], attempts)

    def classify_file(self, path: str | Path) -> FindingsResult:
        """Load a DICOM/PNG with cxrlt.io.images.load_image (hint from the header) and classify it.

        Raises cxrlt.io.images.InputError for a file the service cannot use.
        """
        loaded = _load(path)
        return self.classify(loaded.pixels, hint=loaded.hint, image_id=loaded.image_id)


# ----------------------------------------------------------------------------- asyncio


class AsyncCxrltClient(_ClientBase):
    """asyncio client (tritonclient.grpc.aio); same arguments and results as :class:`CxrltClient`.

    The gRPC channel is opened lazily inside the running event loop; use ``async with`` or
    call :meth:`close`. File loading (:meth:`classify_file`) runs in a worker thread.
    """

    def _connect(self) -> None:
        self._client: Any = None  # opened lazily inside the running event loop
        self._info_lock: asyncio.Lock | None = None
        self._sleep: Callable[[float], Any] = asyncio.sleep

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
                raise self._registration_error(exc) from None
        return region

    async def __aenter__(self) -> "AsyncCxrltClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, function: Callable[[float], Any]) -> tuple[Any, int]:
        """``await function(rpc_timeout)``'s value and the attempts it took, retried as the policy says."""
        state = self._begin(what)
        while True:
            try:
                return await function(self._next_attempt(state)), state.count
            except Exception as exc:
                await self._sleep(self._retry_delay(exc, state))

    async def is_ready(self) -> bool:
        try:
            timeout = min(self.timeout_s, 5.0)
            client = self._aio()
            return bool(await client.is_server_ready(client_timeout=timeout)
                        and await client.is_model_ready(self.model, client_timeout=timeout))
        except Exception:
            return False

    async def wait_until_ready(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> None:
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
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:
            if self._info is None:
                client = self._aio()
                configs = {}
                for name in self._config_models():
                    response, _ = await self._call(
                        f"read the config of {name}",
                        lambda timeout, name=name: client.get_model_config(name, client_timeout=timeout),
                    )
                    configs[name] = response.config
                self._info = self._model_info(configs)
            return self._info

    async def random_weights(self) -> bool:
        """Whether the served networks are randomly initialised (outputs NOT DIAGNOSTIC)."""
        return (await self.model_info()).random_weights

    async def classify(self, image: np.ndarray, hint: str | None = None, image_id: str = "image") -> FindingsResult:
        info = await self.model_info()
        pixels = self._pixels(image, info)
        region = await self._region(pixels.nbytes)
        try:
            inputs, hint = self._inputs(self._grpcclient, pixels, hint, region)
            outputs = self._outputs(self._grpcclient)
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
        return self._result(response, info, hint, image_id, timing["ms"], attempts)

    async def classify_file(self, path: str | Path) -> FindingsResult:
        loaded = await asyncio.to_thread(_load, path)
        return await self.classify(loaded.pixels, hint=loaded.hint, image_id=loaded.image_id)
