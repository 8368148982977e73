"""Locust load test of the served CXR-LT pipeline over gRPC (Triton's ModelInfer), which `cxrlt loadtest` runs and adds Triton's
metrics and target checks to (loadtest/README.md, "Load test"). Every call fires a locust request event (request_type "grpc",
name = the model); each image's request is serialised once per process, at locust's init event. Custom options also read
environment variables (LOCUST_CLASSIFIER_WEIGHT=3); with --figures-json, the final figures are written from locust's own stats
as it exits."""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: blocking gRPC calls then yield to other users

import grpc  # noqa: E402
from locust import User, constant, events  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402
from locust.stats import RequestStats, StatsEntry, StatsError  # noqa: E402

from cxrlt.client.sdk import MODEL_LABELS  # noqa: E402
from loadtest.kernel import (GRPC_OPTIONS, IMAGE_SETS, MODELS, Payload, address, error_text, load_payloads,  # noqa: E402
                             model_infer, probabilities, request_bytes)

TLS_FILES = ("root_certificates", "private_key", "certificate_chain")
REQUESTS: dict[tuple[str, str], bytes] = {}  # (image name, model) -> its serialised request


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
    add("--figures-json", default=None, help="write the final figures per model and in all, and the failures, here")


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    weights = {m: getattr(options, f"{m.removeprefix('cxr_')}_weight") for m in MODELS}
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"task weights must be >= 0 with at least one > 0, got {weights}")
    CxrGrpcUser.tasks = [task for model in MODELS for task in [lambda user, m=model: user.infer(m)] * weights[model]]
    if not isinstance(environment.runner, MasterRunner):  # the master of a distributed run sends nothing
        CxrGrpcUser.payloads = load_payloads(options.image_set)
        REQUESTS.update({(p.name, m): request_bytes(p, m, not options.no_hints) for p in CxrGrpcUser.payloads for m in MODELS})
        logging.getLogger("cxrlt.loadtest").info("cxrlt load test: weights %s, images %s", weights,
                                                 [p.name for p in CxrGrpcUser.payloads])
    if options.figures_json:  # locust writes its CSV files once a second: they may miss the last second
        environment.events.quit.add_listener(lambda **_kwargs: write_figures(environment.stats, options.figures_json))


def write_figures(stats: RequestStats, path: str) -> None:
    """Each model's figures and all of them together, from locust's stats as it ends (percentiles None where
    nothing was sent), and the failures by model and error, most frequent first."""
    def figures(entry: StatsEntry) -> dict[str, float | None]:
        return {"requests": entry.num_requests, "failures": entry.num_failures, "rps": entry.total_rps,
                "failures_per_s": entry.total_fail_per_sec, "avg_ms": entry.avg_response_time, "min_ms": entry.min_response_time,
                "max_ms": entry.max_response_time, "avg_response_bytes": entry.avg_content_length,
                **{f"p{q}_ms": entry.get_response_time_percentile(q / 100) if entry.num_requests else None for q in (50, 95, 99)}}

    failures = [{"model": e.name, "error": StatsError.parse_error(e.error), "occurrences": e.occurrences}
                for e in sorted(stats.errors.values(), key=lambda error: -error.occurrences)]
    Path(path).write_text(json.dumps({"models": {name: figures(entry) for (name, _), entry in sorted(stats.entries.items())},
                                      "aggregated": figures(stats.total), "failures": failures}))


def _channel(url: str, options) -> grpc.Channel:
    files, parts = {name: getattr(options, name) for name in TLS_FILES}, address(url)
    target = parts.netloc if parts.port else f"{parts.netloc}:8001"
    if not (options.ssl or any(files.values())):
        return grpc.insecure_channel(target, options=GRPC_OPTIONS)
    pem = [Path(path).read_bytes() if path else None for path in files.values()]  # root, key, chain: grpc's order
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(*pem), options=GRPC_OPTIONS)


class GrpcCallError(Exception):
    """A failed call as locust records it: the gRPC status and Triton's message (locust groups failures by repr)."""


class CxrGrpcUser(User):
    """A PACS integration sending one radiograph per call, round robin over the image set."""

    host = "grpc://127.0.0.1:8001"
    wait_time = constant(0)
    payloads: tuple[Payload, ...] = ()

    def __init__(self, environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        self.channel, self.timeout_s = _channel(self.host or "", options), options.request_timeout
        self.images = itertools.islice(itertools.cycle(self.payloads), random.randrange(len(self.payloads)), None)

    def on_stop(self) -> None:
        self.channel.close()

    def infer(self, model: str) -> None:
        payload = next(self.images)
        length, exception, start = 0, None, time.perf_counter()
        try:
            response = model_infer(self.channel)(REQUESTS[payload.name, model], timeout=self.timeout_s)
            if (shape := probabilities(response).shape) != (expected := (1, len(MODEL_LABELS[model]))):
                raise RuntimeError(f"{model} returned PROBABILITIES of shape {shape}, expected {expected}")
            length = response.ByteSize()
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request in the report
            exception = GrpcCallError("%s: %s" % error_text(exc))
        self.environment.events.request.fire(
            request_type="grpc", name=model, response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            exception=exception, context={"image": payload.name, "hint": payload.hint})
