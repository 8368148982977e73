"""`cxrlt serve`: readiness, endpoints, clean shutdown, and clear load failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tritonclient.grpc as grpcclient

from cxrlt.server.launcher import ServerError, TritonServer, free_port

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
def test_serve_prints_endpoints_and_stops_on_sigterm(tiny_repository, tmp_path):
    grpc_port = free_port()
    command = [sys.executable, "-m", "cxrlt", "serve", "--repo", str(tiny_repository),
               "--grpc-port", str(grpc_port), "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    env = dict(os.environ, COLUMNS="200")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if "READY" in line or not line:
                break
        output = "".join(lines)
        assert f"gRPC 127.0.0.1:{grpc_port}" in output, output
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("cxr_findings") and client.is_model_ready("ensemble_lateral_swin")
        process.send_signal(signal.SIGTERM)
        # read() drains what readline() already buffered too (communicate() would skip it)
        remaining = process.stdout.read()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "NOT DIAGNOSTIC" in output + remaining
    with pytest.raises(Exception):
        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_live()


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="does not exist; build one with `cxrlt build-repo"):
        TritonServer(tmp_path / "nowhere").start()


def test_a_model_that_fails_to_load_is_named_with_tritons_reason(tiny_repository, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_repository, broken)
    (broken / "ensemble_frontal_cait" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    server = TritonServer(broken, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with pytest.raises(ServerError) as error:
        server.start(timeout=240)
    message = str(error.value)
    assert "model 'ensemble_frontal_cait'" in message
    assert "protobuf" in message.lower() or "onnx" in message.lower()  # Triton's reason, passed through
    assert server.process.poll() is not None  # nothing left running
