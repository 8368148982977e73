"""Declarative profiles: which architecture and size each served network has.

A profile is data only; `networks.factory.create_model` turns a member spec into a
torch module and `exporters` turn it into ONNX. `tiny` keeps every family and head
of `paper` but shrinks depths, widths and resolution so a whole repository builds and
serves on two CPU cores in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cxrlt.contract.labels import PROJECTIONS
from cxrlt.contract.ensemble import MEMBERS
from cxrlt.contract.served import ROUTER_MODEL, ensemble_model_name


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    arch: str  # a key of networks.factory' registry
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    model_name: str  # an open_clip config name (or one registered by networks.clip)
    image_size: int = 224


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    """Bounds on Triton's queues, written into every model's `dynamic_batching.default_queue_policy`.

    Entry models (`cxr_findings`, `cxr_classifier`, `cxr_zeroshot`) hold at most
    `max_queue_size` waiting requests and reject one that waited `timeout_ms` (UNAVAILABLE,
    so clients retry elsewhere or later), so overload is refused fast instead of queued
    without limit. Their calls to the network models carry `member_timeout_ms`, the network
    models' own queue timeout too, so a stuck member never holds a BLS instance forever.
    """

    max_queue_size: int
    timeout_ms: int
    member_timeout_ms: int
    network_max_queue_size: int = 64


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    image_size: int
    router: NetworkSpec
    members: dict[str, NetworkSpec]  # pcam / cait / swin, the same for both projections
    clip: ClipSpec
    queue: QueuePolicy

    def network_specs(self) -> dict[str, NetworkSpec]:
        """Model-repository name -> spec, for every network of Task 1."""
        specs = {ROUTER_MODEL: self.router}
        for projection in PROJECTIONS:
            for member in MEMBERS:
                specs[ensemble_model_name(projection, member)] = self.members[member]
        return specs


_TINY_CONVNEXT = {"variant": "convnextv2_atto", "depths": (1, 1, 2, 1), "dims": (16, 32, 48, 64)}
_PAPER_CONVNEXT = {"variant": "convnextv2_tiny"}

PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        image_size=64,
        router=NetworkSpec("efficientnet", {"variant": "test_efficientnet"}),
        members={
            "pcam": NetworkSpec("convnextv2_pcam", {"backbone": _TINY_CONVNEXT}),
            "cait": NetworkSpec(
                "cait_on_convnextv2",
                {"backbone": _TINY_CONVNEXT, "embed_dim": 32, "depth": 2, "num_heads": 2, "depth_token_only": 1},
            ),
            # Three stages of two blocks: shifted windows in every stage and a last stage whose
            # one window sees the whole 4 x 4 grid. Absolute position embedding (Swin's `ape`)
            # because a network this small learns where a finding sits far faster with it.
            "swin": NetworkSpec(
                "swinv2",
                {"variant": "swinv2_tiny_window8_256", "embed_dim": 32, "depths": (2, 2, 2), "num_heads": (2, 4, 8),
                 "window_size": 4, "absolute_pos_embed": True},
            ),
        },
        clip=ClipSpec("cxrlt-tiny-vit", image_size=224),
        # An image takes milliseconds: a request that waited 2 s is better refused and retried.
        queue=QueuePolicy(max_queue_size=8, timeout_ms=2_000, member_timeout_ms=10_000),
    ),
    "paper": Profile(
        name="paper",
        image_size=512,
        router=NetworkSpec("efficientnet", {"variant": "efficientnet_b0"}),
        members={
            "pcam": NetworkSpec("convnextv2_pcam", {"backbone": _PAPER_CONVNEXT}),
            # CaiT-XXS: 192 wide, 24 self-attention blocks, 4 heads, 2 class-attention blocks.
            "cait": NetworkSpec(
                "cait_on_convnextv2",
                {"backbone": _PAPER_CONVNEXT, "embed_dim": 192, "depth": 24, "num_heads": 4, "depth_token_only": 2},
            ),
            "swin": NetworkSpec("swinv2", {"variant": "swinv2_tiny_window16_256"}),
        },
        clip=ClipSpec("ViT-B-32", image_size=224),
        # Seconds per image on a CPU, tens of milliseconds on a GPU: sized for the CPU.
        queue=QueuePolicy(max_queue_size=8, timeout_ms=60_000, member_timeout_ms=120_000),
    ),
}


def get_profile(name: str, clip_model: str | None = None) -> Profile:
    """A profile by name; `clip_model` swaps its CLIP (e.g. "ViT-L-14", as WhyXrayCLIP)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None
    if clip_model and clip_model != profile.clip.model_name:
        profile = dataclasses.replace(profile, clip=ClipSpec(clip_model, profile.clip.image_size))
    return profile
