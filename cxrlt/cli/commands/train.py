"""Train networks from recipe files (training/configs/*.yaml): the projection router, the
ensemble members, head ablations and the zero-shot dual-branch CLIP. Each recipe writes
OUT/<served model name>.pt after every epoch (weights, EMA weights, optimiser and scheduler
state) and OUT/<name>.metrics.csv, so `cxrlt build-repo --checkpoints OUT` serves them and
`--resume` continues an interrupted run.

`--config all` trains every served network's recipe in dependency order (PCAM before the
CaiT that freezes its backbone).

Data-parallel: `--nproc N` runs this same command under torchrun with N processes on this
machine (one GPU each, NCCL; gloo on CPU); for several machines run
`torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m cxrlt train ...`
on each. Images come from the `cxrlt prepare-data` cache when one of the recipe's size is
present (`resized/` next to the CSV, or --cache DIR)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# The served networks' recipes, in an order that trains each PCAM before its CaiT.
ALL_RECIPES = ("router", "frontal_pcam", "lateral_pcam", "frontal_cait", "lateral_cait",
               "frontal_swin", "lateral_swin", "clip_dual_branch")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, nargs="+", metavar="FILE",
                        help="recipe YAML file(s) or checked-in recipe name(s) (e.g. frontal_pcam); 'all' = every served network")
    parser.add_argument("--data", required=True, type=Path, help="CXR-LT label CSV or PadChest label file (images are found next to it)")
    parser.add_argument("--images", type=Path, help="image folder (default: the CSV's folder)")
    parser.add_argument("--out", type=Path, default=Path("runs/checkpoints"), metavar="DIR", help="checkpoint folder (default runs/checkpoints)")
    parser.add_argument("--epochs", type=int, help="total epochs (overrides the recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/<model>.pt (model, EMA, optimiser, scheduler, epoch)")
    parser.add_argument("--stop-after-epoch", type=int, metavar="N", help="end this run after epoch N (continue later with --resume)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set optimizer.lr=1e-4 --set batch_size=64 (repeatable)")
    parser.add_argument("--profile", choices=["tiny", "paper"], help="override the recipes' profile")
    parser.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train data-parallel with N processes on this machine (torchrun; one per GPU, or gloo on CPU)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="pre-resized image cache from `cxrlt prepare-data` (default: resized/ next to the CSV, when present)")
    parser.add_argument("--no-cache", action="store_true", help="decode the source images even when a cache is present")


def expand_configs(configs: list[str]) -> list[str]:
    out: list[str] = []
    for config in configs:
        out += list(ALL_RECIPES) if config == "all" else [config]
    return list(dict.fromkeys(out))


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m cxrlt train ARGV` (ARGV without --nproc)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cxrlt", "train", *rest]


def launch(nproc: int) -> int:
    """Run this command again under torchrun with `nproc` processes; its exit status."""
    argv = sys.argv[sys.argv.index("train") + 1:] if "train" in sys.argv else sys.argv[1:]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo talks over loopback
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(torchrun_command(argv, nproc), env=env)


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args.nproc)
    from rich.table import Table

    from cxrlt.cli.console import console
    from training.recipes import load_recipe
    from training.loop import train

    assignments = list(args.assignments)
    if args.profile:
        assignments.append(f"profile={args.profile}")
    if args.threads:
        assignments.append(f"threads={args.threads}")
    recipes = [load_recipe(config, assignments=assignments) for config in expand_configs(args.config)]
    # a CaiT recipe needs its PCAM checkpoint: train those after the others given with them
    recipes.sort(key=lambda recipe: 1 if recipe.pcam_checkpoint else 0)
    results = []
    for recipe in recipes:
        if int(os.environ.get("RANK", "0")) == 0:
            console.print(f"[bold]training {recipe.name}[/] -> {args.out / (recipe.checkpoint_name() + '.pt')} "
                          f"(profile {recipe.profile}, {args.epochs or recipe.epochs} epochs)")
        results.append(train(
            recipe, args.data, args.out, resume=args.resume, epochs=args.epochs, stop_after_epoch=args.stop_after_epoch,
            device=args.device, image_root=args.images, progress=False if args.no_progress else None,
            resized=None if args.no_cache else (args.cache or "auto"),
            log=lambda line: console.print(line, highlight=False, soft_wrap=True),
        ))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    table = Table(title=f"trained into {args.out}")
    for column in ("recipe", "checkpoint", "epoch", "metric", "value", "time"):
        table.add_column(column)
    for result in results:
        value = result.final.get(result.primary)
        table.add_row(result.recipe.name, result.checkpoint.name, str(result.epoch), result.primary,
                      "-" if value is None else f"{value:.4f}", f"{result.seconds:.1f}s")
    console.print(table)
    console.print(f"serve them with: cxrlt build-repo --checkpoints {args.out} --repo REPO")
    return 0
