"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable


def add_report_arguments(parser: argparse.ArgumentParser, name: str, plot_help: str) -> None:
    """--out / --json / --plot of a measuring command (bench, stress, soak)."""
    parser.add_argument("--out", type=Path, help=f"output directory (default runs/{name}-<time>)")
    parser.add_argument("--json", type=Path, help=f"report JSON (default OUT/{name}.json)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help=f"{plot_help} (default OUT/{name}.png)")


def report_folder(args: argparse.Namespace, name: str) -> Path:
    """--out, or runs/<name>-<time>."""
    return args.out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")


def write_report(report: dict[str, Any], args: argparse.Namespace, out: Path, name: str,
                 plot: Callable[[dict[str, Any], Path], None]) -> None:
    """Write a measuring command's plot and JSON (--json / --plot, else OUT/<name>.json|png)."""
    from loadtest.bench import write_json

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
