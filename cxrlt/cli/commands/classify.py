"""Classify DICOM (or PNG) files against a running Triton server and write JSON, the challenge
submission CSV, or one DICOM SR per image.

Folders are searched recursively and every non-hidden file is tried (DICOM files often have
no extension). A file that cannot be classified is reported once, with its reason, and the
rest still run; the JSON output lists it as ``{"source": PATH, "error": REASON, "attempts":
N}`` after the results, and ``--format csv`` writes ``failures.csv`` (``path,reason``) next to
the challenge CSV. While the server answers UNAVAILABLE (overloaded or restarting) each
image is retried with backoff within ``--retries`` attempts and ``--deadline-s`` seconds.
Every output file is written under a temporary name and renamed into place, so a killed run
leaves only complete files. Exit status: 0 all files classified, 2 some failed, 1 nothing
could be done (server unreachable, no input files, bad options)."""

from __future__ import annotations

import argparse

from cxrlt.cli.options import add_send_size_argument, add_tls_arguments, tls_options
from pathlib import Path

FORMATS = ("json", "csv", "sr")
FAILURES_CSV = "failures.csv"  # next to the challenge CSV: path,reason of every input that failed
TASKS = ("all", "task1", "task2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders (searched recursively)")
    parser.add_argument("--dicomweb", metavar="URL",
                        help="instead of files: classify the radiographs of --study from this DICOMweb service root "
                             "(e.g. http://pacs:8042/dicom-web); JSON output, one SR per image stored back with --store")
    parser.add_argument("--study", metavar="UID", help="with --dicomweb: the StudyInstanceUID to classify")
    parser.add_argument("--store", action="store_true", help="with --dicomweb: STOW-RS each image's SR back into its study")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint HOST:PORT (default 127.0.0.1:8001)")
    parser.add_argument("--format", default="json", choices=FORMATS, help="json (default), the challenge csv, or sr (DICOM SR per image)")
    parser.add_argument("--out", help="output file (json, csv; '-' or absent: stdout) or directory (sr)")
    parser.add_argument("--task", default="all", choices=TASKS, help="findings to write: task1 (30), task2 (6) or all (36)")
    parser.add_argument("--model", default="cxr_findings", choices=["cxr_findings", "cxr_classifier", "cxr_zeroshot"],
                        help="served model to call (default cxr_findings: all 36)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--image-id", default="auto", choices=["auto", "name"],
                        help="auto: SOPInstanceUID for DICOM, file stem otherwise; name: the file name "
                             "(as in the challenge's ImageID column, e.g. 'x.png')")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds one attempt may take (default 60); never more than the time left in --deadline-s")
    parser.add_argument("--retries", type=int, default=8,
                        help="attempts in all per image while the server answers UNAVAILABLE (overloaded or "
                             "restarting), with exponential backoff and jitter between them (default 8; 1: never "
                             "retry); retrying stops at --retries or --deadline-s, whichever comes first")
    parser.add_argument("--deadline-s", type=float, default=120.0,
                        help="seconds one image may take over all its attempts and backoff sleeps (default 120)")
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
                                   timeout_s=args.timeout, retries=args.retries, deadline_s=args.deadline_s,
                                   concurrency=args.concurrency))
    text = json.dumps(entries, indent=2) + "\n"
    if args.out and args.out != "-":
        write_text_atomic(args.out, text)
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


def _reason(path: Path, exc: BaseException) -> str:
    """The error's message without a leading 'PATH: ' (the summary names the file already)."""
    message = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _failed(console, path: Path, reason: str) -> None:
    from rich.markup import escape

    console.print(f"[red]FAILED[/] {escape(str(path))}: {escape(reason)}", soft_wrap=True, highlight=False)


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


async def _run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import json
    import sys
    from collections import Counter

    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cxrlt.client.sdk import (MODEL_LABELS, AsyncCxrltClient, ClientError, RequestTimeout, ServerOverloaded,
                                  ServerRejected, ServerUnavailable)
    from cxrlt.cli.console import console, warn_random_weights
    from cxrlt.io.images import InputError, load_image
    from cxrlt.contract.labels import ALL_LABELS, TASK1_LABELS, TASK2_LABELS
    from cxrlt.io.atomic import write_text_atomic
    from cxrlt.io.reports import NOT_FOR_CLINICAL_USE, write_challenge_csv, write_failures_csv, write_sr

    task_labels = {"all": ALL_LABELS, "task1": TASK1_LABELS, "task2": TASK2_LABELS}[args.task]
    missing_labels = [label for label in task_labels if label not in MODEL_LABELS[args.model]]
    if missing_labels:
        console.print(f"[red]cxrlt classify: --task {args.task} needs findings that {args.model} does not return "
                      f"({missing_labels[0]!r}, ...); use --model cxr_findings or a matching --task")
        return 1
    if args.concurrency < 1 or args.retries < 1:
        console.print("[red]cxrlt classify: --concurrency and --retries must be at least 1")
        return 1
    if args.timeout <= 0 or args.deadline_s <= 0:
        console.print("[red]cxrlt classify: --timeout and --deadline-s must be positive")
        return 1
    to_stdout = args.out in (None, "-")
    if args.format == "sr" and to_stdout:
        console.print("[red]cxrlt classify: --format sr writes one file per image: give --out DIRECTORY")
        return 1
    out = None if to_stdout else Path(args.out)
    if args.format == "sr" and out.exists() and not out.is_dir():
        console.print(f"[red]cxrlt classify: --out {escape(str(out))} exists and is not a directory", soft_wrap=True)
        return 1
    if args.format == "csv" and out is not None and out.name == FAILURES_CSV:
        console.print(f"[red]cxrlt classify: --out cannot be named {FAILURES_CSV}: the failures go there", soft_wrap=True)
        return 1

    files, missing = expand_paths(args.paths)
    failures = [(path, reason, 0) for path, reason in missing]  # (path, reason, attempts)
    for path, reason, _ in failures:
        _failed(console, path, reason)
    if not files:
        console.print("[red]cxrlt classify: no input files found in " + escape(", ".join(str(p) for p in args.paths)), soft_wrap=True)
        return 1

    client = AsyncCxrltClient(
        args.url, timeout_s=args.timeout, retries=args.retries, deadline_s=args.deadline_s, model=args.model,
        **tls_options(args),
        shared_memory=args.shared_memory, send_size=args.send_size,
    )
    try:
        try:
            info = await client.model_info()
        except ClientError as exc:
            console.print(f"[red]cxrlt classify: {escape(str(exc))}", soft_wrap=True)
            return 1

        if args.format == "sr":
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                console.print(f"[red]cxrlt classify: cannot create {escape(str(out))}: {escape(str(exc))}", soft_wrap=True)
                return 1
        sr_names: set[str] = set()
        semaphore = asyncio.Semaphore(args.concurrency)
        unavailable: list[str] = []  # once the server is gone (not merely overloaded), stop sending
        outcomes: dict[Path, tuple] = {}  # path -> (result or None, failure reason or None, attempts)

        def fail(path: Path, reason: str, attempts: int = 0) -> None:
            outcomes[path] = (None, reason, attempts)
            _failed(progress.console, path, reason)

        async def one(path: Path) -> None:
            async with semaphore:
                if unavailable:
                    fail(path, f"not sent: {unavailable[0]}")
                    return
                try:
                    loaded = await asyncio.to_thread(load_image, path)
                    if args.format == "sr" and loaded.dataset is None:
                        raise InputError(
                            f"{path}: SR output needs DICOM input (a {path.suffix or 'non-DICOM'} image has no "
                            "study to report into); use --format json or csv for it"
                        )
                    image_id = path.name if args.image_id == "name" else loaded.image_id
                    result = await client.classify(loaded.pixels, hint=loaded.hint, image_id=image_id)
                except ServerOverloaded as exc:  # this image ran out of time; the others may not
                    fail(path, str(exc), exc.attempts)
                except ServerUnavailable as exc:
                    unavailable.append(f"the server at {args.url} became unavailable")
                    fail(path, str(exc), exc.attempts)
                except ServerRejected as exc:
                    fail(path, f"rejected by the server: {exc.server_message}", exc.attempts)
                except RequestTimeout as exc:
                    fail(path, str(exc), exc.attempts)
                except ClientError as exc:
                    detail = f"server error ({exc.status}): {exc.server_message}" if exc.server_message else str(exc)
                    fail(path, detail, exc.attempts)
                except InputError as exc:
                    fail(path, _reason(path, exc))
                except Exception as exc:  # one odd file must not stop the batch
                    fail(path, f"{type(exc).__name__}: {exc}")
                else:
                    if task_labels != MODEL_LABELS[args.model]:
                        result = dataclasses.replace(
                            result, probabilities={label: result.probabilities[label] for label in task_labels}
                        )
                    if args.format == "sr":  # write now: holding every dataset (pixels included) would not scale
                        name = _reserve_sr_name(out, result.image_id, sr_names)
                        try:
                            await asyncio.to_thread(write_sr, result, loaded.dataset, out / name)
                        except Exception as exc:
                            fail(path, f"could not write the SR: {_reason(path, exc)}", result.attempts)
                            return
                    outcomes[path] = (result, None, result.attempts)
                finally:
                    progress.advance(task)

        with Progress(
            SpinnerColumn(), TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=True, disable=len(files) < 2 or not console.is_terminal,
        ) as progress:
            task = progress.add_task("classify", total=len(files))
            await asyncio.gather(*(one(path) for path in files))
    finally:
        await client.close()

    # ------------------------------------------------------------------ outputs, in input order
    done = [(path, outcomes[path][0]) for path in files if outcomes[path][0] is not None]
    failures += [(path, *outcomes[path][1:]) for path in files if outcomes[path][0] is None]

    counts = Counter(result.image_id for _, result in done)
    duplicates = sorted(image_id for image_id, n in counts.items() if n > 1)
    if duplicates and args.format == "csv":
        console.print(f"[yellow]warning:[/] {len(duplicates)} ImageID(s) appear more than once in the CSV "
                      f"(e.g. {duplicates[0]!r}); the challenge expects one row per image")
    written = where = ""
    try:
        if args.format == "json":  # the results, then one {"source", "error", "attempts"} entry per failure
            entries = [{**result.to_dict(), "source": str(path)} for path, result in done]
            entries += [{"source": str(path), "error": reason, "attempts": attempts} for path, reason, attempts in failures]
            text = json.dumps(entries, indent=2) + "\n"
            if to_stdout:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                written = str(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(out, text)
                where = f"; also in {out}" if failures else ""
        elif args.format == "csv":
            results = [result for _, result in done]
            if to_stdout:
                import tempfile

                with tempfile.TemporaryDirectory() as scratch:
                    text = write_challenge_csv(results, Path(scratch) / "out.csv", task=args.task).read_text(encoding="utf-8")
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                written = str(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                write_challenge_csv(results, out, task=args.task)
                written = str(out.parent / FAILURES_CSV)  # always written: no stale list from an older run
                write_failures_csv([(path, reason) for path, reason, _ in failures], out.parent / FAILURES_CSV)
                where = f"; also in {out.parent / FAILURES_CSV}" if failures else ""
    except OSError as exc:
        console.print(f"[red]cxrlt classify: could not write {escape(written)}: {escape(str(exc))}", soft_wrap=True)
        return 1

    # ------------------------------------------------------------------ summary (each failure was printed once, above)
    total = len(done) + len(failures)
    target = "" if to_stdout else f" -> {out}"
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
    if info.random_weights and done:
        warn_random_weights(NOT_FOR_CLINICAL_USE)
    if not done and unavailable:
        console.print(f"[red]nothing classified: the server at {escape(args.url)} is unavailable; "
                      "start one with `cxrlt serve --model-repository DIR`")
        return 1
    return 2 if failures else 0
