"""`cxrlt bench`: served pipeline vs the same pipeline in process, interleaved per concurrency.

Speed is reported by the benchmark, never asserted here: these tests check that both sides
run, are measured and compared, and that the figures and the plot are written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from loadtest.bench import DEFAULT_LEVELS, RawSide, default_levels, preprocessing_timings
from loadtest.kernel import Payload, drive, level_figures, load_payloads
from loadtest.metrics import COUNTS, member_calls_per_image
from tests.grpc_inputs import settled


def test_concurrency_levels_are_parsed():
    from cxrlt.cli.commands.bench import _levels

    assert _levels("8,1,2,2") == (1, 2, 8)
    with pytest.raises(argparse.ArgumentTypeError):
        _levels("1,zero")
    with pytest.raises(argparse.ArgumentTypeError):
        _levels("0")


def test_drive_hands_out_every_request_once_across_workers():
    payloads = load_payloads("synthetic")
    seen: list[tuple[int, str]] = []

    def call(worker: int, payload: Payload) -> None:
        seen.append((worker, payload.name))

    latencies, wall_s = drive(call, payloads, concurrency=3, total=10)
    assert len(latencies) == len(seen) == 10 and wall_s > 0
    assert {w for w, _ in seen} <= {0, 1, 2}
    assert sorted(n for _, n in seen) == sorted(payloads[i % len(payloads)].name for i in range(10))
    # a level's runs (bench's rounds) pooled: every latency, the summed wall and CPU time
    figures = level_figures([{"latencies_ms": [1.0, 2.0], "wall_s": 1.5, "cpu_s": (0.1, None)},
                             {"latencies_ms": [3.0, 4.0], "wall_s": 0.5, "cpu_s": (0.3, None)}])
    assert figures["requests"] == 4 and figures["images_per_s"] == 2.0 and figures["p50_ms"] == 2.5
    assert figures["cpu"] == {"client_cores": 0.2, "client_ms_per_image": 100.0, "server_cores": None,
                              "server_ms_per_image": None}


def test_default_levels_stop_at_what_the_model_admits():
    assert default_levels({"instances": 4, "max_queue_size": 8}) == (1, 2, 4, 8)  # a default build's entry models
    assert default_levels({"instances": 1, "max_queue_size": 3}) == (1, 2, 3)
    assert default_levels({"instances": 1, "max_queue_size": 32}) == DEFAULT_LEVELS == (1, 2, 4, 8, 16)
    assert default_levels({"instances": 4, "max_queue_size": 0}) == DEFAULT_LEVELS  # no bound


def test_member_calls_are_counted_per_image_of_the_entry_model():
    counts = {"cxr_classifier": (10, 10, 10), "cxr_zeroshot": (3, 3, 3),  # public: not members
              "projection_router": (10, 10, 8), **{f"ensemble_frontal_{m}": (5, 10, 5) for m in ("pcam", "cait", "swin")}}
    rows = pd.DataFrame(counts, index=[c for c in COUNTS if c != "failures"]).T
    assert member_calls_per_image(rows, "cxr_classifier") == {
        "member_requests_per_image": 2.5, "member_executions_per_image": 2.3,
        "requests_per_image_by_network": {"projection_router": 1.0, **{f"ensemble_frontal_{m}": 0.5 for m in ("pcam", "cait", "swin")}}}
    assert member_calls_per_image(rows, "cxr_findings") == {
        "member_requests_per_image": None, "member_executions_per_image": None, "requests_per_image_by_network": None}


def test_preprocessing_is_timed_once_per_distinct_config(tmp_path):
    from cxrlt.contract.preprocessing import PreprocessConfig

    def write_config(model: str, config: PreprocessConfig) -> None:
        params = "".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}\n'
                         for k, v in config.to_parameters().items())
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text(f'name: "{model}"\n{params}')

    write_config("cxr_classifier", PreprocessConfig(size=64))
    write_config("cxr_zeroshot", PreprocessConfig.clip(64))
    timings = preprocessing_timings(tmp_path, load_payloads("synthetic"), repeats=2)
    assert [(c["models"], c["size"], c["mode"]) for c in timings["configs"]] == [(["cxr_classifier"], 64, "percentile"),
                                                                                (["cxr_zeroshot"], 64, "max")]
    for config in timings["configs"]:
        assert [i["image"] for i in config["images"]] == ["random_12bit", "synthetic_frontal", "synthetic_lateral"]
        assert config["images"][0]["shape"] == [1955, 1841]
        assert all(0 < i["min_ms"] <= i["median_ms"] for i in config["images"])


def test_raw_side_runs_an_images_members_at_once(tiny_repository, monkeypatch):
    """With a pool, the three ensemble members of one image overlap, on the pool's threads."""
    from python_backends.onnx_runner import OnnxRunner

    payload = load_payloads("synthetic")[0]
    raw = RawSide(tiny_repository, "cxr_classifier", threads=1, pool_threads=4)
    calls: list[tuple[str, float, float]] = []
    run = OnnxRunner.run

    def slowed(self, pixels: np.ndarray) -> np.ndarray:
        began = time.perf_counter()
        time.sleep(0.1)  # long enough that calls one after another could not overlap by chance
        out = run(self, pixels)
        calls.append((threading.current_thread().name, began, time.perf_counter()))
        return out

    try:
        raw(0, payload)  # creates the sessions
        monkeypatch.setattr(OnnxRunner, "run", slowed)
        raw(0, payload)
    finally:
        raw.close()
    assert len(calls) == 4 and all(thread.startswith("member") for thread, _, _ in calls)  # the router, then 3 members
    members = sorted(calls, key=lambda c: c[1])[1:]
    assert max(began for _, began, _ in members) < min(ended for _, _, ended in members)  # all three in flight together
    assert len(raw.session_providers()) == 4


def test_raw_side_needs_no_torch(tiny_repository):
    """The loadtest extra runs the bench's raw side: onnxruntime and the Python backends' pipelines, no torch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from loadtest.bench import RawSide\nfrom loadtest.kernel import load_payloads\n"
            f"raw = RawSide({str(tiny_repository)!r}, 'cxr_findings', threads=1)\n"
            "print(raw(0, load_payloads('synthetic')[0]).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(36,)", done.stderr[-2000:]


def test_payloads_carry_the_real_cxr_and_hints():
    payloads = {p.name: p for p in load_payloads("all")}
    assert payloads["RG1_UNCR"].pixels.shape == (1955, 1841) and payloads["RG1_UNCR"].hint == "PA"
    assert payloads["synthetic_frontal"].hint == "PA" and payloads["synthetic_lateral"].hint == "LL"
    assert all(p.pixels.dtype.name == "uint16" for p in payloads.values())


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_bench_against_the_session_server(tiny_repository, triton_server, tmp_path, capsys, cxrlt):
    out = tmp_path / "bench"
    png = tmp_path / "plot" / "bench.png"
    rc = cxrlt("bench", "--repo", str(tiny_repository), "--url", triton_server.endpoints.grpc,
               "--metrics-url", triton_server.endpoints.metrics, "--concurrency", "1,2", "--requests", "3", "--rounds", "2",
               "--warmup", "2", "--out", str(out), "--plot", str(png))
    printed = capsys.readouterr().err
    assert rc == 0, printed

    report = json.loads((out / "bench.json").read_text())
    assert [row["concurrency"] for row in report["sweep"]] == [1, 2]
    for row in report["sweep"]:
        for side in ("raw", "served"):
            figures = row[side]
            assert figures["requests"] == 6  # 3 per round, pooled over 2 rounds
            assert figures["images_per_s"] > 0 and 0 < figures["p50_ms"] <= figures["p95_ms"]
        assert row["ratio"] > 0 and len(row["ratio_per_round"]) == 2
        assert row["raw"]["cpu"]["client_ms_per_image"] > 0 and row["raw"]["cpu"]["client_cores"] > 0
        assert row["served"]["cpu"]["server_ms_per_image"] is None  # --url: the server's processes are not ours
        assert row["orders"][0] == row["orders"][1][::-1]  # which side goes first alternates between rounds
        assert row["served"]["triton"]["cxr_classifier"]["requests"] >= 6  # queue vs compute per concurrency
        assert row["served"]["member_requests_per_image"] > 0 and row["served"]["member_executions_per_image"] > 0
    assert sorted(row["order"][0] for row in report["sweep"]) == ["raw", "served"]  # alternating across levels too
    assert report["best"]["ratio"] > 0 and report["best"]["served"]["member_requests_per_image"] > 0
    assert report["overhead_per_image_ms"]["concurrency"] == 1 and "p50" in report["overhead_per_image_ms"]
    # Same ONNX files, same pipeline code: both sides compute the same probabilities.
    assert report["parity_max_abs_diff"] < 1e-4
    budget = report["thread_budget"]
    assert budget["raw"]["intra_op_threads_per_session"] == budget["served"]["network_intra_op_threads"]
    assert budget["raw"]["compute_threads_total"] == budget["served"]["network_compute_threads_total"]  # same budget both sides
    providers = report["execution_providers"]
    assert set(providers["raw_sessions"]) <= set(providers["served_configured"])
    assert all(sessions[-1] == "CPUExecutionProvider" for sessions in providers["raw_sessions"].values())  # CUDA first, if any
    assert {c["mode"] for c in report["preprocessing_ms"]["configs"]} == {"percentile", "max"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "served/raw" in printed and "member req/img" in printed and "preprocessing of cxr_classifier" in printed


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_bench_passes_images_through_shared_memory(tiny_repository, triton_server, grpc_client, tmp_path, capsys, cxrlt):
    out = tmp_path / "bench"
    before = grpc_client.get_inference_statistics("cxr_classifier", as_json=True)["model_stats"][0]
    rc = cxrlt("bench", "--repo", str(tiny_repository), "--url", triton_server.endpoints.grpc, "--shared-memory",
               "--concurrency", "2", "--requests", "4", "--warmup", "0", "--out", str(out))
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "bench.json").read_text())
    assert report["image_transport"] == "system shared memory"
    # the warm-up parity check runs every image through both sides: same results via the region
    assert report["parity_max_abs_diff"] < 1e-4

    def served_since_before() -> int:
        after = grpc_client.get_inference_statistics("cxr_classifier", as_json=True)["model_stats"][0]
        return int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])

    assert settled(served_since_before, lambda served: served >= 7) == 3 + 4  # parity pass over the three images, then the measured requests
    assert grpc_client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}  # unregistered


def test_a_failed_bench_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """The server bench starts fails after its log's folder was made: the run removes the folder again."""
    from cxrlt.cli.main import main
    from cxrlt.contract.preprocessing import PreprocessConfig
    from cxrlt.server.launcher import TritonServer

    def fail(self, *args, **kwargs):
        raise RuntimeError("tritonserver did not start")

    repo = tmp_path / "repo"
    for model, config in (("cxr_classifier", PreprocessConfig(size=64)), ("cxr_zeroshot", PreprocessConfig.clip(64))):
        params = "".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}\n'
                         for k, v in config.to_parameters().items())
        (repo / model).mkdir(parents=True)
        (repo / model / "config.pbtxt").write_text(f'name: "{model}"\n{params}')
    (repo / "manifest.json").write_text('{"models": {}}')
    monkeypatch.setattr(TritonServer, "start", fail)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--repo", str(repo), "--image-set", "synthetic"]) == 1
    assert "tritonserver did not start" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
