"""Rendering `config.pbtxt` files from the templates shipped in the `triton_models` package."""

from __future__ import annotations

import string
from typing import Mapping

from cxrlt.contract.model_config import parse
from cxrlt.contract.resources import package_file

TEMPLATES = package_file("triton_models")


def parameters_block(params: Mapping[str, str]) -> str:
    if not params:
        return ""
    entries = ",\n".join(
        f'  {{\n    key: "{key}"\n    value: {{ string_value: {_quote(value)} }}\n  }}' for key, value in sorted(params.items())
    )
    return f"parameters [\n{entries}\n]"


def queue_policy_block(max_queue_size: int, timeout_ms: int) -> str:
    """`default_queue_policy` of a dynamic_batching block: a bounded queue whose overflow and
    expired requests are rejected with UNAVAILABLE, and callers may shorten the timeout."""
    if max_queue_size < 1 or timeout_ms < 1:
        raise ValueError(f"queue bounds must be positive (max_queue_size {max_queue_size}, timeout_ms {timeout_ms})")
    return (
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {timeout_ms * 1000}\n"
        "    allow_timeout_override: true\n"
        f"    max_queue_size: {max_queue_size}\n"
        "  }"
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(template: str, **values: object) -> str:
    """Fill a template and prove the result is a valid Triton ModelConfig."""
    text = string.Template((TEMPLATES / template).read_text()).substitute({k: str(v) for k, v in values.items()})
    parse(text)
    return text
