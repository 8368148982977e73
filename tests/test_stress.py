"""`cxrlt stress`: saturation, an open-loop overload storm, then recovery.

Timings are reported by the command, never asserted here (2 shared cores): these tests check that
overload is refused the way the queue policy says (UNAVAILABLE, queue full or timeout expired,
never INTERNAL), that every admitted answer is the reference pipeline's, that the server stays
live and ready and gets back to its unloaded latency, and that the report holds every figure.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from cxrlt.cli.commands import stress as stress_command
from loadtest.driver import QUEUE_MESSAGES, Refusals, arrival_times, check_options, recovered_after, rejection_reason, saturation_index
from loadtest.kernel import require_loopback


def test_refusals_are_classified_by_status_and_message():
    from tritonclient.utils import InferenceServerException

    assert rejection_reason("StatusCode.UNAVAILABLE", "Exceeds maximum queue size") == "queue_full"
    assert rejection_reason("StatusCode.UNAVAILABLE", "Request timeout expired") == "queue_timeout"
    assert rejection_reason("StatusCode.INTERNAL", "Exceeds maximum queue size") == "other"  # the status counts too
    assert rejection_reason("StatusCode.INTERNAL", "Stub process 'cxr_classifier_0_0' is not healthy.") == "other"
    assert rejection_reason("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded") == "other"
    assert rejection_reason(None, None) == "other"

    refusals = Refusals()
    for latency in (1.0, 2.0, 3.0):
        refusals.add(InferenceServerException("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"), latency)
    refusals.add(InferenceServerException("Request timeout expired", status="StatusCode.UNAVAILABLE"), 2000.0)
    figures = refusals.to_json()
    assert figures["total"] == 4 and figures["by_reason"] == {"queue_full": 3, "queue_timeout": 1, "other": 0}
    assert figures["latency"]["queue_full"]["p50_ms"] == 2.0 and figures["latency"]["all"]["max_ms"] == 2000.0
    assert figures["kinds"][0] == {"reason": "queue_full", "status": "StatusCode.UNAVAILABLE",
                                   "message": "Exceeds maximum queue size", "count": 3}


def test_arrivals_are_bounded_in_time_and_count():
    fixed = arrival_times(10.0, 2.0, "fixed", 0, 1000)
    assert len(fixed) == 20 and np.allclose(np.diff(fixed), 0.1) and fixed[0] == 0.0
    poisson = arrival_times(200.0, 5.0, "poisson", 7, 100_000)
    assert np.all(np.diff(poisson) > 0) and poisson[-1] < 5.0
    assert abs(len(poisson) - 1000) < 5 * np.sqrt(1000)  # Poisson count around rate x duration
    assert np.array_equal(poisson, arrival_times(200.0, 5.0, "poisson", 7, 100_000))  # seeded
    assert len(arrival_times(200.0, 5.0, "poisson", 7, 50)) == 50
    with pytest.raises(ValueError):
        arrival_times(0.0, 5.0, "fixed", 0, 10)


def test_saturation_is_where_throughput_stops_growing():
    assert saturation_index([10.0], 0.05) == (0, False)
    assert saturation_index([10.0, 20.0, 30.0], 0.05) == (2, False)
    assert saturation_index([10.0, 20.0, 20.5], 0.05) == (2, True)  # +2.5 %: stop, the best level is saturation
    assert saturation_index([10.0, 20.0, 15.0], 0.05) == (1, True)


def test_recovery_needs_a_whole_window_back_under_the_threshold():
    probes = [(0.1, 900.0), (0.2, None), (0.3, 10.0), (0.4, 12.0), (0.5, 500.0), (0.6, 11.0), (0.7, 9.0)]
    assert recovered_after(probes, 20.0, 4) == 0.6  # the p50 of 10, 12, 500, 11: a slow probe in the window is allowed
    assert recovered_after(probes, 20.0, 6) is None  # the refused probe at 0.2 restarted the window: only 5 since
    assert recovered_after(probes, 5.0, 2) is None
    assert recovered_after(probes[:4], 20.0, 2) == 0.4


def test_overload_goes_to_loopback_only():
    for url, host in (("127.0.0.1:8001", "127.0.0.1"), ("localhost:8001", "localhost"), ("[::1]:8001", "::1"),
                      ("127.3.2.1:1", "127.3.2.1")):
        assert require_loopback(url, "stress") == host
    for url in ("10.1.2.3:8001", "8.8.8.8:8001"):
        with pytest.raises(ValueError, match="loopback"):
            require_loopback(url, "stress")
    parser = argparse.ArgumentParser()
    stress_command.add_arguments(parser)
    with pytest.raises(ValueError, match="loopback"):
        check_options(parser.parse_args(["--repo", ".", "--url", "grpc://192.168.0.1:8001"]), "stress")
    with pytest.raises(SystemExit):  # argparse's type refuses it: "argument --overload: must be positive, not 0"
        parser.parse_args(["--repo", ".", "--url", "127.0.0.1:8001", "--overload", "0"])
    args = parser.parse_args(["--repo", ".", "--url", "grpc://127.0.0.1:8001/"])
    check_options(args, "stress")
    assert args.url == "127.0.0.1:8001"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_overload_is_refused_by_the_queue_and_admitted_answers_are_right(tiny_repository, triton_server, url, grpc_client,
                                                                         tmp_path, capsys, cxrlt):
    out = tmp_path / "stress"
    rc = cxrlt("stress", "--url", url, "--metrics-url", triton_server.endpoints.metrics, "--repo", str(tiny_repository),
               "--overload", "3", "--duration-s", "8", "--saturation-requests", "30", "--max-concurrency", "8",
               "--recovery-timeout-s", "60", "--out", str(out))
    printed = capsys.readouterr().err
    assert rc == 0, printed  # without --strict only a failed check (wrong answer, crash, other refusal) exits 1
    report = json.loads((out / "stress.json").read_text())
    saturation, storm = report["saturation"], report["storm"]
    rejected = storm["rejected"]

    # Overload was refused, and only by the queue policy: UNAVAILABLE, queue full or timeout expired.
    assert rejected["total"] > 0 and storm["sent"] == storm["admitted"] + rejected["total"]
    assert rejected["by_reason"]["other"] == 0, rejected["kinds"]
    for kind in rejected["kinds"]:
        assert kind["status"] == "StatusCode.UNAVAILABLE", kind
        assert QUEUE_MESSAGES[kind["reason"]] in kind["message"].lower(), kind
    # Every admitted answer (and every answer of the sweep and the recovery probes) is the reference's.
    parity = report["parity"]
    assert parity["wrong"] == 0 and parity["max_abs_diff"] <= 1e-4
    assert parity["responses_checked"] >= storm["admitted"] > 0
    # The server stayed up, and latency at concurrency 1 came back.
    assert report["server_crashes"] == 0 and storm["live_probes"]["asked"] > 0 and storm["live_probes"]["unanswered"] == 0
    assert report["server_pid"] == triton_server.process.pid  # found by its port: alive, and its CPU measured
    assert report["health_after"] == {"process_alive": True, "live": True, "ready": True, "model_ready": True}
    assert storm["cpu"]["server_cores"] > 0 and storm["cpu"]["client_cores"] > 0
    assert triton_server.process.poll() is None and grpc_client.is_server_ready() and grpc_client.is_model_ready("cxr_classifier")
    assert storm["recovery"]["recovered"] and storm["recovery"]["seconds"] is not None

    # Every figure is in the report.
    assert saturation["images_per_s"] > 0 and saturation["concurrency"] >= 1
    assert 0 < saturation["p50_ms"] <= saturation["p95_ms"] and saturation["unloaded_p50_ms"] > 0
    assert [p["concurrency"] for p in saturation["sweep"]][:2] == [1, 2]
    assert storm["rate_offered"] == pytest.approx(3 * saturation["images_per_s"], rel=1e-3)
    assert set(rejected["by_reason"]) == {"queue_full", "queue_timeout", "other"}
    for figure in ("p50_ms", "p95_ms"):
        assert rejected["latency"]["all"][figure] is not None and storm["admitted_latency"][figure] is not None
    assert storm["goodput_images_per_s"] > 0 and storm["send_lag"]["p95_ms"] is not None
    assert report["triton"]["cxr_classifier"]["requests"] > 0
    assert len(report["load_average"]["before"]) == 3
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"rejection_p95", "admitted_p95", "goodput", "recovery", "wrong_responses", "server_crashes",
                           "other_rejections"}
    assert all(checks[name]["passed"] for name in ("wrong_responses", "server_crashes", "other_rejections"))
    assert {checks[name]["kind"] for name in ("rejection_p95", "admitted_p95", "goodput", "recovery")} == {"target"}
    assert report["missed_targets"] == [c for c in ("rejection_p95", "admitted_p95", "goodput", "recovery")
                                        if not checks[c]["passed"]]
    assert (out / "stress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "goodput" in printed and ("PASS" in printed or "MISS" in printed)
