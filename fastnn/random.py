"""fastnn's seeded host generator: parameter init, shuffling, dropout masks.

Draws happen on the host with NumPy's PCG64 and are then moved to the device,
so a seed gives the same weights and the same batch order on every backend.
"""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed fastnn's generators so that a run repeats exactly."""
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _generator
