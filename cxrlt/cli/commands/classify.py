"""Classify DICOM (or PNG) files against a running Triton server and write JSON, the challenge
submission CSV, or one DICOM SR per image.

Folders are searched recursively and every non-hidden file is tried (DICOM files often have
no extension). A file that cannot be classified is reported once, with its reason, and the
rest still run; the JSON output lists it as ``{"source": PATH, "error": REASON, "attempts":
N}`` after the results, and ``--format csv`` writes ``failures.csv`` (``path,reason``) next to
the challenge CSV. While the server answers UNAVAILABLE (overloaded or restarting) each
image is retried with backoff within ``--retries`` attempts and ``--deadline-s`` seconds; a
server that never answered (a wrong ``--url``) fails at once. ``--format sr`` gives each SR the
same deterministic UIDs the DICOM node and ``--dicomweb ... --store`` give it (derived from the
image's and the served repository's identity), so the same image is never filed twice.
Every output file is written under a temporary name and renamed into place, so a killed run
leaves only complete files. Exit status: 0 all files classified, 2 some failed, 1 nothing
could be done (server unreachable, no input files, bad options)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrlt.cli.options import add_option, add_send_size_argument, add_tls_arguments, tls_options
from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
from cxrlt.contract.served import FINDINGS_MODEL, PIPELINE_MODELS

FORMATS = ("json", "csv", "sr")
FAILURES_CSV = "failures.csv"  # next to the challenge CSV: path,reason of every input that failed
TASKS = {"all": ALL_LABELS, "task1": TASK1_LABELS, "task2": TASK2_LABELS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders (searched recursively)")
    parser.add_argument("--dicomweb", metavar="URL",
                        help="instead of files: classify the radiographs of --study from this DICOMweb service root "
                             "(e.g. http://pacs:8042/dicom-web); JSON output, one SR per image stored back with --store")
    parser.add_argument("--study", metavar="UID", help="with --dicomweb: the StudyInstanceUID to classify")
    parser.add_argument("--store", action="store_true", help="with --dicomweb: STOW-RS each image's SR back into its study")
    parser.add_argument("--dicomweb-credentials-file", type=Path, metavar="FILE",
                        help="file holding USER:PASSWORD for --dicomweb (HTTP basic auth; kept off the command line)")
    parser.add_argument("--url", default="127.0.0.1:8001", metavar="HOST:PORT", help="Triton gRPC endpoint")
    parser.add_argument("--format", default="json", choices=FORMATS,
                        help="json, the challenge csv, or sr (DICOM SR per image)")
    parser.add_argument("--out", help="output file (json, csv; '-' or absent: stdout) or directory (sr)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the JSON results (and failures) to PATH; with --format json, the output file")
    parser.add_argument("--by-study", action="store_true",
                        help="group DICOM images by StudyInstanceUID: per finding the mean over the study's frontal "
                             "images and over its lateral ones, then the mean of the two, called at the repository's "
                             "operating points; JSON gives one entry per study (its images inside), --format sr one "
                             "SR per study")
    parser.add_argument("--decisions-csv", type=Path, metavar="PATH",
                        help="also write the decisions at the repository's operating points: one row per image (per "
                             "study with --by-study): source, study/series/instance UIDs, projection, then 1/0 per "
                             "finding (empty: no operating point)")
    parser.add_argument("--task", default="all", choices=list(TASKS), help="findings to write: task1 (30), task2 (6) or all (36)")
    parser.add_argument("--model", default=FINDINGS_MODEL, choices=list(PIPELINE_MODELS),
                        help=f"served model to call ({FINDINGS_MODEL}: all 36)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--image-id", default="auto", choices=["auto", "name"],
                        help="auto: SOPInstanceUID for DICOM, file stem otherwise; name: the file name "
                             "(as in the challenge's ImageID column, e.g. 'x.png')")
    add_option(parser, "--timeout-s", "--timeout", type=float, default=60.0, metavar="S",
               help="seconds one attempt may take; never more than the time left in --deadline-s")
    parser.add_argument("--retries", type=int, default=8,
                        help="attempts in all per image while the server answers UNAVAILABLE (overloaded or "
                             "restarting), with exponential backoff and jitter between them (1: never "
                             "retry); retrying stops at --retries or --deadline-s, whichever comes first")
    parser.add_argument("--deadline-s", type=float, default=120.0, metavar="S",
                        help="seconds one image may take over all its attempts and backoff sleeps")
    parser.add_argument("--shared-memory", action="store_true",
                        help="send images through system shared memory instead of the gRPC message "
                             "(only with a server on this host)")
    add_send_size_argument(parser, "each image")
    add_tls_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import asyncio

    if args.dicomweb or args.study or args.store:
        return _backfill(args)
    if not args.paths:
        raise ValueError("give files or folders to classify, or --dicomweb URL --study UID")
    return asyncio.run(_run(args))


def _backfill(args: argparse.Namespace) -> int:
    """`--dicomweb URL --study UID [--store]`: the study's radiographs through the DICOM node's pipeline."""
    import asyncio
    import json

    from cxrlt.cli.console import console
    from cxrlt.io.atomic import write_text_atomic
    from cxrlt.node.backfill import backfill

    if not (args.dicomweb and args.study) or args.paths or args.format != "json":
        raise ValueError("DICOMweb backfill takes --dicomweb URL and --study UID, no paths, and writes JSON")
    entries = asyncio.run(backfill(args.dicomweb, args.study, args.url, store=args.store, tls=tls_options(args),
                                   credentials_file=args.dicomweb_credentials_file,
                                   timeout_s=args.timeout_s, retries=args.retries, deadline_s=args.deadline_s,
                                   concurrency=args.concurrency))
    text = json.dumps(entries, indent=2) + "\n"
    out = args.json or (args.out if args.out and args.out != "-" else None)
    if out:
        write_text_atomic(out, text)
    else:
        print(text, end="")
    failed = [e for e in entries if e.get("error")]
    stored = sum(1 for e in entries if e.get("stored"))
    console.print(f"{len(entries) - len(failed)} of {len(entries)} images of study {args.study} classified"
                  + (f", {stored} SRs stored" if args.store else ""), highlight=False)
    for entry in failed:
        console.print(f"[red]{entry.get('source', entry.get('image_id'))}: {entry['error']}", highlight=False)
    return 2 if failed else 0


# ----------------------------------------------------------------------------- inputs


def expand_paths(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to try (folders recursively, hidden files and folders skipped) and missing paths."""
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                relative = candidate.relative_to(path)
                if candidate.is_file() and not any(part.startswith(".") for part in relative.parts):
                    files.append(candidate)
        elif path.is_file():
            files.append(path)
        else:
            missing.append((path, "no such file or directory"))
    return list(dict.fromkeys(files)), missing


def _failed(console, path: Path, reason: str) -> None:
    from rich.markup import escape

    console.print(f"[red]FAILED[/] {escape(str(path))}: {escape(reason)}", soft_wrap=True, highlight=False)


def _error(message: str) -> int:
    """Print the run's one error line; the exit status 1."""
    from rich.markup import escape

    from cxrlt.cli.console import console

    console.print(f"[red]cxrlt classify: {escape(message)}", soft_wrap=True)
    return 1


def _reserve_sr_name(folder: Path, image_id: str, used: set[str]) -> str:
    """A file name for the SR of `image_id` that no other image of this run (or an older file) has."""
    stem = _safe_name(image_id)
    name, n = f"{stem}.SR.dcm", 1
    while name in used or (folder / name).exists():
        n += 1
        name = f"{stem}-{n}.SR.dcm"
    used.add(name)
    return name


def _safe_name(text: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text).strip("._")
    return cleaned[:150] or "image"


# ----------------------------------------------------------------------------- main


def _check_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the options (None: nothing); resolves --json into --out for --format json."""
    from cxrlt.client.sdk import MODEL_LABELS

    missing_labels = [label for label in TASKS[args.task] if label not in MODEL_LABELS[args.model]]
    if missing_labels:
        return (f"--task {args.task} needs findings that {args.model} does not return ({missing_labels[0]!r}, ...); "
                f"use --model {FINDINGS_MODEL} or a matching --task")
    if args.concurrency < 1 or args.retries < 1:
        return "--concurrency and --retries must be at least 1"
    if args.timeout_s <= 0 or args.deadline_s <= 0:
        return "--timeout-s and --deadline-s must be positive"
    if args.format == "json" and args.json is not None:
        if args.out not in (None, "-") and Path(args.out) != args.json:
            return "--format json writes one file: give --out or --json, not both"
        args.out = str(args.json)
    out = None if args.out in (None, "-") else Path(args.out)
    if args.format == "sr" and out is None:
        return "--format sr writes one file per image: give --out DIRECTORY"
    if args.format == "sr" and out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory"
    if args.by_study and args.format == "csv":
        return "--by-study has no challenge CSV (it is per image): use --format json or sr, and --decisions-csv"
    if args.format == "csv" and out is not None and out.name == FAILURES_CSV:
        return f"--out cannot be named {FAILURES_CSV}: the failures go there"
    return None


class _Batch:
    """One run's images through cxrlt.client.workflow.classify_image, each outcome kept by path."""

    def __init__(self, args: argparse.Namespace, client, progress) -> None:
        import asyncio

        self.args, self.client, self.progress = args, client, progress
        self.semaphore = asyncio.Semaphore(args.concurrency)
        self.unavailable: list[str] = []  # once the server is gone (not merely overloaded), stop sending
        self.outcomes: dict[Path, tuple] = {}  # path -> (result or None, failure reason or None, attempts)
        self.sr_names: set[str] = set()
        self.headers: dict[Path, object] = {}  # --by-study --format sr: each image's header (no pixels)

    def fail(self, path: Path, reason: str, attempts: int = 0) -> None:
        self.outcomes[path] = (None, reason, attempts)
        _failed(self.progress.console, path, reason)

    async def one(self, path: Path, task) -> None:
        import asyncio

        from cxrlt.client.workflow import ClassifyFailure, classify_image, reason
        from cxrlt.io.images import header_only
        from cxrlt.io.reports import save_sr

        async with self.semaphore:
            try:
                if self.unavailable:
                    self.fail(path, f"not sent: {self.unavailable[0]}")
                    return
                try:
                    done = await classify_image(self.client, path, labels=TASKS[self.args.task],
                                                sr=self.args.format == "sr" and not self.args.by_study,
                                                image_id=path.name if self.args.image_id == "name" else None)
                except ClassifyFailure as exc:
                    if exc.kind == ClassifyFailure.UNAVAILABLE:
                        self.unavailable.append(f"the server at {self.args.url} became unavailable")
                    self.fail(path, exc.reason, exc.attempts)
                    return
                result = done.result
                if self.args.by_study and self.args.format == "sr" and done.dataset is not None:
                    self.headers[path] = header_only(done.dataset)
                if done.sr is not None:  # write now: holding every dataset (pixels included) would not scale
                    name = _reserve_sr_name(Path(self.args.out), result.image_id, self.sr_names)
                    try:
                        await asyncio.to_thread(save_sr, done.sr, Path(self.args.out) / name)
                    except Exception as exc:
                        self.fail(path, f"could not write the SR: {reason(path, exc)}", result.attempts)
                        return
                self.outcomes[path] = (result, None, result.attempts)
            finally:
                self.progress.advance(task)


async def _classify_all(args: argparse.Namespace, files: list[Path]) -> tuple[dict[Path, tuple], list[str], object, dict] | int:
    """Every file classified (outcomes by path, 'unavailable' notes, the served ModelInfo, the headers kept for
    study SRs), or an exit status."""
    import asyncio

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from cxrlt.cli.console import console
    from cxrlt.client.sdk import AsyncCxrltClient, ClientError

    async with AsyncCxrltClient(args.url, timeout_s=args.timeout_s, retries=args.retries, deadline_s=args.deadline_s,
                                model=args.model, **tls_options(args), shared_memory=args.shared_memory,
                                send_size=args.send_size) as client:
        try:
            info = await client.model_info()
        except ClientError as exc:
            return _error(str(exc))
        if args.format == "sr":
            try:
                Path(args.out).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return _error(f"cannot create {args.out}: {exc}")
        with Progress(
            SpinnerColumn(), TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=True, disable=len(files) < 2 or not console.is_terminal,
        ) as progress:
            batch = _Batch(args, client, progress)
            task = progress.add_task("classify", total=len(files))
            await asyncio.gather(*(batch.one(path, task) for path in files))
    return batch.outcomes, batch.unavailable, info, batch.headers


async def _run(args: argparse.Namespace) -> int:
    from cxrlt.cli.console import console

    problem = _check_options(args)
    if problem is not None:
        return _error(problem)
    files, missing = expand_paths(args.paths)
    failures = [(path, reason, 0) for path, reason in missing]  # (path, reason, attempts)
    for path, reason, _ in failures:
        _failed(console, path, reason)
    if not files:
        return _error("no input files found in " + ", ".join(str(p) for p in args.paths))
    classified = await _classify_all(args, files)
    if isinstance(classified, int):
        return classified
    outcomes, unavailable, info, headers = classified
    done = [(path, outcomes[path][0]) for path in files if outcomes[path][0] is not None]
    failures += [(path, *outcomes[path][1:]) for path in files if outcomes[path][0] is None]
    studies = _studies(done, info) if args.by_study else []
    if args.by_study and args.format == "sr" and not await _write_study_srs(args, studies, headers, info):
        return 1
    where = _write_outputs(args, done, failures, studies)
    if where is None:
        return 1
    return _summary(args, done, failures, where, unavailable, info.random_weights)


# ----------------------------------------------------------------------------- outputs, in input order


def _studies(done: list, info) -> list:
    """The StudyResults of the DICOM images in ``done``, in input order of their first image."""
    from cxrlt.contract.study import aggregate_study, group_by_study

    return [aggregate_study(images, info.operating_points) for images in group_by_study(r for _, r in done).values()]


async def _write_study_srs(args: argparse.Namespace, studies: list, headers: dict, info) -> bool:
    """--by-study --format sr: one SR per study into --out (False after an error, which was printed)."""
    import asyncio

    from cxrlt.client.workflow import build_study_report
    from cxrlt.io.reports import save_sr

    used: set[str] = set()
    for study in studies:
        sources = [headers[Path(image.source)] for image in study.images]
        try:
            report = await asyncio.to_thread(build_study_report, list(study.images), sources, info.repository,
                                             info.operating_points)
            name = _reserve_sr_name(Path(args.out), f"study-{study.study_instance_uid}", used)
            await asyncio.to_thread(save_sr, report, Path(args.out) / name)
        except Exception as exc:
            _error(f"could not write the study SR of {study.study_instance_uid}: {type(exc).__name__}: {exc}")
            return False
    return True


def _json_text(done: list, failures: list, studies: list = ()) -> str:
    """The results (by study, with --by-study), then one {"source", "error", "attempts"} entry per failure."""
    import json

    in_studies = {id(image) for study in studies for image in study.images}
    entries = [study.to_dict() for study in studies]
    entries += [{**result.to_dict(), "source": str(path)} for path, result in done if id(result) not in in_studies]
    entries += [{"source": str(path), "error": reason, "attempts": attempts} for path, reason, attempts in failures]
    return json.dumps(entries, indent=2) + "\n"


def _write_outputs(args: argparse.Namespace, done: list, failures: list, studies: list = ()) -> str | None:
    """Write JSON / CSV (and --json); where the failures are listed ('' if nowhere), None after an error."""
    import sys
    from collections import Counter

    from cxrlt.cli.console import console
    from cxrlt.io.atomic import write_text_atomic
    from cxrlt.io.reports import challenge_csv, failures_csv

    counts = Counter(result.image_id for _, result in done)
    duplicates = sorted(image_id for image_id, n in counts.items() if n > 1)
    if duplicates and args.format == "csv":
        console.print(f"[yellow]warning:[/] {len(duplicates)} ImageID(s) appear more than once in the CSV "
                      f"(e.g. {duplicates[0]!r}); the challenge expects one row per image")
    out = None if args.out in (None, "-") else Path(args.out)
    files: list[tuple[Path, str]] = []  # (path, text), written in this order; all but a challenge CSV list the failures
    if args.format in ("json", "csv"):
        text = _json_text(done, failures, studies) if args.format == "json" else challenge_csv([r for _, r in done], args.task)
        if out is None:
            sys.stdout.write(text.replace("\r\n", "\n"))
            sys.stdout.flush()
        else:
            files.append((out, text))
    if args.format == "csv" and out is not None:  # always written: no stale list from an older run
        files.append((out.parent / FAILURES_CSV, failures_csv([(path, reason) for path, reason, _ in failures])))
    if args.json is not None and args.format != "json":
        files.append((args.json, _json_text(done, failures, studies)))
    if args.decisions_csv is not None:
        from cxrlt.io.reports import decisions_csv

        files.append((args.decisions_csv, decisions_csv(studies if args.by_study else [r for _, r in done])))
    for path, text in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
        except OSError as exc:
            _error(f"could not write {path}: {exc}")
            return None
    listed = [path for path, _ in files if not (args.format == "csv" and path == out)]
    return f"; also in {listed[0]}" if failures and listed else ""


def _summary(args: argparse.Namespace, done: list, failures: list, where: str, unavailable: list[str],
             random_weights: bool) -> int:
    """The summary lines (each failure was printed once, as it happened) and the exit status."""
    from rich.markup import escape

    from cxrlt.cli.console import console, warn_random_weights
    from cxrlt.io.reports import NOT_FOR_CLINICAL_USE

    total = len(done) + len(failures)
    target = "" if args.out in (None, "-") else f" -> {args.out}"
    console.print(f"classified {len(done)} of {total} file{'s' if total != 1 else ''} with {args.model} at "
                  f"{escape(args.url)}{escape(target)}", soft_wrap=True, highlight=False)
    attempts = [result.attempts for _, result in done] + [n for _, _, n in failures]
    retried = [n for n in attempts if n > 1]
    if retried:
        console.print(f"retries: {len(retried)} of {total} image{'s' if total != 1 else ''} needed more than one "
                      f"attempt (at most {max(retried)}; the server was overloaded or restarting)", highlight=False)
    else:
        console.print("retries: none needed", highlight=False)
    if failures:
        console.print(f"[red]{len(failures)} failed[/] (reasons above{escape(where)})", soft_wrap=True, highlight=False)
    if random_weights and done:
        warn_random_weights(NOT_FOR_CLINICAL_USE)
    if not done and unavailable:
        console.print(f"[red]nothing classified: the server at {escape(args.url)} is unavailable; "
                      "start one with `cxrlt serve --repo DIR`")
        return 1
    return 2 if failures else 0
