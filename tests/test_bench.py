"""`cxrlt bench`: served pipeline vs the same pipeline in process, interleaved per concurrency.

Speed is reported by the benchmark, never asserted here: these tests check that both sides
run, are measured and compared, and that the figures and the plot are written.
"""

from __future__ import annotations

import argparse
import json

import pytest

from loadtest.bench import Measurement, drive
from loadtest.payloads import Payload, load_payloads
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

    measurement = drive(call, payloads, concurrency=3, total=10)
    assert measurement.requests == len(measurement.latencies_ms) == len(seen) == 10
    assert {w for w, _ in seen} <= {0, 1, 2}
    assert sorted(n for _, n in seen) == sorted(payloads[i % len(payloads)].name for i in range(10))
    figures = Measurement(2, 4, 2.0, [1.0, 2.0, 3.0, 4.0]).to_json()
    assert figures["images_per_s"] == 2.0 and figures["p50_ms"] == 2.5


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
        assert row["raw"]["cpu_ms_per_image"]["this_process"] > 0
        assert row["served"]["cpu_ms_per_image"]["server"] is None  # --url: the server's processes are not ours
        assert row["orders"][0] == row["orders"][1][::-1]  # which side goes first alternates between rounds
        assert row["served"]["triton"]["cxr_classifier"]["requests"] >= 6  # queue vs compute per concurrency
    assert sorted(row["order"][0] for row in report["sweep"]) == ["raw", "served"]  # alternating across levels too
    assert report["best"]["ratio"] > 0
    assert report["overhead_per_image_ms"]["concurrency"] == 1 and "p50" in report["overhead_per_image_ms"]
    # Same ONNX files, same pipeline code: both sides compute the same probabilities.
    assert report["parity_max_abs_diff"] < 1e-4
    budget = report["thread_budget"]
    assert budget["raw"]["intra_op_threads_per_session"] == budget["served"]["network_intra_op_threads"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "served/raw" in printed


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
