"""Rendering `config.pbtxt` files from the templates shipped in the `triton_models` package."""

from __future__ import annotations

import string
from pathlib import Path
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


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(template: str, **values: object) -> str:
    """Fill a template and prove the result is a valid Triton ModelConfig."""
    text = string.Template((TEMPLATES / template).read_text()).substitute({k: str(v) for k, v in values.items()})
    parse(text)
    return text
