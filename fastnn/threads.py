"""One place that controls CPU threads: BLAS (via threadpoolctl) and Numba.

fastnn's Numba kernels are serial (see backends/numba_kernels.py), so BLAS
owns the cores and the two pools never spin against each other. Numba's own
pool is sized here too, for user code that runs parallel Numba functions.
"""
from __future__ import annotations

import os
import sys

_requested: int | None = None
_limiter = None


def default_threads() -> int:
    env = os.environ.get("FASTNN_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: all cores the process may use) for BLAS and Numba."""
    global _requested
    if n is not None and int(n) < 1:
        raise ValueError(f"set_num_threads: expected n >= 1, got {n}")
    _requested = int(n) if n is not None else None
    return apply()


def get_num_threads() -> int:
    return _requested if _requested is not None else default_threads()


def apply() -> int:
    """Push the thread count to every pool that is loaded now."""
    global _limiter
    n = get_num_threads()
    # Only on request: the default leaves every pool as it is (setting Numba's
    # count would start its OpenMP pool, which fastnn's serial kernels never use).
    if _requested is None:
        return n
    from threadpoolctl import threadpool_limits

    _limiter = threadpool_limits(limits=n)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


def thread_info() -> list[dict]:
    """threadpoolctl's view of the loaded native pools (BLAS, OpenMP)."""
    from threadpoolctl import threadpool_info

    return threadpool_info()
