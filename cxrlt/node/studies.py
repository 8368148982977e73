"""The DICOM node's studies: classified images grouped by StudyInstanceUID until the study is quiet.

A study gets one SR (cxrlt.io.reports.build_study_sr) once no image of it has arrived for the
quiet period: its findings are the study scores (cxrlt.contract.study.aggregate_study) called at
the repository's operating points, and it references every image. Each classified image's result
and header (no pixels) is written under ``SPOOL/studies/<study>/`` before its own spool entry is
removed, so a restarted node still reports the study; the folder goes once the destination
accepted the study SR. An image that arrives after its study's SR went out starts the study again
and the next study SR covers every image it has then (its UID is derived from the images it
references, so the same images never give two SRs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cxrlt.contract.results import FindingsResult
from cxrlt.node.spool import entry_name

__all__ = ["STUDY_SR_MODES", "DEFAULT_STUDY_SR", "StudyBook"]

# off: one SR per image (as before); also: per image, and one per study once it is quiet;
# only: one SR per study. Default `also`: each image's result reaches the PACS as soon as it is
# classified (a worklist rule can act on it at once), and the study SR follows with the study's
# combined call; a site that wants one object per study chooses `only`.
STUDY_SR_MODES = ("off", "also", "only")
DEFAULT_STUDY_SR = "also"
_RESULT = ".result.json"
_HEADER = ".header.dcm"


def _folder_name(study_instance_uid: str) -> str:
    return entry_name(study_instance_uid).removesuffix(".dcm")


class StudyBook:
    """The studies waiting for their SR, on disk under ``root`` (thread-compatible: one event loop uses it)."""

    def __init__(self, root: str | Path, quiet_s: float) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quiet_s = quiet_s
        self._next_try: dict[str, float] = {}  # study folder -> monotonic time of the next send attempt

    def add(self, result: FindingsResult, dataset: Any) -> None:
        """Keep an image's result and header (PixelData left out) in its study's folder (fsynced)."""
        from cxrlt.io.atomic import write_text_atomic
        from cxrlt.io.images import header_only

        if not result.study_instance_uid:
            return
        folder = self.root / _folder_name(result.study_instance_uid)
        folder.mkdir(exist_ok=True)
        stem = entry_name(result.sop_instance_uid or result.image_id).removesuffix(".dcm")
        temporary = folder / f".{stem}{_HEADER}.tmp"
        header_only(dataset).save_as(temporary, implicit_vr=False, little_endian=True, enforce_file_format=False)
        os.replace(temporary, folder / f"{stem}{_HEADER}")
        write_text_atomic(folder / f"{stem}{_RESULT}", json.dumps(result.to_dict()))
        self._next_try.pop(folder.name, None)

    def quiet(self) -> list[str]:
        """Study folders with no new image for the quiet period and no pending retry wait."""
        now_wall, now = time.time(), time.monotonic()
        ready = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = list(folder.glob(f"*{_RESULT}"))
            if not files or self._next_try.get(folder.name, 0.0) > now:
                continue
            if now_wall - max(f.stat().st_mtime for f in files) >= self.quiet_s:
                ready.append(folder.name)
        return ready

    def load(self, name: str) -> tuple[list[FindingsResult], list[Any]]:
        """A study's image results and headers, in SOPInstanceUID order."""
        import pydicom

        folder = self.root / name
        results, headers = [], []
        for path in sorted(folder.glob(f"*{_RESULT}")):
            results.append(FindingsResult.from_dict(json.loads(path.read_text())))
            headers.append(pydicom.dcmread(folder / (path.name.removesuffix(_RESULT) + _HEADER), force=True))
        return results, headers

    def retry_later(self, name: str, delay_s: float) -> None:
        self._next_try[name] = time.monotonic() + delay_s

    def remove(self, name: str, results: list[FindingsResult]) -> None:
        """Forget what the study SR covered; an image that arrived meanwhile stays for the next one."""
        folder = self.root / name
        covered = {entry_name(r.sop_instance_uid or r.image_id).removesuffix(".dcm") for r in results}
        for stem in covered:
            for suffix in (_RESULT, _HEADER):
                (folder / f"{stem}{suffix}").unlink(missing_ok=True)
        self._next_try.pop(name, None)
        if not any(folder.iterdir()):
            folder.rmdir()

    def count(self) -> int:
        return sum(1 for p in self.root.iterdir() if p.is_dir())
