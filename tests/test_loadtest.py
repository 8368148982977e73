"""`cxrlt loadtest`: locust over gRPC against a real tritonserver, Triton's metrics, targets."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from cxrlt.contract.resources import package_file
from loadtest.metrics import diff, parse_prometheus, per_model, scrape
from cxrlt.cli.commands.loadtest import parse_duration
from loadtest.runner import LoadTestConfig, ProfileError, check_targets, load_profile, locust_command

PROFILE = package_file("loadtest", "profiles", "tiny_cpu.yaml")


SCRAPE = """\
# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="cxr_classifier",version="1"} %(success)d
nv_inference_request_success{model="projection_router",version="1"} %(success)d
nv_inference_request_failure{model="cxr_classifier",reason="BACKEND",version="1"} 0
nv_inference_count{model="cxr_classifier",version="1"} %(success)d
nv_inference_count{model="projection_router",version="1"} %(success)d
nv_inference_exec_count{model="cxr_classifier",version="1"} %(success)d
nv_inference_exec_count{model="projection_router",version="1"} %(execs)d
nv_inference_queue_duration_us{model="cxr_classifier",version="1"} %(cq)d
nv_inference_queue_duration_us{model="projection_router",version="1"} %(rq)d
nv_inference_compute_input_duration_us{model="cxr_classifier",version="1"} 0
nv_inference_compute_infer_duration_us{model="cxr_classifier",version="1"} %(ci)d
nv_inference_compute_output_duration_us{model="cxr_classifier",version="1"} 0
nv_inference_compute_infer_duration_us{model="projection_router",version="1"} %(ri)d
nv_inference_request_duration_us{model="cxr_classifier",version="1"} %(cr)d
nv_inference_request_duration_us{model="projection_router",version="1"} %(rr)d
nv_cpu_utilization 0.5
"""


def test_metrics_breakdown_from_two_scrapes():
    before = parse_prometheus(SCRAPE % dict(success=10, execs=10, cq=1000, rq=20000, ci=100000, ri=30000, cr=101000, rr=50000))
    after = parse_prometheus(SCRAPE % dict(success=30, execs=20, cq=3000, rq=60000, ci=300000, ri=90000, cr=303000, rr=150000))
    rows = per_model(diff(before, after)).to_dict("index")
    assert list(rows) == ["cxr_classifier", "projection_router"]  # public models first
    classifier, router = rows["cxr_classifier"], rows["projection_router"]
    assert classifier["requests"] == 20 and classifier["executions"] == 20
    assert classifier["queue_ms"] == pytest.approx(0.1) and classifier["compute_ms"] == pytest.approx(10.0)
    assert router["queue_ms"] == pytest.approx(2.0) and router["compute_ms"] == pytest.approx(3.0)
    assert router["avg_batch"] == pytest.approx(2.0) and router["queue_share"] == pytest.approx(0.4)
    doubled = per_model(diff(before, after).add(diff(before, after), fill_value=0)).loc["projection_router"]
    assert doubled.requests == 40 and doubled.queue_ms == pytest.approx(2.0)


def _serve_scrapes(pages: list[str]) -> tuple[http.server.HTTPServer, list[int]]:
    """A metrics endpoint that answers with `pages` in turn (the last one from then on); counts its scrapes."""
    served = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages[min(served[0], len(pages) - 1)].encode()
            served[0] += 1
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, served


def test_scrape_after_a_run_waits_for_the_last_request_to_be_counted():
    page = lambda success: SCRAPE % dict(success=success, execs=success, cq=0, rq=0, ci=0, ri=0, cr=0, rr=0)
    before = parse_prometheus(page(10))
    # Triton counts the last request a moment after the client has its response.
    server, served = _serve_scrapes([page(29), page(29), page(30)])
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        after = scrape(url, before, {"cxr_classifier": 20}, interval=0.01)
        assert per_model(diff(before, after)).requests.iloc[0] == 20 and served[0] == 3
        # A request that never reached Triton never counts: the wait ends at the timeout.
        after = scrape(url, before, {"cxr_classifier": 21}, settle_s=0.1, interval=0.01)
        assert per_model(diff(before, after)).requests.iloc[0] == 20 and served[0] > 4
    finally:
        server.shutdown()


def test_checked_in_profile_and_target_checks(tmp_path):
    profile = load_profile(PROFILE)
    assert profile["targets"]["min_rps"] and profile["targets"]["max_p95_ms"] and profile["targets"]["max_failures"] == 0
    assert profile["load"]["users"] >= 1 and profile["source"] == str(PROFILE)
    assert load_profile(None)["targets"] == {"max_failures": 0, "models": {}}  # no file: zero failures, nothing else

    aggregated = {"requests": 40, "failures": 1, "rps": 5.0, "p95_ms": 900.0}
    models = {"cxr_findings": {"requests": 10, "failures": 0, "rps": 1.0, "p95_ms": 1200.0}}
    checks = check_targets({"min_rps": 10, "max_p95_ms": 1000, "max_failures": 0, "models": {"cxr_findings": {"max_p95_ms": 1000}}},
                           aggregated, models)
    assert [c["name"] for c in checks if not c["passed"]] == ["min_rps", "max_failures", "cxr_findings.max_p95_ms"]
    assert "MISSED" in next(c for c in checks if c["name"] == "min_rps")["message"]
    # No request completed: throughput and latency targets cannot be met.
    assert not all(c["passed"] for c in check_targets({"min_rps": 1, "max_p95_ms": 10}, {"requests": 0, "failures": 0}, {}))

    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  min_rsp: 3\n")
    with pytest.raises(ProfileError, match="min_rsp"):
        load_profile(bad)


def test_durations_and_locust_command(tmp_path):
    assert parse_duration("90") == parse_duration("90s") == parse_duration("1m30s") == 90.0
    with pytest.raises(ValueError):
        parse_duration("soon")
    config = LoadTestConfig(url="grpc://127.0.0.1:9", users=3, spawn_rate=1.5, duration_s=7, out=tmp_path,
                            weights={"cxr_classifier": 2, "cxr_zeroshot": 0, "cxr_findings": 1})
    command = " ".join(locust_command(config))
    assert "--headless" in command and "--host grpc://127.0.0.1:9" in command and "-u 3" in command and "-t 7s" in command
    assert "--classifier-weight 2 --zeroshot-weight 0 --findings-weight 1" in command
    assert f"--csv {tmp_path / 'locust'}" in command and "--html" in command


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_headless_run_meets_profile_targets_and_reports_queue_vs_compute(triton_server, tmp_path, capsys, cxrlt):
    endpoints = triton_server.endpoints
    out = tmp_path / "run"
    rc = cxrlt("loadtest", "--url", endpoints.grpc, "--metrics-url", endpoints.metrics, "--targets", str(PROFILE),
               "--users", "2", "--duration-s", "8", "--out", str(out))
    printed = capsys.readouterr()
    assert rc == 0, printed.err

    for name in ("locust_stats.csv", "locust_failures.csv", "figures.json", "report.html", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    per_model_stats, aggregated = report["locust"]["models"], report["locust"]["aggregated"]
    assert set(per_model_stats) == {"cxr_classifier", "cxr_zeroshot", "cxr_findings"}
    assert aggregated["requests"] > 0 and aggregated["failures"] == 0

    assert report["passed"] and report["missed"] == [] and report["locust"]["failures"] == []
    assert report["profile"] == str(PROFILE)
    assert {c["name"] for c in report["checks"]} >= {"min_rps", "max_p95_ms", "max_failures"}
    triton = report["triton"]["models"]
    # The public models and the networks their BLS calls reach, each with queue vs compute time.
    for model in ("cxr_classifier", "cxr_zeroshot", "cxr_findings", "projection_router", "clip_image_encoder"):
        assert triton[model]["requests"] > 0
        assert triton[model]["queue_ms"] >= 0 and triton[model]["compute_ms"] > 0
    for model, figures in per_model_stats.items():  # Triton counted every request locust saw answered
        assert triton[model]["requests"] >= figures["requests"], model
    assert "queue" in printed.err and "compute" in printed.err


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_impossible_target_fails_naming_it(triton_server, tmp_path, capsys, cxrlt):
    out = tmp_path / "run"
    rc = cxrlt("loadtest", "--url", triton_server.endpoints.grpc, "--metrics-url", triton_server.endpoints.metrics,
               "--users", "1", "--spawn-rate", "1", "--duration", "3", "--min-rps", "100000",
               "--zeroshot-weight", "0", "--findings-weight", "0", "--image-set", "synthetic", "--out", str(out))
    printed = capsys.readouterr().err
    assert rc != 0
    assert "min_rps" in printed and "MISSED" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["missed"] == ["min_rps"] and not report["passed"]
    assert set(report["locust"]["models"]) == {"cxr_classifier"}  # the task weights reached locust


def test_no_server_is_a_clear_error(tmp_path):
    from cxrlt.server.launcher import free_port
    from loadtest.runner import LoadTestError, check_server

    with pytest.raises(LoadTestError, match="no Triton server"):
        check_server(f"127.0.0.1:{free_port()}", ["cxr_classifier"], timeout=2)


@pytest.mark.timeout(180)
def test_failed_calls_are_locust_failures(tmp_path):
    """With nothing listening, every gRPC call fails and is recorded as a failure with its reason."""
    from cxrlt.server.launcher import free_port
    from loadtest.runner import run_locust

    config = LoadTestConfig(url=f"127.0.0.1:{free_port()}", users=1, spawn_rate=1, duration_s=2, out=tmp_path,
                            image_set="synthetic", request_timeout_s=1,
                            weights={"cxr_classifier": 1, "cxr_zeroshot": 0, "cxr_findings": 0})
    figures = run_locust(config)  # locust's own stats as it ended, not its CSV files of up to a second before
    per_model_stats, aggregated = figures["models"], figures["aggregated"]
    assert aggregated["requests"] > 0 and aggregated["failures"] == aggregated["requests"]
    assert set(per_model_stats) == {"cxr_classifier"} and per_model_stats["cxr_classifier"]["p95_ms"] is not None
    (failure,) = figures["failures"]
    assert failure["model"] == "cxr_classifier" and failure["occurrences"] == aggregated["failures"]
    assert failure["error"].startswith("GrpcCallError") and "UNAVAILABLE" in failure["error"]  # the reason, not a bare name


def test_without_locust_the_extra_is_named_and_no_folder_is_left(tmp_path, monkeypatch, capsys):
    import sys

    from cxrlt.cli.main import main

    monkeypatch.setitem(sys.modules, "locust", None)  # what importlib finds when locust is not installed
    monkeypatch.chdir(tmp_path)
    assert main(["loadtest", "--url", "127.0.0.1:1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install -e '.[loadtest]'" in line and "locust" in line
    assert not (tmp_path / "runs").exists()
