"""Rendering `config.pbtxt` files from the checked-in templates in triton_models/."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Mapping

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

TEMPLATES = Path(__file__).resolve().parent.parent / "triton_models"


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


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(path: Path | str) -> model_config_pb2.ModelConfig:
    return parse(Path(path).read_text())


def config_parameters(path: Path | str) -> dict[str, str]:
    return {key: value.string_value for key, value in read_config(path).parameters.items()}


def set_config_parameters(path: Path | str, updates: Mapping[str, str]) -> None:
    """Change string parameters of a written config in place (e.g. tuned ensemble weights)."""
    path = Path(path)
    config = read_config(path)
    for key, value in updates.items():
        config.parameters[key].string_value = value
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    path.write_text(header + text_format.MessageToString(config))
