"""The DICOM node's durable spool: what was acknowledged is on disk until it is done with.

Layout under the spool folder::

    incoming/<SOPInstanceUID>.dcm            received, acknowledged, not yet delivered
    rejected/<SOPInstanceUID>.dcm            retrying cannot help (bad image, not a chest radiograph)
    rejected/<SOPInstanceUID>.dcm.reason.txt why

A file is written with :func:`cxrlt.io.atomic.atomic_path` (fsync, then rename) and the folder
is fsynced after every rename or removal, so an acknowledged instance survives a crash or a
power cut, and a half-received one (a ``.NAME.*.tmp`` file, never acknowledged) is swept
away on start. The file name is the SOPInstanceUID (a hash when the UID is not a plain
UID), so an instance sent twice while it waits is spooled once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from cxrlt.io.atomic import atomic_path, write_text_atomic

__all__ = ["Spool", "entry_name"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SUFFIX = ".dcm"
REASON_SUFFIX = ".reason.txt"


def entry_name(sop_instance_uid: str) -> str:
    """The spool file name of an instance: its UID when it is a valid UID, else a hash of it."""
    uid = sop_instance_uid.strip().rstrip("\0")
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        uid = "x" + hashlib.sha256(sop_instance_uid.encode("utf-8", "replace")).hexdigest()[:40]
    return uid + SUFFIX


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """Durable per-instance storage; every method is safe to call from several threads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.rejected = self.root / "rejected"
        for folder in (self.incoming, self.rejected):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob(".*.tmp"):  # a write cut short: never acknowledged
            with contextlib.suppress(OSError):
                stale.unlink()

    def put(self, name: str, data: bytes) -> Path:
        """Write ``data`` as incoming ``name``; on disk (file and folder entry) when this returns."""
        path = self.incoming / name
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
        _fsync_dir(self.incoming)
        return path

    def pending(self) -> list[str]:
        """The incoming entries, oldest first (what a restarted node replays)."""
        entries = []
        for path in self.incoming.glob("*" + SUFFIX):
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime, path.name))
        return [name for _, name in sorted(entries)]

    def count(self) -> int:
        return sum(1 for _ in self.incoming.glob("*" + SUFFIX))

    def path(self, name: str) -> Path:
        return self.incoming / name

    def remove(self, name: str) -> None:
        """Forget a delivered entry."""
        with contextlib.suppress(FileNotFoundError):
            (self.incoming / name).unlink()
        _fsync_dir(self.incoming)

    def reject(self, name: str, reason: str, data: bytes | None = None) -> Path:
        """Move incoming ``name`` (or write ``data``) to rejected/, with ``reason`` beside it.

        The reason is written first: a crash in between leaves the entry in incoming/, and
        it is judged again on restart.
        """
        target = self.rejected / name
        write_text_atomic(self.rejected / (name + REASON_SUFFIX), reason.rstrip() + "\n")
        if data is not None:
            with atomic_path(target) as temporary:
                temporary.write_bytes(data)
        else:
            os.replace(self.incoming / name, target)
            _fsync_dir(self.incoming)
        _fsync_dir(self.rejected)
        return target
