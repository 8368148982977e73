"""Run the tritonserver that ships in the nvidia-pytriton wheel on a model repository, wait until
every model is READY, print the endpoints, and shut down cleanly on Ctrl-C or SIGTERM.

While it runs, a watchdog reloads any model whose Python-backend stub process died (Triton
does not restart stubs itself), and if tritonserver dies, `cxrlt serve` exits non-zero with
the tail of its log. The server dies with this process, so nothing outlives a killed launcher."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from cxrlt.cli.options import add_option, add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_argument(parser, "the model repository to serve (written by `cxrlt build-repo`)", "--model-repository",
                      required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port, what clients use")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (/metrics)")
    parser.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    add_option(parser, "--ready-timeout-s", "--timeout", type=float, default=600.0,
               help="seconds to wait for every model to become ready")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level (0 quiet, 1 per request)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) of the server: TLS on the gRPC endpoint")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="PEM CA certificates that sign client certificates: mutual TLS, clients without one are refused")
    parser.add_argument("--admin-key-file", type=Path,
                        help="file holding the key that guards the admin APIs (model repository, shared memory, "
                             f"statistics, trace, logging); or set {ADMIN_KEY_ENV}. Off loopback they are always "
                             "guarded: without a key one is generated and its file printed")
    add_option(parser, "--watchdog-interval-s", "--watchdog-interval", type=float, default=1.0,
               help="seconds between checks for dead stub processes (0 turns the watchdog off)")


_SHM_SWEEP_S = 10.0
ADMIN_KEY_ENV = "CXRLT_ADMIN_KEY"


def admin_key(args: argparse.Namespace, console) -> str | None:
    """The admin key from the file or the environment (never the command line, which `ps` shows).

    On a loopback address the admin APIs stay open unless a key is given; on any other address
    they are always guarded, with a generated key written to a private file when none is given.
    """
    import os
    import secrets

    from cxrlt.server import is_loopback

    if args.admin_key_file:
        key = args.admin_key_file.read_text().strip()
        if not key:
            raise ValueError(f"admin key file {args.admin_key_file} is empty")
        return key
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV].strip()
    if is_loopback(args.host):
        return None
    key = secrets.token_urlsafe(24)
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrlt"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"admin-key-{args.grpc_port}"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key + "\n")
    console.print(f"admin APIs guarded by a generated key, in {path} (send it as header "
                  f"'triton-grpc-protocol-admin-key' on gRPC, 'admin-key' on HTTP)")
    return key


def _sweep_orphaned_regions(admin, console) -> bool:
    """Free the shared-memory regions of local clients that died holding them; False if it cannot."""
    from cxrlt.server.regions import clean_up_orphaned_regions

    try:
        cleaned = clean_up_orphaned_regions(admin)
    except Exception as exc:  # noqa: BLE001 - e.g. the shared-memory API restricted: stop trying
        console.print(f"[yellow]not sweeping orphaned shared-memory regions: {exc}")
        return False
    if cleaned:
        console.print(f"[yellow]freed {len(cleaned)} shared-memory region(s) of clients that exited without releasing "
                      f"them: {', '.join(cleaned)}")
    return True


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console
    from cxrlt.server import Tls, TritonServer, is_loopback
    from cxrlt.server.watchdog import StubWatchdog

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    tls = Tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if not is_loopback(args.host) and tls is None:
        console.print(f"[bold yellow]warning:[/] --host {args.host} without TLS: images and results cross the network "
                      "in clear text; give --tls-cert and --tls-key", highlight=False)
    # Explicit model control: the watchdog reloads a model whose stub died, through the repository API.
    server = TritonServer(args.repo, args.host, args.grpc_port, args.http_port, args.metrics_port, args.log_file,
                          extra_args=("--model-control-mode=explicit", "--load-model=*"), tls=tls,
                          admin_key=admin_key(args, console), log_verbose=args.log_verbose)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with console.status(f"starting tritonserver on {args.repo}"):
        server.start(args.ready_timeout_s)
    try:
        console.print(f"[bold green]READY[/] gRPC {server.endpoints.grpc}{' (TLS)' if tls else ''}{' mutual' if tls and tls.client_ca else ''}  "
                      f"HTTP {server.endpoints.http}  metrics {server.endpoints.metrics}  (log: {server.log_path})", highlight=False)
        _print_releases(args.repo, server, console)
        if args.watchdog_interval_s > 0:
            watchdog = StubWatchdog(server.process.pid, server.admin(), report=lambda m: console.print(f"[yellow]watchdog:[/] {m}"))
            threading.Thread(target=watchdog.run, args=(stop, args.watchdog_interval_s), name="stub-watchdog", daemon=True).start()
        next_sweep = time.monotonic() + _SHM_SWEEP_S
        while not stop.wait(0.5):
            if time.monotonic() > next_sweep:
                swept = _sweep_orphaned_regions(server.admin(), console)
                next_sweep = time.monotonic() + _SHM_SWEEP_S if swept else float("inf")
            if server.process.poll() is not None:
                console.print(f"[red]tritonserver died (exit status {server.process.returncode}); last lines of its log "
                              f"({server.log_path}):[/]", highlight=False)
                console.print(server.log_tail(), markup=False, highlight=False)
                return 1
    finally:
        console.print("shutting down tritonserver")
        server.stop()
    return 0


def _print_releases(repository: Path, server, console) -> None:
    """Which release answers (the served plan, CXRLT_RELEASE included) and, when its weights are random, the warning."""
    from cxrlt.cli.console import warn_random_weights
    from cxrlt.contract.manifest import read_manifest
    from cxrlt.contract.releases import ReleasePlan, release_numbers
    from cxrlt.contract.served import FINDINGS_MODEL

    held = release_numbers(repository)
    if not held:
        return
    config = server.admin().model_config(FINDINGS_MODEL)
    plan = ReleasePlan.from_parameters({k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()})
    manifest = read_manifest(repository, plan.live)
    console.print(f"serving {plan.describe()}; releases held: {', '.join(map(str, held))} "
                  f"(release {plan.live}: {manifest.get('repository_sha256', '')[:16]}; `cxrlt release` switches)", highlight=False)
    for line in execution_lines(manifest.get("execution")):
        console.print(line, highlight=False)
    if manifest.get("random_weights"):
        warn_random_weights(manifest["warning"])


def execution_lines(record: dict | None) -> list[str]:
    """What runs the networks, from the manifest's `execution` record; and a note when auto chose an
    OpenVINO setting for a CPU other than this one (its choice follows the build host's features)."""
    from cxrlt.contract.execution import cpu_features, cuda_offered, describe_execution

    lines = [describe_execution(record, cuda=cuda_offered())]
    if record and record.get("chosen") == "auto" and record["execution_provider"] == "openvino":
        here = list(cpu_features())
        if here != record.get("cpu_features"):
            lines.append(f"[yellow]note:[/] auto chose it for a CPU with {' '.join(record.get('cpu_features') or ['none'])}; "
                         f"this one has {' '.join(here) or 'none detected'} (a build here may choose otherwise)")
    return lines
