"""`cxrlt soak`: the growth verdicts on synthetic series, the /proc sampler on a process tree this
test starts, and a short soak against the session's tritonserver (no fd or shm-segment growth,
RSS under the threshold, the report and a valid PNG written)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from cxrlt.cli.commands import soak as soak_command
from loadtest.driver import check_growth, check_options, chunk_bounds, growth, jobs
from loadtest.kernel import MIB, MODELS, LoadTestError, load_payloads, process_tree, sample_tree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _targets(max_rss_slope_mib_per_1000: float = 1.0) -> dict[str, float]:
    return {"max_rss_growth_pct": 5.0, "max_rss_slope_mib_per_1000": max_rss_slope_mib_per_1000, "max_fd_growth": 0,
            "max_shm_file_growth": 0}


def _verdicts(rss, fds, shm_files, requests, warmup, targets=_targets()) -> dict[str, bool]:
    series = {key: growth(key, requests, values, warmup) for key, values in (("rss_bytes", rss), ("fds", fds), ("shm_files", shm_files))}
    return {c["name"]: c["passed"] for c in check_growth(series, targets)}


def _rss(requests, per_request: float, noise_mib: float, steps: dict[int, float] = {}, seed: int = 0) -> list[float]:
    """1.4 GiB before the first request, 2.2 GiB from then on, plus noise, high-water steps and a leak."""
    rng = np.random.default_rng(seed)
    return [1400 * MIB if r == 0 else
            2200 * MIB + per_request * r + noise_mib * MIB * rng.standard_normal() + sum(MIB * mib for at, mib in steps.items() if r >= at)
            for r in requests]


LONG = list(range(0, 20001, 100))  # the README's run: 20,000 requests, warm-up 1,000, every 100
SHORT = list(range(0, 2001, 100))  # the CI run: 2,000 requests, warm-up 300, every 100
SHORT_TARGETS = _targets(max_rss_slope_mib_per_1000=50.0)


def test_a_flat_series_passes_and_a_leak_fails():
    fds, files = [223] + [260] * (len(LONG) - 1), [20] * len(LONG)
    # Flat after warm-up with the measured sample noise (~12 MiB) and high-water steps that stop: no leak.
    settling = _rss(LONG, 0.0, 12, steps={2000: 20, 7000: 15})
    assert all(_verdicts(settling, fds, files, LONG, 1000).values())
    # A leak of 4 KiB per request: 3.5 % over the run, under the 5 % target, but the slope never levels off.
    leak = _verdicts(_rss(LONG, 4 * 1024, 12), fds, files, LONG, 1000)
    assert leak["rss_slope"] is False and leak["rss_growth_pct"] is True
    # A big one misses both.
    big = _verdicts(_rss(LONG, 64 * 1024, 12), fds, files, LONG, 1000)
    assert big["rss_slope"] is False and big["rss_growth_pct"] is False


def test_a_short_run_fails_on_a_clear_leak_only():
    fds, files = [223] + [260] * (len(SHORT) - 1), [20] * len(SHORT)
    # The CI run's measured behaviour: still settling by ~13 MiB per 1,000 requests, 3 MiB of noise.
    assert all(_verdicts(_rss(SHORT, 13 * 1024, 3), fds, files, SHORT, 300, SHORT_TARGETS).values())
    # One leaked 256 x 256 UINT16 image (128 KiB) per request: 125 MiB per 1,000.
    leak = _verdicts(_rss(SHORT, 128 * 1024, 3), fds, files, SHORT, 300, SHORT_TARGETS)
    assert leak["rss_slope"] is False


def test_descriptor_and_shared_memory_growth():
    rss = _rss(SHORT, 0.0, 3)
    flat_fds, flat_files = [223] + [260] * (len(SHORT) - 1), [20] * len(SHORT)
    # One descriptor leaked every 500 requests: steady growth, a miss.
    leaking = [260 + r // 500 for r in SHORT]
    assert _verdicts(rss, leaking, flat_files, SHORT, 300, SHORT_TARGETS)["fds_growth"] is False
    # One transient extra descriptor in one sample is not growth.
    blip = list(flat_fds)
    blip[12] += 1
    assert _verdicts(rss, blip, flat_files, SHORT, 300, SHORT_TARGETS)["fds_growth"] is True
    # A shared-memory region left behind every 400 requests.
    regions = [20 + r // 400 for r in SHORT]
    verdicts = _verdicts(rss, flat_fds, regions, SHORT, 300, SHORT_TARGETS)
    assert verdicts["shm_files_growth"] is False and verdicts["fds_growth"] is True


def test_growth_figures():
    requests = [0, 100, 200, 300, 400]
    g = growth("rss_bytes", requests, [50.0, 100.0, 102.0, 104.0, 106.0], warmup=100)
    assert g["samples"] == 4 and g["at_start"] == 50.0 and g["after_warmup"] == 100.0 and g["end"] == 106.0
    assert g["slope_per_1000"] == pytest.approx(20.0)
    assert g["fitted_after_warmup"] == pytest.approx(100.0) and g["growth_pct"] == pytest.approx(6.0)
    assert g["level_growth"] == pytest.approx(6.0)
    with pytest.raises(LoadTestError, match="at least 3"):
        growth("fds", requests, [1, 1, 1, 1, 1], warmup=300)


def test_sampling_bounds_and_the_request_cycle():
    assert chunk_bounds(2000, 100, 300) == list(range(0, 2001, 100))
    assert chunk_bounds(1000, 300, 150) == [0, 150, 300, 600, 900, 1000]
    payloads = load_payloads("synthetic")
    cycle = jobs(payloads)
    assert sorted((m, p.name) for m, p in cycle) == sorted((m, p.name) for m in MODELS for p in payloads)
    assert [m for m, _ in cycle[:3]] == list(MODELS)  # consecutive requests go to different models


def test_config_and_url_are_checked():
    parser = argparse.ArgumentParser()
    soak_command.add_arguments(parser)

    def checked(*argv: str) -> argparse.Namespace:
        args = parser.parse_args(argv)
        check_options(args, "soak")
        return args

    with pytest.raises(ValueError, match="--url"):
        checked("--requests", "100")
    with pytest.raises(ValueError, match="--warmup"):
        checked("--requests", "100", "--url", "127.0.0.1:8001", "--warmup", "100")
    with pytest.raises(ValueError, match="at least 3"):
        checked("--requests", "1000", "--url", "127.0.0.1:8001", "--warmup", "900", "--sample-every", "100")
    with pytest.raises(ValueError, match="loopback"):
        checked("--requests", "1000", "--url", "192.0.2.1:8001", "--warmup", "100")
    with pytest.raises(SystemExit):  # argparse's type refuses it: "argument --concurrency: must be at least 1, not 0"
        checked("--requests", "1000", "--url", "127.0.0.1:8001", "--warmup", "100", "--concurrency", "0")
    assert checked("--requests", "1000", "--url", "grpc://[::1]:8001", "--warmup", "100").url == "[::1]:8001"


def test_sampler_reads_a_process_tree(tmp_path):
    """A parent holding a /dev/shm file, with a child holding a second one: both are found, and their descriptors."""
    names = [f"cxrlt_soak_test_{uuid.uuid4().hex}_{i}" for i in range(2)]
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        def hold(name):
            fd = os.open("/dev/shm/" + name, os.O_CREAT | os.O_RDWR, 0o600)
            os.ftruncate(fd, 65536)
            os.write(fd, b"x" * 65536)
            return fd
        if len(sys.argv) > 1:
            hold(sys.argv[1]); print("ready", flush=True); time.sleep(120); sys.exit()
        hold({names[0]!r})
        child = subprocess.Popen([sys.executable, __file__, {names[1]!r}], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        print("ready", flush=True)
        time.sleep(120)
    """)
    path = tmp_path / "tree.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        sample = sample_tree(parent.pid, requests=7, elapsed_s=1.0)
        assert sample["requests"] == 7 and sample["processes"] == 2
        assert sample["shm_files"] == 2 and sample["shm_bytes"] >= 2 * 65536
        assert sample["shm_all_files"] >= 2 and sample["shm_all_bytes"] >= sample["shm_bytes"]
        assert sample["fds"] >= 2 * 4  # stdin, stdout, stderr and the shm file in each
        assert sample["rss_bytes"] > sample["rss_anon_bytes"] > 0
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # its process group: the parent and its child, nothing else
        parent.wait()
        parent.stdout.close()
        for name in names:
            Path("/dev/shm", name).unlink(missing_ok=True)
    with pytest.raises(LoadTestError, match="gone"):
        sample_tree(parent.pid)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_short_soak_against_the_session_server(triton_server, url, tmp_path, capsys, cxrlt):
    """2,000 requests over the three models, 300 of warm-up, sampled every 100.

    The synthetic images only: with them the Python backend's shared-memory regions and the
    allocators reach their high-water marks within the warm-up (RSS then settles by ~13 MiB per
    1,000 requests with ~3 MiB of noise), while the real 1955 x 1841 image keeps raising them for
    ~8,000 requests (loadtest/README.md, "Soak"), which 2,000 requests cannot tell from a leak.
    The slope bound, 50 MiB per 1,000 requests, is what a clear leak exceeds: one leaked input
    image per request is 125 MiB per 1,000.
    """
    out = tmp_path / "soak"
    started = time.monotonic()
    rc = cxrlt("soak", "--url", url, "--server-pid", str(triton_server.process.pid), "--requests", "2000",
               "--warmup", "300", "--sample-every", "100", "--image-set", "synthetic", "--max-rss-slope-mib", "50",
               "--time-limit", "900", "--out", str(out))
    printed = capsys.readouterr().err
    report = json.loads((out / "soak.json").read_text())
    assert rc == (0 if report["passed"] else 1), printed
    assert time.monotonic() - started < 1100

    assert report["requests_completed"] == 2000 and sum(report["sent"].values()) == 2000
    assert set(report["sent"]) == set(MODELS) and report["failed"] == {}, report["errors"]
    assert [s["requests"] for s in report["samples"]] == list(range(0, 2001, 100))
    # tritonserver and the Python-backend stubs of every model (the tiny repository has 20)
    assert report["samples"][0]["processes"] > len(MODELS)
    for key in ("rss_bytes", "rss_anon_bytes", "fds", "shm_files", "shm_bytes"):
        g = report["growth"][key]
        assert g["samples"] == 18 and g["at_start"] > 0 and g["end"] > 0
        for figure in ("growth_pct", "slope_per_1000", "fitted_after_warmup", "level_growth"):
            assert g[figure] is not None
    assert report["load_average"]["before"] and report["load_average"]["after"]

    checks = {c["name"]: c for c in report["checks"]}
    assert checks["fds_growth"]["passed"], checks["fds_growth"]["message"]
    assert checks["shm_files_growth"]["passed"], checks["shm_files_growth"]["message"]
    assert checks["rss_growth_pct"]["passed"] and checks["rss_slope"]["passed"], printed
    assert "shm_bytes_growth" not in checks and report["growth"]["shm_bytes"]["end"] >= 20 * MIB  # reported, not judged
    assert "PASS" in printed or "MISS" in printed

    png = (out / "soak.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and 10_000 < len(png) < 400_000
    from PIL import Image

    with Image.open(out / "soak.png") as image:
        image.verify()
