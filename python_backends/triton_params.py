"""Reading a Triton model config (the JSON the Python backend receives) into plain values."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def parameters(model_config: Mapping[str, Any] | str) -> dict[str, str]:
    """`parameters { key: ... value { string_value: ... } }` -> {key: value}."""
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def require(params: Mapping[str, str], key: str) -> str:
    try:
        return params[key]
    except KeyError:
        raise ValueError(f"model config lacks parameter {key!r}; rebuild the repository with `cxrlt build-repo`") from None


def optional_number(text: str) -> float | None:
    """A parameter's finite number; None where it is empty, not a number or not finite."""
    try:
        value = float(text) if str(text).strip() else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def as_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean parameter (true/false), got {value!r}")
