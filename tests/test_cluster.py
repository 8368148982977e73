"""Replicas behind a real gRPC load balancer (nginx) with Prometheus, on loopback.

Two tiny-repository replicas: a locust run through nginx reaches both in fair shares; the
HPA's recording rule, evaluated by a real Prometheus, rises under load (its fall a minute after
the load, the [1m] window emptying, is `promtool test rules`'s in tests/test_deploy.py);
a replica SIGKILLed mid-run costs the user nothing (the client retries), and every answer
stays correct.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cxrlt.client import AsyncCxrltClient, CxrltClient
from cxrlt.server.cluster import RECORDED_METRIC, LocalCluster
from cxrlt.server.watchdog import stubs_of
from tests.serve_process import running
from loadtest.metrics import scrape

# Needs Debian's nginx and prometheus, which .ci/run installs; without them LocalCluster says which to install.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _served(cluster: LocalCluster) -> list[float]:
    """Requests each replica has answered (every model), from its own Triton metrics."""
    counts = []
    for server in cluster.servers:
        success = scrape(server.endpoints.metrics).get("nv_inference_request_success", {})
        counts.append(sum(success.values()))
    return counts


def _recorded(cluster: LocalCluster) -> float:
    values = [float(r["value"][1]) for r in cluster.query(RECORDED_METRIC)]
    return max([v for v in values if np.isfinite(v)], default=0.0)


@pytest.mark.timeout(900)
def test_replicas_share_load_survive_a_kill_and_drive_the_scaling_metric(tiny_repository, synthetic_cxrs, cxrlt, tmp_path):
    with LocalCluster(tiny_repository, replicas=2, workdir=tmp_path / "cluster") as cluster:
        for server in cluster.servers:  # everything listens on loopback only
            assert server.endpoints.host == "127.0.0.1"
        image = synthetic_cxrs["frontal"]
        with CxrltClient(cluster.servers[0].endpoints.grpc) as direct:
            expected = direct.classify(image, hint="PA").probabilities
        before = _served(cluster)

        # 1. locust through nginx: both replicas serve a fair share.
        assert cxrlt("loadtest", "--url", cluster.url, "--no-metrics", "--users", "4", "--spawn-rate", "4",
                     "--duration", "15s", "--image-set", "synthetic", "--out", str(tmp_path / "locust")) == 0
        served = [after - b for after, b in zip(_served(cluster), before)]
        shares = [s / sum(served) for s in served]
        print(f"requests per replica through nginx: {served} (shares {[round(s, 2) for s in shares]})")
        assert min(shares) >= 0.30, served

        # 2. the HPA's metric, from a real Prometheus with the shipped rule: up under load.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _recorded(cluster) <= 0:
            time.sleep(1)
        peak = _recorded(cluster)
        assert peak > 0, f"{RECORDED_METRIC} never rose"

        # 3. a replica dies mid-run: with the client's retries no request fails, answers stay right.
        results: list[tuple[int, dict]] = []
        errors: list[str] = []

        async def load(stop: threading.Event) -> None:
            async with AsyncCxrltClient(cluster.url, retries=8, backoff_s=0.2, deadline_s=60, timeout_s=30) as client:
                async def user() -> None:
                    while not stop.is_set():
                        try:
                            result = await client.classify(image, hint="PA")
                            results.append((result.attempts, result.probabilities))
                        except Exception as exc:  # noqa: BLE001 - asserted below
                            errors.append(str(exc))

                await asyncio.gather(*(user() for _ in range(4)))

        stop = threading.Event()
        runner = threading.Thread(target=lambda: asyncio.run(load(stop)), daemon=True)
        runner.start()
        time.sleep(3)
        orphans = [s.pid for s in stubs_of(cluster.servers[1].process.pid)]
        cluster.kill_replica(1)
        time.sleep(8)
        stop.set()
        runner.join(120)
        retried = sum(1 for attempts, _ in results if attempts > 1)
        print(f"replica killed mid-run: {len(results)} requests answered, {len(errors)} failed for the user, "
              f"{retried} needed a retry (gRPC-level failures before the retry)")
        assert not errors, errors[:3]
        assert len(results) > 20
        for _, probabilities in results:
            assert max(abs(probabilities[k] - expected[k]) for k in expected) <= 1e-6

    for server in cluster.servers:
        assert server.process.poll() is not None
    assert cluster.nginx.poll() is not None and cluster.prometheus.poll() is not None
    # Leaving the cluster SIGKILLs what is left of each server's process group; a killed process
    # may take a moment to be gone (unmapping its shared memory).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(running(pid) for pid in orphans):
        time.sleep(0.2)
    assert orphans and not [pid for pid in orphans if running(pid)], "the killed replica's stubs outlived it"
