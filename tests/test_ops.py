"""Every backend op equals the generic reference (``Backend()``: plain NumPy).

Each op runs on every usable backend (the ``backend`` fixture), in float32 and
float64, on hypothesis-drawn shapes, on edge values and on non-contiguous
views, and is compared with ``fastnn.backends.base.Backend()`` and with the
activation table's reference functions; activations and softmax-xent are also
cross-checked against ``torch.nn.functional``.

Tolerances are a few units of roundoff (``K * eps``) times each element's
condition scale: ``|ref|`` for well-conditioned results, plus the terms where
the formula itself cancels (GELU's ``1 + tanh`` for negative inputs, a GEMM's
``|a| @ |b|``, a sum's ``sum |x|``), so float64 is checked to ~1e-15 and
float32 to a few ulp without false alarms.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import fastnn
from fastnn.backends.activations import ACTIVATIONS, GELU_C, GELU_K
from fastnn.backends.base import Backend
from fastnn.backends.constants import BCE_EPSILON

REF = Backend()  # the generic implementation on NumPy: the reference
ACTS = sorted(ACTIVATIONS)
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]
K = 4  # allowed units of roundoff

EDGE = np.array(
    [0.0, -0.0, 1e4, -1e4, 1e-30, -1e-30, 1.0, -1.0, 0.5, -3.0, 20.0, -20.0]
)


# ------------------------------------------------------------------ helpers
def _eps(dtype, backend=None) -> float:
    if backend is not None and backend.name == "cupy" and np.dtype(dtype) == np.float32 \
            and os.environ.get("CUPY_TF32", "0") != "0":
        return 2.0 ** -10  # TF32 GEMMs keep a 10-bit mantissa
    return float(np.finfo(dtype).eps)


def assert_close(actual, desired, scale=None, *, k=K, eps=None, what="result"):
    """``|actual - desired| <= k * eps * scale + k * tiny`` element-wise.

    ``scale`` defaults to ``|desired|`` (relative error); NaNs and infinities
    must sit at the same places; ``actual`` must keep ``desired``'s dtype.
    """
    a = np.asarray(fastnn.to_numpy(actual))
    d = np.asarray(desired)
    assert a.shape == d.shape, f"{what}: shape {a.shape} != {d.shape}"
    assert a.dtype == d.dtype, f"{what}: dtype {a.dtype} != {d.dtype}"
    nan_a, nan_d = np.isnan(a), np.isnan(d)
    assert np.array_equal(nan_a, nan_d), (
        f"{what}: NaN at {np.argwhere(nan_a != nan_d)[:5].tolist()} differ"
        f" (actual {a[nan_a != nan_d][:5]}, desired {d[nan_a != nan_d][:5]})"
    )
    fin = np.isfinite(d)
    assert np.array_equal(a[~fin & ~nan_d], d[~fin & ~nan_d]), f"{what}: infinities differ"
    eps = _eps(d.dtype) if eps is None else eps
    tiny = float(np.finfo(d.dtype).tiny)
    scale = np.abs(d.astype(np.float64)) if scale is None else np.broadcast_to(scale, d.shape)
    err = np.abs(a.astype(np.float64) - d.astype(np.float64))
    tol = k * eps * scale + k * tiny
    bad = fin & ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / tol, 0)), d.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {d.size} elements off; worst at {i}: "
            f"actual {a[i]!r}, desired {d[i]!r}, error {err[i]:.3g} > tol {tol[i]:.3g}"
        )


def to_backend(backend, host, layout="c"):
    """``host`` (copied) on ``backend`` as a C-contiguous, transposed or strided array."""
    host = np.asarray(host)
    if layout == "c" or host.ndim == 0:
        return backend.asarray(host.copy())
    if layout == "transposed":
        return backend.asarray(np.ascontiguousarray(host.T)).T
    assert layout == "strided"  # every other element of the last axis
    big = backend.asarray(np.zeros(host.shape[:-1] + (2 * host.shape[-1],), host.dtype))
    view = big[..., ::2]
    view[...] = backend.asarray(host.copy())
    return view


def random_array(rng, shape, dtype, scale=1.0, zeros=0.1):
    x = rng.standard_normal(shape) * scale
    x[rng.random(shape) < zeros] = 0.0
    return x.astype(dtype)


def act_scale(act, x, ref):
    """Condition scale of the forward activation at ``x`` (see module docstring)."""
    s = np.abs(ref.astype(np.float64))
    if act == "gelu":
        x = x.astype(np.float64)
        inner = GELU_C * (x + GELU_K * x ** 3)
        th = np.tanh(inner)
        s = s + np.where(np.abs(th) < 1, np.abs(x) * (1 + np.abs(inner)), np.abs(x))
    return s


def act_backward_scale(act, dy, x, y, ref):
    """Condition scale of ``dy * act'``: the terms of the formula taken in absolute value."""
    s = np.abs(ref.astype(np.float64))
    y64, ady = np.abs(y.astype(np.float64)), np.abs(dy.astype(np.float64))
    if act == "tanh":  # 1 - y*y cancels near |y| = 1
        s = s + ady * (1 + y64 * y64)
    elif act == "sigmoid":  # 1 - y cancels near y = 1
        s = s + ady * y64 * (1 + y64)
    elif act == "gelu":
        # tanh's error times |x| u'(x): 4 ulps of it, as CUDA's tanhf is 2 ulps
        # off (tanh 1) and the reference's own error comes on top, wherever
        # either side's tanh may not have rounded to +-1 yet
        limit = np.arctanh(1 - np.finfo(dy.dtype).eps) + 1
        x, dy = x.astype(np.float64), dy.astype(np.float64)
        u = GELU_C * (x + GELU_K * x ** 3)
        s = s + np.abs(dy) * (1 + np.where(np.abs(u) < limit, 4 * np.abs(x) * (1 + x * x), np.abs(x)))
    return s


def alpha_for(act, data):
    if act != "leaky_relu":
        return 0.0
    return data.draw(st.sampled_from([0.01, 0.2, 0.0, -0.1]), label="alpha")


def ref_forward(act, x, alpha):
    return ACTIVATIONS[act].forward(np, x.copy(), alpha)


shapes_2d = st.tuples(st.integers(1, 40), st.integers(1, 40))
layouts = st.sampled_from(["c", "transposed", "strided"])
seeds = st.integers(0, 2 ** 32 - 1)
scales = st.sampled_from([1.0, 4.0, 50.0])


# ------------------------------------------------------------------ gemm / bias_grad
@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 40), k=st.integers(1, 40), n=st.integers(1, 40), seed=seeds,
       trans_a=st.booleans(), trans_b=st.booleans(), give_out=st.booleans(),
       layout=layouts)
def test_gemm(backend, dtype, m, k, n, seed, trans_a, trans_b, give_out, layout):
    rng = np.random.default_rng(seed)
    a = random_array(rng, (k, m) if trans_a else (m, k), dtype)
    b = random_array(rng, (n, k) if trans_b else (k, n), dtype)
    ref = REF.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert ref.dtype == dtype and ref.shape == (m, n)
    out = to_backend(backend, np.zeros((m, n), dtype), layout) if give_out else None
    got = backend.gemm(to_backend(backend, a, layout), to_backend(backend, b, layout),
                       out=out, trans_a=trans_a, trans_b=trans_b)
    if give_out:
        assert got is out
    op_a = np.abs(a.T if trans_a else a).astype(np.float64)
    op_b = np.abs(b.T if trans_b else b).astype(np.float64)
    assert_close(got, ref, scale=k * (op_a @ op_b), eps=_eps(dtype, backend), what="gemm")


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=shapes_2d, seed=seeds, give_out=st.booleans(), layout=layouts)
def test_bias_grad(backend, dtype, shape, seed, give_out, layout):
    rng = np.random.default_rng(seed)
    dz = random_array(rng, shape, dtype, scale=3.0)
    ref = REF.bias_grad(dz)
    out = backend.zeros(shape[1], dtype) if give_out else None
    got = backend.bias_grad(to_backend(backend, dz, layout), out=out)
    if give_out:
        assert got is out
    scale = shape[0] * np.abs(dz.astype(np.float64)).sum(axis=0)
    assert_close(got, ref, scale=scale, what="bias_grad")


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_bias_act(backend, act, dtype, data):
    shape = data.draw(shapes_2d, label="shape")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    has_bias = data.draw(st.booleans(), label="has_bias")
    give_out = data.draw(st.booleans(), label="give_out")
    layout = data.draw(layouts, label="layout")
    alpha = alpha_for(act, data)
    scale = data.draw(scales, label="scale")
    z = random_array(rng, shape, dtype, scale)
    bias = random_array(rng, shape[1], dtype) if has_bias else None

    z_ref = z.copy()  # receives z + bias
    y_ref = REF.bias_act(z_ref, bias, act, alpha=alpha, out=np.empty_like(z))
    np.testing.assert_array_equal(y_ref, ref_forward(act, z_ref, alpha))  # REF == table

    zb = to_backend(backend, z, layout)
    bb = None if bias is None else to_backend(backend, bias, layout)
    out = to_backend(backend, np.zeros(shape, dtype), "c" if layout != "c" else "strided") \
        if give_out else None
    got = backend.bias_act(zb, bb, act, alpha=alpha, out=out)
    assert got is (out if give_out else zb)
    assert_close(got, y_ref, act_scale(act, z_ref, y_ref), what=f"bias_act({act})")
    if give_out:
        assert_close(zb, z_ref, what="z after bias_act (holds z + bias)")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_act_backward(backend, act, dtype, data):
    shape = data.draw(shapes_2d, label="shape")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    alpha = alpha_for(act, data)
    give_pre = ACTIVATIONS[act].needs_pre(alpha) or data.draw(st.booleans(), label="give_pre")
    give_out = data.draw(st.booleans(), label="give_out")
    layout = data.draw(layouts, label="layout")
    x = random_array(rng, shape, dtype, data.draw(scales, label="scale"))
    y = ref_forward(act, x, alpha)
    dy = random_array(rng, shape, dtype, zeros=0.0)

    ref = REF.act_backward(dy.copy(), y, act, pre=x if give_pre else None, alpha=alpha)
    table = ACTIVATIONS[act].backward(np, dy, y, x if give_pre else None, alpha)
    np.testing.assert_array_equal(ref, table)

    dyb = to_backend(backend, dy, layout)
    out = to_backend(backend, np.zeros(shape, dtype), "c" if layout != "c" else "transposed") \
        if give_out else None
    got = backend.act_backward(
        dyb, to_backend(backend, y, layout), act,
        pre=to_backend(backend, x, layout) if give_pre else None, alpha=alpha, out=out,
    )
    assert got is (out if give_out else dyb)
    assert_close(got, ref, act_backward_scale(act, dy, x, y, ref), what=f"act_backward({act})")
    if give_out:
        assert_close(dyb, dy, what="dy untouched when out is separate")


@pytest.mark.parametrize("act", [a for a in ACTS if ACTIVATIONS[a].needs_pre()])
def test_act_backward_without_needed_pre_raises(backend, act):
    y = backend.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="pre"):
        backend.act_backward(backend.asarray(np.ones((2, 3), np.float32)), y, act)


def test_unknown_activation_raises(backend):
    z = backend.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="swish"):
        backend.bias_act(z, None, "swish")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_on_edge_values(backend, act, dtype):
    alpha = 0.01 if act == "leaky_relu" else 0.0
    x = EDGE.astype(dtype).reshape(3, 4)
    y_ref = ref_forward(act, x, alpha)
    assert np.isfinite(y_ref).all()
    y = backend.bias_act(to_backend(backend, x), None, act, alpha=alpha)
    assert_close(y, y_ref, act_scale(act, x, y_ref), what=f"{act} forward on edge values")

    for dy in (np.ones_like(x), np.zeros_like(x), EDGE[::-1].astype(dtype).reshape(3, 4)):
        ref = REF.act_backward(dy.copy(), y_ref, act, pre=x, alpha=alpha)
        assert np.isfinite(ref).all()
        got = backend.act_backward(to_backend(backend, dy), to_backend(backend, y_ref), act,
                                   pre=to_backend(backend, x), alpha=alpha)
        assert_close(got, ref, act_backward_scale(act, dy, x, y_ref, ref),
                     what=f"{act} backward on edge values")

    # with a separate out, z keeps z + bias: a bias of -z[0] cancels row 0 exactly
    z = to_backend(backend, x)
    backend.bias_act(z, to_backend(backend, -x[0]), act, alpha=alpha,
                     out=backend.zeros(x.shape, dtype))
    np.testing.assert_array_equal(fastnn.to_numpy(z)[0], np.zeros(4, dtype))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_through_activations(backend, act, dtype):
    alpha = 0.01 if act == "leaky_relu" else 0.0
    x = np.array([[np.nan, 1.0, -1.0], [2.0, np.nan, 0.5]], dtype)
    y = fastnn.to_numpy(backend.bias_act(to_backend(backend, x), None, act, alpha=alpha))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(x))
    bias = np.array([0.0, np.nan, 0.0], dtype)
    y = fastnn.to_numpy(backend.bias_act(to_backend(backend, np.ones((2, 3), dtype)),
                                         to_backend(backend, bias), act, alpha=alpha))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(np.ones((2, 3)) + bias))

    # NaN in dy must reach dz wherever the local derivative is nonzero
    xs = np.array([[1.0, 2.0, 0.5], [1.5, 3.0, 0.25]], dtype)  # all with act' != 0
    ys = ref_forward(act, xs, alpha)
    dy = np.array([[np.nan, 1.0, 1.0], [1.0, 1.0, np.nan]], dtype)
    dz = fastnn.to_numpy(backend.act_backward(to_backend(backend, dy), to_backend(backend, ys),
                                              act, pre=to_backend(backend, xs), alpha=alpha))
    np.testing.assert_array_equal(np.isnan(dz), np.isnan(dy))
    if act in ("sigmoid", "tanh", "gelu"):  # a NaN saved value must reach dz as well
        bad_y = ys.copy()
        bad_y[0, 1] = np.nan
        bad_x = xs.copy()
        bad_x[0, 1] = np.nan
        dz = fastnn.to_numpy(backend.act_backward(
            to_backend(backend, np.ones_like(xs)), to_backend(backend, bad_y), act,
            pre=to_backend(backend, bad_x), alpha=alpha))
        assert np.isnan(dz[0, 1]) and np.isfinite(np.delete(dz.ravel(), 1)).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)], ids=["no-rows", "no-features"])
@pytest.mark.parametrize("act", ACTS)
def test_empty_batches(backend, act, shape):
    alpha = 0.01 if act == "leaky_relu" else 0.0
    empty = np.zeros(shape, np.float32)
    for bias in (None, np.zeros(shape[1], np.float32)):
        y = backend.bias_act(to_backend(backend, empty), None if bias is None
                             else to_backend(backend, bias), act, alpha=alpha)
        assert y.shape == shape and y.dtype == np.float32
    dz = backend.act_backward(to_backend(backend, empty), to_backend(backend, empty), act,
                              pre=to_backend(backend, empty), alpha=alpha)
    assert dz.shape == shape and dz.dtype == np.float32
    assert_close(backend.bias_grad(to_backend(backend, empty)), np.zeros(shape[1], np.float32))
    w = np.ones((shape[1], 3), np.float32)
    assert_close(backend.gemm(to_backend(backend, empty), to_backend(backend, w)),
                 np.zeros((shape[0], 3), np.float32))


def test_ops_are_safe_to_call_from_several_threads(backend):
    """One backend instance serves every thread: no shared work buffer may race."""
    def work(seed, errors):
        rng = np.random.default_rng(seed)
        x = random_array(rng, (192, 160), np.float32, zeros=0.0)
        dy = random_array(rng, x.shape, np.float32, zeros=0.0)
        cases = []
        for act in ACTS:
            y = ref_forward(act, x, 0.01)
            cases.append((act, y, REF.act_backward(dy.copy(), y, act, pre=x, alpha=0.01)))
        for _ in range(20):
            for act, y_ref, dz_ref in cases:
                y = backend.bias_act(to_backend(backend, x), None, act, alpha=0.01)
                dz = backend.act_backward(to_backend(backend, dy), to_backend(backend, y_ref),
                                          act, pre=to_backend(backend, x), alpha=0.01)
                backend.synchronize()
                for got, want in ((y, y_ref), (dz, dz_ref)):
                    # (a race gives gross errors; atol 1e-5 leaves CUDA's tanhf,
                    # 2 ulps off, its GELU derivative's few 1e-6: test_cuda_kernels)
                    if not np.allclose(fastnn.to_numpy(got), want, rtol=1e-5, atol=1e-5):
                        errors.append(f"thread {seed}: {act}")
                        return

    errors: list[str] = []
    threads = [threading.Thread(target=work, args=(seed, errors)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ------------------------------------------------------------------ vs torch
def _torch_act(act, t, alpha):
    return {
        "identity": lambda: t * 1,
        "relu": lambda: F.relu(t),
        "leaky_relu": lambda: F.leaky_relu(t, alpha),
        "sigmoid": lambda: torch.sigmoid(t),
        "tanh": lambda: torch.tanh(t),
        "gelu": lambda: F.gelu(t, approximate="tanh"),
    }[act]()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_match_torch(backend, act, dtype):
    alpha = 0.2 if act == "leaky_relu" else 0.0
    rng = np.random.default_rng(7)
    x = np.concatenate([random_array(rng, 300, dtype, 3.0), EDGE.astype(dtype)]).reshape(-1, 8)
    dy = random_array(rng, x.shape, dtype, zeros=0.0)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = _torch_act(act, xt, alpha)
    yt.backward(torch.from_numpy(dy))
    y_torch, dx_torch = yt.detach().numpy(), xt.grad.numpy()

    y = backend.bias_act(to_backend(backend, x), None, act, alpha=alpha)
    assert_close(y, y_torch, act_scale(act, x, y_torch), k=8, what=f"{act} vs torch")
    dx = backend.act_backward(to_backend(backend, dy), to_backend(backend, y_torch), act,
                              pre=to_backend(backend, x), alpha=alpha)
    assert_close(dx, dx_torch, act_backward_scale(act, dy, x, y_torch, dx_torch), k=8,
                 what=f"{act} backward vs torch")


# ------------------------------------------------------------------ softmax cross-entropy
def _xent_truth(logits, labels):
    """float64 loss, grad and a per-row condition scale for the tolerance."""
    z = logits.astype(np.float64)
    n, c = z.shape
    shifted = z - z.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    s = p.sum(axis=1, keepdims=True)
    p /= s
    loss = np.mean(np.log(s[:, 0]) - shifted[np.arange(n), labels])
    onehot = np.zeros_like(p)
    onehot[np.arange(n), labels] = 1
    grad = (p - onehot) / n
    loss_scale = 1 + np.abs(shifted).max() + np.log(c)
    grad_scale = (p * (1 + np.abs(shifted)) + onehot) / n  # exp(z - max) amplifies z's rounding
    return loss, grad, loss_scale, grad_scale


def check_softmax_xent(backend, logits, labels, layout="c", give_out=False):
    dtype = logits.dtype
    truth, g_truth, loss_scale, g_scale = _xent_truth(logits, labels)
    ref_loss, ref_grad = REF.softmax_xent(logits.copy(), labels)
    out = to_backend(backend, np.zeros(logits.shape, dtype), layout) if give_out else None
    loss, grad = backend.softmax_xent(to_backend(backend, logits, layout),
                                      backend.asarray(labels), grad_out=out)
    if give_out:
        assert grad is out
    loss_h = np.asarray(fastnn.to_numpy(loss))
    assert loss_h.shape == () and loss_h.dtype == dtype
    assert np.isfinite(loss_h)
    k = 4 * logits.shape[1]  # error grows with the row's exp-sum length
    assert_close(loss_h, np.asarray(truth, dtype), np.asarray(loss_scale), k=k, what="loss")
    assert_close(loss_h, np.asarray(ref_loss), np.asarray(loss_scale), k=2 * k, what="loss/ref")
    assert_close(grad, g_truth.astype(dtype), g_scale, k=k, what="dlogits")
    assert_close(grad, ref_grad, g_scale, k=2 * k, what="dlogits/ref")
    return loss_h, fastnn.to_numpy(grad)


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 32), c=st.integers(2, 20), seed=seeds, scale=scales,
       label_dtype=st.sampled_from([np.int64, np.int32]), layout=layouts,
       give_out=st.booleans())
def test_softmax_xent(backend, dtype, n, c, seed, scale, label_dtype, layout, give_out):
    rng = np.random.default_rng(seed)
    logits = random_array(rng, (n, c), dtype, scale)
    labels = rng.integers(0, c, n).astype(label_dtype)
    check_softmax_xent(backend, logits, labels, layout, give_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_edge_values(backend, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4],
                       [0.0, 0.0, 0.0], [1e-30, -1e-30, 0.0], [3.0, 1.0, -2.0]], dtype)
    labels = np.array([1, 0, 0, 2, 1, 0])
    loss, grad = check_softmax_xent(backend, logits, labels)
    assert np.isclose(loss, (2e4 + np.log(3) + np.log(2) + np.log(3) + np.log(3)
                             + np.log1p(np.exp(-2) + np.exp(-5))) / 6, rtol=1e-6)
    np.testing.assert_array_equal(grad[0], np.array([1, -1, 0], dtype) / dtype(6))
    assert np.isfinite(grad).all()


def test_softmax_xent_nan_propagates(backend):
    logits = np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]], np.float32)
    loss, grad = backend.softmax_xent(to_backend(backend, logits), backend.asarray(np.array([0, 1])))
    assert np.isnan(fastnn.to_numpy(loss))
    g = fastnn.to_numpy(grad)
    assert np.isnan(g[0]).all() and np.isfinite(g[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_matches_torch(backend, dtype):
    rng = np.random.default_rng(3)
    logits = random_array(rng, (64, 10), dtype, 5.0)
    logits[0, :2] = [1e4, -1e4]
    labels = rng.integers(0, 10, 64)
    lt = torch.from_numpy(logits.copy()).requires_grad_(True)
    lt_loss = F.cross_entropy(lt, torch.from_numpy(labels))
    lt_loss.backward()
    loss, grad = backend.softmax_xent(to_backend(backend, logits), backend.asarray(labels))
    _, _, loss_scale, g_scale = _xent_truth(logits, labels)
    assert_close(np.asarray(fastnn.to_numpy(loss)), lt_loss.detach().numpy(),
                 np.asarray(loss_scale), k=40, what="loss vs torch")
    assert_close(grad, lt.grad.numpy(), g_scale, k=40, what="dlogits vs torch")


# ------------------------------------------------------------------ binary losses and MSE
def _binary_truth(kind, x, t):
    """float64 (per-element loss terms, their condition scale, grad, grad scale)."""
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    inv = 1.0 / x.size
    if kind == "mse":
        d = x64 - t64
        return d * d, (np.abs(x64) + np.abs(t64)) ** 2, 2 * d * inv, 2 * (np.abs(x64) + np.abs(t64)) * inv
    if kind == "bce":
        with np.errstate(divide="ignore"):
            log_p, log_1mp = np.maximum(np.log(x64), -100), np.maximum(np.log1p(-x64), -100)
        terms = -(t64 * log_p + (1 - t64) * log_1mp)
        denom = np.maximum((1 - x64) * x64, BCE_EPSILON)  # torch's float32(1e-12)
        return (terms, np.abs(t64 * log_p) + np.abs((1 - t64) * log_1mp),
                (x64 - t64) / denom * inv, (np.abs(x64) + np.abs(t64)) / denom * inv)
    with np.errstate(over="ignore"):
        sig = 1 / (1 + np.exp(-x64))
    soft = np.log1p(np.exp(-np.abs(x64)))
    terms = np.maximum(x64, 0) - x64 * t64 + soft
    return (terms, np.abs(x64) * (1 + np.abs(t64)) + soft,
            (sig - t64) * inv, (sig + np.abs(t64)) * inv)


def _binary_inputs(rng, kind, shape, dtype):
    if kind == "bce":
        x = rng.uniform(0, 1, shape)
        x[rng.random(shape) < 0.1] = 0.0
        x[rng.random(shape) < 0.1] = 1.0
    else:
        x = rng.standard_normal(shape) * (8 if kind == "bce_logits" else 2)
    t = rng.uniform(0, 1, shape)
    exact = rng.random(shape) < 0.5  # half the targets exactly 0 or 1
    t[exact] = np.round(t[exact])
    return x.astype(dtype), t.astype(dtype)


def check_binary_loss(backend, kind, x, t, layout="c"):
    """The backend's mse / bce / bce_with_logits against the float64 truth and
    the generic reference: a 0-d loss of x's dtype, grad written to grad_out."""
    dtype = x.dtype
    op = {"mse": "mse", "bce": "bce", "bce_logits": "bce_with_logits"}[kind]
    terms, term_scale, g_truth, g_scale = _binary_truth(kind, x, t)
    ref_loss, ref_grad = getattr(REF, op)(x.copy(), t.copy(), np.empty_like(x))
    out = to_backend(backend, np.zeros(x.shape, dtype), layout)
    loss, grad = getattr(backend, op)(to_backend(backend, x, layout), to_backend(backend, t, layout),
                                      out)
    assert grad is out
    loss_h = np.asarray(fastnn.to_numpy(loss))
    assert loss_h.shape == () and loss_h.dtype == dtype
    k = 8 * (2 + int(np.log2(x.size)))  # a sum of x.size terms
    scale = np.asarray(term_scale.mean())
    assert_close(loss_h, np.asarray(terms.mean(), dtype), scale, k=k, what="loss")
    assert_close(loss_h, ref_loss, scale, k=2 * k, what="loss/ref")
    assert_close(grad, g_truth.astype(dtype), g_scale, k=8, what="grad")
    assert_close(grad, ref_grad, g_scale, k=16, what="grad/ref")


BINARY = ["mse", "bce", "bce_logits"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", BINARY)
@given(shape=st.one_of(shapes_2d, st.tuples(st.integers(1, 1100), st.just(1))), seed=seeds,
       layout=layouts)
def test_binary_losses(backend, kind, dtype, shape, seed, layout):
    rng = np.random.default_rng(seed)
    x, t = _binary_inputs(rng, kind, shape, dtype)
    check_binary_loss(backend, kind, x, t, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", BINARY)
def test_binary_losses_either_side_of_the_numba_fused_size(backend, kind, dtype):
    """The Numba backend fuses these losses up to FUSED_BINARY_LOSS_MAX elements
    and uses the NumPy chain above it: both sides agree with the truth."""
    from fastnn.backends.numba_backend import FUSED_BINARY_LOSS_MAX as edge

    rng = np.random.default_rng(7)
    for shape in ((edge, 1), (edge + 1, 1), (edge // 4, 4), (3, edge // 2)):
        x, t = _binary_inputs(rng, kind, shape, dtype)
        check_binary_loss(backend, kind, x, t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_edge_values(backend, dtype):
    """p = 0 and 1 (the logs clamped at -100), huge logits, exact targets."""
    p = np.array([[0.0, 1.0, 0.0, 1.0, 0.5, 1e-20, 1 - 1e-7]], dtype)
    t = np.array([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]], dtype)
    check_binary_loss(backend, "bce", p, t)
    x = np.array([[1e4, -1e4, 1e4, -1e4, 88.0, -88.0, 700.0 if dtype == np.float64 else 80.0, 0.0]],
                 dtype)
    t = np.array([[1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 1.0, 0.5]], dtype)
    check_binary_loss(backend, "bce_logits", x, t)


@pytest.mark.parametrize("op", ["mse", "bce", "bce_with_logits"])
def test_binary_losses_propagate_nan(backend, op):
    """A NaN prediction gives a NaN loss and a NaN gradient there (fit then
    stops with TrainingDiverged), never a clamp that hides it."""
    x = np.array([[0.2], [np.nan], [0.7]], np.float32)
    loss, grad = getattr(backend, op)(to_backend(backend, x), backend.asarray(np.ones_like(x)),
                                      to_backend(backend, np.zeros_like(x)))
    g = fastnn.to_numpy(grad)
    assert np.isnan(fastnn.to_numpy(loss)) and np.isnan(g[1]).all()
    assert np.isfinite(g[[0, 2]]).all()


def test_numba_fuses_small_binary_losses_only():
    from fastnn.backends import numba_backend, numba_kernels

    if fastnn.available_backends()["numba"] is not None:
        pytest.skip("numba is not usable here")
    with fastnn.use_backend("numba") as backend:  # restores the previous backend
        pass
    calls = []
    real = {name: getattr(numba_kernels, name) for name in ("bce_1d", "bce_logits_1d")}
    try:
        for name, fn_ in real.items():
            setattr(numba_kernels, name, lambda *a, _f=fn_, _n=name: calls.append(_n) or _f(*a))
        for n in (numba_backend.FUSED_BINARY_LOSS_MAX, numba_backend.FUSED_BINARY_LOSS_MAX + 1):
            x = np.full((n, 1), 0.25, np.float32)
            backend.bce(x, x, np.empty_like(x))
            backend.bce_with_logits(x, x, np.empty_like(x))
    finally:
        for name, fn_ in real.items():
            setattr(numba_kernels, name, fn_)
    assert calls == ["bce_1d", "bce_logits_1d"]


# ------------------------------------------------------------------ optimizers
SGD_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01),
    dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.01),
]
ADAM_CONFIGS = [
    dict(weight_decay=0.0, decoupled=False),
    dict(weight_decay=0.05, decoupled=False),
    dict(weight_decay=0.0, decoupled=True),
    dict(weight_decay=0.05, decoupled=True),
]
RMSPROP_CONFIGS = [
    dict(centered=False, momentum=0.0, weight_decay=0.0),
    dict(centered=True, momentum=0.0, weight_decay=0.0),
    dict(centered=False, momentum=0.9, weight_decay=0.01),
    dict(centered=True, momentum=0.9, weight_decay=0.01),
]


def _cfg_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def run_optimizer(backend, kind, cfg, param, grads, layout="c"):
    """Apply ``grads`` (a list) with ``backend``'s op; return host param and state."""
    n, dtype = param.shape[0], param.dtype
    p = to_backend(backend, param, layout)

    def state():
        return to_backend(backend, np.zeros(n, dtype), layout)

    if kind == "sgd":
        st_ = {"buf": state() if cfg["momentum"] else None}
    elif kind == "adam":
        st_ = {"exp_avg": state(), "exp_avg_sq": state()}
    else:
        st_ = {"square_avg": state(), "buf": state() if cfg["momentum"] else None,
               "grad_avg": state() if cfg["centered"] else None}
    for step, g in enumerate(grads, start=1):
        gb = to_backend(backend, g, layout)
        if kind == "sgd":
            backend.sgd_step(p, gb, st_["buf"], lr=0.1, first_step=step == 1, **cfg)
        elif kind == "adam":
            backend.adam_step(p, gb, st_["exp_avg"], st_["exp_avg_sq"], step=step, lr=0.01,
                              beta1=0.9, beta2=0.999, eps=1e-8, **cfg)
        else:
            backend.rmsprop_step(p, gb, st_["square_avg"], lr=0.01, alpha=0.99, eps=1e-8,
                                 buf=st_["buf"], grad_avg=st_["grad_avg"], **cfg)
        np.testing.assert_array_equal(fastnn.to_numpy(gb), g)  # grads are read-only
    host = {k: fastnn.to_numpy(v) for k, v in st_.items() if v is not None}
    for k, v in list(st_.items()) + [("param", p)]:
        if v is not None:
            assert v.dtype == dtype, f"{k} changed dtype to {v.dtype}"
    return fastnn.to_numpy(p), host


def check_optimizer(backend, kind, cfg, param, grads, layout="c", k=K):
    p_ref, s_ref = run_optimizer(REF, kind, cfg, param, grads)
    p_got, s_got = run_optimizer(backend, kind, cfg, param, grads, layout)
    moved = np.abs(p_ref.astype(np.float64) - param)
    cond = 1.0
    if kind == "rmsprop" and cfg["centered"]:  # sqrt(sq - ga^2) cancels
        sq, ga = s_ref["square_avg"].astype(np.float64), s_ref["grad_avg"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = np.nan_to_num(sq / (sq - ga * ga), nan=1.0, posinf=1e6)
    assert_close(p_got, p_ref, np.abs(p_ref) + len(grads) * moved * cond, k=k,
                 what=f"{kind} param")
    for name, ref in s_ref.items():
        assert_close(s_got[name], ref, k=k, what=f"{kind} {name}")


OPT_CASES = (
    [pytest.param("sgd", c, id="sgd-" + _cfg_id(c)) for c in SGD_CONFIGS]
    + [pytest.param("adam", c, id="adam-" + _cfg_id(c)) for c in ADAM_CONFIGS]
    + [pytest.param("rmsprop", c, id="rmsprop-" + _cfg_id(c)) for c in RMSPROP_CONFIGS]
)


@pytest.mark.parametrize("kind, cfg", OPT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(n=st.integers(1, 300), steps=st.integers(1, 4), seed=seeds,
       layout=st.sampled_from(["c", "strided"]))
def test_optimizer_steps(backend, kind, cfg, dtype, n, steps, seed, layout):
    rng = np.random.default_rng(seed)
    param = random_array(rng, n, dtype)
    grads = [random_array(rng, n, dtype) for _ in range(steps)]
    check_optimizer(backend, kind, cfg, param, grads, layout)


@pytest.mark.parametrize("kind, cfg", OPT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_edge_values(backend, kind, cfg, dtype):
    param = np.array([0.0, 1.0, -1.0, 1e4, -1e4, 1e-30, -1e-30, 0.5], dtype)
    grads = [np.zeros(8, dtype), param[::-1].copy(), np.full(8, 1e-30, dtype),
             np.array([1e4, -1e4, 0, 1, -1, 1e-30, 0, 3], dtype)]
    check_optimizer(backend, kind, cfg, param, grads)
    # a NaN gradient must reach its parameter (and only that one)
    nan_grads = [g.copy() for g in grads[:2]]
    nan_grads[1][2] = np.nan
    p, _ = run_optimizer(backend, kind, cfg, param, nan_grads)
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()
