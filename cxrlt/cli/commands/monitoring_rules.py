"""Write Prometheus drift rules for a repository: recording rules of the pipeline's metrics over
a window of images, its monitoring baseline as series, and the alerts (a finding's positive rate
out of its binomial band, Bonferroni over the 36 findings; the projection mix; the OOD refusal
rate and mean OOD score), as a rules file and a Kubernetes PrometheusRule (docs/monitoring.md).
Prometheus windows are time: the window is --window-images / --images-per-second seconds."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_repo_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.drift import DEFAULT_ALPHA, DEFAULT_IMAGES_PER_SECOND, DEFAULT_SCRAPE_INTERVAL_S, DEFAULT_WINDOW_IMAGES

    add_repo_argument(parser, "a repository with monitoring_baseline.json (written by `cxrlt operating-points`)", required=True)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for drift_rules.yml (and the PrometheusRule)")
    parser.add_argument("--manifest-dir", type=Path, metavar="DIR", help="folder for the PrometheusRule manifest (default: --out)")
    parser.add_argument("--window-images", type=int, default=DEFAULT_WINDOW_IMAGES,
                        help=f"images per window (default {DEFAULT_WINDOW_IMAGES}, chosen by the simulation in docs/monitoring.md)")
    parser.add_argument("--images-per-second", type=float, default=DEFAULT_IMAGES_PER_SECOND,
                        help=f"expected traffic, to size the window in time (default {DEFAULT_IMAGES_PER_SECOND:g})")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"false-alarm probability of one evaluation of one alert (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--scrape-interval-s", type=float, default=DEFAULT_SCRAPE_INTERVAL_S, metavar="SECONDS",
                        help=f"how often Prometheus scrapes Triton (default {DEFAULT_SCRAPE_INTERVAL_S:g}, the shipped "
                             "ServiceMonitor's): the bands count the images the scrapes inside a window span")
    parser.add_argument("--evaluation-interval", metavar="DURATION", help="the groups' evaluation interval (default: Prometheus's)")
    parser.add_argument("--release", type=int, metavar="N", help="the release whose baseline to use (default: the live one); "
                                                                   "regenerate the rules when another release goes live")
    parser.add_argument("--simulate", action="store_true", help="also print the simulated false alarms and images to alarm")


def run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console
    from cxrlt.contract.monitoring import load_baseline
    from cxrlt.contract.releases import files_of
    from evaluation.drift import simulate, window_seconds, write_rules

    baseline = load_baseline(files_of(args.repo, args.release))
    if baseline is None:
        console.print(f"{files_of(args.repo, args.release)} has no monitoring_baseline.json: run "
                      f"`cxrlt operating-points --repo {args.repo} ...` first")
        return 2
    if args.window_images < 2 or args.images_per_second <= 0 or not 0 < args.alpha < 1:
        console.print("--window-images must be >= 2, --images-per-second > 0 and --alpha in (0, 1)")
        return 2
    window_s = window_seconds(args.window_images, args.images_per_second)
    if not 0 < args.scrape_interval_s <= window_s / 2:
        console.print(f"a window of {window_s} s ({args.window_images} images at {args.images_per_second:g} images/s) must span "
                      f"at least two scrape intervals (--scrape-interval-s {args.scrape_interval_s:g}): raise --window-images "
                      "or scrape more often")
        return 2
    written = write_rules(baseline, args.out, args.window_images, args.images_per_second, args.alpha,
                          args.evaluation_interval, args.manifest_dir, source=f"the repository {args.repo.name}",
                          scrape_interval_s=args.scrape_interval_s)
    for path in written:
        console.print(f"wrote {path}")
    if args.simulate:
        for key, value in simulate(baseline, args.window_images, args.alpha).items():
            console.print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0
