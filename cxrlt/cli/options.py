"""Command-line options that several commands share, defined once, and the one vocabulary
of option names every `cxrlt` subcommand uses (VOCABULARY; docs/cli.md shows it).

Old names stay accepted for one release as hidden aliases of the same option
(`add_option(parser, "--repo", "--out", ...)`); `--help` shows only the new name, with the
default (`HelpFormatter`, which `cxrlt.cli.main` gives every subcommand).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Callable

# option -> what it means in every subcommand that has it
VOCABULARY: dict[str, str] = {
    "--repo DIR": "a Triton model repository: read, served, or (build-repo) written",
    "--url HOST:PORT": "the gRPC endpoint of a running server",
    "--grpc-port N": "the gRPC port this command listens on (the one clients use)",
    "--timeout-s S": "seconds one request (one call, one attempt) may take",
    "--ready-timeout-s S": "seconds to wait for a started server to become ready",
    "--duration-s S": "how long a run lasts",
    "--json PATH": "where a JSON report is written",
    "--format FORMAT": "the format of what is printed or written (json, csv, ...)",
    "--out PATH": "where the command's other output goes (a file or folder, as its help says); never a model repository",
    "--hints / --no-hints": "send (or route by) the images' DICOM projection hints, or let the router decide",
    "--engine {onnxruntime,torch}": "what runs the networks: onnxruntime on the ONNX files, or PyTorch",
    "--profile {tiny,paper}": "network sizes",
    "--checkpoints DIR": "a folder of trained <model>.pt checkpoints",
}

# The networks' runtimes, by one name everywhere (build-repo, evaluate, tune-weights).
ENGINES = ("onnxruntime", "torch")
# Old engine names, still accepted: build-repo's 'torchscript' is the torch engine.
ENGINE_ALIASES = {"torchscript": "torch"}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default and hides the old names of renamed options.

    A default is appended as "(default: X)" unless the help already mentions a default or the
    default is empty (None, False, an empty list); options without help get one that names it.
    """

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if getattr(action, "hidden_aliases", ()):
            action = copy.copy(action)
            action.option_strings = visible_options(action)
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "default" not in text.lower():
            text = f"{text} (default: %(default)s)".strip()
        return text


def visible_options(action: argparse.Action) -> list[str]:
    """The option strings --help shows for `action` (its hidden old names left out)."""
    hidden = getattr(action, "hidden_aliases", ())
    return [o for o in action.option_strings if o not in hidden]


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS or default == [] or default == "":
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *old_names: str,
               **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(name, *old_names, **kwargs)` with the old names hidden from --help.

    The old names are the same option (same dest, type, default): scripts that use them keep
    working for one release, and `cxrlt.cli.reference` lists them as deprecated aliases.
    """
    action = parser.add_argument(name, *old_names, **kwargs)
    action.hidden_aliases = tuple(old_names)  # type: ignore[attr-defined]
    return action


def add_repo_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str, *old_names: str,
                      **kwargs: Any) -> argparse.Action:
    """`--repo DIR`: a model repository."""
    return add_option(parser, "--repo", *old_names, type=Path, metavar="DIR", help=help, **kwargs)


def add_hints_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: bool, help: str) -> argparse.Action:
    """`--hints/--no-hints` (dest `hints`): whether the DICOM projection hint is sent / routes the image."""
    return parser.add_argument("--hints", action=argparse.BooleanOptionalAction, default=default, help=help)


def engine(value: str) -> str:
    """argparse type of --engine: one of ENGINES, with the old names mapped onto them."""
    return ENGINE_ALIASES.get(value, value)


def add_engine_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str, help: str) -> argparse.Action:
    """`--engine {onnxruntime,torch}`."""
    return parser.add_argument("--engine", type=engine, default=default, choices=ENGINES, help=help)


def add_report_arguments(parser: argparse.ArgumentParser, name: str, plot_help: str) -> None:
    """--out / --json / --plot of a measuring command (bench, stress, soak)."""
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default runs/{name}-<time>)")
    parser.add_argument("--json", type=Path, metavar="PATH", help=f"report JSON (default OUT/{name}.json)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help=f"{plot_help} (default OUT/{name}.png)")


def report_folder(args: argparse.Namespace, name: str) -> Path:
    """--out, or runs/<name>-<time>."""
    return args.out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")


def write_report(report: dict[str, Any], args: argparse.Namespace, out: Path, name: str,
                 plot: Callable[[dict[str, Any], Path], None]) -> None:
    """Write a measuring command's plot and JSON (--json / --plot, else OUT/<name>.json|png)."""
    from loadtest.kernel import write_json

    json_path = args.json or out / f"{name}.json"
    png_path = args.plot or out / f"{name}.png"
    report["files"] = {"json": str(json_path), "plot": str(png_path)}
    plot(report, png_path)
    write_json(report, json_path)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Client-side TLS options (matching `cxrlt serve --tls-cert/--tls-key/--tls-client-ca`)."""
    group = parser.add_argument_group("TLS (a server started with --tls-cert)")
    group.add_argument("--ssl", action="store_true", help="use TLS (implied by the options below)")
    group.add_argument("--root-certificates", help="PEM file of the CA that signed the server's certificate")
    group.add_argument("--private-key", help="PEM file of the client's private key (mutual TLS)")
    group.add_argument("--certificate-chain", help="PEM file of the client's certificate chain (mutual TLS)")


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TLS keyword arguments of CxrltClient / tritonclient's gRPC client."""
    files = {"root_certificates": args.root_certificates, "private_key": args.private_key,
             "certificate_chain": args.certificate_chain}
    if (files["private_key"] is None) != (files["certificate_chain"] is None):
        raise ValueError("mutual TLS needs both --private-key and --certificate-chain")
    return {"ssl": bool(args.ssl or any(files.values())), **files}


def add_send_size_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """`--send-size [N]`: downscale images before sending (cxrlt.client.CxrltClient's send_size)."""
    from cxrlt.contract.served import SEND_SIZE_SERVED

    def send_size(value: str) -> int | str:
        if value == SEND_SIZE_SERVED:
            return value
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--send-size takes a number of pixels or {SEND_SIZE_SERVED!r}, not {value!r}") from None

    parser.add_argument("--send-size", nargs="?", const=SEND_SIZE_SERVED, default=None, metavar="N", type=send_size,
                        help=f"downscale {what} to at most N pixels on its long side before sending, with the server's own "
                             "resampling (less to send to a remote server); without N (put it after positional arguments, "
                             f"or write --send-size={SEND_SIZE_SERVED}): the largest input size of the served networks")
