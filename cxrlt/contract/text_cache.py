"""The cached, prompt-ensembled text tensor of the zero-shot model (numpy only).

On disk, next to the `cxr_zeroshot` model:
    text_cache.npz   positive [C, D] (and negative [C, D] when negative prompts exist)
    text_cache.json  what produced it: class names, CLIP config, weights hash, prompt-file hash
The image encoder carries `encoder.json` with the same weights hash; a cache built from
other weights or from an edited prompt file is refused at load time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CACHE_ARRAYS = "text_cache.npz"
CACHE_RECORD = "text_cache.json"
ENCODER_RECORD = "encoder.json"
PROMPTS_FILE = "prompts.yaml"


class StaleCacheError(RuntimeError):
    """The text cache does not belong to the served encoder or prompts."""


@dataclasses.dataclass(frozen=True)
class TextCache:
    class_names: tuple[str, ...]
    positive: np.ndarray
    negative: np.ndarray | None
    record: dict[str, Any]


def sha256_text(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rebuild_hint(repository: Path | str | None) -> str:
    where = repository if repository is not None else "<repository>"
    return f"rebuild it with `cxrlt build-text-cache --repo {where}` (no ONNX re-export needed)"


def save_text_cache(
    directory: Path | str,
    class_names: Sequence[str],
    positive: np.ndarray,
    negative: np.ndarray | None,
    record: dict[str, Any],
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"positive": np.asarray(positive, dtype=np.float32)}
    if negative is not None:
        arrays["negative"] = np.asarray(negative, dtype=np.float32)
    # np.savez writes zip entries with fixed timestamps, so equal inputs give equal bytes
    np.savez(directory / CACHE_ARRAYS, **arrays)
    full_record = dict(record, class_names=list(class_names), dim=int(arrays["positive"].shape[1]))
    (directory / CACHE_RECORD).write_text(json.dumps(full_record, indent=2, sort_keys=True) + "\n")


def load_text_cache(
    directory: Path | str,
    expected_classes: Sequence[str],
    encoder_record_path: Path | str,
    repository: Path | str | None = None,
) -> TextCache:
    """Load the cache and prove it matches the served encoder and the prompt file beside it."""
    directory = Path(directory)
    hint = rebuild_hint(repository)
    arrays_path, record_path = directory / CACHE_ARRAYS, directory / CACHE_RECORD
    if not arrays_path.is_file() or not record_path.is_file():
        raise StaleCacheError(f"no text cache in {directory}; {hint}")
    record = json.loads(record_path.read_text())
    encoder = json.loads(Path(encoder_record_path).read_text())
    if record.get("weights_sha256") != encoder.get("weights_sha256"):
        raise StaleCacheError(
            f"text cache {record_path} was built from CLIP weights {str(record.get('weights_sha256'))[:12]} but the "
            f"image encoder serves weights {str(encoder.get('weights_sha256'))[:12]}; {hint}"
        )
    prompts_path = directory / PROMPTS_FILE
    if prompts_path.is_file() and record.get("prompts_sha256") != sha256_text(prompts_path):
        raise StaleCacheError(f"prompt file {prompts_path} changed after the text cache was built; {hint}")
    if list(record.get("class_names", [])) != list(expected_classes):
        raise StaleCacheError(
            f"text cache classes {record.get('class_names')} differ from the served classes {list(expected_classes)}; {hint}"
        )
    with np.load(arrays_path) as data:
        positive = data["positive"]
        negative = data["negative"] if "negative" in data.files else None
    if positive.shape != (len(expected_classes), encoder.get("dim")):
        raise StaleCacheError(
            f"text cache shape {list(positive.shape)} does not fit {len(expected_classes)} classes x encoder dim "
            f"{encoder.get('dim')}; {hint}"
        )
    return TextCache(tuple(record["class_names"]), positive, negative, record)
