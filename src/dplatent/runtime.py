"""Process settings for fast per-example-gradient training on CPU.

glibc's default allocator returns large blocks to the OS and maps fresh ones on every step,
which slows per-example-gradient training 2-3x; disabling mmap for large blocks and the trim
threshold (the same effect as MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...) removes that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

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


def busy_cores(window: float = 0.3) -> float | None:
    """How many cores the machine kept busy over the next `window` seconds while this process
    slept, i.e. other jobs' load now (Linux /proc/stat; None where it is not available).
    Unlike the load average it does not remember a job that has just ended."""
    def read() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        ticks = [int(v) for v in lines[0].split()[1:9]]  # the sum over the CPUs listed below
        cpus = sum(1 for line in lines if line[:3] == "cpu" and line[3:4].isdigit())
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks), cpus  # all but idle and iowait
    try:
        busy0, total0, _ = read()
        time.sleep(window)
        busy1, total1, cpus = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * cpus


def busy_warning(threads: int, busy: float | None = None, cores: int | None = None) -> str | None:
    """A warning when other jobs already keep the CPU busy and this one would use every core.

    Two processes whose OpenMP threads each spin on every core stall each other: a DP step ran
    3-24x slower in each of two at once, against 1.6-2.2x (the cores shared) with
    OMP_WAIT_POLICY=PASSIVE or one thread each (benchmarks/contention.py).
    busy: cores other jobs use now (measured when None).
    """
    cores = cores or os.cpu_count() or 1
    spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    if not spinning or 0 < threads < cores:
        return None
    if busy is None:
        busy = busy_cores()
    if busy is None or busy < 0.75:
        return None
    return (f"warning: other jobs keep the CPU busy ({busy:.1f} of {cores} cores); two jobs "
            "that each use every core slow each other down several times over. Run one at a "
            "time, or start each with OMP_WAIT_POLICY=PASSIVE or --threads "
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
