"""System shared-memory regions for sending images to a Triton server on the same host.

A full-size radiograph is ~7 MB of uint16. In a gRPC message it is serialised by the client
and parsed by the server; through a registered POSIX shared-memory region the request only
names the region, and the server reads the pixels in place. This only works when client and
server share a host (a PACS gateway beside the server, `cxrlt bench --shared-memory`).

`RegionPool` hands one region to each request in flight and reuses it afterwards, so a
region is created and registered with the server once, not per image. It does no I/O with
the server itself: the sync and asyncio clients register new regions their own way.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np

from cxrlt.contract.regions import REGION_PREFIX, pool_prefix

_ALIGN = 1 << 20  # round region sizes up to whole MiB so slightly larger images reuse a region


@dataclasses.dataclass
class Region:
    name: str  # the server's name for it
    key: str  # the POSIX shared-memory key (/name)
    byte_size: int
    handle: Any  # tritonclient.utils.shared_memory handle

    def attach(self, infer_input: Any, array: np.ndarray) -> None:
        """Copy `array` into the region and point `infer_input` (a tritonclient InferInput) at it."""
        import tritonclient.utils.shared_memory as shm

        array = np.ascontiguousarray(array)
        shm.set_shared_memory_region(self.handle, [array])
        infer_input.set_shared_memory(self.name, array.nbytes)


class RegionPool:
    """Free regions to reuse; `acquire` says whether the region is new (and must be registered)."""

    def __init__(self, prefix: str = REGION_PREFIX) -> None:
        self.prefix = pool_prefix(os.getpid(), id(self), prefix)
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._lock = threading.Lock()

    def acquire(self, byte_size: int) -> tuple[Region, bool]:
        import tritonclient.utils.shared_memory as shm

        with self._lock:
            fitting = [r for r in self._free if r.byte_size >= byte_size]
            if fitting:
                region = min(fitting, key=lambda r: r.byte_size)
                self._free.remove(region)
                return region, False
            name = f"{self.prefix}_{len(self._all)}"
            size = max(_ALIGN, -(-byte_size // _ALIGN) * _ALIGN)
            region = Region(name, f"/{name}", size, shm.create_shared_memory_region(name, f"/{name}", size))
            self._all.append(region)
            return region, True

    def release(self, region: Region) -> None:
        with self._lock:
            self._free.append(region)

    def discard(self, region: Region) -> None:
        """Forget a region that could not be registered, and free its memory."""
        import tritonclient.utils.shared_memory as shm

        with self._lock:
            self._all.remove(region)
        shm.destroy_shared_memory_region(region.handle)

    def drain(self) -> list[Region]:
        """Every region, removed from the pool: the caller unregisters them, then calls `destroy`."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        return regions

    @staticmethod
    def destroy(regions: list[Region]) -> None:
        import tritonclient.utils.shared_memory as shm

        for region in regions:
            shm.destroy_shared_memory_region(region.handle)
