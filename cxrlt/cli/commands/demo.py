"""End-to-end demo: build the tiny model repository (or use --repo), start the embedded
tritonserver on free loopback ports, classify a real PA chest radiograph (RG1_UNCR.dcm from
pydicom-data) through the DICOM path and the gRPC client SDK, print the 36 findings, and
shut the server down (also on Ctrl-C). Without checkpoints the weights are random and every
number it prints is NOT DIAGNOSTIC."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cxrlt.cli.options import add_option, add_repo_argument
from cxrlt.io.samples import REAL_CXR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", type=Path, help="directory of trained <model>.pt files (default: random weights)")
    parser.add_argument("--allow-random", action="store_true", help="with --checkpoints: random weights for missing ones")
    parser.add_argument("--profile", default="tiny", choices=["tiny", "paper"], help="network sizes to build")
    add_repo_argument(parser, "serve this already-built repository instead of building one")
    parser.add_argument("--image", type=Path, help=f"a DICOM/PNG to classify (default: {REAL_CXR} from pydicom-data)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log, repository if built there)")
    parser.add_argument("--no-cache", action="store_true",
                        help="build into a temporary folder instead of reusing the cached random-weights repository")
    add_option(parser, "--ready-timeout-s", "--timeout", type=float, default=300.0,
               help="seconds to wait for the server to become ready")


def run(args: argparse.Namespace) -> int:
    import shutil
    import signal
    import tempfile
    import time

    from rich.console import Console

    from cxrlt.cli.console import console

    image_path = args.image or _demo_image()

    def terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: the finally blocks stop the server
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="cxrlt-demo-"))
    try:
        repo, manifest = _repository(args, workdir, timings)
        outcome = _classify_on_server(repo, image_path, args.ready_timeout_s, workdir, timings)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            console.print(f"kept {workdir} (repository and server log)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    timings["total"] = time.perf_counter() - started
    random_weights = outcome["result"].random_weights or bool(manifest and manifest.get("random_weights"))
    print_report(Console(), image_path=image_path, timings=timings, random_weights=random_weights, **outcome)
    return 0


def _repository(args: argparse.Namespace, workdir: Path, timings: dict[str, float]) -> tuple[Path, dict | None]:
    """--repo, else the cached random-weights repository, else a fresh build; with its manifest."""
    import os
    import time

    from rich.markup import escape

    from cxrlt.cli.console import console
    from cxrlt.contract.manifest import MANIFEST, read_manifest

    if args.repo:
        return args.repo, read_manifest(args.repo) if (args.repo / MANIFEST).is_file() else None
    cached = None if (args.checkpoints or args.no_cache) else _cached_repository(args.profile)
    if cached is not None and (cached / MANIFEST).is_file():
        os.utime(cached)  # in use: keep it from being pruned as stale
        console.print(f"using the {args.profile} repository built earlier: {escape(str(cached))} (--no-cache rebuilds)")
        return cached, read_manifest(cached)
    tick = time.perf_counter()
    if cached is None:
        repo, manifest = workdir / "repository", _build(workdir / "repository", args, console)
    else:
        repo, manifest = _build_into_cache(cached, args, console)
    timings["build repository"] = time.perf_counter() - tick
    return repo, manifest


def _classify_on_server(repo: Path, image_path: Path, ready_timeout_s: float, workdir: Path,
                        timings: dict[str, float]) -> dict[str, Any]:
    """Start tritonserver on `repo`, classify the image twice (first and warm), stop the server."""
    import time

    from cxrlt.client.sdk import CxrltClient
    from cxrlt.cli.console import console
    from cxrlt.io.images import load_image
    from cxrlt.server.launcher import TritonServer, free_port

    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          log_file=workdir / "tritonserver.log")
    try:
        tick = time.perf_counter()
        with console.status(f"starting tritonserver on {repo}"):
            server.start(ready_timeout_s)
        timings["start server"] = time.perf_counter() - tick
        with CxrltClient(server.endpoints.grpc, timeout_s=120) as client:
            client.wait_until_ready(30)
            loaded = load_image(image_path)
            tick = time.perf_counter()
            result = client.classify_file(image_path)  # the full path: file -> pixels + header hint -> gRPC
            timings["classify (first request)"] = time.perf_counter() - tick
            warm = client.classify(loaded.pixels, hint=loaded.hint, image_id=loaded.image_id)
    finally:
        with console.status("stopping tritonserver"):
            server.stop()
    return {"result": result, "warm": warm, "loaded": loaded, "endpoint": server.endpoints.grpc}


def random_weights_banner():
    """The one NOT DIAGNOSTIC warning of a demo on random weights."""
    from rich.panel import Panel

    from cxrlt.io.reports import NOT_FOR_CLINICAL_USE

    return Panel(f"[bold]RANDOM WEIGHTS: NOT DIAGNOSTIC.[/] {NOT_FOR_CLINICAL_USE}\n"
                 "Pass --checkpoints DIR with trained networks for meaningful probabilities.",
                 title="[bold]WARNING[/]", style="bold red")


def print_report(out, *, result, warm, loaded, endpoint: str, image_path: Path, timings: dict[str, float],
                 random_weights: bool) -> None:
    """The demo's findings table and facts on `out` (stdout), under one random-weights warning."""
    from rich.table import Table

    from cxrlt.contract.labels import TASK1_LABELS

    if random_weights:
        out.print(random_weights_banner())
    ds = loaded.dataset
    source = f"{image_path.name}: {loaded.pixels.shape[1]}x{loaded.pixels.shape[0]} px"
    if ds is not None:
        source += (f", {ds.get('Modality', '?')} {ds.get('PhotometricInterpretation', '?')}, "
                   f"{ds.get('BitsStored', '?')}-bit, ViewPosition {ds.get('ViewPosition', '') or 'none'}")
    table = Table(title=f"cxrlt demo: {source}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("finding", no_wrap=True)
    table.add_column("task", no_wrap=True)
    table.add_column("probability", justify="right")
    table.add_column("", no_wrap=True)
    for index, (label, probability) in enumerate(result.probabilities.items(), start=1):
        task = "1" if label in TASK1_LABELS else "2 zero-shot"
        table.add_row(str(index), label, task, f"{probability:.3f}", "█" * round(probability * 10))
    out.print(table)

    hint = f"header ViewPosition {result.hint}" if result.hint else "no header hint"
    routed = "routed by the hint" if result.hint_used else "routed by the projection router"
    out.print(f"[bold]projection:[/] {result.projection} ({hint}; {routed}; router score for {result.projection}: "
              f"{result.projection_score:.3f})")
    out.print(f"[bold]hint used:[/] {'yes' if result.hint_used else 'no'}")
    out.print(f"[bold]model:[/] {result.model_name} version {result.model_version} at {endpoint}")
    out.print(f"[bold]latency:[/] {result.latency_ms:.0f} ms first request, {warm.latency_ms:.0f} ms warm")
    out.print("[bold]timings:[/] " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))


def _build(repo: Path, args: argparse.Namespace, console) -> dict:
    from exporters.build_repo import BuildOptions, build_repository  # torch, timm, open_clip: only to build

    # One instance per Python model: the demo sends one request at a time, and fewer stub
    # processes start faster on a small machine.
    options = BuildOptions(profile=args.profile, checkpoints=args.checkpoints, allow_random=args.allow_random,
                           bls_instances=1)
    with console.status(f"building the {args.profile} model repository") as status:
        return build_repository(repo, options, on_step=lambda message: status.update(f"building the {args.profile} repository: {message}"))


def _build_into_cache(target: Path, args: argparse.Namespace, console) -> tuple[Path, dict]:
    """Build next to the cache entry under a unique name, then move it in (concurrent demos are safe)."""
    import shutil
    import uuid

    staging = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}")
    manifest = _build(staging, args, console)
    try:
        staging.rename(target)
    except OSError:  # another demo put it there first: the same bytes, keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target, manifest


_CACHE_SOURCES = ("cxrlt", "exporters", "networks", "python_backends", "training", "triton_models")
_CACHE_PACKAGES = ("torch", "timm", "open_clip_torch", "onnx", "onnxruntime", "numpy", "nvidia-pytriton")


def _cached_repository(profile: str) -> Path | None:
    """Where the random-weights demo repository of this exact code and these packages is cached.

    The build is deterministic (seeded random weights, byte-identical output), so a repository
    built by the same sources and package versions is the one a new build would write. The
    key hashes every source, prompt and template file of the project and the versions of the
    packages that shape the export; older entries of the same profile are removed.
    """
    import hashlib
    import os
    import shutil
    import time
    from importlib import metadata

    from cxrlt.contract.resources import package_file

    digest = hashlib.sha256(f"demo|{profile}|seed0|bls1".encode())
    for name in _CACHE_PACKAGES:
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    for package in _CACHE_SOURCES:
        folder = package_file(package)
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".yaml", ".yml", ".template", ".pbtxt", ".json") and "__pycache__" not in path.parts:
                digest.update(f"{package}/{path.relative_to(folder)}".encode())
                digest.update(path.read_bytes())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrlt" / "demo-repositories"
    target = root / f"{profile}-{digest.hexdigest()[:16]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        stale = time.time() - 24 * 3600  # other code versions' entries, unused for a day
        for old in root.glob(f"{profile}-*"):
            if old != target and old.is_dir() and old.stat().st_mtime < stale:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return None  # no writable cache: build into the temporary folder
    return target


def _demo_image() -> Path:
    from cxrlt.io.samples import pydicom_data_file

    try:
        return pydicom_data_file(REAL_CXR)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{exc}; or pass --image FILE") from None
