"""The gRPC client SDK (cxrlt.client.sdk) against the real tritonserver of the session fixtures."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from tritonclient.utils import InferenceServerException

from cxrlt.client.sdk import (
    AsyncCxrltClient,
    ClientError,
    CxrltClient,
    RequestTimeout,
    ServerFailed,
    ServerRejected,
    ServerUnavailable,
)
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.server.launcher import free_port

pytestmark = pytest.mark.e2e

RG1 = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


@pytest.fixture(scope="module")
def client(url):
    with CxrltClient(url) as c:
        yield c


@pytest.fixture(scope="module")
def rg1(client):
    """RG1_UNCR (uncompressed), RG1_J2KR (lossless JPEG 2000), RG1_J2KI (lossy) classified once."""
    return {name: client.classify_file(get_testdata_file(name)) for name in RG1}


def _probs(result) -> np.ndarray:
    return np.array(list(result.probabilities.values()))


class CountingCalls:
    """Wraps a tritonclient method and counts the RPCs it really makes."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def _fake_sleeps(client: CxrltClient) -> list[float]:
    """The client's backoff sleeps, recorded instead of slept."""
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    client.aio._sleep = sleep
    return sleeps


def _rpc(client: CxrltClient):
    """The tritonclient.grpc.aio client under a CxrltClient (opened in its loop by the first call)."""
    client.model_info()
    return client.aio._client


# ----------------------------------------------------------------------------- results


def test_real_cxr_result_is_complete(rg1):
    result = rg1["RG1_UNCR.dcm"]
    assert list(result.probabilities) == list(ALL_LABELS)
    probabilities = _probs(result)
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert result.image_id == str(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True).SOPInstanceUID)
    assert result.model_name == "cxr_findings" and result.model_version == "1"
    assert result.random_weights is True  # the tiny test repository has no checkpoints
    assert result.latency_ms is not None and result.latency_ms > 0
    assert result.task1() == {label: result.probabilities[label] for label in TASK1_LABELS}
    json.dumps(result.to_dict())


def test_projection_comes_from_the_header_hint(rg1):
    for name in RG1:
        result = rg1[name]
        assert result.hint == "PA", name
        assert result.projection == "frontal", name
        assert result.hint_used is True, name
        assert 0.0 <= result.projection_score <= 1.0


def test_lossless_twin_gives_identical_results(rg1):
    uncompressed, lossless = rg1["RG1_UNCR.dcm"], rg1["RG1_J2KR.dcm"]
    assert uncompressed.probabilities == lossless.probabilities
    assert uncompressed.projection_score == lossless.projection_score


def test_lossy_version_gives_close_results(rg1):
    difference = np.abs(_probs(rg1["RG1_UNCR.dcm"]) - _probs(rg1["RG1_J2KI.dcm"]))
    assert difference.max() < 0.05
    assert rg1["RG1_J2KI.dcm"].projection == rg1["RG1_UNCR.dcm"].projection


def test_classify_array_equals_classify_file(client, rg1, real_cxr):
    result = client.classify(real_cxr, hint="PA", image_id="rg1")
    assert result.image_id == "rg1"
    assert result.probabilities == rg1["RG1_UNCR.dcm"].probabilities


def test_without_a_hint_the_router_decides(client, real_cxr):
    result = client.classify(real_cxr)
    assert result.hint is None and result.hint_used is False
    assert result.projection in ("frontal", "lateral")
    assert result.projection_score >= 0.5  # the router's argmax of two projections
    assert client.classify(real_cxr, hint="").hint is None  # empty hint means none


def test_lateral_hint_routes_to_the_lateral_ensemble(client, real_cxr):
    result = client.classify(real_cxr, hint="LL")
    assert result.projection == "lateral" and result.hint_used is True and result.hint == "LL"


def test_eight_bit_images_are_sent_full_scale(client, synthetic_cxrs):
    frontal = synthetic_cxrs["frontal"]
    eight_bit = (frontal >> 8).astype(np.uint8)
    result = client.classify(eight_bit, hint="PA")
    assert client.classify(eight_bit.astype(np.uint16) * 257, hint="PA").probabilities == result.probabilities


def test_bad_arrays_are_refused_before_sending(client):
    with pytest.raises(ValueError, match="dtype"):
        client.classify(np.zeros((64, 64), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        client.classify(np.zeros((1, 64, 64), np.uint16))


def test_classifier_and_zeroshot_models(url, rg1, real_cxr):
    findings = rg1["RG1_UNCR.dcm"]
    with CxrltClient(url, model="cxr_classifier") as classifier:
        task1 = classifier.classify(real_cxr, hint="PA")
    assert list(task1.probabilities) == list(TASK1_LABELS)
    assert task1.probabilities == findings.task1()  # cxr_findings concatenates these
    assert (task1.projection, task1.hint_used, task1.model_name) == ("frontal", True, "cxr_classifier")
    with CxrltClient(url, model="cxr_zeroshot") as zeroshot:
        task2 = zeroshot.classify(real_cxr, hint="PA")
    assert list(task2.probabilities) == list(TASK2_LABELS)
    assert task2.probabilities == findings.task2()
    assert task2.projection == "" and task2.hint_used is False and task2.hint == "PA"


def test_model_info_is_read_from_the_served_config(client):
    info = client.model_info()
    assert info.labels == ALL_LABELS
    assert info.trust_hint is True and info.random_weights is True and info.accepts_hint is True
    assert client.model_info() is info  # cached
    assert info.input_size == 224  # the CLIP encoder's side; the tiny Task 1 networks take 64
    assert client.random_weights() is True
    with pytest.raises(ValueError, match="unknown model"):
        CxrltClient(client.url, model="ensemble_frontal_pcam")


def test_trust_hint_off_is_reported_from_the_served_config(url, grpc_client, real_cxr):
    """Reload cxr_classifier with trust_hint=false (a config override; files untouched), then restore it."""
    original = grpc_client.get_model_config("cxr_classifier", as_json=True)["config"]
    config = json.loads(json.dumps(original))
    config["parameters"]["trust_hint"]["string_value"] = "false"
    grpc_client.load_model("cxr_classifier", config=json.dumps(config))
    try:
        with CxrltClient(url, model="cxr_classifier") as fresh:
            assert fresh.model_info().trust_hint is False
            result = fresh.classify(real_cxr, hint="PA")
        assert result.hint == "PA" and result.hint_used is False
        assert result.projection_score >= 0.5  # routed by the router's argmax, not by the hint
    finally:
        grpc_client.load_model("cxr_classifier", config=json.dumps(original))
    assert grpc_client.get_model_config("cxr_classifier").config.parameters["trust_hint"].string_value == "true"


def test_random_weights_can_be_forced_by_the_caller(url, real_cxr):
    with CxrltClient(url, random_weights=True) as forced:
        assert forced.classify(real_cxr, hint="PA").random_weights is True


# ----------------------------------------------------------------------------- asyncio


@pytest.mark.parametrize("model", ["cxr_findings", "cxr_classifier"])
def test_send_size_sends_a_smaller_image_with_nearly_the_same_answer(url, real_cxr, model):
    with CxrltClient(url, model=model) as full_client, CxrltClient(url, model=model, send_size="served") as small_client:
        sent = []
        rpc = _rpc(small_client)
        infer = rpc.infer

        def recording(model_name, inputs, **kwargs):
            sent.append(inputs[0].shape())
            return infer(model_name, inputs, **kwargs)

        rpc.infer = recording
        full = _probs(full_client.classify(real_cxr, hint="PA"))
        small = _probs(small_client.classify(real_cxr, hint="PA"))
    side = small_client.model_info().input_size
    assert side == (224 if model == "cxr_findings" else 64)
    assert max(sent[0][1:]) == side and sent[0][1:] == [side, round(real_cxr.shape[1] * side / real_cxr.shape[0])]
    assert np.abs(full - small).max() < 0.005  # measured: 4e-4 (findings), 2e-6 (classifier)


def test_send_size_is_checked():
    for bad in (0, 8, "half", 100.5):
        with pytest.raises(ValueError, match="send_size must be"):
            CxrltClient("127.0.0.1:1", send_size=bad)


def test_async_client_equals_sync_client(url, rg1, real_cxr):
    async def go():
        async with AsyncCxrltClient(url) as aclient:
            await aclient.wait_until_ready(10)
            assert await aclient.is_ready()
            from_file = await aclient.classify_file(get_testdata_file("RG1_UNCR.dcm"))
            concurrent = await asyncio.gather(*(aclient.classify(real_cxr, hint="PA") for _ in range(3)))
            return from_file, concurrent, await aclient.random_weights()

    from_file, concurrent, random_weights = asyncio.run(go())
    sync = rg1["RG1_UNCR.dcm"]
    fields = ("image_id", "probabilities", "projection", "projection_score", "hint", "hint_used",
              "model_name", "model_version", "random_weights")
    assert {f: getattr(from_file, f) for f in fields} == {f: getattr(sync, f) for f in fields}
    assert all(_batched_equal(result.probabilities, sync.probabilities) for result in concurrent)
    assert random_weights is True


def _batched_equal(batched: dict[str, float], alone: dict[str, float]) -> bool:
    """Concurrent requests the dynamic batcher merges run through the networks as one batch, and
    onnxruntime's matrix kernels may round the last bits of a batch of 3 differently from a batch of
    1 (SwinV2's attention, PCAM's pooled head): equal within 1e-6, the contract's bound."""
    return list(batched) == list(alone) and all(abs(batched[k] - alone[k]) <= 1e-6 for k in alone)


def _registered_regions(grpc_client) -> set[str]:
    return set(grpc_client.get_system_shared_memory_status(as_json=True).get("regions", {}))


def test_shared_memory_client_gives_the_same_results_and_cleans_up(url, grpc_client, rg1, real_cxr, synthetic_cxrs):
    """Images through registered shared-memory regions: same answers; regions reused, then released."""
    sync = rg1["RG1_UNCR.dcm"]
    with CxrltClient(url, shared_memory=True) as shm_client:
        first = shm_client.classify(real_cxr, hint="PA")
        small = shm_client.classify(synthetic_cxrs["lateral"], hint="LL")
        again = shm_client.classify(real_cxr, hint="PA")
        registered = _registered_regions(grpc_client)
        assert len(registered) == 1  # one request at a time: one region, reused for every image
    assert first.probabilities == again.probabilities == sync.probabilities
    with CxrltClient(url) as plain:
        assert small.probabilities == plain.classify(synthetic_cxrs["lateral"], hint="LL").probabilities
    assert not registered & _registered_regions(grpc_client)  # unregistered on close

    async def concurrent():
        async with AsyncCxrltClient(url, shared_memory=True) as aclient:
            results = await asyncio.gather(*(aclient.classify(real_cxr, hint="PA") for _ in range(3)))
            return results, _registered_regions(grpc_client)

    results, during = asyncio.run(concurrent())
    assert all(_batched_equal(r.probabilities, sync.probabilities) for r in results)
    assert 1 <= len(during) <= 3  # at most one region per request in flight
    assert not during & _registered_regions(grpc_client)


def test_shared_memory_registration_failure_names_the_fix(url, real_cxr, monkeypatch):
    from cxrlt.client.shared_memory import RegionPool

    original = RegionPool.acquire

    def unknown_key(self, byte_size):  # as if the server could not see this host's memory
        region, new = original(self, byte_size)
        region.key = "/cxrlt_no_such_region"
        return region, new

    monkeypatch.setattr(RegionPool, "acquire", unknown_key)
    with CxrltClient(url, shared_memory=True) as shm_client:
        with pytest.raises(ClientError, match="server's host"):
            shm_client.classify(real_cxr)
        assert shm_client._regions.drain() == []  # the failed region was discarded


# ----------------------------------------------------------------------------- errors and retries


def test_readiness(client):
    assert client.is_ready()
    client.wait_until_ready(5)
    closed = CxrltClient(f"127.0.0.1:{free_port()}")
    assert closed.is_ready() is False
    with pytest.raises(ServerUnavailable, match=closed.url):
        closed.wait_until_ready(0.3)


def test_unavailable_then_recovered_is_retried(url, real_cxr, rg1):
    """The first infer meets UNAVAILABLE (as during a server restart); the retry reaches the real server."""
    client = CxrltClient(url, retries=3, backoff_s=0.5)
    sleeps = _fake_sleeps(client)
    rpc = _rpc(client)
    real_infer = rpc.infer
    calls = []

    async def flaky_infer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE")
        return await real_infer(*args, **kwargs)

    rpc.infer = flaky_infer
    result = client.classify(real_cxr, hint="PA")
    assert len(calls) == 2 and len(sleeps) == 1 and 0.25 <= sleeps[0] <= 0.5
    assert result.probabilities == rg1["RG1_UNCR.dcm"].probabilities and result.attempts == 2
    client.close()


@pytest.mark.parametrize("model", ["cxr_classifier", "cxr_zeroshot"])
def test_invalid_argument_is_raised_at_once_without_retry(url, model):
    client = CxrltClient(url, model=model, retries=5)
    sleeps = _fake_sleeps(client)
    rpc = _rpc(client).infer = CountingCalls(_rpc(client).infer)
    with pytest.raises(ServerRejected) as caught:
        client.classify(np.zeros((2, 2), np.uint16))
    assert rpc.calls == 1 and sleeps == [] and caught.value.attempts == 1
    assert caught.value.status == "INVALID_ARGUMENT"
    assert "too small" in caught.value.server_message and "too small" in str(caught.value)
    client.close()


def test_invalid_hint_is_rejected_with_triton_message(url, real_cxr):
    with CxrltClient(url, model="cxr_classifier") as client, pytest.raises(ServerRejected, match="unknown projection hint"):
        client.classify(real_cxr, hint="OBLIQUE")


def test_cxr_findings_passes_its_callees_invalid_argument_through(client, monkeypatch):
    """A bad image sent to cxr_findings is INVALID_ARGUMENT (from cxr_classifier/cxr_zeroshot), not retried."""
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    monkeypatch.setattr(client.aio, "_sleep", sleep)
    rpc = CountingCalls(_rpc(client).infer)
    monkeypatch.setattr(_rpc(client), "infer", rpc)
    with pytest.raises(ServerRejected) as caught:
        client.classify(np.zeros((2, 2), np.uint16))
    assert rpc.calls == 1 and sleeps == [] and caught.value.attempts == 1
    assert caught.value.status == "INVALID_ARGUMENT" and "too small" in caught.value.server_message
    with pytest.raises(ServerRejected, match="unknown projection hint"):
        client.classify(np.zeros((64, 64), np.uint16), hint="OBLIQUE")
    assert rpc.calls == 2 and sleeps == []


def test_per_call_timeout(url, real_cxr):
    client = CxrltClient(url, timeout_s=0.001, retries=3)
    sleeps = _fake_sleeps(client)
    with pytest.raises(RequestTimeout, match="0.001 s"):
        client.classify(real_cxr, hint="PA")
    assert sleeps == []  # a deadline is not UNAVAILABLE: no retry
    client.close()


def test_errors_share_one_base_class():
    assert all(issubclass(cls, ClientError) for cls in (ServerUnavailable, ServerRejected, ServerFailed, RequestTimeout))
