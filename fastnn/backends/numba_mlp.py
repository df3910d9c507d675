"""One Numba call that runs many training steps of a small MLP.

For tiny networks (XOR, parity, small regressions) a step is a few hundred
multiply-adds, and Python's per-op overhead is the whole cost. This kernel
runs forward, loss, backward and the optimizer update for every batch of one
or more epochs without returning to Python. It follows the ordinary path's
math op for op (same activation formulas, same loss scaling; the update *is*
``numba_kernels.sgd_1d`` / ``adam_1d`` over the optimizer's flat buffers);
only the matmul summation order differs from BLAS, so results agree to
rounding.

layout[l] = (in, out, weight offset, bias offset or -1) into the flat buffers.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import activations, constants, numba_kernels
from .constants import BCE_EPSILON
from .jit_cache import track_sources
from .numba_kernels import (SIGMOID, act_grad_value, act_value, adam_1d, bce_grad, bce_logits_term,
                            bce_term, sgd_1d)

# compiled.LOSS_KINDS: MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, BCELoss (after a sigmoid).
LOSS_MSE, LOSS_XENT, LOSS_BCE_LOGITS, LOSS_BCE = 0, 1, 2, 3
OPT_SGD, OPT_ADAM = 0, 1


@njit(cache=True, nogil=True)
def train_mlp(X, Yf, Yi, orders, batch_size, params, grads, state1, state2,
              layout, acts, alphas, loss_kind, opt_kind, hyper, step0, losses):
    """Run len(orders) epochs; returns the number of steps done (stops at the
    first non-finite loss, before its update, like the ordinary path).

    hyper (float64): SGD: lr, momentum, dampening, weight_decay, nesterov;
    Adam: lr, beta1, beta2, eps, weight_decay, decoupled.
    """
    n = X.shape[0]
    n_layers = layout.shape[0]
    dt = np.empty(1, dtype=params.dtype)  # scratch for casts to the param dtype
    zero, one = _as(dt, 0.0), _as(dt, 1.0)
    floor, eps = _as(dt, -100.0), _as(dt, BCE_EPSILON)  # BCELoss's log clamp and torch's epsilon
    width = 0
    for l in range(n_layers):
        width = max(width, layout[l, 0], layout[l, 1])
    # Activations A[l] (post) and Z[l] (pre) for every layer, and two dA buffers.
    A = np.zeros((n_layers + 1, batch_size, width), dtype=params.dtype)
    Z = np.zeros((n_layers + 1, batch_size, width), dtype=params.dtype)
    dA = np.zeros((batch_size, width), dtype=params.dtype)
    dZ = np.zeros((batch_size, width), dtype=params.dtype)
    out_dim = layout[n_layers - 1, 1]
    n_batches = (n + batch_size - 1) // batch_size
    step = step0
    done = 0
    for e in range(orders.shape[0]):
        for b in range(n_batches):
            lo = b * batch_size
            hi = min(lo + batch_size, n)
            m = hi - lo
            for r in range(m):
                src = orders[e, lo + r]
                for j in range(layout[0, 0]):
                    A[0, r, j] = X[src, j]
            # ---------------- forward
            for l in range(n_layers):
                fi, fo, wo, bo = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
                code, alpha = acts[l], alphas[l]
                for r in range(m):
                    for j in range(fo):
                        Z[l + 1, r, j] = 0
                    for k in range(fi):
                        a = A[l, r, k]
                        for j in range(fo):
                            Z[l + 1, r, j] += a * params[wo + k * fo + j]
                    for j in range(fo):
                        v = Z[l + 1, r, j]
                        if bo >= 0:
                            v += params[bo + j]
                            Z[l + 1, r, j] = v
                        A[l + 1, r, j] = act_value(v, code, alpha)
            # ---------------- loss and its gradient (into dA)
            total = 0.0
            if loss_kind != LOSS_XENT:  # elementwise: MSE, BCE on logits, BCE on probabilities
                scale = _as(dt, 2.0 / (m * out_dim))
                inv = _as(dt, 1.0 / (m * out_dim))
                acc = zero
                for r in range(m):
                    src = orders[e, lo + r]
                    for j in range(out_dim):
                        x = A[n_layers, r, j]
                        t = Yf[src, j]
                        if loss_kind == LOSS_MSE:
                            d = x - t
                            acc += d * d
                            dA[r, j] = d * scale
                        elif loss_kind == LOSS_BCE_LOGITS:
                            acc += bce_logits_term(x, t, zero)
                            dA[r, j] = (act_value(x, SIGMOID, zero) - t) * inv
                        else:
                            acc += bce_term(x, t, one, floor)
                            dA[r, j] = bce_grad(x, t, one, eps, inv)
                total = acc * inv
            else:
                inv_n = _as(dt, 1.0 / m)
                s_total = 0.0
                for r in range(m):
                    mx = A[n_layers, r, 0]
                    for j in range(1, out_dim):
                        v = A[n_layers, r, j]
                        if v > mx or v != v:
                            mx = v
                    s = 0.0
                    for j in range(out_dim):
                        ex = math.exp(A[n_layers, r, j] - mx)
                        dA[r, j] = ex
                        s += ex
                    label = Yi[orders[e, lo + r]]
                    s_total += math.log(s) - (A[n_layers, r, label] - mx)
                    sc = inv_n / s
                    for j in range(out_dim):
                        dA[r, j] = dA[r, j] * sc
                    dA[r, label] -= inv_n
                total = s_total / m
            losses[done] = total
            if not math.isfinite(total):
                return done
            # ---------------- backward
            for l in range(n_layers - 1, -1, -1):
                fi, fo, wo, bo = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
                code, alpha = acts[l], alphas[l]
                for r in range(m):
                    for j in range(fo):
                        dZ[r, j] = act_grad_value(dA[r, j], A[l + 1, r, j], Z[l + 1, r, j], code, alpha)
                for k in range(fi):
                    for j in range(fo):
                        grads[wo + k * fo + j] = 0
                for r in range(m):
                    for k in range(fi):
                        a = A[l, r, k]
                        for j in range(fo):
                            grads[wo + k * fo + j] += a * dZ[r, j]
                if bo >= 0:
                    for j in range(fo):
                        acc = _as(dt, 0.0)
                        for r in range(m):
                            acc += dZ[r, j]
                        grads[bo + j] = acc
                if l > 0:
                    for r in range(m):
                        for k in range(fi):
                            acc = _as(dt, 0.0)
                            for j in range(fo):
                                acc += dZ[r, j] * params[wo + k * fo + j]
                            dA[r, k] = acc
            # ---------------- update (the flat kernels' math)
            step += 1
            _update(params, grads, state1, state2, opt_kind, hyper, step, dt)
            done += 1
    return done


@njit(cache=True, nogil=True)
def _as(dt, value):
    """``value`` cast to the dtype of the 1-element array ``dt``."""
    dt[0] = value
    return dt[0]


@njit(cache=True, nogil=True)
def _update(params, grads, state1, state2, opt_kind, hyper, step, dt):
    """The flat-buffer update kernels themselves, so both paths share one rule."""
    if opt_kind == OPT_SGD:
        sgd_1d(params, grads, state1, _as(dt, hyper[0]), _as(dt, hyper[1]),
               _as(dt, 1.0 - hyper[2]), _as(dt, hyper[3]), hyper[4] != 0.0, step == 1,
               hyper[1] != 0.0, hyper[3] != 0.0)
    else:
        lr, beta1, beta2, eps, wd = hyper[0], hyper[1], hyper[2], hyper[3], hyper[4]
        adam_1d(params, grads, state1, state2, _as(dt, 1.0 - beta1), _as(dt, beta2),
                _as(dt, 1.0 - beta2), _as(dt, lr / (1.0 - beta1 ** step)),
                _as(dt, (1.0 - beta2 ** step) ** 0.5), _as(dt, eps), _as(dt, wd),
                _as(dt, 1.0 - lr * wd), wd != 0.0, hyper[5] != 0.0)


# Built from numba_kernels' functions and the constants of activations.py and constants.py.
track_sources(globals(), numba_kernels, activations, constants)
