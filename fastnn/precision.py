"""The GEMM precision policy: exact float32 by default, TF32 on request.

``fn.set_precision("tf32")`` lets float32 GEMMs on an NVIDIA GPU (compute
capability >= 8.0) use TF32 tensor cores: ~7x the float32 GEMM rate on an H100,
with 10-bit mantissa inputs and float32 accumulation. It has no effect on the CPU
backends, whose BLAS always computes in float32, and none on float64. The
default, ``"float32"``, is exact and overrides a ``CUPY_TF32`` set in the
environment, so results do not depend on a variable nobody sees.
"""
from __future__ import annotations

import sys

PRECISIONS = ("float32", "tf32")
_precision = "float32"


def set_precision(mode: str) -> None:
    """``"float32"`` (exact, default) or ``"tf32"`` for float32 GEMMs on a GPU."""
    global _precision
    if mode not in PRECISIONS:
        hint = "; bf16 mixed precision is not implemented yet" if "bf16" in str(mode) else ""
        raise ValueError(f"set_precision: expected one of {PRECISIONS}, got {mode!r}{hint}")
    previous, _precision = _precision, mode
    if "cupy" in sys.modules:  # applied now if CuPy is loaded, else when it is
        try:
            apply_to_cupy()
        except BaseException:
            _precision = previous
            raise


def get_precision() -> str:
    return _precision


def apply_to_cupy() -> None:
    """Set CuPy's float32 GEMM compute type to match the policy.

    CuPy reads ``CUPY_TF32`` once, at its first float32 GEMM; its
    ``_routines_linalg.set_compute_type`` is the switch that works at any time.
    """
    import numpy as np

    try:
        from cupy._core import _routines_linalg as linalg

        kind = linalg.COMPUTE_TYPE_TF32 if _precision == "tf32" else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, kind)
    except (ImportError, AttributeError) as exc:
        # CuPy moved its switch: exact float32 is CuPy's own default, so only a
        # request for TF32 must fail loudly.
        if _precision == "tf32":
            raise NotImplementedError(
                f"set_precision('tf32'): this CuPy has no compute-type switch ({exc}); "
                "set CUPY_TF32=1 before the first GEMM instead"
            ) from exc
