"""Unit tests of the Task 1 pipeline logic with fake networks (no Triton)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cxrlt.contract import ensemble
from cxrlt.contract.labels import NORMAL_INDEX
from cxrlt.contract.preprocessing import PreprocessConfig
from python_backends.classifier import ClassifierPipeline, ClassifierSettings
from python_backends.pipeline_errors import RequestError

MEMBER_LOGIT = {"pcam": 1.0, "cait": -2.0, "swin": 0.5}


class FakeNetworks:
    """Router says `router_logits`; each member returns a constant logit, +view index for TTA."""

    def __init__(self, router_logits=(3.0, 0.0)):
        self.router_logits = np.array([router_logits], dtype=np.float32)
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    async def __call__(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        self.calls.append((model_name, pixel_values.shape))
        if model_name == "projection_router":
            return self.router_logits
        member = model_name.rsplit("_", 1)[1]
        views = len(pixel_values)
        return np.array([[MEMBER_LOGIT[member] + v] * 30 for v in range(views)], dtype=np.float32)


def _settings(**overrides) -> ClassifierSettings:
    return ClassifierSettings(preprocess=PreprocessConfig(size=32), **overrides)


def _image(height=40, width=30) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 4096).astype(np.uint16)


def _expected(projection: str, views: int, alpha: float) -> tuple[float, float]:
    weights = ensemble.DEFAULT_WEIGHTS[projection]
    mean_view_offset = (views - 1) / 2
    logit = sum(weights[m] * (MEMBER_LOGIT[m] + mean_view_offset) for m in MEMBER_LOGIT) / sum(weights.values())
    p = 1 / (1 + np.exp(-logit))
    return logit, p * (1 - p) ** alpha


def test_router_picks_projection_and_weights_are_applied_per_projection():
    for router_logits, projection in (((3.0, 0.0), "frontal"), ((0.0, 3.0), "lateral")):
        networks = FakeNetworks(router_logits)
        result = asyncio.run(ClassifierPipeline(_settings(), networks).classify(_image()))
        logit, gated = _expected(projection, views=2, alpha=0.5)
        assert result.projection == projection and not result.hint_used
        assert result.projection_score == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-5)
        assert result.logits[3] == pytest.approx(logit, abs=1e-5)
        assert result.probabilities[NORMAL_INDEX] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
        assert result.probabilities[3] == pytest.approx(gated, abs=1e-6)
        members = {name for name, _ in networks.calls if name != "projection_router"}
        assert members == {f"ensemble_{projection}_{m}" for m in ("pcam", "cait", "swin")}


def test_tta_views_go_as_one_batch_per_member_and_router_sees_one_view():
    networks = FakeNetworks()
    settings = _settings(tta_views=("identity", "hflip", "rot+5", "zoom0.9"))
    result = asyncio.run(ClassifierPipeline(settings, networks).classify(_image()))
    shapes = dict(networks.calls)
    assert shapes["projection_router"] == (1, 3, 32, 32)
    assert shapes["ensemble_frontal_pcam"] == (4, 3, 32, 32)
    assert result.logits[0] == pytest.approx(_expected("frontal", views=4, alpha=0.5)[0], abs=1e-5)


def test_hint_overrides_router_unless_trust_hint_is_off():
    trusted = asyncio.run(ClassifierPipeline(_settings(), FakeNetworks((3.0, 0.0))).classify(_image(), "LL"))
    assert trusted.projection == "lateral" and trusted.hint_used
    assert trusted.projection_score == pytest.approx(1 / (1 + np.exp(3.0)), rel=1e-5)  # router disagreed
    ignored = asyncio.run(ClassifierPipeline(_settings(trust_hint=False), FakeNetworks((3.0, 0.0))).classify(_image(), "LL"))
    assert ignored.projection == "frontal" and not ignored.hint_used
    empty = asyncio.run(ClassifierPipeline(_settings(), FakeNetworks((0.0, 3.0))).classify(_image(), ""))
    assert empty.projection == "lateral" and not empty.hint_used


def test_gating_alpha_changes_only_non_normal_classes():
    base = asyncio.run(ClassifierPipeline(_settings(gating_alpha=0.5), FakeNetworks()).classify(_image()))
    strong = asyncio.run(ClassifierPipeline(_settings(gating_alpha=2.0), FakeNetworks()).classify(_image()))
    assert strong.probabilities[NORMAL_INDEX] == base.probabilities[NORMAL_INDEX]
    assert strong.probabilities[5] == pytest.approx(_expected("frontal", 2, 2.0)[1], abs=1e-6)
    assert strong.probabilities[5] < base.probabilities[5]


@pytest.mark.parametrize(
    "image, hint, problem",
    [
        (np.zeros((0, 0), np.uint16), None, "empty"),
        (np.zeros((1, 1), np.uint16), None, "too small"),
        (np.zeros((40, 30), np.float32), None, "dtype"),
        (np.zeros((2, 40, 30), np.uint16), None, "2-D"),
        (np.zeros((400, 300), np.uint16), None, "exceeds the limit"),
        (_image(), "OBLIQUE", "unknown projection hint"),
    ],
)
def test_bad_requests_raise_request_error_naming_the_problem(image, hint, problem):
    pipeline = ClassifierPipeline(_settings(max_pixels=100_000), FakeNetworks())
    with pytest.raises(RequestError, match=problem):
        asyncio.run(pipeline.classify(image, hint))


def test_settings_round_trip_through_config_parameters():
    settings = _settings(
        tta_views=("identity", "zoom1.1"),
        weights={"frontal": {"pcam": 1, "cait": 0, "swin": 2}, "lateral": {"pcam": 0.3, "cait": 0.3, "swin": 0.4}},
        gating_alpha=0.25,
        trust_hint=False,
        max_pixels=1234,
    )
    assert ClassifierSettings.from_parameters(settings.to_parameters()) == settings


def test_bad_weights_in_config_are_refused():
    params = _settings().to_parameters()
    params["weights_frontal"] = "pcam=0.5,swin=0.5"
    with pytest.raises(ValueError, match="missing \\['cait'\\]"):
        ClassifierSettings.from_parameters(params)


class ContentNetworks:
    """Outputs that follow each row's own pixels, so images mixed up in a stacked call show."""

    def __init__(self, failing: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.failing = failing

    async def __call__(self, model_name: str, pixel_values: np.ndarray) -> np.ndarray:
        self.calls.append((model_name, len(pixel_values)))
        if model_name == self.failing:
            raise RuntimeError(f"{model_name} is broken")
        means = pixel_values.reshape(len(pixel_values), -1).mean(axis=1)
        if model_name == "projection_router":
            return np.stack([means, -means], axis=1).astype(np.float32)
        offset = MEMBER_LOGIT[model_name.rsplit("_", 1)[1]]
        return (means[:, None] * np.linspace(0.5, 1.5, 30)[None] + offset).astype(np.float32)


def _mixed_items():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 4000, (40 + 3 * i, 30 + 2 * i), dtype=np.uint16) for i in range(5)]
    items = list(zip(images, [None, "LL", None, "PA", "LATERAL"]))
    items.insert(2, (np.zeros((20, 20), np.uint16), None))  # too small: fails alone
    return items


def test_classify_many_stacks_every_image_and_matches_one_at_a_time():
    items = _mixed_items()
    networks = ContentNetworks()
    outcomes = asyncio.run(ClassifierPipeline(_settings(), networks).classify_many(items))
    assert isinstance(outcomes[2], RequestError) and "too small" in str(outcomes[2])
    good = [i for i in range(len(items)) if i != 2]
    # One router call for the five good images, then one call per member and projection, each
    # carrying two TTA views of every image routed there.
    assert networks.calls[0] == ("projection_router", 5)
    member_calls = networks.calls[1:]
    assert len(member_calls) == 6 and {n for n, _ in member_calls} == {
        f"ensemble_{p}_{m}" for p in ("frontal", "lateral") for m in ("pcam", "cait", "swin")}
    assert sum(size for _, size in member_calls) == 3 * 2 * 5
    for index in good:
        image, hint = items[index]
        alone = asyncio.run(ClassifierPipeline(_settings(), ContentNetworks()).classify(image, hint))
        together = outcomes[index]
        assert together.projection == alone.projection and together.hint_used == alone.hint_used
        assert together.projection_score == pytest.approx(alone.projection_score, abs=1e-6)
        np.testing.assert_allclose(together.probabilities, alone.probabilities, atol=1e-6)
    assert {outcomes[i].projection for i in good} == {"frontal", "lateral"}


def test_a_failing_member_fails_only_the_images_routed_to_it():
    items = _mixed_items()
    outcomes = asyncio.run(ClassifierPipeline(_settings(), ContentNetworks(failing="ensemble_lateral_cait")).classify_many(items))
    for index, outcome in enumerate(outcomes):
        if index == 2:
            assert isinstance(outcome, RequestError)
        elif isinstance(outcome, Exception):
            assert "ensemble_lateral_cait is broken" in str(outcome)
        else:
            assert outcome.projection == "frontal"
    assert sum(isinstance(o, RuntimeError) for o in outcomes) >= 2  # the two hinted laterals at least
