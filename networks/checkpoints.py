"""Checkpoint files: one state_dict file per served network.

Naming inside a checkpoint directory (what `cxrlt build-repo --checkpoints DIR` reads):
    projection_router.pt
    ensemble_<frontal|lateral>_<pcam|cait|swin>.pt
    clip.pt                        (an open_clip state_dict, fine-tuned or not)
A file may hold a bare state_dict or a training checkpoint dict; from the latter the
EMA weights are preferred, then `state_dict`, then `model`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

CHECKPOINT_SUFFIX = ".pt"
CLIP_CHECKPOINT = "clip"


class CheckpointError(ValueError):
    """A checkpoint does not fit the network it is loaded into."""


def checkpoint_path(directory: Path | str, model_name: str) -> Path:
    return Path(directory) / f"{model_name}{CHECKPOINT_SUFFIX}"


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if isinstance(payload, Mapping):
        for key in ("ema_state_dict", "state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"checkpoint {path} holds no state_dict of tensors")
    # weights saved from DataParallel / torch.compile wrappers carry a prefix
    return {_strip_prefix(k): v for k, v in payload.items()}


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_into(model: nn.Module, path: Path | str) -> None:
    """Load a checkpoint strictly, naming the file and the first bad key on any mismatch."""
    state = read_state_dict(path)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing key {key!r} (and maybe more); is it for this network and profile?")
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path}: key {key!r} has shape {list(state[key].shape)}, the network expects "
                f"{list(tensor.shape)}; was it trained with another profile?"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"checkpoint {path}: unexpected key {unexpected[0]!r}; is it for this network?")
    model.load_state_dict(state, strict=True)


def save_state_dict(model: nn.Module, path: Path | str, **extra: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return path


def state_dict_sha256(model: nn.Module) -> str:
    """A content hash of a network's weights, independent of how they were stored."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
