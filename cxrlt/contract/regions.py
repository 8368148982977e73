"""How clients name the system shared-memory regions they register with the server.

The client's PID is part of the name, so the server's host can tell the regions of a client
that died holding them (and free them) from those of a client still running.
"""

from __future__ import annotations

REGION_PREFIX = "cxrlt"


def pool_prefix(pid: int, pool_id: int, prefix: str = REGION_PREFIX) -> str:
    """The name prefix of one client's pool of regions: `<prefix>_<pid>_<pool>`; regions add `_<n>`."""
    return f"{prefix}_{pid}_{pool_id:x}"


def owner_pid(region_name: str, prefix: str = REGION_PREFIX) -> int | None:
    """The client PID in a region name made by `pool_prefix`, or None for any other name."""
    parts = region_name.split("_")
    if len(parts) == 4 and parts[0] == prefix and parts[1].isdigit():
        return int(parts[1])
    return None
