"""What CupyBackend (cupy_backend.py) and its mixins (cupy_gemm.py, cupy_steps.py)
share: the dtype table, the elementwise block size, one-line reasons and the
out-of-memory guard. A module of its own so the three import it, not each other.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import FastnnError

_FLOATS = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_BLOCK = 256  # threads per block of the elementwise (grid-stride) kernels


class GPUOutOfMemory(FastnnError, MemoryError):
    """A CuPy op ran out of device memory; the message names the op and the size."""


def _one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (reasons must fit on one line)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _oom_guard(op: str, estimate):
    """Turn CuPy's OutOfMemoryError inside ``op`` into GPUOutOfMemory.

    ``estimate(*args, **kwargs)`` gives the bytes the op works on, used when
    CuPy's message does not say how much was requested.
    """

    def decorate(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except self._oom_error as exc:
                try:
                    size = int(estimate(*args, **kwargs))
                except Exception:  # never let the estimate hide the real error
                    size = 0
                raise self._memory_error(op, size, exc) from exc

        return guarded

    return decorate


def _c_contiguous(a) -> bool:
    """``a.flags.c_contiguous`` without building a Flags object per call: CuPy's
    ndarray keeps the bit as ``_c_contiguous`` (a hot-path test, made several
    times per op); anything else (the CPU stand-in's arrays) asks its flags."""
    bit = getattr(a, "_c_contiguous", None)
    return a.flags.c_contiguous if bit is None else bool(bit)


def _nbytes(*arrays) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)
