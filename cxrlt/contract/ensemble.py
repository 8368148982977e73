"""Ensemble and zero-shot scoring math, shared by the Triton backends and the reference pipeline."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cxrlt.contract.labels import NORMAL_INDEX

MEMBERS: tuple[str, ...] = ("pcam", "cait", "swin")

# Logit weights of the seeds; the weight search in training/ tunes them per projection.
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "frontal": {"pcam": 0.40, "swin": 0.40, "cait": 0.20},
    "lateral": {"pcam": 0.45, "swin": 0.45, "cait": 0.10},
}
DEFAULT_GATING_ALPHA = 0.5
DEFAULT_ZEROSHOT_ALPHA = 5.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    missing = [m for m in MEMBERS if m not in weights]
    extra = [m for m in weights if m not in MEMBERS]
    if missing or extra:
        raise ValueError(f"ensemble weights need exactly {list(MEMBERS)}; missing {missing}, unknown {extra}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"ensemble weights must be non-negative with a positive sum, got {dict(weights)}")
    return {m: float(weights[m]) for m in MEMBERS}


def combine_member_logits(member_logits: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Average each member's logits over TTA views ([V, C] -> [C]), then weight them.

    Weights are normalised to sum to 1 so tuning them never rescales the logits.
    """
    weights = validate_weights(weights)
    total = sum(weights.values())
    combined = sum(
        (weights[m] / total) * np.asarray(member_logits[m], dtype=np.float64).mean(axis=0) for m in MEMBERS
    )
    return np.asarray(combined, dtype=np.float32)


def normal_gating(probabilities: np.ndarray, alpha: float = DEFAULT_GATING_ALPHA) -> np.ndarray:
    """p_c <- p_c * (1 - p_Normal) ** alpha for every class but Normal."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    gated = probabilities * (1.0 - probabilities[..., NORMAL_INDEX : NORMAL_INDEX + 1]) ** alpha
    gated[..., NORMAL_INDEX] = probabilities[..., NORMAL_INDEX]
    return gated.astype(np.float32)


def ensemble_probabilities(
    member_logits: Mapping[str, np.ndarray], weights: Mapping[str, float], alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [C], gated probabilities [C]) of one image."""
    logits = combine_member_logits(member_logits, weights)
    return logits, normal_gating(sigmoid(logits), alpha)


def zeroshot_scores(
    image_embedding: np.ndarray,
    positive_text: np.ndarray,
    negative_text: np.ndarray | None = None,
    alpha: float = DEFAULT_ZEROSHOT_ALPHA,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [C], similarities [C]) of one image embedding [D].

    Each text row is the mean of unit-normalised prompt embeddings, so with a
    unit-normalised image embedding `v @ row` is exactly mean_k cos(v, t_ck).
    Without negatives p = sigmoid(alpha * s_pos); with them the positive-vs-negative
    two-way softmax at temperature alpha, i.e. sigmoid(alpha * (s_pos - s_neg)).
    """
    v = np.asarray(image_embedding, dtype=np.float64)
    v = v / max(np.linalg.norm(v), 1e-12)
    similarities = positive_text.astype(np.float64) @ v
    margin = similarities if negative_text is None else similarities - negative_text.astype(np.float64) @ v
    return sigmoid(alpha * margin), similarities.astype(np.float32)


def parse_weights(spec: str) -> dict[str, float]:
    """'pcam=0.4,swin=0.4,cait=0.2' -> dict, validated."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad ensemble weight {part!r}; write e.g. 'pcam=0.4,swin=0.4,cait=0.2'") from None
    return validate_weights(out)


def format_weights(weights: Mapping[str, float]) -> str:
    return ",".join(f"{m}={float(weights[m]):g}" for m in MEMBERS)

