"""Fitting the out-of-distribution gate of a built repository (`cxrlt build-repo --reference-images`).

The reference images go through the served CLIP image encoder (the repository's own ONNX file, with
the zero-shot preprocessing); a Gaussian with a Ledoit-Wolf shrunk covariance is fitted to their
embeddings, and the threshold is a percentile (default the 99th) of held-out Mahalanobis distances
(5-fold: each image scored by a fit without it). The gate (cxrlt.contract.ood_gate.GATE_FILE) is written into
the release's files, recorded in its manifest, its threshold in its pipeline parameters, and the
release's identity is refreshed so that it covers the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cxrlt.contract.manifest import read_manifest
from cxrlt.contract.ood_gate import DEFAULT_PERCENTILE, FEATURE, GATE_FILE, THRESHOLD_PARAMETER, OodGate
from cxrlt.contract.releases import release_dir, version_dir
from cxrlt.contract.preprocessing import ImageError, PreprocessConfig, check_not_constant, preprocess, validate_served_image
from cxrlt.contract.served import ENCODER_MODEL
from cxrlt.contract.text_cache import ENCODER_RECORD
from exporters.releases import release_number
from python_backends.onnx_runner import OnnxRunner


FOLDS = 5  # the held-out distances the threshold is chosen on: 5-fold, out of fold
HOLDOUT_SEED = 0
MIN_FIT_IMAGES = 20


def encoder_preprocess(repository: Path | str, release: int | None = None) -> PreprocessConfig:
    """The CLIP preprocessing a release's zero-shot task serves (so the gate sees what it will score)."""
    return PreprocessConfig.from_parameters(read_manifest(repository, release)["zeroshot"])


class Embedder:
    """The repository's CLIP image encoder (its ONNX file, onnxruntime on CPU) after the served
    image checks and preprocessing: images -> embeddings [N, D]."""

    def __init__(self, repository: Path | str, batch: int = 16, release: int | None = None) -> None:
        repository = Path(repository)
        release = release_number(repository, release)
        self.run = OnnxRunner(version_dir(repository, ENCODER_MODEL, release) / "model.onnx", 1, "cpu").run
        self.config = encoder_preprocess(repository, release)
        self.batch = batch

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        validate_served_image(image)  # ImageError where the served pipeline would refuse the image
        check_not_constant(image)
        return preprocess(image, self.config)[0]

    def _embed(self, pixels: list[np.ndarray]) -> np.ndarray:
        if not pixels:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([self.run(np.stack(pixels[i : i + self.batch])) for i in range(0, len(pixels), self.batch)])

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings of images that pass the served checks (those that do not raise ImageError)."""
        return self._embed([self._pixels(image) for image in images])

    def embed_each(self, images: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
        """(embeddings of the usable images, how many were skipped by the served image checks)."""
        pixels, skipped = [], 0
        for image in images:
            try:
                pixels.append(self._pixels(image))
            except ImageError:
                skipped += 1
        return self._embed(pixels), skipped


def fit_gate(embeddings: np.ndarray, *, percentile: float = DEFAULT_PERCENTILE, folds: int = FOLDS,
             seed: int = HOLDOUT_SEED, meta: Mapping[str, Any] | None = None) -> OodGate:
    """A gate fitted on all of `embeddings` [N, D] (Ledoit-Wolf), its threshold the `percentile` of
    held-out distances: each image's distance to a gate fitted without it (seeded `folds`-fold split),
    so every reference image counts once as held out and the threshold is not the training fit's
    own, optimistic, distances."""
    from sklearn.covariance import LedoitWolf

    embeddings = np.asarray(embeddings, dtype=np.float64)
    count = len(embeddings)
    if count < MIN_FIT_IMAGES or folds < 2:
        raise ValueError(f"{count} reference images are too few to fit the gate and hold some out; give at least "
                         f"{MIN_FIT_IMAGES} (and folds >= 2)")
    held_scores = np.empty(count)
    for rows in np.array_split(np.random.default_rng(seed).permutation(count), folds):
        rest = np.setdiff1d(np.arange(count), rows)
        fold = LedoitWolf().fit(embeddings[rest])
        held_scores[rows] = OodGate(fold.location_, fold.precision_, 1.0).score(embeddings[rows])
    estimator = LedoitWolf().fit(embeddings)
    threshold = float(np.percentile(held_scores, percentile))
    record = {
        **(meta or {}), "feature": FEATURE, "fit_images": int(count), "heldout_images": int(count), "folds": folds,
        "heldout_seed": seed, "percentile": percentile, "shrinkage": float(estimator.shrinkage_), "threshold": threshold,
        "heldout_scores": {q: float(np.percentile(held_scores, float(q))) for q in ("50", "90", "95", "99", "100")},
        "heldout_refused": float(np.mean(held_scores > threshold)),
    }
    return OodGate(estimator.location_, estimator.precision_, threshold, record)


def fit_repository_gate(repository: Path | str, images: Iterable[np.ndarray], source: str, *,
                        percentile: float = DEFAULT_PERCENTILE, folds: int = FOLDS, seed: int = HOLDOUT_SEED,
                        release: int | None = None) -> dict[str, Any]:
    """Fit the gate of a built repository's release (default: the live one) on the in-distribution reference `images` (named `source` in
    the record; evaluation.ood_sets.reference_images reads a folder or a label CSV's training split)
    and write it in. Returns the manifest record (and the refreshed repository_sha256)."""
    repository = Path(repository)
    release = release_number(repository, release)
    embeddings, skipped = Embedder(repository, release=release).embed_each(images)
    encoder = json.loads((version_dir(repository, ENCODER_MODEL, release) / ENCODER_RECORD).read_text())
    meta = {"reference_images": str(source), "skipped_images": skipped, "encoder_weights_sha256": encoder["weights_sha256"],
            "preprocess": encoder_preprocess(repository, release).to_parameters()}
    gate = fit_gate(embeddings, percentile=percentile, folds=folds, seed=seed, meta=meta)
    return write_gate(repository, gate, release)


def write_gate(repository: Path | str, gate: OodGate, release: int | None = None) -> dict[str, Any]:
    """Write `gate` into a release (default: the live one): GATE_FILE in its directory, the threshold
    in its pipeline parameters (`ood_threshold`), its manifest's `ood_gate` record, and the identity
    that covers the file."""
    from cxrlt.contract.served import PIPELINE_MODELS
    from exporters.releases import update_release
    from networks.checkpoints import file_sha256

    number = release_number(repository, release)
    path = gate.save(release_dir(repository, number) / GATE_FILE)
    record = {"file": GATE_FILE, "sha256": file_sha256(path), "dim": gate.dim,
              **{k: v for k, v in gate.meta.items() if k != "preprocess"}}
    record["repository_sha256"] = update_release(
        repository, number, {model: {THRESHOLD_PARAMETER: repr(float(gate.threshold))} for model in PIPELINE_MODELS},
        {"ood_gate": record})
    return record
