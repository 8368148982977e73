"""Bring back Python-backend models whose stub process died.

Triton releases since r24.06 (2.51 included) do not restart a dead stub: every request to
the model then fails with "Stub process '<instance>' is not healthy." while the server and
the model still report ready. The watchdog compares the stub processes of the server with
those it saw when the server became ready; a model whose stub is gone (in two scans in a
row, so a reload in progress is not mistaken for a death) is reloaded through the model
repository API (over the launcher's loopback HTTP endpoint) with a config override that differs only in its `stub_generation`
parameter: Triton skips a load whose files and config did not change, and this is the way
to make it replace the instances.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from cxrlt.server.admin import AdminApi

log = logging.getLogger(__name__)

STUB_BINARY = "triton_python_backend_stub"
GENERATION_PARAMETER = "stub_generation"


@dataclasses.dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str  # Triton's instance name, e.g. ensemble_frontal_pcam_0_0


@dataclasses.dataclass(frozen=True)
class Recovery:
    model: str
    dead_instances: tuple[str, ...]
    seconds: float  # from the reload request until the model's stubs were back
    error: str | None = None


def stubs_of(server_pid: int, proc: Path = Path("/proc")) -> list[Stub]:
    """The live (not zombie) Python-backend stub processes whose parent is `server_pid`."""
    stubs = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != server_pid or state == "Z":
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        argv = [a.decode(errors="replace") for a in argv if a]
        if not argv or not argv[0].endswith(STUB_BINARY) or len(argv) < 3:
            continue
        # argv: stub, <repository>/<model>/<version>/model.py, ..., <instance name>, <kind>
        stubs.append(Stub(int(stat.parent.name), Path(argv[1]).parent.parent.name, argv[-2]))
    return stubs


class StubWatchdog:
    """Watches one server's stubs and reloads the models that lost one.

    Needs the server in explicit model-control mode (`--model-control-mode=explicit`), the
    mode in which the repository API may load models.
    """

    def __init__(self, server_pid: int, admin: AdminApi, report: Callable[[str], None] = log.warning,
                 settle_s: float = 60.0) -> None:
        self.server_pid = server_pid
        self.admin = admin
        self.report = report
        self.settle_s = settle_s
        self.expected: dict[str, str] = {s.instance: s.model for s in stubs_of(server_pid)}
        self._suspects: set[str] = set()
        self._generation = 0
        self.recoveries: list[Recovery] = []

    def dead_instances(self) -> dict[str, str]:
        """instance -> model of every expected stub that is not running now."""
        alive = {s.instance for s in stubs_of(self.server_pid)}
        return {instance: model for instance, model in self.expected.items() if instance not in alive}

    def check(self) -> list[Recovery]:
        """One round: reload each model whose stub was missing now and in the previous round."""
        dead = self.dead_instances()
        confirmed = {i: m for i, m in dead.items() if i in self._suspects}
        self._suspects = set(dead) - set(confirmed)
        by_model: dict[str, list[str]] = {}
        for instance, model in confirmed.items():
            by_model.setdefault(model, []).append(instance)
        done = [self._reload(model, sorted(instances)) for model, instances in sorted(by_model.items())]
        self.recoveries.extend(done)
        return done

    def _reload(self, model: str, instances: list[str]) -> Recovery:
        self.report(f"stub process of {', '.join(instances)} died; reloading model {model!r}")
        started = time.monotonic()
        self._generation += 1
        try:
            config = self.admin.model_config(model)
            config.setdefault("parameters", {})[GENERATION_PARAMETER] = {"string_value": str(self._generation)}
            self.admin.load_model(model, config)
            restored = self._wait_for_stubs(model)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the next round retries
            error = f"reloading {model!r} failed: {exc}"
            self.report(error)
            return Recovery(model, tuple(instances), time.monotonic() - started, error)
        seconds = time.monotonic() - started
        for instance in instances:
            self.expected.pop(instance, None)
        self.expected.update({s.instance: s.model for s in restored})
        self.report(f"model {model!r} is back after {seconds:.1f} s")
        return Recovery(model, tuple(instances), seconds)

    def _wait_for_stubs(self, model: str) -> list[Stub]:
        wanted = sum(1 for m in self.expected.values() if m == model)
        deadline = time.monotonic() + self.settle_s
        while True:
            found = [s for s in stubs_of(self.server_pid) if s.model == model]
            if len(found) >= wanted:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {wanted} stubs of {model!r} running after {self.settle_s:.0f} s")
            time.sleep(0.2)

    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Check every `interval_s` until `stop` is set (for a daemon thread)."""
        while not stop.wait(interval_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive a bad round
                self.report(f"stub watchdog round failed: {exc}")
