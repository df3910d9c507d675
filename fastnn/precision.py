"""The GEMM precision policy: exact float32 by default, TF32 or bf16 on request.

``fn.set_precision("tf32")`` lets float32 GEMMs on an NVIDIA GPU (compute
capability >= 8.0) use TF32 tensor cores: ~7x the float32 GEMM rate on an H100,
with 10-bit mantissa inputs and float32 accumulation.

``fn.set_precision("bf16")`` is mixed precision on the CuPy backend: float32
GEMMs take their inputs rounded to bfloat16 (8 significant bits, 7 stored, and
float32's exponent range) and accumulate and return float32. Only the GEMM
inputs are rounded: parameters (the float32 master weights), gradients,
optimizer state and every elementwise op stay float32. fastnn's own cuBLAS handle runs these GEMMs, so
CuPy's compute type stays at its exact default. ``bf16_bits`` / ``bf16_round``
below are the NumPy reference of the rounding (kernels/convert.cu).

Neither mode has an effect on the CPU backends, whose BLAS always computes in
float32, nor on float64. The default, ``"float32"``, is exact and overrides a
``CUPY_TF32`` set in the environment, so results do not depend on a variable
nobody sees.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

PRECISIONS = ("float32", "tf32", "bf16")
_precision = "float32"


def set_precision(mode: str) -> None:
    """``"float32"`` (exact, default), ``"tf32"`` or ``"bf16"`` for float32 GEMMs on a GPU."""
    global _precision
    if mode not in PRECISIONS:
        raise ValueError(f"set_precision: expected one of {PRECISIONS}, got {mode!r}")
    previous, _precision = _precision, mode
    if "cupy" in sys.modules:  # applied now if CuPy is loaded, else when it is
        try:
            apply_to_cupy()
        except BaseException:
            _precision = previous
            raise


def get_precision() -> str:
    return _precision


@contextlib.contextmanager
def using(mode: str):
    """``with fastnn.precision.using("tf32"):`` the policy for a block, then the previous one."""
    previous = _precision
    set_precision(mode)
    try:
        yield
    finally:
        set_precision(previous)


def apply_to_cupy() -> None:
    """Set CuPy's float32 GEMM compute type to match the policy.

    CuPy reads ``CUPY_TF32`` once, at its first float32 GEMM; its
    ``_routines_linalg.set_compute_type`` is the switch that works at any time.
    ``"bf16"`` keeps CuPy exact: the bf16 GEMMs go through fastnn's own cuBLAS
    handle, and any GEMM left to CuPy must not silently become TF32.
    """
    try:
        from cupy._core import _routines_linalg as linalg

        kind = linalg.COMPUTE_TYPE_TF32 if _precision == "tf32" else linalg.COMPUTE_TYPE_DEFAULT
        try:
            linalg.set_compute_type(np.float32, kind)
        except Exception:
            # The TF32 switch reads the device's compute capability. CuPy installed
            # on a machine with no usable GPU runs no GEMM: nothing to switch (a
            # CupyBackend, made only on a usable device, applies the policy then).
            if _cupy_has_a_device():
                raise
    except (ImportError, AttributeError) as exc:
        # CuPy moved its switch: exact float32 is CuPy's own default, so only a
        # request for TF32 must fail loudly.
        if _precision == "tf32":
            raise NotImplementedError(
                f"set_precision('tf32'): this CuPy has no compute-type switch ({exc}); "
                "set CUPY_TF32=1 before the first GEMM instead"
            ) from exc


def _cupy_has_a_device() -> bool:
    import cupy

    try:
        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no driver, or a driver too old for this CUDA runtime
        return False


# bfloat16 is the top 16 bits of a float32; these masks act on the uint32 view.
_ABS_MASK = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_HALF_MINUS_ONE = np.uint32(0x7FFF)
_QUIET_BIT = np.uint32(0x0040)  # top mantissa bit of a bf16
_SHIFT = np.uint32(16)
_ONE = np.uint32(1)


def bf16_bits(x) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``, same shape) of ``x`` cast to float32.

    Round to nearest, ties to even, exactly as kernels/convert.cu: add ``0x7fff``
    plus the lowest kept bit, keep the top half. Subnormals are not flushed; a
    value past the largest bf16 becomes inf; NaN stays a quiet NaN with its sign
    (``(u >> 16) | 0x0040``). A float64 ``x`` is rounded to float32 first, as the
    GPU path only ever converts float32 arrays.
    """
    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    is_nan = (u & _ABS_MASK) > _INF_BITS
    # A NaN's rounding add may wrap the uint32; those lanes are replaced below.
    rounded = (u + (_HALF_MINUS_ONE + ((u >> _SHIFT) & _ONE))) >> _SHIFT
    quiet_nan = (u >> _SHIFT) | _QUIET_BIT
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


def bf16_round(x) -> np.ndarray:
    """``x`` rounded to bfloat16, as float32 (the value a bf16 GEMM reads)."""
    widened = bf16_bits(x).astype(np.uint32)
    widened <<= _SHIFT  # in place: a 0-d input stays an array, not a scalar
    return widened.view(np.float32)
