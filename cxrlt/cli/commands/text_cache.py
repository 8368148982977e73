"""Re-encode the zero-shot prompts of a built repository with its own CLIP text tower and
rewrite the cached text tensor. No ONNX is re-exported; reload cxr_zeroshot (or restart
the server) to serve the new prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_repo_argument(parser, "a repository written by `cxrlt build-repo`", required=True)
    parser.add_argument("--prompts", type=Path, help="a new prompt file (default: the repository's cxr_zeroshot/1/prompts.yaml)")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console
    from exporters.build_repo import rebuild_text_cache

    record = rebuild_text_cache(args.repo, args.prompts)
    console.print(f"text cache rebuilt for {len(record['prompts_per_class'])} classes "
                  f"(prompts {record['prompts_sha256'][:12]}, weights {record['weights_sha256'][:12]})")
    return 0
