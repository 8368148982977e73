"""Shared terminal output: one rich console on stderr for progress and warnings."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console

console = Console(stderr=True)


def warn_random_weights(message: str) -> None:
    console.print(f"[bold red on yellow] WARNING [/] [bold red]{message}[/]")


@contextlib.contextmanager
def counting(what: str = "classified", unit: str = "images") -> Iterator[Callable[[], None]]:
    """A status line counting finished items; yields the function to call once per item."""
    with console.status(f"{what} 0 {unit}") as status:
        done = [0]

        def tick() -> None:
            done[0] += 1
            status.update(f"{what} {done[0]} {unit}")

        yield tick
