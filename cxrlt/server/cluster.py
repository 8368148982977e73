"""Replicas on one machine, as a cluster runs them: N servers behind nginx, scraped by Prometheus.

`LocalCluster` starts N tritonservers (the launcher, so each dies with this process), nginx
(Debian's package) load-balancing gRPC over them with `grpc_pass` (round robin; a replica
that refuses connections is skipped), and Prometheus (Debian's package) scraping every
replica's metrics with the recording rule the Kubernetes HPA uses
(`cxrlt/server/data/recording_rules.yml`), each replica labelled as a pod. Everything
listens on loopback and is stopped by PID.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from cxrlt.contract.resources import package_file
from cxrlt.server.launcher import ServerError, TritonServer, check_ports_free, free_port

HOST = "127.0.0.1"
RECORDED_METRIC = "cxrlt_queue_time_per_request_us"


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        raise ServerError(f"{name} is not installed: apt-get install {package}")
    return found


def nginx_config(workdir: Path, port: int, replicas: list[str]) -> str:
    upstreams = "\n".join(f"        server {address} max_fails=1 fail_timeout=5s;" for address in replicas)
    return f"""# nginx in front of the local replicas: gRPC over HTTP/2 cleartext, round robin.
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream triton {{
{upstreams}
        keepalive 32;
    }}
    server {{
        listen {HOST}:{port} http2;
        client_max_body_size 0;            # radiographs are megabytes
        location / {{
            grpc_pass grpc://triton;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
            # a replica that is gone: try the next one before answering
            grpc_next_upstream error timeout;
            grpc_next_upstream_tries 2;
        }}
    }}
}}
"""


def prometheus_config(workdir: Path, replicas: dict[str, str], rules: Path) -> str:
    targets = "\n".join(
        f"      - targets: ['{address}']\n        labels: {{pod: '{name}', namespace: local}}" for name, address in replicas.items()
    )
    return f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: triton
    static_configs:
{targets}
"""


@dataclasses.dataclass
class LocalCluster:
    repository: Path
    replicas: int = 2
    grpc_port: int = 0  # nginx's; 0 picks a free one
    prometheus_port: int = 0
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="cxrlt-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port = self.grpc_port or free_port()
        self.prometheus_port = self.prometheus_port or free_port()
        self.servers: list[TritonServer] = []
        self.nginx: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{HOST}:{self.prometheus_port}"

    def replica_names(self) -> list[str]:
        return [f"replica-{i}" for i in range(len(self.servers))]

    def start(self, timeout: float = 300.0) -> "LocalCluster":
        nginx, prometheus = _binary("nginx", "nginx-light"), _binary("prometheus", "prometheus")
        check_ports_free(HOST, {"nginx gRPC": self.grpc_port, "Prometheus": self.prometheus_port},
                         "choose others with --port / --prometheus-port")
        try:
            for index in range(self.replicas):
                server = TritonServer(self.repository, HOST, free_port(), free_port(), free_port(),
                                      log_file=self.workdir / f"replica-{index}.log")
                self.servers.append(server)
                server.start(timeout)
            self._start_nginx(nginx)
            self._start_prometheus(prometheus, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nginx(self, binary: str) -> None:
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir, self.grpc_port, [s.endpoints.grpc for s in self.servers]))
        log = open(self.workdir / "nginx.out", "wb")
        self.nginx = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.workdir)], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        _wait(lambda: _listening(self.grpc_port), 30, lambda: self.nginx.poll() is not None,
              f"nginx did not start; see {self.workdir / 'nginx-error.log'}")

    def _start_prometheus(self, binary: str, timeout: float) -> None:
        replicas = {name: server.endpoints.metrics.split("//", 1)[1].rsplit("/", 1)[0]
                    for name, server in zip(self.replica_names(), self.servers)}
        conf = self.workdir / "prometheus.yml"
        conf.write_text(prometheus_config(self.workdir, replicas, package_file("cxrlt.server", "data", "recording_rules.yml")))
        log = open(self.workdir / "prometheus.log", "wb")
        self.prometheus = subprocess.Popen(
            [binary, f"--config.file={conf}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address={HOST}:{self.prometheus_port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait(lambda: _http_ok(f"{self.prometheus_url}/-/ready"), timeout, lambda: self.prometheus.poll() is not None,
              f"Prometheus did not get ready; see {self.workdir / 'prometheus.log'}")

    def query(self, expression: str) -> list[dict]:
        """Prometheus's instant query result (`data.result`) for `expression`."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as response:
            payload = json.load(response)
        if payload.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expression!r} failed: {payload}")
        return payload["data"]["result"]

    def kill_replica(self, index: int) -> None:
        """SIGKILL one replica's tritonserver (its stubs follow), as a crashed node would."""
        self.servers[index].process.send_signal(signal.SIGKILL)
        self.servers[index].process.wait()

    def stop(self) -> None:
        for process in (self.nginx, self.prometheus):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(ready, timeout: float, died, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if died():
            raise ServerError(message)
        if ready():
            return
        time.sleep(0.2)
    raise ServerError(f"{message} (after {timeout:.0f} s)")
