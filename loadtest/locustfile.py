"""Locust load test of the served CXR-LT pipeline over gRPC (tritonclient.grpc).

    locust -f loadtest/locustfile.py --headless --host grpc://127.0.0.1:8001 -u 4 -r 2 -t 60s \
        --classifier-weight 2 --zeroshot-weight 1 --findings-weight 1

or `cxrlt loadtest`, which adds Triton's metrics and target checks. Every call fires a locust request
event (request_type "grpc", name = the model). The images' gRPC tensors are built once per process,
at locust's init event. Custom options also read environment variables (LOCUST_CLASSIFIER_WEIGHT=3).
"""

from __future__ import annotations

import itertools
import logging
import random
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before tritonclient makes a channel: blocking gRPC calls then yield to other users

import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, events  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402

from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL
from loadtest.kernel import IMAGE_SETS, MODELS, Payload, grpc_request, load_payloads  # noqa: E402

OUTPUT_WIDTH = {CLASSIFIER_MODEL: 30, ZEROSHOT_MODEL: 6, FINDINGS_MODEL: 36}
TLS_FILES = ("root_certificates", "private_key", "certificate_chain")
# Filled once per process at the init event: (image name, model) -> (inputs, outputs).
_REQUESTS: dict[tuple[str, str], tuple[list, list]] = {}
_PAYLOADS: list[Payload] = []
_SETTINGS = {"request_timeout": 30.0, "think_time": 0.0}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("cxrlt", "CXR-LT gRPC load test")

    def add(flag: str, **kwargs) -> None:
        group.add_argument(flag, env_var=f"LOCUST_{flag[2:].replace('-', '_').upper()}", **kwargs)

    for model in MODELS:
        add(f"--{model.removeprefix('cxr_')}-weight", type=int, default=1, help=f"task weight of {model} (0 leaves it out)")
    add("--image-set", choices=IMAGE_SETS, default="all", help="all: the real CXR and the synthetic frontal and lateral ones")
    add("--no-hints", action="store_true", default=False, help="send no PROJECTION_HINT (the router decides the projection)")
    add("--request-timeout", type=float, default=30.0, help="seconds before a gRPC call counts as failed (default 30)")
    add("--think-time", type=float, default=0.0, help="seconds each user waits between requests (default 0: back to back)")
    add("--ssl", action="store_true", default=False, help="TLS to the server")
    for name in TLS_FILES:
        add(f"--{name.replace('_', '-')}", default=None, help="PEM file for TLS (as `cxrlt classify`)")


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    weights = {m: int(getattr(options, f"{m.removeprefix('cxr_')}_weight", 1)) for m in MODELS}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"task weights must be >= 0 with at least one > 0, got {weights}")
    CxrGrpcUser.tasks = [task for model in MODELS for task in [lambda user, m=model: user.infer(m)] * weights[model]]
    if options is not None:
        _SETTINGS.update(request_timeout=float(options.request_timeout), think_time=float(options.think_time))
    if not isinstance(environment.runner, MasterRunner):  # the master of a distributed run sends nothing
        prepare_requests(getattr(options, "image_set", "all"), send_hints=not getattr(options, "no_hints", False))
        logging.getLogger("cxrlt.loadtest").info("cxrlt load test: weights %s, images %s", weights, [p.name for p in _PAYLOADS])


def prepare_requests(image_set: str = "all", send_hints: bool = True) -> None:
    """Decode the images and build every model's gRPC inputs once."""
    _PAYLOADS[:] = load_payloads(image_set)
    if not _PAYLOADS:
        raise RuntimeError(f"image set {image_set!r} has no images")
    _REQUESTS.update({(p.name, m): grpc_request(p, m, send_hints) for p in _PAYLOADS for m in MODELS})


class GrpcCallError(Exception):
    """A failed call as locust records it: the gRPC status and Triton's message (locust groups failures by repr)."""


class CxrGrpcUser(User):
    """A PACS integration sending one radiograph per call, round robin over the image set."""

    host = "grpc://127.0.0.1:8001"

    def wait_time(self) -> float:
        return _SETTINGS["think_time"]

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not _REQUESTS:  # locust used as a library without the init event
            prepare_requests()
        options = environment.parsed_options
        files = {name: getattr(options, name, None) for name in TLS_FILES}
        address = (self.host or "").split("://", 1)[-1].rstrip("/")
        self.client = grpcclient.InferenceServerClient(address if ":" in address else f"{address}:8001",
                                                       ssl=bool(getattr(options, "ssl", False) or any(files.values())), **files)
        self.images = itertools.islice(itertools.cycle(_PAYLOADS), random.randrange(len(_PAYLOADS)), None)

    def on_stop(self) -> None:
        self.client.close()

    def infer(self, model: str) -> None:
        payload = next(self.images)
        inputs, outputs = _REQUESTS[payload.name, model]
        length, exception, start = 0, None, time.perf_counter()
        try:
            result = self.client.infer(model, inputs, outputs=outputs, client_timeout=_SETTINGS["request_timeout"])
            probabilities = result.as_numpy("PROBABILITIES")
            if probabilities is None or probabilities.shape != (1, OUTPUT_WIDTH[model]):
                raise RuntimeError(f"{model} returned PROBABILITIES of shape "
                                   f"{None if probabilities is None else probabilities.shape}, expected (1, {OUTPUT_WIDTH[model]})")
            length = result.get_response().ByteSize()
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request in the report
            status = exc.status() if callable(getattr(exc, "status", None)) else None
            message = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            exception = GrpcCallError(f"{status}: {message}" if status else f"{type(exc).__name__}: {message}")
        self.environment.events.request.fire(
            request_type="grpc", name=model, response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            exception=exception, context={"image": payload.name, "hint": payload.hint})
