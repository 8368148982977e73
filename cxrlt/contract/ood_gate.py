"""The learned out-of-distribution gate: its file and its score (numpy only).

The gate is the Mahalanobis distance of an image's CLIP image embedding (the served model
`clip_image_encoder`, output `image_embeds`) to the embeddings of the repository's reference images
(a Gaussian with a Ledoit-Wolf shrunk covariance, fitted by exporters.ood_gate). Its threshold is a
percentile (default the 99th) of the distances of reference images held out of the fit.
Everything lives in one file at the repository root, GATE_FILE, part of `repository_sha256`;
docs/gate.md has the measured quality.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["GATE_FILE", "ACTION_PARAMETER", "THRESHOLD_PARAMETER", "ACTIONS", "DEFAULT_ACTION", "DEFAULT_PERCENTILE",
           "NO_SCORE", "FEATURE", "OodGate", "load_gate", "refusal_message"]

GATE_FILE = "ood_gate.npz"
ACTION_PARAMETER = "ood_action"  # pipeline config: refuse | flag
THRESHOLD_PARAMETER = "ood_threshold"  # pipeline config: the threshold in force ("" without a gate)
ACTIONS = ("refuse", "flag")
DEFAULT_ACTION = "refuse"
DEFAULT_PERCENTILE = 99.0
NO_SCORE = float("nan")  # OOD_SCORE of a repository without a fitted gate
FEATURE = "clip_image_encoder/image_embeds"


def refusal_message(score: float, threshold: float) -> str:
    return f"not a chest radiograph (out-of-distribution score {score:.2f} > {threshold:.2f})"


@dataclasses.dataclass(frozen=True, eq=False)
class OodGate:
    """mean [D] and precision [D, D] of the reference embeddings, the threshold, and a record of
    the fit (`meta`: feature, encoder weights, preprocessing, counts, held-out score quantiles)."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        dim = self.mean.shape[-1]
        if self.mean.ndim != 1 or self.precision.shape != (dim, dim):
            raise ValueError(f"gate statistics have shapes {self.mean.shape} and {self.precision.shape}; expected [D] and [D, D]")
        if not math.isfinite(self.threshold):
            raise ValueError(f"gate threshold {self.threshold} is not finite")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` [N, D] to the reference mean, float64 [N]."""
        features = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        centred = features - self.mean
        squared = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean.astype(np.float64), precision=self.precision.astype(np.float64),
                 threshold=np.float64(self.threshold), meta=np.array(json.dumps(dict(self.meta), sort_keys=True)))
        return buffer.getvalue()

    def save(self, path: Path | str) -> Path:
        """Write the gate (the same gate always gives the same bytes: np.savez stores no dates)."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path

    @classmethod
    def load(cls, path: Path | str) -> "OodGate":
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(mean=data["mean"], precision=data["precision"], threshold=float(data["threshold"]),
                       meta=json.loads(str(data["meta"])))


def load_gate(directory: Path | str) -> OodGate | None:
    """A release's gate (`directory`: its files, cxrlt.contract.releases.files_of), or None when it has none."""
    path = Path(directory) / GATE_FILE
    if not path.is_file():
        return None
    try:
        return OodGate.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a valid out-of-distribution gate ({exc}); refit it with "
                         "`cxrlt build-repo ... --reference-images DIR`") from None
