"""Check that a server really serves: every model ready and a tiny real inference through every
network and through cxr_findings for both projections. Exit 0 when ready, 1 when not: usable
as a Kubernetes readiness probe (`exec: cxrlt health --url 127.0.0.1:8001`), unlike
/v2/health/ready, which stays 200 after a Python-backend stub has died."""

from __future__ import annotations

import argparse

from cxrlt.cli.options import add_tls_arguments, tls_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address (default 127.0.0.1:8001)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="budget of each call (default 10 s)")
    parser.add_argument("--format", default="text", choices=["text", "json"], help="how the report is printed")
    # old name of --format json, kept for one release (--json takes a path in every other command)
    parser.add_argument("--json", dest="format", action="store_const", const="json", help=argparse.SUPPRESS)
    add_tls_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from cxrlt.client.health import check_health

    report = check_health(args.url, timeout_s=args.timeout_s, tls=tls_options(args))
    if args.format == "json":
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.ready else 1
