"""Shared data and backends for the benchmarks (pytest-benchmark).

Run ``pytest bench --benchmark-only`` to measure; under ``make test``
(``--benchmark-disable``) every benchmark body runs once and checks its result
against plain NumPy, so a benchmark can never time a wrong answer.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastnn

SHAPE = (1024, 1024)
DTYPE = np.float32


@pytest.fixture(scope="session")
def arrays() -> dict[str, np.ndarray]:
    """(1024, 1024) float32 operands: a pre-activation ``z``, a bias row ``b``,
    GEMM inputs ``x @ w``, an upstream gradient ``dy`` and activation outputs."""
    rng = np.random.default_rng(0)
    n, m = SHAPE
    z = rng.standard_normal(SHAPE).astype(DTYPE)
    b = rng.standard_normal(m).astype(DTYPE)
    return {
        "z": z,
        "b": b,
        "x": rng.standard_normal((n, n)).astype(DTYPE) / np.float32(np.sqrt(n)),
        "w": rng.standard_normal((n, m)).astype(DTYPE),
        "dy": rng.standard_normal(SHAPE).astype(DTYPE),
        "y_relu": np.maximum(z + b, 0),
        "y_tanh": np.tanh(z + b),
    }


@pytest.fixture
def backend_or_skip():
    """``backend_or_skip(name)``: that backend's instance (not activated), or skip
    the benchmark with the reason from ``fastnn.available_backends()``."""

    def get(name: str):
        reason = fastnn.available_backends()[name]
        if reason is not None:
            pytest.skip(reason)
        with fastnn.use_backend(name) as backend:
            pass  # only the instance is needed; the current backend stays as it was
        return backend

    return get
