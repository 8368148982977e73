"""`cxrlt serve` as a user runs it, in a subprocess with its own ports, for tests that need a
server of their own (faults, TLS); always stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from cxrlt.server.launcher import free_port


class Serve:
    """`cxrlt serve` in a subprocess, with its own ports; stopped by PID whatever happens."""

    def __init__(self, repository: Path, *args: str, env: dict[str, str] | None = None,
                 ports: dict[str, int] | None = None) -> None:
        # ports: {"grpc", "http", "metrics"} to restart a server where its clients expect it
        self.ports = dict(ports) if ports else {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
        command = [sys.executable, "-m", "cxrlt", "serve", "--model-repository", str(repository),
                   "--grpc-port", str(self.ports["grpc"]), "--http-port", str(self.ports["http"]),
                   "--metrics-port", str(self.ports["metrics"]), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, COLUMNS="200", **(env or {})))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and "READY" not in self.output:
            if self.process.poll() is not None:
                raise AssertionError(f"cxrlt serve exited {self.process.returncode}:\n{self.output[-3000:]}")
            time.sleep(0.2)
        assert "READY" in self.output, self.output[-3000:]

    def server_pid(self) -> int:
        (pid,) = [p for p, cmd in children(self.process.pid).items() if "tritonserver" in cmd]
        return pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def children(pid: int) -> dict[int, str]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return children


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed process waits as a zombie until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_stopping: list[threading.Thread] = []


def stop_later(stop: Callable[[], object]) -> None:
    """Begin a server's stop (`stop`, which stops it by PID) and go on without waiting for it: as Triton
    unloads a Python-backend model it sleeps 1 s per instance, some seconds no later test needs to wait
    out. The session waits for every stop begun here before it ends (`wait_for_stops`)."""
    thread = threading.Thread(target=stop, name="stopping a test server")
    thread.start()
    _stopping.append(thread)


def wait_for_stops(timeout: float = 120) -> list[str]:
    """Wait for the stops `stop_later` began; the names of those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    for thread in _stopping:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [thread.name for thread in _stopping if thread.is_alive()]
