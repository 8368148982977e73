"""Start and stop the tritonserver that ships inside the nvidia-pytriton wheel.

That wheel carries the server binary, its shared libraries and the Python backend, but
the backend's stub for this Python version lives in a separate folder; Triton wants it
next to `libtriton_python.so`. We assemble a backend directory in a user cache (never
editing site-packages) and run the server with this interpreter's packages on PYTHONPATH
so the model.py files can import this project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import IO, Callable

from cxrlt.contract.resources import package_root
from cxrlt.server.admin import ADMIN_HEADER, AdminApi

_PR_SET_PDEATHSIG = 1
# After SIGTERM: seconds with no stub left before the server counts as done (Triton checks for
# unloaded models once a second, then exits).
STUBS_GONE_S = 3.0
_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.+)")
_NOT_READY = re.compile(r"\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (.+?)\s*\|")


class ServerError(RuntimeError):
    """tritonserver could not start or a model did not load; the message says which and why."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the embedded tritonserver (nvidia-pytriton) is not installed: pip install 'cxrlt-triton[serve]'") from None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def backend_directory() -> Path:
    """A backends/ folder with the Python backend and the stub for this interpreter."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrlt" / f"backends-py{version}"
    target = cache / "python"
    sources = [*(root / "backends" / "python").glob("*.*"), stub]
    if not all((target / s.name).is_file() and (target / s.name).stat().st_size == s.stat().st_size for s in sources):
        target.mkdir(parents=True, exist_ok=True)
        for source in sources:
            shutil.copy2(source, target / source.name)
    return cache


def server_environment() -> dict[str, str]:
    root = _pytriton_root()
    libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    # The Python backend stub embeds its own interpreter: give it this one's packages and the project.
    paths = [str(package_root("cxrlt")), *[p for p in sys.path if p and Path(p).is_dir()]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclasses.dataclass
class Endpoints:
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    http_host: str | None = None  # where HTTP listens when not on `host` (loopback only, under TLS)

    @property
    def grpc(self) -> str:
        return f"{_url_host(self.host)}:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"{_url_host(self.http_host or self.host)}:{self.http_port}"

    @property
    def metrics(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM files for TLS on the gRPC endpoint; `client_ca` turns on mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for label, path in (("certificate", self.cert), ("private key", self.key), ("client CA", self.client_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"TLS {label} file {path} does not exist")

    def arguments(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca:
            args += [f"--grpc-root-cert={self.client_ca}", "--grpc-use-ssl-mutual=true"]
        return args


# The Triton APIs an admin key guards: everything but inference, health and metadata.
RESTRICTED_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int], advice: str = "choose other ports with --grpc-port / "
                     "--http-port / --metrics-port") -> None:
    """Raise ServerError naming the first port (label -> port) that something already listens on.

    Triton itself would only log "Socket ... already in use" and exit, and an old server
    still answering on that port could be mistaken for the new one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for label, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # As the server binds: connections of a stopped server lingering in TIME_WAIT do not count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ServerError(
                    f"{label} port {port} on {host} is already in use ({exc.strerror}); another server "
                    f"(perhaps an earlier tritonserver: `ss -ltnp 'sport = :{port}'` shows it) holds it: stop it, or "
                    f"{advice}"
                ) from None


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM (a graceful Triton shutdown) when its parent dies.

    Linux's PR_SET_PDEATHSIG; without it a killed launcher would leave tritonserver and all
    its stubs running as orphans, holding the ports.
    """

    def arm() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # not Linux: the launcher's own stop() still applies
            return
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return arm


class TritonServer:
    """A tritonserver process serving one model repository.

    Use as a context manager, or call start() / stop(). start() returns once every model
    is READY, or raises ServerError naming the model that failed and Triton's reason.
    """

    def __init__(
        self,
        model_repository: Path | str,
        host: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_file: Path | str | None = None,
        extra_args: tuple[str, ...] = (),
        tls: Tls | None = None,
        admin_key: str | None = None,
        log_verbose: int = 0,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.tls = tls
        self.admin_key = admin_key
        self.log_verbose = log_verbose
        # Triton's HTTP endpoint has no TLS: with TLS on gRPC it stays on loopback, where the
        # launcher (readiness, the watchdog) and a pod's probes use it.
        http_host = "127.0.0.1" if tls is not None and not is_loopback(host) else None
        self.endpoints = Endpoints(host, grpc_port, http_port, metrics_port, http_host)
        self.log_path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        binary = _pytriton_root() / "bin" / "tritonserver"
        return [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-address={self.endpoints.http_host or self.endpoints.host}",
            f"--http-port={self.endpoints.http_port}",
            f"--grpc-address={self.endpoints.host}",
            f"--grpc-port={self.endpoints.grpc_port}",
            f"--metrics-address={self.endpoints.host}",
            f"--metrics-port={self.endpoints.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *(self.tls.arguments() if self.tls else []),
            *self._restriction_arguments(),
            *self.extra_args,
        ]

    def _restriction_arguments(self) -> list[str]:
        if not self.admin_key:
            return []
        if not all(c.isalnum() or c in "-_.~+/=" for c in self.admin_key):
            raise ServerError("the admin key may hold letters, digits and -_.~+/= only")
        guarded = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        return [f"--grpc-restricted-protocol={guarded}", f"--http-restricted-api={guarded}"]

    def admin(self) -> AdminApi:
        """The launcher's HTTP client of this server (with the admin key when there is one)."""
        return AdminApi(self.endpoints.http, self.admin_key)

    def start(self, timeout: float = 300.0) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise ServerError(
                f"model repository {self.model_repository} does not exist; build one with "
                "`cxrlt build-repo --profile tiny --out DIR`"
            )
        ends = self.endpoints
        check_ports_free(ends.host, {"gRPC": ends.grpc_port, "metrics": ends.metrics_port})
        check_ports_free(ends.http_host or ends.host, {"HTTP": ends.http_port})
        command = self.command()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        admin = AdminApi(self.endpoints.http, timeout_s=5.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(self._failure_message(f"tritonserver exited with status {self.process.returncode}"))
            ready = admin.ready()
            # Answering is not enough: it must be our process that answers.
            if ready and self.process.poll() is None:
                return
            time.sleep(0.25)
        raise ServerError(self._failure_message(f"tritonserver was not ready after {timeout:.0f} s"))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().strip().splitlines()[-lines:])

    def _failure_message(self, headline: str) -> str:
        log = self.log_text()
        failures = dict(_LOAD_FAILURE.findall(log)) or dict(_NOT_READY.findall(log))
        if failures:
            details = "\n".join(f"  model {name!r}: {reason.strip()}" for name, reason in failures.items())
            return f"{headline}; these models did not load:\n{details}\n(full server log: {self.log_path})"
        return f"{headline}. Last lines of the server log ({self.log_path}):\n{self.log_tail()}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for Triton's graceful shutdown, then SIGKILL if it hangs.

        Every model here runs in a Python-backend stub, and Triton ends a model's stub when it
        has unloaded it: once no stub has been left for STUBS_GONE_S, nothing remains to finish
        and the server is killed. Triton itself would wait out its whole exit timeout (30 s) for
        a model it counts as live but can no longer unload: one whose load failed, or whose stub
        was killed while it held a request.

        Whatever is left of the server's process group afterwards is killed: the stubs of a
        tritonserver that died abruptly (SIGKILL, a crash) outlive it otherwise.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            if not self._wait_for_exit(timeout):
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group is empty after a clean shutdown
        except (ProcessLookupError, PermissionError):
            pass
        if self._log:
            self._log.close()
        return self.process.returncode

    def _wait_for_exit(self, timeout: float) -> bool:
        """Whether the server exited by itself within `timeout`; False as soon as it has had no
        stub for STUBS_GONE_S (see stop())."""
        from cxrlt.server.watchdog import stubs_of

        deadline = time.monotonic() + timeout
        stubless_since = None
        while time.monotonic() < deadline:
            try:
                self.process.wait(0.2)
                return True
            except subprocess.TimeoutExpired:
                pass
            if stubs_of(self.process.pid):
                stubless_since = None
            elif stubless_since is None:
                stubless_since = time.monotonic()
            elif time.monotonic() - stubless_since >= STUBS_GONE_S:
                return False
        return self.process.poll() is not None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
