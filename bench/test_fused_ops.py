"""Fused elementwise ops vs the NumPy expressions they replace, at (1024, 1024) float32.

Groups (compare the contenders inside one group; ratios are what matter):

* ``bias_act[relu|tanh]``: ``np.maximum(z + b, 0)`` / ``np.tanh(z + b)`` (a
  temporary and a fresh result) vs each backend's in-place ``bias_act``.
* ``act_backward[relu|tanh]``: ``dy * (y > 0)`` / ``dy * (1 - y * y)`` vs
  ``act_backward(dy, y, act, out=dz)``.
* ``gemm+bias_act[relu]``: the between-GEMMs pattern of an MLP layer,
  ``gemm(x, w, out=z)`` then ``bias_act`` (or the NumPy expression), with
  ``gemm`` alone as the floor. The Numba kernels are serial, so BLAS keeps the
  cores and the two thread pools never spin against each other.

* ``bce[...]`` / ``bce_logits[...]``: the binary losses with their gradient on a
  small batch of outputs, where the Numba backend fuses them into one pass (up
  to ``FUSED_BINARY_LOSS_MAX`` elements) and the NumPy backend runs ~10 ufunc
  calls: the per-call overhead is what is measured.

``bias_act`` overwrites ``z``, so every round starts from a fresh copy of it
(the copy is not timed; the NumPy expression gets the same setup). With
``--benchmark-disable`` each body runs once and is checked against NumPy.
"""
from __future__ import annotations

import numpy as np
import pytest

ROUNDS = 200  # ~1-3 ms per elementwise round
GEMM_ROUNDS = 25  # ~20-60 ms per GEMM round on 2 cores
SHAPE = (1024, 1024)  # as bench/conftest.py's ``arrays``
SIZE = "x".join(map(str, SHAPE))

EXPR_FORWARD = {
    "relu": lambda z, b: np.maximum(z + b, 0),
    "tanh": lambda z, b: np.tanh(z + b),
}
EXPR_BACKWARD = {
    "relu": lambda dy, y: dy * (y > 0),
    "tanh": lambda dy, y: dy * (1 - y * y),
}
IMPLS = ["numpy-expr", "numpy-backend", "numba-backend"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_bias_act(benchmark, arrays, backend_or_skip, act, impl):
    benchmark.group = f"bias_act[{act}] {SIZE} f32"
    z0, b = arrays["z"], arrays["b"]
    z = np.empty_like(z0)
    if impl == "numpy-expr":
        expr = EXPR_FORWARD[act]

        def run():
            return expr(z, b)
    else:
        backend = backend_or_skip(impl.split("-")[0])

        def run():
            return backend.bias_act(z, b, act)

    result = benchmark.pedantic(run, setup=lambda: np.copyto(z, z0),
                                rounds=ROUNDS, warmup_rounds=5)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, arrays[f"y_{act}"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_act_backward(benchmark, arrays, backend_or_skip, act, impl):
    benchmark.group = f"act_backward[{act}] {SIZE} f32"
    dy, y = arrays["dy"], arrays[f"y_{act}"]
    if impl == "numpy-expr":
        expr = EXPR_BACKWARD[act]

        def run():
            return expr(dy, y)
    else:
        backend = backend_or_skip(impl.split("-")[0])
        dz = np.empty_like(dy)

        def run():
            return backend.act_backward(dy, y, act, out=dz)

    result = benchmark.pedantic(run, rounds=ROUNDS // 2, warmup_rounds=5, iterations=2)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, EXPR_BACKWARD[act](dy, y), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["gemm-only", "gemm+numpy-expr", "gemm+numpy-backend",
                                  "gemm+numba-backend"])
def test_gemm_then_bias_act(benchmark, arrays, backend_or_skip, impl):
    benchmark.group = f"gemm+bias_act[relu] {SIZE} f32"
    x, w, b = arrays["x"], arrays["w"], arrays["b"]
    z = np.empty(SHAPE, np.float32)
    numpy_backend = backend_or_skip("numpy")
    if impl == "gemm-only":
        def run():
            return numpy_backend.gemm(x, w, out=z)
    elif impl == "gemm+numpy-expr":
        def run():
            numpy_backend.gemm(x, w, out=z)
            return np.maximum(z + b, 0)
    else:
        backend = backend_or_skip(impl.split("+")[1].split("-")[0])

        def run():
            backend.gemm(x, w, out=z)
            return backend.bias_act(z, b, "relu")

    result = benchmark.pedantic(run, rounds=GEMM_ROUNDS, warmup_rounds=3)
    expected = x @ w
    if impl != "gemm-only":
        expected = np.maximum(expected + b, 0)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["numpy-backend", "numba-backend"])
@pytest.mark.parametrize("n", [64, 512])
@pytest.mark.parametrize("op", ["bce", "bce_with_logits"])
def test_binary_loss(benchmark, backend_or_skip, op, n, impl):
    benchmark.group = f"{op} ({n}, 1) f32"
    rng = np.random.default_rng(0)
    x = rng.uniform(0.01, 0.99, (n, 1)).astype(np.float32)
    t = (rng.random((n, 1)) < 0.5).astype(np.float32)
    grad = np.empty_like(x)
    fn = getattr(backend_or_skip(impl.split("-")[0]), op)
    loss, _ = benchmark.pedantic(lambda: fn(x, t, grad), rounds=ROUNDS, warmup_rounds=5,
                                 iterations=20)
    ref_loss, ref_grad = getattr(backend_or_skip("numpy"), op)(x, t, np.empty_like(x))
    assert grad.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
