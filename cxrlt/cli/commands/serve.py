"""Run the tritonserver that ships in the nvidia-pytriton wheel on a model repository, wait until
every model is READY, print the endpoints, and shut down cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for readiness")


def run(args: argparse.Namespace) -> int:
    import json

    from cxrlt.cli.console import console, warn_random_weights
    from cxrlt.server.launcher import TritonServer

    server = TritonServer(args.model_repository, args.host, args.grpc_port, args.http_port, args.metrics_port, args.log_file)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with console.status(f"starting tritonserver on {args.model_repository}"):
        server.start(args.timeout)
    try:
        console.print(f"[bold green]READY[/] gRPC {server.endpoints.grpc}  HTTP {server.endpoints.http}  "
                      f"metrics {server.endpoints.metrics}  (log: {server.log_path})")
        manifest = args.model_repository / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("random_weights"):
            warn_random_weights(json.loads(manifest.read_text())["warning"])
        while not stop.wait(1.0):
            if server.process.poll() is not None:
                console.print(f"[red]tritonserver exited unexpectedly ({server.process.returncode}); see {server.log_path}")
                return 1
    finally:
        console.print("shutting down tritonserver")
        server.stop()
    return 0
