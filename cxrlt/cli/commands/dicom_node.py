"""Run a DICOM Storage SCP that has chest radiographs classified and sends one SR per image back.

The PACS (or a modality) C-STOREs images to this AE title. Each instance is written to the
spool folder (fsync, then rename) before the C-STORE is answered; a pool of workers
classifies it on the Triton server (`--url`), builds the TID 1500 SR in the source image's
study and sends it to `--destination` by C-STORE (or to `--stow-url` by STOW-RS). The spool
entry is removed only when the destination has accepted the SR. While the server or the
destination is unavailable, entries stay spooled and are retried with backoff; a restarted
node replays its spool. Images that cannot be classified (bad pixel data, not a chest
radiograph) go to SPOOL/rejected/ with a .reason.txt beside them. SRs, presentation states
and other objects without pixels are acknowledged and ignored, so the node's own SRs never
loop back; the SR's SOPInstanceUID is derived from the image's and the served repository's,
so a re-sent image yields the same SR. One log line per instance, no patient identifiers;
counters on http://HOST:METRICS-PORT/metrics. SIGTERM stops it cleanly."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_option, add_tls_arguments, tls_options
from cxrlt.node import CHEST_BODY_PARTS
from cxrlt.node.studies import DEFAULT_STUDY_SR, STUDY_SR_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ae-title", default="CXRLT", help="this node's AE title; associations "
                        "addressed to another called AE title are refused")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the DICOM port and the metrics listen on (default: loopback only)")
    add_option(parser, "--dicom-port", "--port", type=int, default=11112, metavar="N", help="the DICOM port this node listens on")
    parser.add_argument("--url", default="127.0.0.1:8001", metavar="HOST:PORT", help="Triton gRPC endpoint")
    parser.add_argument("--destination", metavar="AE@HOST:PORT",
                        help="where the SRs go by C-STORE, e.g. PACS@10.0.0.5:104 (the calling AE title is --ae-title)")
    parser.add_argument("--stow-url", metavar="URL",
                        help="send the SRs by STOW-RS to this DICOMweb service root instead (e.g. http://pacs:8042/dicom-web)")
    parser.add_argument("--stow-credentials-file", type=Path, metavar="FILE",
                        help="file holding USER:PASSWORD for --stow-url (HTTP basic auth; kept off the command line)")
    parser.add_argument("--spool", required=True, type=Path, metavar="DIR",
                        help="spool folder: incoming/ (waiting), rejected/ (with reasons); keep it on a durable disk")
    parser.add_argument("--workers", type=int, default=2, help="images classified and sent at once")
    parser.add_argument("--metrics-port", type=int, default=9102,
                        help="Prometheus metrics on http://HOST:PORT/metrics (default 9102; 0: off)")
    add_option(parser, "--timeout-s", "--timeout", type=float, default=60.0, metavar="S",
               help="seconds one inference attempt may take")
    parser.add_argument("--retries", type=int, default=3,
                        help="attempts per classification while the server answers UNAVAILABLE, before the image "
                             "is put back in the spool for a later retry")
    parser.add_argument("--deadline-s", type=float, default=60.0,
                        metavar="S", help="seconds one classification may take over all its attempts")
    parser.add_argument("--max-backoff-s", type=float, default=60.0,
                        help="longest wait before a spooled image is tried again (default 60; the wait starts at "
                             "1 s and doubles)")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="on SIGTERM, seconds for associations and images in flight to finish (default 10); "
                             "what does not finish stays spooled")
    parser.add_argument("--body-parts", default=",".join(CHEST_BODY_PARTS),
                        help="BodyPartExamined values taken as chest, comma-separated, matched as substrings "
                             "(an empty BodyPartExamined is accepted; default %(default)s)")
    parser.add_argument("--study-sr", default=DEFAULT_STUDY_SR, choices=STUDY_SR_MODES,
                        help="also: one SR per image and one per study once it is quiet (default); only: one SR per "
                             "study; off: per image only. The study SR combines the frontal and lateral images")
    parser.add_argument("--study-quiet-s", type=float, default=30.0, metavar="S",
                        help="a study is reported once no image of it has arrived for S seconds (default 30)")
    add_tls_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from cxrlt.node.destinations import CStoreDestination, StowDestination, parse_ae_address
    from cxrlt.node.node import DicomNode, NodeConfig

    if (args.destination is None) == (args.stow_url is None):
        print("cxrlt dicom-node: error: give exactly one of --destination AE@HOST:PORT and --stow-url URL",
              file=sys.stderr)
        return 1
    if (args.workers < 1 or args.retries < 1 or args.timeout_s <= 0 or args.deadline_s <= 0 or args.max_backoff_s <= 0
            or args.study_quiet_s <= 0):
        print("cxrlt dicom-node: error: --workers and --retries must be at least 1, the times positive", file=sys.stderr)
        return 1
    destination = (CStoreDestination(parse_ae_address(args.destination), args.ae_title) if args.destination
                   else StowDestination(args.stow_url, args.stow_credentials_file))
    body_parts = tuple(term.strip().upper() for term in args.body_parts.split(",") if term.strip())
    config = NodeConfig(
        ae_title=args.ae_title, spool=args.spool, destination=destination, url=args.url, host=args.host,
        port=args.dicom_port, workers=args.workers, metrics_port=args.metrics_port or None, tls=tls_options(args),
        timeout_s=args.timeout_s, retries=args.retries, deadline_s=args.deadline_s, max_backoff_s=args.max_backoff_s,
        grace_s=args.grace_s, body_parts=body_parts, study_sr=args.study_sr, study_quiet_s=args.study_quiet_s,
    )
    # One line per instance on stderr, with a timestamp; pynetdicom's own chatter stays at warnings.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    node_log = logging.getLogger("cxrlt.node")
    node_log.addHandler(handler)
    node_log.setLevel(logging.INFO)
    node_log.propagate = False

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await DicomNode(config).run(stop)

    asyncio.run(main())
    return 0
