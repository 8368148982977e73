"""loadtest/gpu_bench.sh --dry-run: the GPU run's steps on the CPU, so the script keeps working
where no GPU is. It runs against the session's server (one tritonserver at a time) and checks
that every figure of the report is there and plausible; speed is not asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench import CUDA, TARGETS, judge

SCRIPT = Path(__file__).resolve().parents[1] / "loadtest" / "gpu_bench.sh"


def test_targets_are_judged_only_for_the_paper_profile_on_cuda():
    models = {"cxr_classifier": {"p50_ms_at_concurrency_1": 12.0, "images_per_s_at_saturation": 300.0},
              "cxr_zeroshot": {"images_per_s_at_saturation": 2500.0}}
    assert [c["met"] for c in judge(models, CUDA, "paper")] == [True, False, True]
    assert [c["met"] for c in judge(models, "CPUExecutionProvider", "paper")] == [None] * len(TARGETS)
    assert [c["met"] for c in judge(models, CUDA, "tiny")] == [None] * len(TARGETS)


@pytest.mark.timeout(300)
def test_dry_run_writes_every_figure(tiny_repository, triton_server, tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, CXRLT_GPU_DRY_RUN="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    command = [str(SCRIPT), "--repo", str(tiny_repository), "--url", triton_server.endpoints.grpc,
               "--metrics-url", triton_server.endpoints.metrics, "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:  # SIGINT first: the run stops its locust on KeyboardInterrupt
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert process.returncode == 0, output[-4000:]

    report = json.loads((out / "gpu_bench.json").read_text())
    assert report["dry_run"] is True and report["profile"] == "tiny"
    assert set(report["models"]) == {"cxr_classifier", "cxr_zeroshot", "cxr_findings"}
    for model, figures in report["models"].items():
        assert 0 < figures["p50_ms_at_concurrency_1"] <= figures["p95_ms_at_concurrency_1"], model
        assert figures["images_per_s_at_saturation"] > 0 and figures["saturation_concurrency"] in (1, 2), model
        assert figures["raw"]["images_per_s_at_saturation"] > 0, model
        assert figures["member_requests_per_image"] > 0, model  # every model calls at least one network
        assert figures["parity_max_abs_diff"] < 1e-4, model
        assert Path(report["files"][f"bench_{model}"]).is_file()
    providers = report["execution_provider"]
    assert len(providers["raw_sessions"]) == len(providers["served_configured"])  # cxr_findings' raw side: every network
    # CPU here; a dry run where onnxruntime-gpu is installed takes CUDA as the served models' "auto" does
    assert providers["provider"] == (CUDA if CUDA in providers["available"] else "CPUExecutionProvider")
    assert set(report["execution_provider"]["served_configured"].values()) == {"auto"}
    loadtest = report["loadtest"]
    assert loadtest["passed"] and set(loadtest["models"]) == set(report["models"])
    assert all(m["requests"] > 0 and m["failures"] == 0 for m in loadtest["models"].values())
    assert [(t["model"], t["figure"]) for t in report["targets"]] == [(m, f) for m, f, _, _ in TARGETS]
    assert all(t["met"] is None for t in report["targets"])  # a CPU rehearsal judges nothing
    assert report["preprocessing_ms"]["configs"]
    assert f"execution provider: {providers['provider']}" in output
