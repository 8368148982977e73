"""Reading a built repository's `manifest.json` (what `cxrlt build-repo` recorded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrlt.contract.profiles import Profile, get_profile

MANIFEST = "manifest.json"


def read_manifest(repository: Path | str) -> dict[str, Any]:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{repository} has no {MANIFEST}; is it a repository built by `cxrlt build-repo`?")
    return json.loads(path.read_text())


def manifest_profile(manifest: dict[str, Any]) -> Profile:
    """The profile a repository was built with, its CLIP choice included."""
    return get_profile(manifest["profile"], manifest.get("clip_model"))
