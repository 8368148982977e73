"""The `cxrlt` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cxrlt.cli.options import HelpFormatter

# subcommand -> (module under cxrlt.cli.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build-repo": ("build_repo", "export every network to ONNX and write a Triton model repository"),
    "build-text-cache": ("text_cache", "re-encode the zero-shot prompts of a built repository (no ONNX re-export)"),
    "serve": ("serve", "run the embedded tritonserver on a model repository"),
    "local-cluster": ("local_cluster", "N replicas behind nginx (gRPC) with Prometheus and the HPA's recording rule, on loopback"),
    "health": ("health", "deep readiness check: every model ready and a tiny real inference through each (exit 0/1)"),
    "classify": ("classify", "classify DICOM/PNG files on a running server: JSON, challenge CSV or DICOM SR"),
    "dicom-node": ("dicom_node", "DICOM Storage SCP: spool received chest radiographs, classify them, store one SR per image back"),
    "demo": ("demo", "build the tiny repository, serve it and classify a real chest X-ray end to end"),
    "loadtest": ("loadtest", "load-test a running server with locust over gRPC and check throughput/latency targets"),
    "bench": ("bench", "served pipeline vs the same pipeline in process (onnxruntime): images/s and latency per concurrency"),
    "soak": ("soak", "many requests against one server: RSS, fds and /dev/shm of its process tree sampled, growth after warm-up judged"),
    "stress": ("stress", "overload test: saturation, then N x that rate; rejections, goodput, correctness, recovery"),
    "synth-data": ("synth_data", "write a synthetic, long-tailed CXR-like data set (16-bit PNGs + labels.csv)"),
    "prepare-data": ("prepare_data", "resize every image of a label CSV once into the cache training reads (uint16, process pool, resumable)"),
    "train": ("train", "train networks from recipe YAMLs into <served model name>.pt checkpoints"),
    "evaluate": ("evaluate", "mAP/mAUC/mF1/mECE of the served pipeline (server, repository or checkpoints) on labelled images"),
    "tune-weights": ("tune_weights", "grid-search the per-projection ensemble weights on validation data into a repository"),
    "operating-points": ("operating_points", "choose per-finding decision thresholds and calibration on validation data into a repository"),
    "monitoring-rules": ("monitoring_rules", "write Prometheus drift rules (recording, alerts, PrometheusRule) from a repository's monitoring baseline"),
    "monitor": ("monitor", "drift status per finding from Prometheus's drift rules; exit 1 while an alert fires"),
    "release": ("release", "releases of a repository: list, shadow, canary, promote, rollback, report, prune"),
    "zeroshot-proxy": ("zeroshot_proxy", "leak-free proxy validation of zero-shot fine-tuning (held-out seen classes)"),
}


# Top-level modules of the optional dependencies -> the extra that installs them.
EXTRA_OF_MODULE: dict[str, str] = {
    "tritonclient": "client", "pydicom": "client", "highdicom": "client", "pylibjpeg": "client",
    "openjpeg": "client", "pandas": "client", "grpc": "client", "pynetdicom": "client", "dicomweb_client": "client",
    "prometheus_client": "client",
    "pytriton": "serve", "onnxruntime": "serve",
    "torch": "export", "torchvision": "export", "timm": "export", "open_clip": "export", "onnx": "export",
    "onnxscript": "export",
    "sklearn": "train", "skimage": "train",
    "locust": "loadtest", "matplotlib": "loadtest",
    "pydicom_data": "all",
}


# Each extra with the extras it installs (pyproject.toml's [project.optional-dependencies]).
EXTRA_INCLUDES: dict[str, frozenset[str]] = {
    "client": frozenset({"client"}),
    "serve": frozenset({"serve"}),
    "export": frozenset({"export", "client", "serve"}),
    "train": frozenset({"train", "export", "client", "serve"}),
    "loadtest": frozenset({"loadtest", "client"}),
    "all": frozenset({"all", "train", "export", "client", "serve", "loadtest"}),
}

# The extra a command needs as a whole (README's install line for it); commands that need
# several extras without one that holds them all are left out and get the module's extra.
EXTRA_OF_COMMAND: dict[str, str] = {
    "build-repo": "export", "build-text-cache": "export", "serve": "serve", "local-cluster": "serve",
    "health": "client", "classify": "client", "dicom-node": "client", "release": "client", "demo": "all", "loadtest": "loadtest",
    "synth-data": "train", "train": "train", "prepare-data": "train", "zeroshot-proxy": "train",
}


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> str | None:
    """'pip install ...' advice when `exc` is an optional dependency of this project, else None.

    The extra named is the command's own when that one installs the missing module (`cxrlt train`
    without torch asks for [train], which brings torch with the rest of what training needs),
    else the extra of the missing module.
    """
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    wanted = EXTRA_OF_COMMAND.get(command or "")
    if wanted is not None and extra in EXTRA_INCLUDES[wanted]:
        extra = wanted
    return f"it needs the '{extra}' extra ({exc.name} is not installed): pip install 'cxrlt-triton[{extra}]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrlt", description="CXR-LT 2026 chest X-ray findings on Triton Inference Server",
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"cxrlt.cli.commands.{module_name}")
        command = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                 formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for users; -v shows the traceback
        if args.verbose:
            raise
        advice = missing_extra(exc, args.command) if isinstance(exc, ModuleNotFoundError) else None
        print(f"cxrlt {args.command}: error: {advice or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
