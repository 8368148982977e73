"""open_clip models for zero-shot findings: creation, checkpoint loading and the prompt-ensembled text tensor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch
from torch import nn
from torch.nn import functional as F

from cxrlt.contract.resources import package_file
from networks.checkpoints import load_into

_CONFIG_DIR = package_file("networks", "clip_configs")
open_clip.add_model_config(_CONFIG_DIR)  # registers the project's small configs (tiny profile)


class _QuietRandomInit(logging.Filter):
    """open_clip logs "No pretrained weights loaded" on every random creation; the repository
    builder and the servers already say loudly, once, when weights are random."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_clip(model_name: str, checkpoint: Path | str | None = None) -> nn.Module:
    """An open_clip model, random unless a state_dict checkpoint is given. Offline: never downloads."""
    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    if checkpoint is not None:
        load_into(model, checkpoint)
    return model.eval()


def tokenizer_for(model_name: str):
    return open_clip.get_tokenizer(model_name)


class ImageTower(nn.Module):
    """pixel_values [B, 3, 224, 224] -> unit-normalised image embeddings [B, D] (what ONNX serves)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.visual = clip_model.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values), dim=-1)


@torch.no_grad()
def encode_prompt_ensembles(
    clip_model: nn.Module, tokenizer, prompts_by_class: Sequence[Sequence[str]]
) -> torch.Tensor:
    """[classes, D]: per class the mean of its unit-normalised prompt embeddings.

    The mean is deliberately not re-normalised: with a unit image embedding v, `v @ row`
    is then exactly mean_k cos(v, t_k), the score the papers ensemble.
    """
    rows = []
    for prompts in prompts_by_class:
        if not prompts:
            raise ValueError("every class needs at least one prompt")
        embeddings = F.normalize(clip_model.encode_text(tokenizer(list(prompts))), dim=-1)
        rows.append(embeddings.mean(dim=0))
    return torch.stack(rows)
