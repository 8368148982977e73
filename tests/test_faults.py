"""Faults against the real tritonserver, through `cxrlt serve` as a user runs it.

A killed member stub is detected and its model reloaded while requests flow; the deep health
check reports the dead stub that Triton's own ready endpoint hides; a killed launcher takes
its server and stubs with it; taken ports are named; a dead tritonserver ends `cxrlt serve`
with its log; a client killed holding shared-memory regions does not hurt the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cxrlt.client import CxrltClient, ServerUnavailable
from cxrlt.client.health import check_health
from cxrlt.server.launcher import check_ports_free, free_port
from cxrlt.server.watchdog import stubs_of
from tests.serve_process import running, stop_later

pytestmark = pytest.mark.e2e

MEMBER = "ensemble_frontal_pcam"


@pytest.fixture(scope="module")
def watched(tiny_repository):
    """One `cxrlt serve` (watchdog every 4 s) for the faults it must survive and keep serving
    after: a killed member stub, a client killed holding shared memory."""
    from tests.serve_process import Serve

    server = Serve(tiny_repository, "--watchdog-interval", "4")
    try:
        server.wait_ready()
        yield server
    finally:
        stop_later(server.stop)


def _http_ready(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as response:
        return response.status


@pytest.mark.timeout(600)
def test_a_killed_member_stub_is_reported_and_brought_back_while_requests_flow(watched, real_cxr):
    server = watched
    client = CxrltClient(server.url, retries=1, timeout_s=30)
    expected = client.classify(real_cxr, hint="PA").probabilities
    outcomes: list[tuple[float, str, dict | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        with CxrltClient(server.url, retries=1, timeout_s=30) as flowing:
            while not stop.is_set():
                try:
                    outcomes.append((time.monotonic(), "ok", flowing.classify(real_cxr, hint="PA").probabilities))
                except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                    outcomes.append((time.monotonic(), str(exc), None))
                time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        time.sleep(1.0)
        (stub,) = [s for s in stubs_of(server.server_pid()) if s.model == MEMBER]
        os.kill(stub.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(0.5)
        # Triton's own readiness hides the dead stub; the deep check does not.
        assert _http_ready(server.ports["http"]) == 200
        report = check_health(server.url, timeout_s=10)
        assert not report.ready and any(MEMBER in p for p in report.problems), report.lines()
        deadline = killed_at + 30
        while time.monotonic() < deadline:
            recent = [o for o in outcomes if o[0] > time.monotonic() - 1.0]
            if any(o[1] == "ok" and o[0] > killed_at + 1.0 for o in recent) and check_health(server.url).ready:
                break
            time.sleep(0.5)
        recovered_at = time.monotonic()
    finally:
        stop.set()
        sender.join(30)
        client.close()
    recovery_s = recovered_at - killed_at
    print(f"member stub killed -> requests succeed again after {recovery_s:.1f} s")
    assert recovery_s < 30, server.output
    assert f"reloading model '{MEMBER}'" in server.output and f"model '{MEMBER}' is back" in server.output
    failures = [o for o in outcomes if o[1] != "ok"]
    assert failures, "no request met the dead stub"
    for _, message, _ in failures:  # failed loudly, naming the member: never partial answers
        assert MEMBER in message, message
    for _, status, probabilities in outcomes:
        if status == "ok":
            assert max(abs(probabilities[k] - expected[k]) for k in expected) <= 1e-6
    assert any(o[1] == "ok" and o[0] > killed_at + 1.0 for o in outcomes)


@pytest.mark.timeout(300)
def test_a_killed_launcher_leaves_no_process_and_frees_its_ports(serve):
    server = serve()
    tritonserver = server.server_pid()
    family = {tritonserver, *(s.pid for s in stubs_of(tritonserver))}
    assert len(family) > 5
    server.process.kill()  # SIGKILL: no chance to clean up
    server.process.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(running(pid) for pid in family):
        time.sleep(0.2)
    assert not [pid for pid in family if running(pid)], "processes outlived the killed launcher"
    check_ports_free("127.0.0.1", server.ports)  # the check `cxrlt serve` makes: raises naming a held port


def test_a_taken_port_is_named_before_anything_starts(tiny_repository, cxrlt, capsys):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        from cxrlt.cli.main import main

        code = main(["serve", "--model-repository", str(tiny_repository), "--grpc-port", str(taken),
                     "--http-port", str(free_port()), "--metrics-port", str(free_port())])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1
    assert f"gRPC port {taken} on 127.0.0.1 is already in use" in err and "--grpc-port" in err


@pytest.mark.timeout(300)
def test_a_dead_tritonserver_ends_serve_with_its_log_and_clients_hear_unavailable(serve, real_cxr):
    server = serve()
    tritonserver = server.server_pid()
    stubs = [s.pid for s in stubs_of(tritonserver)]
    os.kill(tritonserver, signal.SIGKILL)
    assert server.process.wait(20) == 1
    time.sleep(0.5)  # the reader thread drains the last lines
    assert "tritonserver died (exit status -9)" in server.output and "last lines of its log" in server.output
    assert stubs and not [pid for pid in stubs if running(pid)], "the dead server's stubs were left running"
    with CxrltClient(server.url, retries=2, backoff_s=0.1, timeout_s=5) as client:
        with pytest.raises(ServerUnavailable, match=server.url):
            client.classify(real_cxr)


@pytest.mark.timeout(300)
def test_a_client_killed_holding_shared_memory_does_not_hurt_the_server(watched, real_cxr, tmp_path):
    server = watched
    np.save(tmp_path / "image.npy", real_cxr)
    script = (
        "import os, sys, numpy as np\n"
        "from cxrlt.client import CxrltClient\n"
        f"client = CxrltClient({server.url!r}, shared_memory=True)\n"
        f"client.classify(np.load({str(tmp_path / 'image.npy')!r}))\n"
        "print('registered', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    dead = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = dead.communicate(timeout=120)
    assert "registered" in out and dead.returncode == -9, err[-2000:]
    with CxrltClient(server.url) as client:
        assert len(client.classify(real_cxr).probabilities) == 36  # still serving
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(server.url)
    deadline = time.monotonic() + 30  # `cxrlt serve` sweeps orphaned regions every 10 s
    while time.monotonic() < deadline and f"cxrlt_{dead.pid}_" not in server.output:
        time.sleep(0.5)
    assert not triton.get_system_shared_memory_status(as_json=True).get("regions"), "orphaned regions left registered"
    assert "freed 1 shared-memory region(s)" in server.output and f"cxrlt_{dead.pid}_" in server.output
    assert not list(Path("/dev/shm").glob(f"cxrlt_{dead.pid}_*")), "the region's memory was not freed"
