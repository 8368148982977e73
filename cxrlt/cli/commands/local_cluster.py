"""N `tritonserver` replicas on this machine behind nginx (gRPC load balancing, Debian's nginx)
and Prometheus (Debian's package) scraping each with the recording rule the Kubernetes HPA
scales on (`cxrlt_queue_time_per_request_us`): the cluster of `deploy/`, on loopback, to try
clients, load tests and replica failures against. Ctrl-C or SIGTERM stops everything."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_option, add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_argument(parser, "the model repository every replica serves", "--model-repository", required=True)
    parser.add_argument("--replicas", type=int, default=2, help="tritonserver replicas (default 2)")
    add_option(parser, "--grpc-port", "--port", type=int, default=0,
               help="nginx's gRPC port, what clients use (default: a free one)")
    parser.add_argument("--prometheus-port", type=int, default=0, help="Prometheus's port (default: a free one)")
    parser.add_argument("--workdir", type=Path, help="configs, logs and Prometheus data (default: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cxrlt.cli.console import console
    from cxrlt.server.cluster import RECORDED_METRIC, LocalCluster

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    cluster = LocalCluster(args.repo, args.replicas, args.grpc_port, args.prometheus_port, args.workdir)
    with console.status(f"starting {args.replicas} replicas, nginx and Prometheus"):
        cluster.start()
    try:
        for name, server in zip(cluster.replica_names(), cluster.servers):
            console.print(f"  {name}: gRPC {server.endpoints.grpc}  metrics {server.endpoints.metrics}", highlight=False)
        console.print(f"[bold green]READY[/] clients: gRPC {cluster.url} (nginx, round robin)  "
                      f"Prometheus {cluster.prometheus_url} (query {RECORDED_METRIC})  files: {cluster.workdir}",
                      highlight=False)
        while not stop.wait(1.0):
            dead = [name for name, s in zip(cluster.replica_names(), cluster.servers) if s.process.poll() is not None]
            if dead:
                console.print(f"[yellow]replica(s) down: {', '.join(dead)}; nginx sends their share to the others")
                break
        stop.wait()
    finally:
        console.print("stopping the cluster")
        cluster.stop()
    return 0
