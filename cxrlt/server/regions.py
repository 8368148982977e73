"""Free the system shared-memory regions of local clients that died holding them.

A client killed while it holds registered regions leaves them registered with the server
(which keeps the memory mapped) and in /dev/shm. Region names carry the client's PID
(`cxrlt.contract.regions`), so on the server's host those of dead PIDs can be told apart
from live ones. `cxrlt serve` runs this periodically.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrlt.contract.regions import owner_pid
from cxrlt.server.admin import AdminApi


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def clean_up_orphaned_regions(admin: AdminApi, shm_root: Path = Path("/dev/shm")) -> list[str]:
    """Unregister and unlink every region whose owner PID is gone; returns their names."""
    cleaned = []
    for region in admin.shared_memory_regions():
        owner = owner_pid(region["name"])
        if owner is None or _alive(owner):
            continue
        admin.unregister_shared_memory(region["name"])
        try:
            (shm_root / region["key"].lstrip("/")).unlink()
        except OSError:
            pass  # already gone
        cleaned.append(region["name"])
    return cleaned
