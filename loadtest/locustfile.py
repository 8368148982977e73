"""Locust load test of the served CXR-LT pipeline over gRPC (Triton's ModelInfer).

    locust -f loadtest/locustfile.py --headless --host grpc://127.0.0.1:8001 -u 4 -r 2 -t 60s \
        --classifier-weight 2 --zeroshot-weight 1 --findings-weight 1

or `cxrlt loadtest`, which adds Triton's metrics and target checks. Every call fires a locust request
event (request_type "grpc", name = the model). Each image's request is serialised once per process, at
locust's init event. Custom options also read environment variables (LOCUST_CLASSIFIER_WEIGHT=3).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: blocking gRPC calls then yield to other users

import grpc  # noqa: E402
from locust import User, constant, events  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402

from cxrlt.contract.served import CLASSIFIER_MODEL, FINDINGS_MODEL, ZEROSHOT_MODEL  # noqa: E402
from loadtest.kernel import (GRPC_OPTIONS, IMAGE_SETS, MODELS, Payload, error_text, load_payloads, model_infer,  # noqa: E402
                             probabilities, request_bytes)

OUTPUT_WIDTH = {CLASSIFIER_MODEL: 30, ZEROSHOT_MODEL: 6, FINDINGS_MODEL: 36}
TLS_FILES = ("root_certificates", "private_key", "certificate_chain")
# Filled once per process at the init event: (image name, model) -> the serialised request.
_REQUESTS: dict[tuple[str, str], bytes] = {}
_PAYLOADS: list[Payload] = []
_SETTINGS = {"request_timeout": 30.0}


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
        _SETTINGS["request_timeout"] = float(options.request_timeout)
    if not isinstance(environment.runner, MasterRunner):  # the master of a distributed run sends nothing
        prepare_requests(getattr(options, "image_set", "all"), send_hints=not getattr(options, "no_hints", False))
        logging.getLogger("cxrlt.loadtest").info("cxrlt load test: weights %s, images %s", weights, [p.name for p in _PAYLOADS])


def prepare_requests(image_set: str = "all", send_hints: bool = True) -> None:
    """Decode the images and serialise every model's request once."""
    _PAYLOADS[:] = load_payloads(image_set)
    if not _PAYLOADS:
        raise RuntimeError(f"image set {image_set!r} has no images")
    _REQUESTS.update({(p.name, m): request_bytes(p, m, send_hints) for p in _PAYLOADS for m in MODELS})


def _channel(address: str, options) -> grpc.Channel:
    files = {name: getattr(options, name, None) for name in TLS_FILES}
    if not (getattr(options, "ssl", False) or any(files.values())):
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    pem = [Path(path).read_bytes() if path else None for path in files.values()]  # root, key, chain: grpc's order
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(*pem), options=GRPC_OPTIONS)


class GrpcCallError(Exception):
    """A failed call as locust records it: the gRPC status and Triton's message (locust groups failures by repr)."""


class CxrGrpcUser(User):
    """A PACS integration sending one radiograph per call, round robin over the image set."""

    host = "grpc://127.0.0.1:8001"
    wait_time = constant(0)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not _REQUESTS:  # locust used as a library without the init event
            prepare_requests()
        address = (self.host or "").split("://", 1)[-1].rstrip("/")
        self.channel = _channel(address if ":" in address else f"{address}:8001", environment.parsed_options)
        self.images = itertools.islice(itertools.cycle(_PAYLOADS), random.randrange(len(_PAYLOADS)), None)

    def on_stop(self) -> None:
        self.channel.close()

    def infer(self, model: str) -> None:
        payload = next(self.images)
        length, exception, start = 0, None, time.perf_counter()
        try:
            response = model_infer(self.channel)(_REQUESTS[payload.name, model], timeout=_SETTINGS["request_timeout"])
            if (shape := probabilities(response).shape) != (1, OUTPUT_WIDTH[model]):
                raise RuntimeError(f"{model} returned PROBABILITIES of shape {shape}, expected (1, {OUTPUT_WIDTH[model]})")
            length = response.ByteSize()
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request in the report
            exception = GrpcCallError("%s: %s" % error_text(exc))
        self.environment.events.request.fire(
            request_type="grpc", name=model, response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            exception=exception, context={"image": payload.name, "hint": payload.hint})
