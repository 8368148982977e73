"""Shared fixtures: a tiny model repository built once, a real tritonserver serving it, and
an in-process `cxrlt` runner.

Every test that uses the session's server (directly or through another fixture) is marked
`e2e` here, and every other test that builds a repository `slow`, so the fast loop
`pytest -m "not e2e and not slow"` neither starts a server nor exports a network.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cxrlt.server.launcher import TritonServer, free_port
from tests.serve_process import Serve, stop_later, wait_for_stops

SERVER_FIXTURES = {"triton_server", "serve"}

os.environ.setdefault("OMP_NUM_THREADS", "1")


# Building a model repository exports nine networks to ONNX: tens of seconds on 2 cores.
BUILD_FIXTURES = {"tiny_repository"}


# The longest modules, minutes each on 2 cores, run first: the two workers (.ci/run) take modules in
# collection order, and one of these started last would run on alone at the end.
LONGEST_FIRST = ("test_training_pipeline.py", "test_drift_e2e.py", "test_releases_e2e.py", "test_cluster.py", "test_install.py")


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SERVER_FIXTURES & fixtures:
            item.add_marker(pytest.mark.e2e)
        elif BUILD_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def cxrlt() -> Callable[..., int]:
    """Run one `cxrlt` subcommand in process, the way cxrlt.cli.main does (without importing the others)."""
    from cxrlt.cli.main import COMMANDS

    def run(name: str, *argv: str) -> int:
        module = importlib.import_module(f"cxrlt.cli.commands.{COMMANDS[name][0]}")
        parser = argparse.ArgumentParser(prog=f"cxrlt {name}")
        module.add_arguments(parser)
        return int(module.run(parser.parse_args([str(a) for a in argv])) or 0)

    return run


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """The tiny-profile repository with seeded random weights (built once per test session)."""
    from exporters.build_repo import BuildOptions, build_repository

    out = tmp_path_factory.mktemp("repos") / "tiny"
    build_repository(out, BuildOptions(profile="tiny"))
    return out


@pytest.fixture(scope="session")
def triton_server(tiny_repository, tmp_path_factory):
    """A real tritonserver (the one in the nvidia-pytriton wheel) serving the tiny repository.

    The repository is copied so tests that edit configs use their own servers.
    Control mode is explicit with every model loaded at start-up, so tests may reload one.
    """
    repository = tmp_path_factory.mktemp("served") / "repo"
    shutil.copytree(tiny_repository, repository)
    server = TritonServer(
        repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log",
        extra_args=("--model-control-mode=explicit", "--load-model=*"),
    )
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture
def serve(tiny_repository):
    """Start `cxrlt serve ARGS` on the tiny repository (own ports); every one started is stopped."""
    started: list[Serve] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Serve:
        server = Serve(tiny_repository, *args, env=env)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        stop_later(server.stop)


@pytest.fixture(scope="session", autouse=True)
def _servers_stopped():
    """Every server whose stop a test began in the background has stopped when the session ends."""
    yield
    still_running = wait_for_stops()
    assert not still_running, f"{len(still_running)} test server(s) did not stop"


@pytest.fixture(scope="session")
def url(triton_server) -> str:
    """The session server's gRPC address."""
    return triton_server.endpoints.grpc


@pytest.fixture(scope="session")
def grpc_client(triton_server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(triton_server.endpoints.grpc)


@pytest.fixture(scope="session")
def real_cxr() -> np.ndarray:
    """The real PA chest CR shipped in pydicom-data, through the client's DICOM path."""
    from pydicom.data import get_testdata_file

    from cxrlt.io.images import load_image

    return load_image(get_testdata_file("RG1_UNCR.dcm")).pixels


@pytest.fixture(scope="session")
def synthetic_cxrs() -> dict[str, np.ndarray]:
    """A synthetic frontal and lateral radiograph (uint16) with a couple of findings drawn."""
    from cxrlt.io.synthetic import synthetic_radiographs

    return synthetic_radiographs()
