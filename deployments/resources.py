"""Peak memory of one model run, measured inside the model replica.

A replica runs one job at a time (``max_ongoing_requests=1``), so the process's peak
resident set is the run's. On Linux the peak (VmHWM) is reset at the start of the run by
writing ``5`` to ``/proc/self/clear_refs``; elsewhere ``ru_maxrss`` (the process's lifetime
peak) is reported and ``peak_rss_scope`` says so. GPU peaks come from torch's allocator.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """``start()`` before the run, ``stop()`` after: {peak_rss_bytes, peak_rss_scope, peak_gpu_bytes}."""

    def __init__(self, device: str):
        self.device = device
        self.scope = "process"

    def start(self) -> PeakMemory:
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
            self.scope = "run" if _vm_hwm_bytes() is not None else "process"
        except OSError:
            self.scope = "process"
        if self.device != "cpu":
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            except Exception:
                pass
        return self

    def stop(self) -> dict:
        rss = _vm_hwm_bytes() if self.scope == "run" else None
        if rss is None:
            ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = int(ru if sys.platform == "darwin" else ru * 1024)  # bytes on macOS, KiB on Linux
        out = {"peak_rss_bytes": int(rss), "peak_rss_scope": self.scope, "peak_gpu_bytes": None}
        if self.device != "cpu":
            try:
                import torch

                if torch.cuda.is_available():
                    out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            except Exception:
                pass
        return out


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system after a run (glibc's ``malloc_trim``; elsewhere nothing).

    A replica runs job after job in one process, and glibc keeps much of what a run freed (its
    transient arrays, its threads' arenas), so the next run's peak would start from there: one
    process running the sneaker (fusion, balanced, with the replica's evaluation) kept 1139 MB
    resident after a job without this, 466 MB with it. Takes milliseconds.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
