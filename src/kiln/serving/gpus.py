"""Which GPUs a replica gets: the machine's inventory and an exclusive allocator.

The inventory is `KILN_GPUS` (e.g. `0,1`; empty for none) when set, so the
assignment can be tested on a machine without GPUs, else what `nvidia-smi -L`
lists. A replica of an API with `compute.gpu: N` is given N devices of its own
through `CUDA_VISIBLE_DEVICES`; devices are not shared between replicas, as in
Cortex (one replica per GPU). When the devices asked for do not exist or are all
taken, the replica is not started and the API shows `compute unavailable`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading


def inventory() -> list[str]:
    """GPU ids on this machine (KILN_GPUS overrides detection)."""
    if "KILN_GPUS" in os.environ:
        return [g.strip() for g in os.environ["KILN_GPUS"].split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


class GpuAllocator:
    """Hands out whole devices, each to one replica at a time."""

    def __init__(self, devices: list[str] | None = None) -> None:
        self.devices = inventory() if devices is None else list(devices)
        self._free = list(self.devices)
        self._lock = threading.Lock()

    def acquire(self, count: int) -> list[str] | None:
        """`count` free devices, or None when there are not enough."""
        with self._lock:
            if count > len(self._free):
                return None
            taken, self._free = self._free[:count], self._free[count:]
            return taken

    def release(self, devices: list[str]) -> None:
        with self._lock:
            for device in devices:
                if device in self.devices and device not in self._free:
                    self._free.append(device)
            self._free.sort(key=self.devices.index)

    def shortage(self, per_replica: int) -> str:
        """Why a replica asking for `per_replica` GPUs cannot start, in words."""
        total, free = len(self.devices), len(self._free)
        if per_replica > total:
            return (
                f"each replica asks for {per_replica} GPU(s) (compute.gpu) but this machine has "
                f"{total}; lower compute.gpu, or deploy where GPUs are (KILN_GPUS lists them)"
            )
        return (
            f"each replica asks for {per_replica} GPU(s) and only {free} of {total} are free; "
            f"the other replicas hold the rest"
        )


_ALLOCATOR: GpuAllocator | None = None


def allocator() -> GpuAllocator:
    """The server process's allocator (created on first use, from the inventory)."""
    global _ALLOCATOR
    if _ALLOCATOR is None:
        _ALLOCATOR = GpuAllocator()
    return _ALLOCATOR
