"""Shared fixtures: run a test once per backend, compare results on the host.

Usage in a test module::

    def test_linear_forward(backend, xp_to_numpy):
        x = backend.asarray(np.ones((2, 3), np.float32))   # array on that backend
        y = fn.Linear(3, 4)(x)                              # fastnn uses `backend`
        np.testing.assert_allclose(xp_to_numpy(y), reference, rtol=1e-6)

* ``backend`` -- parametrized over ``fastnn.backends.BACKEND_NAMES``; test ids read
  ``[numpy]``, ``[numba]``, ``[cupy]``. An unusable backend is *skipped* with the
  reason from ``fastnn.available_backends()`` (so a GPU test skips on a CPU box and
  runs on a GPU box); a usable one is active (``with fastnn.use_backend(name)``) for
  the whole test and the previous backend is restored afterwards. The cupy case
  carries ``@pytest.mark.gpu``.
* ``backend_name`` -- the parameter itself, for tests that only need the name.
* ``xp_to_numpy`` -- ``fastnn.to_numpy``: any backend array -> ``numpy.ndarray``.
* ``fake_gpu`` -- the CuPy backend on ``tests/fake_cupy.py`` (NumPy stand-ins for
  CuPy and libcublas), for checking GPU code paths on the CPU.

Hypothesis: the "fastnn" profile loaded here keeps example counts modest
(``max_examples=20``; override per test with ``@settings``), disables the deadline
(a first Numba call JIT-compiles or loads its cache) and allows the function-scoped
``backend`` fixture under ``@given`` (it is only a context switch, no state).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

import fastnn
from fake_cupy import fake_gpu  # noqa: F401 (the fixture: CupyBackend on a NumPy stand-in)
from fastnn.backends import BACKEND_NAMES

settings.register_profile(
    "fastnn",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile("fastnn")

_BACKEND_PARAMS = [
    pytest.param(name, id=name, marks=[pytest.mark.gpu] if name == "cupy" else [])
    for name in BACKEND_NAMES
]


@pytest.fixture(params=_BACKEND_PARAMS)
def backend_name(request) -> str:
    """One of ``BACKEND_NAMES`` (usable or not: ``backend`` does the skipping)."""
    return request.param


@pytest.fixture
def backend(backend_name):
    """The ``backend_name`` backend, active for the test; skipped if unusable."""
    reason = fastnn.available_backends()[backend_name]
    if reason is not None:
        pytest.skip(reason)
    with fastnn.use_backend(backend_name) as active:
        yield active


@pytest.fixture
def xp_to_numpy():
    """``fastnn.to_numpy``: compare any backend's result against NumPy references."""
    return fastnn.to_numpy
