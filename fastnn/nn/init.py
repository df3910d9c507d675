"""Weight initialisers, drawn on the host from a seeded generator."""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..backends.base import host_array

INIT_NAMES = ("he", "xavier", "zeros", "ones")


def initial_weight(init, shape: tuple, fan_in: int, fan_out: int, rng, dtype, layer: str):
    """A NumPy array of ``shape`` for the named init, a constant or a callable."""
    if callable(init):
        w = host_array(init(shape, rng))  # a CuPy array too (np.asarray refuses it)
        if w.shape != tuple(shape):
            raise ValueError(f"{layer}: init callable returned shape {w.shape}, expected {tuple(shape)}")
        return w.astype(dtype, copy=False)
    if isinstance(init, numbers.Real) and not isinstance(init, bool):
        return np.full(shape, init, dtype=dtype)
    if init == "he":
        return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
    if init == "xavier":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=shape).astype(dtype)
    if init == "zeros":
        return np.zeros(shape, dtype=dtype)
    if init == "ones":
        return np.ones(shape, dtype=dtype)
    raise ValueError(
        f"{layer}: unknown init {init!r}; expected one of {list(INIT_NAMES)}, "
        "a number or a callable (shape, rng) -> array"
    )
