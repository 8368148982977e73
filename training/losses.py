"""Losses of the training recipes (torch), with a small name -> class registry.

Multi-label losses take `logits` and `targets` of shape [B, C] (targets 0/1 floats) and
reduce with `reduction`: "mean" (over all B x C elements, torch's BCE convention),
"sum", or "none" (the [B, C] element losses).

* `bce`  - plain binary cross-entropy on logits.
* `asl`  - asymmetric loss (Ridnik et al., ICCV 2021).
* `db`   - distribution-balanced loss (Wu et al., ECCV 2020) with effective-number class
           weights (Cui et al., CVPR 2019) and negative-tolerant regularisation.
* `clip` - CLIP's symmetric image-text contrastive loss.
* `dual` - the dual-branch objective L = L_con + alpha * L_ASL.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, not {reduction!r}")


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, not {reduction!r}")
    return reduction


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_loss(*names: str) -> Callable:
    """Class decorator: make a loss available to `create_loss` under `names`."""

    def add(cls):
        for name in names:
            _REGISTRY[name.lower()] = cls
        return cls

    return add


def available_losses() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def create_loss(name: str, **kwargs) -> nn.Module:
    """A loss by registry name, e.g. create_loss("asl", gamma_neg=4) or
    create_loss("db", class_counts=counts, num_images=n)."""
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(available_losses())}") from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------- losses


@register_loss("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy on logits; `pos_weight` [C] optionally up-weights positives."""

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=self.pos_weight,
                                                  reduction="none")
        return _reduce(loss, self.reduction)


@register_loss("asl", "asymmetric")
class AsymmetricLoss(nn.Module):
    """Asymmetric loss: focal down-weighting that is stronger on negatives, plus a
    probability shift that discards easy negatives entirely.

    With p = sigmoid(z) and the shifted negative probability p_m = max(p - clip, 0):
        L+ = -(1 - p)^gamma_pos * log(p)
        L- = -p_m^gamma_neg * log(1 - p_m)
    element loss = y * L+ + (1 - y) * L-. Logs are taken of values clamped to >= eps so
    saturated logits give finite losses.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05,
                 eps: float = 1e-8, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"clip must be in [0, 1), not {clip}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.reduction = _check_reduction(reduction)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0.0) if self.clip > 0 else p
        loss_pos = (1.0 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        loss_neg = p_neg.pow(self.gamma_neg) * torch.log((1.0 - p_neg).clamp(min=self.eps))
        return _reduce(-(y * loss_pos + (1.0 - y) * loss_neg), self.reduction)


def effective_number_weights(class_counts: Sequence[float] | np.ndarray, beta: float = 0.9999) -> np.ndarray:
    """Class-balanced weights w_c = (1 - beta) / (1 - beta^n_c), normalised to mean 1.

    Counts below 1 (a class with no training positives) are treated as 1 so the weight
    stays finite; such a class then gets the largest weight.
    """
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return weights / weights.mean()


def prior_log_odds(class_counts: Sequence[float] | np.ndarray, num_images: int) -> np.ndarray:
    """log(p_c / (1 - p_c)) of the class priors p_c = n_c / N, with n_c kept in [1, N-1]."""
    counts = np.clip(np.asarray(class_counts, dtype=np.float64), 1.0, num_images - 1.0)
    return np.log(counts / (num_images - counts))


@register_loss("db", "distribution_balanced")
class DistributionBalancedLoss(nn.Module):
    """Distribution-balanced loss for long-tailed multi-label classification.

    1. Re-weighting: each class's element losses are multiplied by the effective-number
       weight w_c (`effective_number_weights`, beta 0.9999, mean 1), so rare classes count
       more without re-sampling statistics.
    2. Class-prior logit shift: the loss sees z' = z + kappa * b_c, where
       b_c = log(p_c / (1 - p_c)) is the prior log-odds (paper: z - nu with
       nu = -kappa * b_c). The network's raw logit then only has to model the deviation
       from the prior, so rare classes are not pushed to large negative logits.
    3. Negative-tolerant regularisation: negatives use a sharper, 1/lambda-scaled softplus,
           L+ = softplus(-(z' - margin)),   L- = (1 / lambda) * softplus(lambda * z'),
       which is steep for confidently wrong negatives but flat (tolerant) once z' < 0,
       so the many negatives of a tail class do not over-suppress it.
    `margin` (default 0, i.e. the paper) additionally asks positives to clear a margin.

    Defaults (kappa 0.05, lambda 2) are the reference implementation's; it also divides
    the shift by lambda - pass kappa=0.025 to reproduce that exactly.
    """

    def __init__(self, class_counts: Sequence[float] | np.ndarray, num_images: int | None = None,
                 beta: float = 0.9999, kappa: float = 0.05, neg_scale: float = 2.0, margin: float = 0.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if num_images is None:
            raise ValueError("DistributionBalancedLoss needs num_images (the training set size) for the class priors")
        if neg_scale <= 0:
            raise ValueError(f"neg_scale (lambda) must be > 0, not {neg_scale}")
        self.kappa, self.neg_scale, self.margin = kappa, neg_scale, margin
        self.reduction = _check_reduction(reduction)
        self.register_buffer("weights", torch.as_tensor(effective_number_weights(class_counts, beta), dtype=torch.float32))
        self.register_buffer("prior", torch.as_tensor(prior_log_odds(class_counts, num_images), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        y = targets.to(logits.dtype)
        shifted = logits + self.kappa * self.prior
        loss_pos = F.softplus(-(shifted - self.margin))
        loss_neg = F.softplus(self.neg_scale * shifted) / self.neg_scale
        return _reduce(self.weights * (y * loss_pos + (1.0 - y) * loss_neg), self.reduction)


@register_loss("clip", "contrastive")
class ClipContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE: row i of the image batch matches row i of the text batch.

    logits = scale * normalize(img) @ normalize(txt).T; loss = (CE(logits, arange) +
    CE(logits.T, arange)) / 2. The scale is exp(log_scale), a learnable parameter
    initialised to 1/0.07 and clamped to <= 100 as in CLIP, unless the caller passes an
    explicit `logit_scale` (already exponentiated, e.g. open_clip's model output).
    """

    def __init__(self, init_scale: float = 1.0 / 0.07, learnable: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        log_scale = torch.tensor(math.log(init_scale), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                logit_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        if image_embeds.shape != text_embeds.shape:
            raise ValueError(f"image and text embeddings must pair row by row; got {list(image_embeds.shape)} "
                             f"and {list(text_embeds.shape)}")
        scale = self.log_scale.exp().clamp(max=self.max_scale) if logit_scale is None else logit_scale
        logits = scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@register_loss("dual", "dual_branch")
class DualBranchLoss(nn.Module):
    """L = L_con + alpha * L_ASL: image-text contrastive alignment plus multi-label ASL on
    the classifier branch (alpha 1.5)."""

    def __init__(self, alpha: float = 1.5, contrastive: ClipContrastiveLoss | None = None,
                 asl: AsymmetricLoss | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.contrastive = contrastive if contrastive is not None else ClipContrastiveLoss()
        self.asl = asl if asl is not None else AsymmetricLoss()

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logits: torch.Tensor,
                targets: torch.Tensor, logit_scale: torch.Tensor | float | None = None,
                return_parts: bool = False):
        """Total loss, or (total, {"contrastive": ..., "asl": ...}) with return_parts."""
        l_con = self.contrastive(image_embeds, text_embeds, logit_scale)
        l_asl = self.asl(logits, targets)
        total = l_con + self.alpha * l_asl
        if return_parts:
            return total, {"contrastive": l_con.detach(), "asl": l_asl.detach()}
        return total
