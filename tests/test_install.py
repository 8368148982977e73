"""Installs by role, outside the checkout: the wheel serves on its own, the client needs no torch.

Both tests make fresh virtualenvs, so they are slow. The wheel test reuses this environment's
third-party packages through a plain path entry (a `.pth` line, which does not activate this
environment's editable install), so what it proves is that the project's own files all come
from the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from cxrlt.server.launcher import free_port

CHECKOUT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("cxrlt", "python_backends", "networks", "training", "exporters", "evaluation", "loadtest", "triton_models")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(COLUMNS="200", **extra)
    return env


def _run(command: list[str], cwd: Path, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([str(c) for c in command], cwd=cwd, env=_clean_env(**env), capture_output=True,
                               text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {completed.returncode}:\n"
                             f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return completed


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin"


def _site_packages(bin_dir: Path) -> Path:
    out = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _serve(bin_dir: Path, repository: Path, cwd: Path):
    """`cxrlt serve` from that environment; returns (process, grpc address) once READY."""
    grpc_port = free_port()
    command = [str(bin_dir / "cxrlt"), "serve", "--repo", str(repository), "--grpc-port", str(grpc_port),
               "--http-port", str(free_port()), "--metrics-port", str(free_port())]
    process = subprocess.Popen(command, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "READY" in line or not line:
            break
    if "READY" not in "".join(lines):
        process.kill()
        process.wait()
        raise AssertionError("cxrlt serve from the wheel did not get ready:\n" + "".join(lines)[-3000:])
    return process, f"127.0.0.1:{grpc_port}"


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _rg1() -> str:
    from cxrlt.io.samples import pydicom_data_file

    return str(pydicom_data_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once for both installs."""
    # Built from a copy: setuptools leaves build/ in the source folder, and a stale one there
    # could carry files the checkout no longer has into the wheel.
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs", "model_repository"))
    dist = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source], cwd=work)
    return next(dist.glob("cxrlt_triton-*.whl"))


@pytest.mark.timeout(1200)
def test_the_wheel_builds_serves_and_classifies_outside_the_checkout(wheel, tmp_path):
    bin_dir = _venv(tmp_path / "venv")
    site = _site_packages(bin_dir)
    # Third-party packages from this environment, as a plain path entry after the venv's own.
    (site / "zz_third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    locate = ("import importlib, json, sys; "
              "print(json.dumps({p: importlib.import_module(p).__file__ for p in sys.argv[1:]}))")
    where = _run([bin_dir / "python", "-c", locate, *PROJECT_PACKAGES], cwd=work)
    for package, location in json.loads(where.stdout).items():
        assert Path(location).is_relative_to(site), f"{package} imported from {location}, not from the installed wheel"

    repository = work / "repo"
    _run([bin_dir / "cxrlt", "build-repo", "--profile", "tiny", "--repo", repository], cwd=work)
    assert (repository / "cxr_classifier" / "1" / "model.py").is_file()
    assert (repository / "cxr_findings" / "releases" / "1" / "prompts.yaml").is_file()

    server, url = _serve(bin_dir, repository, work)
    try:
        out = work / "result.json"
        _run([bin_dir / "cxrlt", "classify", _rg1(), "--url", url, "--format", "json", "--out", out], cwd=work)
        result = json.loads(out.read_text())
    finally:
        _stop(server)
    assert server.returncode == 0
    (row,) = result
    assert row["projection"] == "frontal" and len(row["probabilities"]) == 36


@pytest.mark.timeout(1200)
def test_a_client_only_install_classifies_against_the_server_without_torch(wheel, tmp_path, url, cxrlt):
    bin_dir = _venv(tmp_path / "client-venv")
    # The wheel with its client extra, as the README installs it (the same numpy pin the full environment
    # uses); pip resolves the rest from the registry.
    _run([bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel}[client]"], cwd=tmp_path, timeout=900)
    site = _site_packages(bin_dir)

    absent = _run([bin_dir / "python", "-c", "import importlib.util as u; print([m for m in ('torch', 'timm', 'open_clip', "
                   "'onnxruntime', 'pytriton', 'locust', 'sklearn') if u.find_spec(m)])"], cwd=tmp_path)
    assert absent.stdout.strip() == "[]", f"a client-only install pulled in {absent.stdout.strip()}"

    out = tmp_path / "client.json"
    _run([bin_dir / "cxrlt", "classify", _rg1(), "--url", url, "--format", "json", "--out", out], cwd=tmp_path)
    mine = tmp_path / "full.json"
    assert cxrlt("classify", _rg1(), "--url", url, "--format", "json", "--out", str(mine)) == 0
    (client_row,) = json.loads(out.read_text())
    (full_row,) = json.loads(mine.read_text())
    assert client_row["probabilities"] == full_row["probabilities"]
    assert client_row["projection"] == full_row["projection"] == "frontal"

    # Commands of other roles say, in one line, which extra to install: the command's own
    # (train asks for [train], not for [export], the extra that brings torch).
    for command, extra in ((["build-repo", "--profile", "tiny", "--repo", tmp_path / "r"], "export"),
                           (["serve", "--repo", tmp_path], "serve"),
                           (["train", "--config", "router", "--data", tmp_path / "labels.csv"], "train")):
        failed = _run([bin_dir / "cxrlt", *command], cwd=tmp_path, check=False)
        assert failed.returncode == 1
        assert f"pip install 'cxrlt-triton[{extra}]'" in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr

    size_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    print(f"client-only install: {size_mb:.0f} MB in site-packages")
    assert size_mb < 1000, f"the client role installs {size_mb:.0f} MB"
