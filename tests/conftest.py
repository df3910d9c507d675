"""Shared fixtures: run a test once per backend, compare results on the host.

Usage in a test module::

    def test_linear_forward(backend, xp_to_numpy):
        x = backend.asarray(np.ones((2, 3), np.float32))   # array on that backend
        y = fn.Linear(3, 4)(x)                              # fastnn uses `backend`
        np.testing.assert_allclose(xp_to_numpy(y), reference, rtol=1e-6)

* ``backend`` -- parametrized over ``fastnn.backends.BACKEND_NAMES``; test ids read
  ``[numpy]``, ``[numba]``, ``[cupy]``. An unusable backend is *skipped* with the
  reason from ``fastnn.available_backends()``; a usable one is active (``with
  fastnn.use_backend(name)``) for the whole test and the previous backend is
  restored afterwards. The cupy case carries ``@pytest.mark.gpu`` and runs on the
  GPU where there is one; without one it runs CupyBackend on ``source_gpu``: the
  NumPy stand-in for CuPy and cuBLAS, every kernel launch running that kernel's
  own CUDA code built for the CPU (tests/cuda_on_cpu.py). So ``[cupy]`` passing
  in CI means the CuPy backend's logic and kernels are right, not that a GPU ran.
* ``backend_name`` -- the parameter itself, for tests that only need the name.
* ``xp_to_numpy`` -- ``fastnn.to_numpy``: any backend array -> ``numpy.ndarray``.
* ``fake_gpu`` -- the CuPy backend on ``tests/fake_cupy.py`` (NumPy stand-ins for
  CuPy and libcublas), for checking GPU code paths on the CPU; each test runs
  with the launches emulated by name in NumPy and with the kernels' own code
  (``emulated_gpu`` / ``source_gpu`` pick one).

Hypothesis: the "fastnn" profile loaded here keeps example counts modest
(``max_examples=20``; override per test with ``@settings``), disables the deadline
(a first Numba call JIT-compiles or loads its cache) and allows the function-scoped
``backend`` fixture under ``@given`` (it is only a context switch, no state).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

import fastnn
from fake_cupy import emulated_gpu, fake_gpu, source_gpu  # noqa: F401 (CupyBackend on a NumPy stand-in)
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
def backend(backend_name, request):
    """The ``backend_name`` backend, active for the test; skipped if unusable,
    but for cupy without a GPU: then CupyBackend on the CPU stand-in running
    the kernels' own CUDA code (``source_gpu``)."""
    if backend_name == "cupy" and fastnn.available_backends()["cupy"] is not None:
        if request.node.get_closest_marker("long_on_stand_in"):
            pytest.skip("a whole training run: on the GPU only (test_cuda_graph's digits fit "
                        "covers learning on the CPU stand-in)")
        stand_in = request.getfixturevalue("source_gpu")[0]  # skips without g++
        with fastnn.use_backend("cupy") as active:
            assert active is stand_in
            yield active
        return
    reason = fastnn.available_backends()[backend_name]
    if reason is not None:
        pytest.skip(reason)
    with fastnn.use_backend(backend_name) as active:
        yield active


@pytest.fixture
def xp_to_numpy():
    """``fastnn.to_numpy``: compare any backend's result against NumPy references."""
    return fastnn.to_numpy
