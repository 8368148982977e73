"""Exponential moving average of a network's weights (what the recipes save as `ema_state_dict`
and what `cxrlt build-repo` serves)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    """ema <- d * ema + (1 - d) * weights after every optimiser step.

    With `warmup` the decay starts low and grows to `decay` as d_n = min(decay, (1 + n) / (10 + n)),
    so a short run's average is not dominated by the random initialisation. Floating-point
    buffers (batch-norm statistics) are averaged like weights; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), not {decay}")
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0
        # Frozen parameters (e.g. CaiT's PCAM-trained backbone) are copied, not averaged, so
        # the average holds them bit for bit.
        self._frozen = frozenset(name for name, p in model.named_parameters() if not p.requires_grad)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        current = model.state_dict()
        for key, value in self.module.state_dict().items():
            source = current[key].detach()
            if value.dtype.is_floating_point and key not in self._frozen:
                value.mul_(decay).add_(source.to(value.dtype), alpha=1.0 - decay)
            else:
                value.copy_(source)

    def train(self, mode: bool = True) -> "ModelEma":
        # The average is never trained; keep it in eval mode whatever its parent does.
        super().train(False)
        return self

    def ema_state(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_ema_state(self, state: dict) -> None:
        """Restore the update count (the averaged weights are loaded into `module` directly)."""
        self.updates = int(state.get("updates", 0))
