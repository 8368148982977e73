"""The client under overload: backoff with jitter inside one deadline, attempt counts in results,
failures in `cxrlt classify`'s outputs, and files that are never half-written.

Unit tests fake the RPC layer (a client whose tritonclient object is replaced, with a fake
clock); the e2e tests run a tritonserver of their own whose `cxr_classifier` queue holds one
request, and the session server for `cxrlt classify`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from tritonclient.utils import InferenceServerException

from cxrlt.client.sdk import (
    AsyncCxrltClient,
    CxrltClient,
    ModelInfo,
    RequestTimeout,
    ServerFailed,
    ServerOverloaded,
    ServerRejected,
    ServerUnavailable,
)
from cxrlt.contract.labels import TASK1_LABELS
from cxrlt.io.atomic import atomic_path, write_text_atomic
from cxrlt.server.launcher import free_port
from tests.serve_process import stop_later

QUEUE_FULL = "Exceeds maximum queue size"


# ----------------------------------------------------------------------------- a fake RPC layer


class Clock:
    """A fake monotonic clock: sleeps and RPCs advance it, nothing waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeResponse:
    def __init__(self, labels=TASK1_LABELS) -> None:
        self.probabilities = np.linspace(0.1, 0.9, len(labels), dtype=np.float32)[None]

    def as_numpy(self, name: str) -> np.ndarray:
        return {
            "PROBABILITIES": self.probabilities,
            "PROJECTION": np.array([[b"frontal"]], dtype=np.object_),
            "PROJECTION_SCORE": np.array([[0.9]], dtype=np.float32),
        }[name]

    def get_response(self):
        class Meta:
            model_name, model_version = "cxr_classifier", "1"

        return Meta()


class FakeRPC:
    """Stands in for tritonclient's InferenceServerClient: answers `errors` in turn, then succeeds.

    Each call takes `rpc_s` of the fake clock (never more than the timeout it was given) and
    records the timeout (client_timeout) the client set.
    """

    def __init__(self, clock: Clock, errors, rpc_s: float = 0.5) -> None:
        self.clock, self.errors, self.rpc_s = clock, list(errors), rpc_s
        self.timeouts: list[float] = []
        self.started: list[float] = []

    def infer(self, model, inputs, outputs=None, client_timeout=None):
        self.started.append(self.clock.now)
        self.timeouts.append(client_timeout)
        self.clock.now += min(self.rpc_s, client_timeout)
        if self.errors:
            error = self.errors[0] if isinstance(self.errors[0], Forever) else self.errors.pop(0)
            raise InferenceServerException(error.message, status=f"StatusCode.{error.status}")
        return FakeResponse()

    def close(self) -> None:
        pass


class AsyncFakeRPC(FakeRPC):
    async def infer(self, *args, **kwargs):
        return FakeRPC.infer(self, *args, **kwargs)

    async def close(self) -> None:
        pass


class Error:
    def __init__(self, status: str, message: str) -> None:
        self.status, self.message = status, message


class Forever(Error):
    """This error, for every call from here on."""


def overloaded(n: int) -> list[Error]:
    return [Error("UNAVAILABLE", QUEUE_FULL)] * n


INFO = ModelInfo(name="cxr_classifier", labels=TASK1_LABELS, accepts_hint=True, trust_hint=True, random_weights=False)


def fake_client(errors, cls=CxrltClient, rpc_s: float = 0.5, **options):
    """A client of `cls` whose RPCs, clock and sleeps are fake; returns (client, rpc, clock, sleeps).

    The sync client is a wrapper over the async one: the fakes go into the async client it drives."""
    clock = Clock()
    client = cls(f"127.0.0.1:{free_port()}", model="cxr_classifier", **options)
    rpc = AsyncFakeRPC(clock, errors, rpc_s)
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        clock.now += delay

    core = client.aio if cls is CxrltClient else client
    core._client, core._clock, core._info, core._sleep = rpc, clock, INFO, sleep
    return client, rpc, clock, sleeps


IMAGE = np.full((64, 64), 1000, np.uint16)


# ----------------------------------------------------------------------------- unit: backoff and deadline


def test_backoff_grows_exponentially_with_jitter_inside_bounds():
    client, *_ = fake_client([], backoff_s=0.5, max_backoff_s=8.0, seed=1)
    for retry in range(1, 12):
        ceiling = min(8.0, 0.5 * 2 ** (retry - 1))
        draws = [client.backoff(retry) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), retry  # equal jitter: [b/2, b]
        assert max(draws) - min(draws) > ceiling / 4  # really random within the band
    lows = [min(client.backoff(retry) for _ in range(50)) for retry in range(1, 5)]
    assert all(b >= 1.9 * a for a, b in zip(lows, lows[1:]))  # the band doubles each retry
    again, *_ = fake_client([], backoff_s=0.5, max_backoff_s=8.0, seed=7)
    other, *_ = fake_client([], backoff_s=0.5, max_backoff_s=8.0, seed=7)
    assert [again.backoff(k) for k in range(1, 9)] == [other.backoff(k) for k in range(1, 9)]  # seedable


def test_overload_is_retried_and_the_result_counts_the_attempts():
    client, rpc, _, sleeps = fake_client(overloaded(3), retries=5, backoff_s=0.5, seed=3)
    result = client.classify(IMAGE, hint="PA", image_id="x")
    assert result.attempts == 4 and len(rpc.timeouts) == 4 and len(sleeps) == 3
    for retry, delay in enumerate(sleeps, start=1):
        assert 0.25 * 2 ** (retry - 1) <= delay <= 0.5 * 2 ** (retry - 1)
    assert result.to_dict()["attempts"] == 4
    assert client.classify(IMAGE, image_id="y").attempts == 1  # the next image starts afresh


@pytest.mark.parametrize("timeout_s", [3.0, 30.0])
def test_retries_never_run_past_the_deadline(timeout_s):
    client, rpc, clock, sleeps = fake_client([Forever("UNAVAILABLE", QUEUE_FULL)], retries=10_000, timeout_s=timeout_s,
                                             deadline_s=10.0, backoff_s=0.2, max_backoff_s=2.0, seed=0)
    start = clock.now
    with pytest.raises(ServerOverloaded) as caught:
        client.classify(IMAGE, image_id="img-1")
    assert clock.now <= start + 10.0  # RPCs and sleeps together stay inside the deadline
    for began, timeout in zip(rpc.started, rpc.timeouts):  # each attempt: min(timeout_s, time left)
        assert timeout == pytest.approx(min(timeout_s, start + 10.0 - began))
    error = caught.value
    assert isinstance(error, ServerUnavailable) and error.status == "UNAVAILABLE"
    assert error.attempts == len(rpc.timeouts) > 3 and error.server_message == QUEUE_FULL
    message = str(error)
    assert message.startswith("server overloaded:") and f"after {error.attempts} attempts in" in message
    assert f"last: {QUEUE_FULL}" in message and "10 s deadline" in message and "img-1" in message


def test_attempts_stop_at_retries_before_the_deadline():
    client, rpc, _, sleeps = fake_client(overloaded(10), retries=3, deadline_s=1000.0, seed=0)
    with pytest.raises(ServerOverloaded, match="after 3 attempts in .*all 3 attempts used.*last: Exceeds") as caught:
        client.classify(IMAGE)
    assert caught.value.attempts == 3 == len(rpc.timeouts) and len(sleeps) == 2


def test_with_retries_off_an_overload_fails_at_once():
    client, rpc, _, sleeps = fake_client(overloaded(1), retries=1)
    with pytest.raises(ServerOverloaded, match="server overloaded: .*after 1 attempt in .*retries off"):
        client.classify(IMAGE)
    assert len(rpc.timeouts) == 1 and sleeps == []


@pytest.mark.parametrize("status, error", [("INVALID_ARGUMENT", ServerRejected), ("INTERNAL", ServerFailed),
                                           ("DEADLINE_EXCEEDED", RequestTimeout)])
def test_only_unavailable_is_retried(status, error):
    client, rpc, _, sleeps = fake_client([Error(status, "image too small")], retries=5, deadline_s=60)
    with pytest.raises(error) as caught:
        client.classify(IMAGE)
    assert len(rpc.timeouts) == 1 and sleeps == [] and caught.value.attempts == 1


def test_a_timeout_cut_by_the_deadline_says_so():
    client, rpc, _, _ = fake_client(overloaded(2) + [Error("DEADLINE_EXCEEDED", "Deadline Exceeded")],
                                    retries=10, timeout_s=30.0, deadline_s=5.0, backoff_s=0.1, seed=0)
    with pytest.raises(RequestTimeout, match=f"5 s deadline: after 3 attempts in .*last: {QUEUE_FULL}"):
        client.classify(IMAGE)
    assert rpc.timeouts[-1] < 5.0


def test_the_asyncio_client_takes_the_same_decisions():
    async def go():
        client, rpc, clock, sleeps = fake_client(overloaded(2), cls=AsyncCxrltClient, retries=5, deadline_s=60, seed=3)
        result = await client.classify(IMAGE, hint="PA")
        assert result.attempts == 3 and len(sleeps) == 2
        client, rpc, clock, sleeps = fake_client([Forever("UNAVAILABLE", QUEUE_FULL)], cls=AsyncCxrltClient,
                                                 retries=100, deadline_s=8.0, seed=0)
        start = clock.now
        with pytest.raises(ServerOverloaded, match="8 s deadline"):
            await client.classify(IMAGE)
        assert clock.now <= start + 8.0
        client, rpc, _, sleeps = fake_client([Error("INVALID_ARGUMENT", "bad")], cls=AsyncCxrltClient, retries=5)
        with pytest.raises(ServerRejected):
            await client.classify(IMAGE)
        assert len(rpc.timeouts) == 1 and sleeps == []

    asyncio.run(go())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="deadline_s"):
        CxrltClient("127.0.0.1:1", deadline_s=0)
    with pytest.raises(ValueError, match="max_backoff_s"):
        CxrltClient("127.0.0.1:1", max_backoff_s=-1)


# ----------------------------------------------------------------------------- unit: a server never reached


def test_a_refused_port_fails_at_once_naming_the_url_and_the_fix():
    """A server never reached (a wrong --url) is not retried: one clear error, well under a second."""
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with CxrltClient(url, retries=8, backoff_s=2.0) as client:
        with pytest.raises(ServerUnavailable) as caught:
            client.classify(np.zeros((64, 64), np.uint16))
    assert time.monotonic() - started < 1.0
    assert caught.value.attempts == 1 and caught.value.status == "UNAVAILABLE" and caught.value.url == url
    message = str(caught.value)
    assert f"no Triton server answers at {url}" in message and "cxrlt serve" in message and "--url" in message
    assert "\n" not in message


def test_async_refused_port_fails_at_once():
    url = f"127.0.0.1:{free_port()}"

    async def go():
        async with AsyncCxrltClient(url, retries=4, backoff_s=1.0) as client:
            await client.classify(np.zeros((64, 64), np.uint16))

    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=url) as caught:
        asyncio.run(go())
    assert time.monotonic() - started < 1.0 and caught.value.attempts == 1


def test_a_server_that_answered_before_is_retried_when_it_goes_away():
    """After one answer, a refused connection (a restarting server) is retried with backoff."""
    url = f"127.0.0.1:{free_port()}"
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    with CxrltClient(url, retries=3, backoff_s=0.5) as client:
        client.aio._sleep, client.aio._answered = fake_sleep, True
        with pytest.raises(ServerUnavailable) as caught:
            client.classify(np.zeros((64, 64), np.uint16))
    assert caught.value.attempts == 3
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # exponential, with jitter
    message = str(caught.value)
    assert url in message and "cxrlt serve" in message and "3 attempts" in message


def test_classify_with_a_wrong_url_says_so_at_once_in_one_line(capsys):
    import tritonclient.grpc.aio  # noqa: F401  (imported first: the test times the command, not an import)

    from cxrlt.cli.main import main

    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = main(["classify", get_testdata_file("RG1_UNCR.dcm"), "--url", url])  # --retries 8 by default
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1 and captured.out == "" and elapsed < 1.0
    assert len(lines) == 1 and url in lines[0] and "cxrlt serve" in lines[0] and "--url" in lines[0], lines


# ----------------------------------------------------------------------------- unit: atomic writes


def test_a_write_that_raises_midway_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old, complete\n")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as temporary:
            temporary.write_text('[{"source": "a"')  # half of the new content
            raise RuntimeError("killed")
    assert target.read_text() == "old, complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # the temporary file is gone

    fresh = tmp_path / "new.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(fresh) as temporary:
            temporary.write_text("ImageID,Normal\r\n")
            raise RuntimeError("disk full")
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_report_writers_leave_no_partial_file(tmp_path, monkeypatch):
    from cxrlt.contract.results import FindingsResult
    from cxrlt.io.reports import write_challenge_csv

    result = FindingsResult(image_id="a", probabilities={label: 0.5 for label in TASK1_LABELS}, projection="frontal",
                            projection_score=0.9, hint=None, hint_used=False, model_name="m", model_version="1")
    out = write_challenge_csv([result], tmp_path / "submission.csv", task="task1")
    complete = out.read_text()
    real_write_text = Path.write_text

    def dies_midway(self, text, **kwargs):
        real_write_text(self, text[: len(text) // 2], **kwargs)  # half of it made it to disk
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_midway)
    with pytest.raises(OSError, match="No space"):
        write_challenge_csv([result, result], out, task="task1")
    assert out.read_text() == complete and [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


# ----------------------------------------------------------------------------- e2e: a server with a one-request queue


def _tiny_queue_repository(tiny_repository: Path, root: Path) -> Path:
    """A copy whose cxr_classifier has one instance, a queue of one, and runs its networks in process."""
    from google.protobuf import text_format

    from cxrlt.contract.model_config import read_config, set_config_parameters

    repository = root / "repo"
    shutil.copytree(tiny_repository, repository)
    path = repository / "cxr_classifier" / "config.pbtxt"
    set_config_parameters(path, {"member_execution": "in_process"})  # one model to load: a quick start
    config = read_config(path)
    config.dynamic_batching.default_queue_policy.max_queue_size = 1
    del config.instance_group[1:]
    config.instance_group[0].count = 1
    path.write_text(text_format.MessageToString(config))
    return repository


@pytest.fixture(scope="module")
def tiny_queue_server(tiny_repository, tmp_path_factory):
    from cxrlt.server.launcher import TritonServer

    root = tmp_path_factory.mktemp("tiny-queue")
    server = TritonServer(
        _tiny_queue_repository(tiny_repository, root),
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), log_file=root / "tritonserver.log",
        extra_args=("--model-control-mode=explicit", "--load-model=cxr_classifier"),
    )
    server.start(timeout=300)
    try:
        yield server
    finally:
        stop_later(server.stop)


def _burst(url: str, image: np.ndarray, n: int, **options) -> list:
    """`n` concurrent classifications from one AsyncCxrltClient: each a FindingsResult or the exception."""

    async def go():
        async with AsyncCxrltClient(url, model="cxr_classifier", **options) as client:
            await client.wait_until_ready(60)
            return await asyncio.gather(*(client.classify(image, hint="PA", image_id=f"img-{i}") for i in range(n)),
                                        return_exceptions=True)

    return asyncio.run(go())


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_overloaded_server_rejects_and_retries_succeed(tiny_queue_server, real_cxr):
    url = tiny_queue_server.endpoints.grpc
    with CxrltClient(url, model="cxr_classifier") as alone:
        reference = alone.classify(real_cxr, hint="PA")
    assert reference.attempts == 1
    expected = np.array(list(reference.probabilities.values()))

    # Retries on: every request succeeds, with the probabilities of the request made alone;
    # the attempt counts show the queue turned some away. On a machine so idle that a burst
    # never overflowed the queue, burst again (a few times at most).
    for _ in range(5):
        results = _burst(url, real_cxr, 24, retries=10_000, deadline_s=500, backoff_s=0.05, max_backoff_s=0.5, seed=0)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for result in results:
            np.testing.assert_allclose(np.array(list(result.probabilities.values())), expected, atol=1e-5, rtol=0)
            assert result.projection == reference.projection
        if any(result.attempts > 1 for result in results):
            break
    else:
        pytest.fail("24 concurrent requests never overflowed a queue of one")

    # Retries off: some requests fail, as overloaded, naming the server's reason.
    for _ in range(5):
        results = _burst(url, real_cxr, 24, retries=1)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all(isinstance(r, ServerOverloaded) for r in failed), failed[:3]
        if failed:
            break
    else:
        pytest.fail("24 concurrent requests without retries never met a full queue")
    assert all(isinstance(error, ServerUnavailable) and error.attempts == 1 for error in failed)
    assert all("server overloaded" in str(e) and ("queue size" in str(e) or "timeout expired" in str(e)) for e in failed)
    assert all(r.attempts == 1 for r in results if not isinstance(r, BaseException))


# ----------------------------------------------------------------------------- e2e: cxrlt classify reports failures


def test_classify_reports_each_failure_once_in_json_and_failures_csv(url, cxrlt, tmp_path, capfd):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(get_testdata_file("RG1_UNCR.dcm"), folder / "good.dcm")
    data = Path(get_testdata_file("RG1_UNCR.dcm")).read_bytes()
    (folder / "corrupt.dcm").write_bytes(data[: len(data) // 3])

    assert cxrlt("classify", folder, "--url", url, "--out", tmp_path / "out" / "results.json") == 2
    err = " ".join(capfd.readouterr().err.split())
    entries = json.loads((tmp_path / "out" / "results.json").read_text())
    [good] = [e for e in entries if "error" not in e]
    [bad] = [e for e in entries if "error" in e]
    assert good["source"] == str(folder / "good.dcm") and good["attempts"] == 1 and len(good["probabilities"]) == 36
    assert bad == {"source": str(folder / "corrupt.dcm"), "error": bad["error"], "attempts": 0}
    assert "truncated" in bad["error"]
    assert err.count(str(folder / "corrupt.dcm")) == 1  # printed once, not again in the summary
    assert err.count("NOT FOR CLINICAL USE") == 1  # the random-weights warning, once
    assert "retries: none needed" in err and "1 failed" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no temporary file left

    csv_out = tmp_path / "csv" / "submission.csv"
    assert cxrlt("classify", folder, "--url", url, "--format", "csv", "--out", csv_out) == 2
    err = " ".join(capfd.readouterr().err.split())
    with (csv_out.parent / "failures.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "reason"] and len(rows) == 2
    assert rows[1][0] == str(folder / "corrupt.dcm") and "truncated" in rows[1][1]
    assert len(list(csv.reader(csv_out.open(newline="")))) == 2  # header and the good image
    assert err.count(str(folder / "corrupt.dcm")) == 1 and "failures.csv" in err
    assert sorted(p.name for p in csv_out.parent.iterdir()) == ["failures.csv", "submission.csv"]

    (folder / "corrupt.dcm").unlink()  # a clean run leaves an empty list, not an older run's
    assert cxrlt("classify", folder, "--url", url, "--format", "csv", "--out", csv_out) == 0
    assert (csv_out.parent / "failures.csv").read_text().splitlines() == ["path,reason"]
