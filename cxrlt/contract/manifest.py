"""Reading a built repository's manifest: `manifest.json` at its root (what `cxrlt build-repo`
recorded for the whole repository) laid under one release's `release.json` (cxrlt.contract.releases)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrlt.contract.profiles import Profile, get_profile

MANIFEST = "manifest.json"


def read_manifest(repository: Path | str, release: int | None = None) -> dict[str, Any]:
    """The manifest of `release` (default: the live one): the repository's fields and the release's."""
    from cxrlt.contract.releases import live_release, read_release, release_numbers

    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{repository} has no {MANIFEST}; is it a repository built by `cxrlt build-repo`?")
    root = json.loads(path.read_text())
    if release is None and not release_numbers(repository):
        return root  # a repository from before releases: one set of weights, all at the root
    return {**root, **read_release(repository, live_release(repository) if release is None else release)}


def manifest_profile(manifest: dict[str, Any]) -> Profile:
    """The profile a repository was built with, its CLIP choice included."""
    return get_profile(manifest["profile"], manifest.get("clip_model"))
