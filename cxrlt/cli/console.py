"""Shared terminal output: one rich console on stderr for progress and warnings."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)


def warn_random_weights(message: str) -> None:
    console.print(f"[bold red on yellow] WARNING [/] [bold red]{message}[/]")
