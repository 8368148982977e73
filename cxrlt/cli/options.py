"""Command-line options that several commands share, defined once."""

from __future__ import annotations

import argparse
from typing import Any


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
