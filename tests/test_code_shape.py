"""The code's shape, kept: no product function over 80 lines, each served model name spelled once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("cxrlt", "python_backends", "triton_models", "networks", "training", "exporters", "evaluation", "loadtest")
MAX_FUNCTION_LINES = 80
SERVED_NAMES = re.compile(r"""["'](cxr_classifier|cxr_zeroshot|cxr_findings|projection_router|clip_image_encoder)["']""")


def product_files() -> list[Path]:
    return sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py"))


def test_no_product_function_is_over_80_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in product_files() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_served_model_names_come_from_the_contract():
    served = ROOT / "cxrlt" / "contract" / "served.py"
    literals = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in product_files() if path != served
                for n, line in enumerate(path.read_text().splitlines(), 1)
                if SERVED_NAMES.search(line) and not line.lstrip().startswith("#")]
    assert not literals, "use the names in cxrlt.contract.served:\n" + "\n".join(literals)
