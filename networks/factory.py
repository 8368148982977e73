"""Network definitions of the served ensemble, built with timm.

`create_model(spec, num_classes, image_size)` is the one factory; each architecture
family registers a small builder. Every model maps [B, 3, S, S] -> logits [B, K].

`pretrained_file` starts a network from local ImageNet-pretrained weights of its timm
variant (a timm / Hugging Face `model.safetensors` or `pytorch_model.bin`, downloaded by the
user: nothing is fetched here). timm loads it: it adapts what its checkpoint filters adapt
(e.g. SwinV2 position tables) and drops the 1000-class classifier, which our heads replace.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn
from timm.models.cait import Cait

from cxrlt.contract.profiles import NetworkSpec

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(arch: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[arch] = fn
        return fn

    return wrap


def list_architectures() -> list[str]:
    return sorted(_BUILDERS)


def create_model(spec: NetworkSpec, num_classes: int, image_size: int, pretrained_file: str | Path | None = None) -> nn.Module:
    """Build the network a profile's spec describes: random weights, or the timm part
    initialised from `pretrained_file` (see the module docstring)."""
    try:
        builder = _BUILDERS[spec.arch]
    except KeyError:
        raise ValueError(f"unknown architecture {spec.arch!r}; registered: {', '.join(list_architectures())}") from None
    if pretrained_file is None:
        return builder(num_classes=num_classes, image_size=image_size, **spec.kwargs)
    if spec.arch in _NO_PRETRAINED_FILE:
        raise ValueError(f"architecture {spec.arch!r} takes no pretrained file: {_NO_PRETRAINED_FILE[spec.arch]}")
    if not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"pretrained weights {pretrained_file} not found; download the timm variant's weights "
                                "(model.safetensors or pytorch_model.bin) and give that path")
    return builder(num_classes=num_classes, image_size=image_size, pretrained_file=str(pretrained_file), **spec.kwargs)


# Architectures whose trainable part has no timm ImageNet checkpoint of the same shape.
_NO_PRETRAINED_FILE = {
    "cait_on_convnextv2": "its ConvNeXt-V2 is the frozen PCAM backbone (pcam_checkpoint) and its token grid differs from CaiT's",
}


def _timm(variant: str, pretrained_file: str | None = None, **kwargs: Any) -> nn.Module:
    if pretrained_file is None:
        return timm.create_model(variant, pretrained=False, **kwargs)
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file}, **kwargs)


def create_convnextv2_backbone(variant: str, pretrained_file: str | None = None, **overrides: Any) -> nn.Module:
    """A ConvNeXt-V2 feature extractor: [B, 3, S, S] -> [B, C, S/32, S/32]."""
    return _timm(variant, pretrained_file=pretrained_file, num_classes=0, global_pool="", **overrides)


class PCAMPool(nn.Module):
    """Probabilistic class activation map pooling (one 1x1 conv per class).

    Each class's sigmoid map, normalised over space, weights the feature map; the same
    1x1 conv applied to that class's pooled feature gives the class logit, so the
    attention and the classifier agree by construction.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_features, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)  # [B, C, N]
        attention = torch.sigmoid(self.classifier(features)).flatten(2)  # [B, K, N]
        attention = attention / attention.sum(dim=-1, keepdim=True)
        pooled = torch.einsum("bkn,bcn->bkc", attention, flat)  # [B, K, C]
        weight = self.classifier.weight.flatten(1)  # [K, C]
        return (pooled * weight).sum(dim=-1) + self.classifier.bias


class CSRAPool(nn.Module):
    """Class-specific residual attention: average-pooled scores plus lambda x attention-pooled ones."""

    def __init__(self, in_features: int, num_classes: int, lam: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_features, num_classes, kernel_size=1, bias=False)
        self.lam, self.temperature = lam, temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(features).flatten(2) / torch.linalg.vector_norm(
            self.classifier.weight.flatten(1), dim=1
        ).view(1, -1, 1)
        base = scores.mean(dim=-1)
        attention = torch.softmax(scores * self.temperature, dim=-1)
        return base + self.lam * (scores * attention).sum(dim=-1)


class MLPPool(nn.Module):
    """Global average pooling followed by a two-layer MLP."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        hidden = hidden or in_features
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.mean(dim=(2, 3)))


class BackboneWithHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


_POOLS = {"pcam": PCAMPool, "csra": CSRAPool, "mlp": MLPPool}


def _convnextv2_with_pool(pool: str, num_classes: int, image_size: int, backbone: dict,
                          pretrained_file: str | None = None, **head_kwargs: Any) -> nn.Module:
    body = create_convnextv2_backbone(pretrained_file=pretrained_file, **backbone)
    return BackboneWithHead(body, _POOLS[pool](body.num_features, num_classes, **head_kwargs))


for _pool in _POOLS:
    register(f"convnextv2_{_pool}")(functools.partial(_convnextv2_with_pool, _pool))


class FrozenConvNeXtTokens(nn.Module):
    """CaiT's patch layer: tokens of a frozen ConvNeXt-V2 feature map, projected to the CaiT width.

    The paper pre-trains this backbone with the PCAM head and freezes it, so it stays
    in eval mode (no batch statistics or dropout updates) whatever mode the model is in.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, backbone: dict, **_: Any) -> None:
        super().__init__()
        self.backbone = create_convnextv2_backbone(**backbone)
        self.backbone.requires_grad_(False)
        stride = self.backbone.feature_info[-1]["reduction"]
        self.grid_size = (img_size // stride, img_size // stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Linear(self.backbone.num_features, embed_dim)

    def train(self, mode: bool = True) -> "FrozenConvNeXtTokens":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)  # [B, C, h, w]
        return self.proj(features.flatten(2).transpose(1, 2))


@register("cait_on_convnextv2")
def _cait_on_convnextv2(num_classes: int, image_size: int, backbone: dict, **cait_kwargs: Any) -> nn.Module:
    patch_layer = functools.partial(FrozenConvNeXtTokens, backbone=backbone)
    return Cait(img_size=image_size, patch_size=32, num_classes=num_classes, patch_layer=patch_layer, **cait_kwargs)


@register("efficientnet")
def _efficientnet(num_classes: int, image_size: int, variant: str, pretrained_file: str | None = None, **overrides: Any) -> nn.Module:
    return _timm(variant, pretrained_file=pretrained_file, num_classes=num_classes, **overrides)


def _add_absolute_position_embedding(model: nn.Module) -> None:
    """Give a timm SwinV2 a learned embedding per patch position (the official Swin's `ape`).

    timm's SwinV2 has only relative position biases inside each window, so a small one
    learns slowly where in the image a pattern lies; timm dropped `ape`, so it is added
    here: a parameter `absolute_pos_embed` [1, H/4, W/4, C] added to the patch tokens by a
    forward hook, which leaves every timm parameter name (and pretrained loading) as it is.
    """
    grid = tuple(model.patch_embed.grid_size)
    model.absolute_pos_embed = nn.Parameter(torch.zeros(1, *grid, model.embed_dim))
    nn.init.trunc_normal_(model.absolute_pos_embed, std=0.02)
    model.patch_embed.register_forward_hook(
        lambda _module, _inputs, tokens: tokens + model.absolute_pos_embed)  # NHWC tokens


@register("swinv2")
def _swinv2(num_classes: int, image_size: int, variant: str, pretrained_file: str | None = None,
            absolute_pos_embed: bool = False, **overrides: Any) -> nn.Module:
    model = _timm(variant, pretrained_file=pretrained_file, num_classes=num_classes, img_size=image_size, **overrides)
    if absolute_pos_embed:
        _add_absolute_position_embedding(model)
    return model


def cait_backbone(model: nn.Module) -> nn.Module:
    """The frozen ConvNeXt-V2 inside a CaiT member (to load PCAM-trained weights into)."""
    return model.patch_embed.backbone


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
