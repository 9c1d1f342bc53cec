"""Peak memory of a block of code, one definition for every benchmark.

GPU: ``torch.cuda.max_memory_allocated`` above what was allocated at entry (what the tensors
need; the caching allocator's reserve is not counted). CPU: resident memory above the level at
entry. The kernel's high-water mark (``ru_maxrss``) is exact but process-wide, so it is used
only when it rose inside the block (then the block set it); otherwise a sampling thread's maximum
(every 20 ms) is the estimate, which can miss a spike shorter than that.
"""
from __future__ import annotations

import os
import resource
import threading

import torch


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """This process's resident high-water mark so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """``with PeakMemory(device) as m: …`` then ``m.peak`` (MiB above entry) and ``m.start``
    (MiB at entry: the loaded model, on the CPU the whole process)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = 0.0
        self.start = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            self.start = rss_mb()
            self._max_at_entry = max_rss_mb()
            self._stop = threading.Event()
            self._top = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._top = max(self._top, rss_mb())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20 - self.start
            return
        self._stop.set()
        self._thread.join()
        top = max(self._top, rss_mb())
        high_water = max_rss_mb()
        if high_water > self._max_at_entry:  # the block set the process's high-water mark
            top = max(top, high_water)
        self.peak = top - self.start
