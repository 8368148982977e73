"""Locust load test of the served CXR-LT pipeline over gRPC (tritonclient.grpc).

    locust -f loadtest/locustfile.py --headless --host grpc://127.0.0.1:8001 -u 4 -r 2 -t 60s \
        --classifier-weight 2 --zeroshot-weight 1 --findings-weight 1

or `cxrlt loadtest`, which adds Triton's metrics and target checks. Every call fires a
locust request event: request_type "grpc", name = the model, response time in ms, the size
of the gRPC response in bytes, and the exception when the call failed.

The images (the real pydicom-data chest X-ray and the synthetic frontal and lateral ones)
are decoded and serialised into gRPC input tensors once per process, at locust's init
event, so the users spend their time on inference, not on DICOM decoding.

Locust monkey-patches the standard library for gevent; gRPC's C core does its own I/O, so
`grpc.experimental.gevent.init_gevent()` is called here, before any channel exists, to make
blocking gRPC calls yield to other greenlets (without it, users would run one at a time).
Custom options (also settable as environment variables, e.g. LOCUST_CLASSIFIER_WEIGHT=3):
--classifier-weight, --zeroshot-weight, --findings-weight, --image-set, --no-hints,
--request-timeout, --think-time.
"""

from __future__ import annotations

import itertools
import logging
import random
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before tritonclient makes a channel

import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, events, task  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402

from loadtest.payloads import IMAGE_SETS, Payload, grpc_inputs, load_payloads, requested_outputs  # noqa: E402

log = logging.getLogger("cxrlt.loadtest")

DEFAULT_HOST = "grpc://127.0.0.1:8001"
OUTPUT_WIDTH = {"cxr_classifier": 30, "cxr_zeroshot": 6, "cxr_findings": 36}
WEIGHT_OPTIONS = {"cxr_classifier": "classifier_weight", "cxr_zeroshot": "zeroshot_weight", "cxr_findings": "findings_weight"}

# Filled once per process at the init event: (image name, model) -> (inputs, outputs).
_REQUESTS: dict[tuple[str, str], tuple[list, list]] = {}
_PAYLOADS: list[Payload] = []
_SETTINGS = {"request_timeout": 30.0, "think_time": 0.0}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("cxrlt", "CXR-LT gRPC load test")
    for model, dest in WEIGHT_OPTIONS.items():
        flag = "--" + dest.replace("_", "-")
        group.add_argument(flag, type=int, default=1, env_var=f"LOCUST_{dest.upper()}",
                           help=f"task weight of {model} (0 leaves it out; default 1)")
    group.add_argument("--image-set", choices=IMAGE_SETS, default="all", env_var="LOCUST_IMAGE_SET",
                       help="all: the real CXR and the synthetic frontal and lateral ones (default)")
    group.add_argument("--no-hints", action="store_true", default=False, env_var="LOCUST_NO_HINTS",
                       help="send no PROJECTION_HINT (the router decides the projection)")
    group.add_argument("--request-timeout", type=float, default=30.0, env_var="LOCUST_REQUEST_TIMEOUT",
                       help="seconds before a gRPC call counts as failed (default 30)")
    group.add_argument("--think-time", type=float, default=0.0, env_var="LOCUST_THINK_TIME",
                       help="seconds each user waits between requests (default 0: closed loop, back to back)")
    group.add_argument("--ssl", action="store_true", default=False, env_var="LOCUST_SSL", help="TLS to the server")
    for flag in ("--root-certificates", "--private-key", "--certificate-chain"):
        group.add_argument(flag, default=None, env_var=f"LOCUST_{flag[2:].replace('-', '_').upper()}",
                           help="PEM file for TLS (as `cxrlt classify`)")


def tls_options(options) -> dict:
    files = {name: getattr(options, name, None) for name in ("root_certificates", "private_key", "certificate_chain")}
    return {"ssl": bool(getattr(options, "ssl", False) or any(files.values())), **files}


def task_weights(options) -> dict[str, int]:
    weights = {model: int(getattr(options, dest, 1)) for model, dest in WEIGHT_OPTIONS.items()}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"task weights must be >= 0 with at least one > 0, got {weights}")
    return weights


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    weights = task_weights(options) if options is not None else {m: 1 for m in WEIGHT_OPTIONS}
    tasks = {"cxr_classifier": CxrGrpcUser.classifier, "cxr_zeroshot": CxrGrpcUser.zeroshot, "cxr_findings": CxrGrpcUser.findings}
    CxrGrpcUser.tasks = [fn for model, fn in tasks.items() for _ in range(weights[model])]
    if options is not None:
        _SETTINGS.update(request_timeout=float(options.request_timeout), think_time=float(options.think_time))
    if isinstance(environment.runner, MasterRunner):
        return  # the master of a distributed run sends nothing
    prepare_requests(getattr(options, "image_set", "all"), send_hints=not getattr(options, "no_hints", False))
    log.info("cxrlt load test: weights %s, images %s", weights, [p.name for p in _PAYLOADS])


def prepare_requests(image_set: str = "all", send_hints: bool = True) -> None:
    """Decode the images and build every model's gRPC inputs once."""
    _PAYLOADS[:] = load_payloads(image_set)
    if not _PAYLOADS:
        raise RuntimeError(f"image set {image_set!r} has no images")
    _REQUESTS.clear()
    for payload in _PAYLOADS:
        for model in OUTPUT_WIDTH:
            _REQUESTS[payload.name, model] = (grpc_inputs(payload, model, send_hints), requested_outputs(model))


class GrpcCallError(Exception):
    """A failed call as locust records it: the gRPC status and Triton's message (locust groups failures by repr)."""

    @classmethod
    def from_exception(cls, exc: Exception) -> "GrpcCallError":
        status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
        message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
        return cls(f"{status}: {message}" if status else f"{type(exc).__name__}: {message}")


def grpc_address(host: str | None) -> str:
    """'grpc://127.0.0.1:8001' or '127.0.0.1:8001' -> '127.0.0.1:8001'."""
    address = (host or DEFAULT_HOST).split("://", 1)[-1].rstrip("/")
    return address if ":" in address else f"{address}:8001"


class CxrGrpcUser(User):
    """A PACS integration sending one radiograph per call, round robin over the image set."""

    host = DEFAULT_HOST

    def wait_time(self) -> float:
        return _SETTINGS["think_time"]

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not _REQUESTS:  # locust used as a library without the init event
            prepare_requests()
        self.client = grpcclient.InferenceServerClient(grpc_address(self.host), **tls_options(environment.parsed_options))
        start = random.randrange(len(_PAYLOADS))
        self._images = itertools.islice(itertools.cycle(_PAYLOADS), start, None)

    def on_stop(self) -> None:
        self.client.close()

    def infer(self, model: str) -> None:
        payload = next(self._images)
        inputs, outputs = _REQUESTS[payload.name, model]
        length, exception = 0, None
        start = time.perf_counter()
        try:
            result = self.client.infer(model, inputs, outputs=outputs, client_timeout=_SETTINGS["request_timeout"])
            probabilities = result.as_numpy("PROBABILITIES")
            if probabilities is None or probabilities.shape != (1, OUTPUT_WIDTH[model]):
                raise RuntimeError(f"{model} returned PROBABILITIES of shape "
                                   f"{None if probabilities is None else probabilities.shape}, expected (1, {OUTPUT_WIDTH[model]})")
            length = result.get_response().ByteSize()
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request in the report
            exception = GrpcCallError.from_exception(exc)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        self.environment.events.request.fire(
            request_type="grpc", name=model, response_time=elapsed_ms, response_length=length,
            exception=exception, context={"image": payload.name, "hint": payload.hint},
        )

    @task
    def classifier(self) -> None:
        self.infer("cxr_classifier")

    @task
    def zeroshot(self) -> None:
        self.infer("cxr_zeroshot")

    @task
    def findings(self) -> None:
        self.infer("cxr_findings")
