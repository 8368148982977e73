"""The batch-aware BLS on the real tritonserver: requests the dynamic batcher merges share
their network calls, and each still gets its own answer or its own error."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.grpc_inputs import image_inputs, inference_counts, settled

BURST = 12  # the default build runs 4 at once and queues 8 (more are refused): 8 wait and merge
TRIES = 4  # on a loaded machine a burst can arrive slower than the pipeline answers it: none wait


def _stats(client, model: str) -> dict[str, int]:
    return inference_counts(client, model)[model]


def _answer_to(answers: queue.Queue, index: int):
    return lambda result, error: answers.put((index, result, error))


def _burst(url: str, model: str, requests: list[list[grpcclient.InferInput]], outputs: list[str]) -> list:
    """Send every request at once (async gRPC) and return each one's result or error."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    try:
        for index, inputs in enumerate(requests):
            client.async_infer(model, inputs, _answer_to(answers, index),
                               outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        results = [None] * len(requests)
        for _ in requests:
            index, result, error = answers.get(timeout=120)
            results[index] = error if error is not None else result
        return results
    finally:
        client.close()


def _images(synthetic_cxrs, real_cxr, count: int) -> list[np.ndarray]:
    """Distinct images of several shapes: the merged batch is ragged."""
    sources = [synthetic_cxrs["frontal"], synthetic_cxrs["lateral"], real_cxr]
    images = []
    for index in range(count):
        source = sources[index % len(sources)]
        crop = source[index % 7 :, : source.shape[1] - (index % 5)]
        images.append(np.ascontiguousarray(crop))
    return images


def _steady(read):
    """read()'s value once two reads 0.1 s apart agree: the callees' statistics can lag their
    caller's answer."""
    previous, value = None, read()
    deadline = time.monotonic() + 5
    while value != previous and time.monotonic() < deadline:
        time.sleep(0.1)
        previous, value = value, read()
    return value


def _merged_burst(url: str, client, model: str, requests: list, outputs: list[str], watched: list[str]):
    """A burst the dynamic batcher merged (fewer executions than requests), sent again while
    none waited; its results and the burst's count deltas of `model` and each `watched` model."""
    for _ in range(TRIES):
        before = {m: _stats(client, m) for m in [model, *watched]}
        results = _burst(url, model, requests, outputs)
        # (The Python backend counts a request it answered with an error as a success.)
        expected = before[model]["success"] + before[model]["fail"] + len(requests)
        after = {model: settled(lambda: _stats(client, model), lambda s: s["success"] + s["fail"] >= expected)}
        after.update(_steady(lambda: {m: _stats(client, m) for m in watched}))
        deltas = {m: {k: after[m][k] - before[m][k] for k in before[m]} for m in before}
        if deltas[model]["executions"] < len(requests):
            return results, deltas
    pytest.fail(f"the dynamic batcher merged none of {len(requests)} requests to {model} in {TRIES} bursts")


@pytest.fixture
def members(grpc_client):
    names = [m["name"] for m in grpc_client.get_model_repository_index(as_json=True)["models"]]
    return [n for n in names if n == "projection_router" or n.startswith("ensemble_")]


def test_merged_classifier_requests_share_member_calls_and_fail_alone(url, grpc_client, members, synthetic_cxrs, real_cxr):
    images = _images(synthetic_cxrs, real_cxr, BURST)
    hints = ["PA" if i % 3 == 0 else "" for i in range(BURST)]
    requests = [image_inputs(image, hint) for image, hint in zip(images, hints)]
    bad_index = 5
    requests[bad_index] = image_inputs(np.full((64, 64), 9, np.uint16), "")  # constant: refused alone
    outputs = ["PROBABILITIES", "PROJECTION"]

    merged, deltas = _merged_burst(url, grpc_client, "cxr_classifier", requests, outputs, members)

    error = merged[bad_index]
    assert isinstance(error, Exception) and "constant image" in str(error)
    assert "StatusCode.INVALID_ARGUMENT" in str(error)
    # Each good request's answer equals the same request answered alone.
    for index, result in enumerate(merged):
        if index == bad_index:
            continue
        assert not isinstance(result, Exception), f"request {index} failed: {result}"
        (alone,) = _burst(url, "cxr_classifier", [requests[index]], outputs)
        np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), alone.as_numpy("PROBABILITIES"), atol=1e-5)
        assert result.as_numpy("PROJECTION").tolist() == alone.as_numpy("PROJECTION").tolist()

    classifier = deltas["cxr_classifier"]
    assert classifier["success"] + classifier["fail"] == BURST, classifier
    # The pipeline stacked the merged requests: fewer router calls than classified images.
    router = deltas["projection_router"]["success"]
    assert router < BURST - 1, f"{router} router calls for {BURST - 1} images: the BLS did not stack them"
    member_calls = sum(deltas[m]["success"] for m in members)
    assert member_calls / (BURST - 1) < 4  # router + 3 members per image was the per-image BLS


def test_merged_zeroshot_requests_share_encoder_calls(url, grpc_client, synthetic_cxrs, real_cxr):
    images = _images(synthetic_cxrs, real_cxr, BURST)
    requests = [image_inputs(image) for image in images]
    merged, deltas = _merged_burst(url, grpc_client, "cxr_zeroshot", requests, ["PROBABILITIES"], ["clip_image_encoder"])
    assert not [r for r in merged if isinstance(r, Exception)]
    encoder = deltas["clip_image_encoder"]
    assert encoder["images"] == BURST and encoder["success"] < BURST, encoder
    (alone,) = _burst(url, "cxr_zeroshot", [requests[3]], ["PROBABILITIES"])
    np.testing.assert_allclose(merged[3].as_numpy("PROBABILITIES"), alone.as_numpy("PROBABILITIES"), atol=1e-5)
