"""Which weights each served network gets: a user's checkpoint, or seeded random initialisation.

Random initialisation is seeded per network so rebuilding a repository from the same
inputs gives the same weights (and the same ONNX bytes), and so the reference pipeline
can rebuild exactly the served networks.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

import torch
from torch import nn

from cxrlt.contract.profiles import Profile
from cxrlt.contract.served import ROUTER_MODEL

from networks.checkpoints import CLIP_CHECKPOINT, CheckpointError, checkpoint_path, load_into
from networks.clip import create_clip
from networks.factory import create_model

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "NO CHECKPOINTS: networks are randomly initialised. Every probability this server returns is "
    "RANDOM and NOT DIAGNOSTIC. Train with `cxrlt train` or pass --checkpoints DIR."
)


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    checkpoint: str | None  # None: seeded random initialisation
    seed: int


def num_outputs(model_name: str) -> int:
    return 2 if model_name == ROUTER_MODEL else 30


def _resolve(checkpoints: Path | str | None, name: str, allow_random: bool) -> Path | None:
    if checkpoints is None:
        return None
    path = checkpoint_path(checkpoints, name)
    if path.is_file():
        return path
    if allow_random:
        log.warning("no checkpoint %s: %s gets RANDOM weights", path, name)
        return None
    raise CheckpointError(
        f"checkpoint directory {checkpoints} has no {path.name} for {name}; train it (`cxrlt train`) or "
        "pass --allow-random to serve that network with random weights"
    )


def _seeded(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def load_network(
    profile: Profile, model_name: str, checkpoints: Path | str | None = None, seed: int = 0, allow_random: bool = False
) -> tuple[nn.Module, WeightsSource]:
    spec = profile.network_specs()[model_name]
    torch.manual_seed(_seeded(seed, model_name))
    model = create_model(spec, num_outputs(model_name), profile.image_size)
    path = _resolve(checkpoints, model_name, allow_random)
    if path is not None:
        load_into(model, path)
    return model.eval(), WeightsSource(str(path) if path else None, seed)


def load_clip(
    profile: Profile, checkpoints: Path | str | None = None, seed: int = 0, allow_random: bool = False
) -> tuple[nn.Module, WeightsSource]:
    torch.manual_seed(_seeded(seed, CLIP_CHECKPOINT))
    path = _resolve(checkpoints, CLIP_CHECKPOINT, allow_random)
    model = create_clip(profile.clip.model_name, path)
    return model, WeightsSource(str(path) if path else None, seed)
