"""Learning-rate schedule of the recipes: linear warm-up, then cosine decay, stepped per batch."""

from __future__ import annotations

import math


class WarmupCosine:
    """lr factor at optimiser step s (a picklable callable for torch's LambdaLR).

    Steps [0, warmup): linear from 1/warmup to 1; then cosine from 1 to `min_ratio` at `total`.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> None:
        self.total = max(1, int(total_steps))
        self.warmup = max(0, min(int(warmup_steps), self.total - 1))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

