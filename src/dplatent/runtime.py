"""Process settings for fast per-example-gradient training on CPU.

glibc's default allocator returns large blocks to the OS and maps fresh ones on every step,
which slows per-example-gradient training 2-3x; disabling mmap for large blocks and the trim
threshold (the same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...) removes that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Apply the allocator settings through mallopt; False where glibc is not available."""
    if os.environ.get("DPLATENT_KEEP_MALLOC"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok1 = libc.mallopt(M_MMAP_MAX, 0)
        ok2 = libc.mallopt(M_TRIM_THRESHOLD, 100_000_000_000 & 0x7FFFFFFF)
        return bool(ok1 and ok2)
    except (OSError, AttributeError):
        return False


def set_threads(threads: int) -> int:
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def busy_warning(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when another job already keeps the CPU busy and this one would use every core.

    Two processes whose OpenMP threads each spin on every core stall each other: a DP step ran
    3-24x slower in each of two at once, against 1.2-1.6x with OMP_WAIT_POLICY=PASSIVE or one
    thread each (benchmarks/contention.py). load: the 1-minute load average (read when None).
    """
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # not available on this platform
            return None
    spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if load < 0.75 or not spinning or 0 < threads < cores:
        return None
    return (f"warning: the CPU is already busy (load average {load:.1f} on {cores} cores); "
            "two jobs that each use every core slow each other down several times over. "
            "Run one at a time, or start each with OMP_WAIT_POLICY=PASSIVE or --threads "
            f"{max(1, cores // 2)}.")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def peak_rss_mb() -> int | None:
    """This process's peak resident memory so far, in MB (None where the platform does not
    report it). Linux reports ru_maxrss in KiB."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
