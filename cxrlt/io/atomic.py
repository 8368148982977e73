"""Files that are never half-written: write to a temporary file in the same folder, then rename.

A rename within one file system is atomic, so a reader (a PACS job picking up results, or
a person after a killed run) sees either the old file, or no file, or the complete new one.
The temporary name is hidden (``.NAME.<random>.tmp``); a write that raises removes it. Only
a process killed outright (SIGKILL) can leave one behind, never a partial ``NAME``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; renamed onto ``path`` when it ends.

    The file is created empty (with the permissions a plain ``open(path, "w")`` would give),
    so writers that take a path (pandas, pydicom) can write it. If the block raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        with open(temporary, "rb+") as handle:  # on disk before it gets the real name
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    path = Path(path)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return path
