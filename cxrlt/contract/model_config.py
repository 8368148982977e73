"""Reading and editing a written `config.pbtxt` (Triton's ModelConfig text format).

The protobuf schema comes from tritonclient (the `client` extra); it is imported only when
a config is read, so the Triton stubs, which get their config as JSON, never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def _schema():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ImportError("reading config.pbtxt needs tritonclient: pip install 'cxrlt-triton[client]'") from None
    return text_format, model_config_pb2


def parse(text: str):
    """A Triton `ModelConfig` message from config.pbtxt text (raises on invalid text)."""
    text_format, model_config_pb2 = _schema()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_config(path: Path | str):
    return parse(Path(path).read_text())


def config_parameters(path: Path | str) -> dict[str, str]:
    return {key: value.string_value for key, value in read_config(path).parameters.items()}


def set_config_parameters(path: Path | str, updates: Mapping[str, str]) -> None:
    """Change string parameters of a written config in place (e.g. tuned ensemble weights)."""
    text_format, _ = _schema()
    path = Path(path)
    config = read_config(path)
    for key, value in updates.items():
        config.parameters[key].string_value = value
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    path.write_text(header + text_format.MessageToString(config))
