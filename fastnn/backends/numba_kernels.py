"""Numba-JIT fused CPU kernels (serial, cached on disk).

Serial on purpose: on 2 cores these passes are memory-bound, and a parallel
Numba region called between OpenBLAS GEMMs stalled (11.4 ms -> 20 ms per
GEMM+ReLU pair, measured) as the two thread pools spin against each other.
BLAS keeps the cores; the kernels stay on the calling thread.

Transcendentals (tanh, exp in sigmoid/GELU forward) are *not* here: this Numba
has no SVML and its scalar tanh ran 30x slower than NumPy's vectorised one, so
those stay NumPy in-place ufuncs (see numba_backend.py).

Activation codes follow ``activations.ACTIVATIONS``: 0 identity, 1 relu,
2 leaky_relu, 3 sigmoid, 4 tanh. Scalars arrive already cast to the array
dtype, so float32 math stays float32.
"""
from __future__ import annotations

import math

from numba import njit

from . import activations
from .activations import ACTIVATIONS, GELU_C, GELU_K
from .jit_cache import track_sources

# The table's codes, as module constants Numba freezes into the kernels.
IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, GELU = (
    ACTIVATIONS[name].code for name in ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu")
)


@njit(cache=True, nogil=True)
def act_value(v, code, alpha):
    """act(v) for one element: the Numba definition of every activation."""
    one = alpha - alpha + 1
    zero = alpha - alpha
    if code == RELU:
        return v if (v > zero or v != v) else zero
    if code == LEAKY_RELU:
        return v if v > zero else v * alpha
    if code == SIGMOID:
        return one / (one + math.exp(-v))
    if code == TANH:
        return math.tanh(v)
    if code == GELU:
        c = alpha - alpha + GELU_C
        k = alpha - alpha + GELU_K
        return (one / 2) * v * (one + math.tanh(c * (v + k * v * v * v)))
    return v


@njit(cache=True, nogil=True)
def act_grad_value(g, y, z, code, alpha):
    """dy * act'(.) from the output y (or the pre-activation z)."""
    one = alpha - alpha + 1
    zero = alpha - alpha
    if code == RELU:
        return g if y > zero else zero
    if code == LEAKY_RELU:
        return g if z > zero else g * alpha
    if code == SIGMOID:
        return g * (y * (one - y))
    if code == TANH:
        return g * (one - y * y)
    if code == GELU:
        c = alpha - alpha + GELU_C
        k = alpha - alpha + GELU_K
        th = math.tanh(c * (z + k * z * z * z))
        d_inner = c * (one + 3 * k * z * z)
        return g * ((one / 2) * (one + th) + (one / 2) * z * (one - th * th) * d_inner)
    return g


@njit(cache=True, nogil=True)
def bce_logits_term(x, t, zero):
    """One element of BCEWithLogitsLoss's sum: max(x, 0) - x t + log1p(exp(-|x|))
    (``zero`` of the dtype: an int literal would make float32 math float64)."""
    relu = x if (x > zero or x != x) else zero
    return relu - x * t + math.log1p(math.exp(-abs(x)))


@njit(cache=True, nogil=True)
def bce_term(p, t, one, floor):
    """One element of BCELoss's sum, as torch: -(t log p + (1 - t) log(1 - p)),
    each log clamped at ``floor`` (-100): p = 0 or 1 is valid input."""
    if p != p:
        return p
    log_p = max(math.log(p), floor) if p > one - one else floor
    log_q = max(math.log1p(-p), floor) if p < one else floor
    return -(t * log_p + (one - t) * log_q)


@njit(cache=True, nogil=True)
def bce_grad(p, t, one, eps, inv_size):
    """d BCELoss / d p of one element, as torch: (p - t) / max(p (1 - p), eps) / size."""
    q = (one - p) * p
    return (p - t) / (q if (q > eps or q != q) else eps) * inv_size


@njit(cache=True, nogil=True, error_model="numpy")
def bias_act_inplace_2d(z, bias, act, alpha, has_bias):
    """z = act(z + bias) for act in {identity, relu, leaky_relu}.

    A separate one-array kernel: with ``out`` aliasing ``z`` LLVM cannot prove
    the stores independent and does not vectorise (0.40 vs 0.054 ms at 1024^2).
    """
    n, m = z.shape
    zero = alpha - alpha  # a zero of the array's dtype
    for i in range(n):
        zi = z[i]
        for j in range(m):
            v = zi[j] + bias[j] if has_bias else zi[j]
            if act == RELU:
                zi[j] = zero if v < zero else v  # NaN propagates
            elif act == LEAKY_RELU:
                zi[j] = v if v > zero else v * alpha
            else:
                zi[j] = v


@njit(cache=True, nogil=True, error_model="numpy")
def bias_act_small_2d(z, bias, out, act, alpha, has_bias, in_place):
    """bias + sigmoid / tanh / gelu for *small* arrays, where NumPy's per-call
    overhead (several ufuncs, ~1 us each) outweighs Numba's scalar libm calls."""
    n, m = z.shape
    for i in range(n):
        for j in range(m):
            v = z[i, j]
            if has_bias:
                v += bias[j]
                if not in_place:
                    z[i, j] = v
            out[i, j] = act_value(v, act, alpha)


@njit(cache=True, nogil=True, error_model="numpy")
def bias_act_2d(z, bias, out, act, alpha, has_bias):
    """z += bias (only when has_bias); out = act(z); ``out`` must not alias ``z``."""
    n, m = z.shape
    zero = alpha - alpha
    for i in range(n):
        zi = z[i]
        oi = out[i]
        for j in range(m):
            v = zi[j]
            if has_bias:
                v += bias[j]
                zi[j] = v
            if act == RELU:
                oi[j] = zero if v < zero else v
            elif act == LEAKY_RELU:
                oi[j] = v if v > zero else v * alpha
            else:
                oi[j] = v


@njit(cache=True, nogil=True, error_model="numpy")
def act_backward_1d(dy, y, pre, out, act, alpha, use_pre):
    """out = dy * act'(.) over flat contiguous buffers, from y (or pre).

    One loop per activation (branch outside the loop) so each vectorises.
    """
    one = alpha - alpha + 1
    zero = alpha - alpha
    ref = pre if use_pre else y
    n = dy.shape[0]
    if act == RELU:
        for i in range(n):
            out[i] = dy[i] if ref[i] > zero else zero
    elif act == LEAKY_RELU:
        for i in range(n):
            out[i] = dy[i] if ref[i] > zero else dy[i] * alpha
    elif act == SIGMOID:
        for i in range(n):
            out[i] = dy[i] * (y[i] * (one - y[i]))
    elif act == TANH:
        for i in range(n):
            out[i] = dy[i] * (one - y[i] * y[i])
    else:
        for i in range(n):
            out[i] = dy[i]


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_xent_2d(logits, labels, grad, inv_n):
    """Per row: stable log-softmax loss; grad = (softmax - onehot) * inv_n.

    Returns the summed loss (float64 accumulator) for the caller to average.
    """
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        mx = logits[i, 0]
        for j in range(1, c):
            if logits[i, j] > mx or logits[i, j] != logits[i, j]:
                mx = logits[i, j]
        s = 0.0
        for j in range(c):
            e = math.exp(logits[i, j] - mx)
            grad[i, j] = e
            s += e
        label = labels[i]
        total += math.log(s) - (logits[i, label] - mx)
        scale = inv_n / s
        for j in range(c):
            grad[i, j] = grad[i, j] * scale
        grad[i, label] -= inv_n
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def bce_1d(pred, target, grad, inv_n, eps):
    """BCELoss over flat arrays in one pass: grad = bce_grad per element;
    returns the sum of bce_term (float64 accumulator) for the caller to average."""
    one = inv_n - inv_n + 1
    floor = one - 101
    total = 0.0
    for i in range(pred.shape[0]):
        total += bce_term(pred[i], target[i], one, floor)
        grad[i] = bce_grad(pred[i], target[i], one, eps, inv_n)
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def bce_logits_1d(logits, target, grad, inv_n):
    """BCEWithLogitsLoss over flat arrays in one pass: grad = (sigmoid(x) - t)
    * inv_n; returns the sum of bce_logits_term (float64 accumulator)."""
    zero = inv_n - inv_n
    total = 0.0
    for i in range(logits.shape[0]):
        x = logits[i]
        total += bce_logits_term(x, target[i], zero)
        grad[i] = (act_value(x, SIGMOID, zero) - target[i]) * inv_n
    return total


@njit(cache=True, nogil=True, error_model="numpy")
def sgd_1d(param, grad, buf, lr, momentum, dampening_c, weight_decay,
           nesterov, first_step, use_momentum, use_wd):
    for i in range(param.shape[0]):
        g = grad[i]
        if use_wd:
            g = g + weight_decay * param[i]
        if use_momentum:
            if first_step:
                b = g
            else:
                b = buf[i] * momentum + dampening_c * g
            buf[i] = b
            if nesterov:
                g = g + momentum * b
            else:
                g = b
        param[i] = param[i] - lr * g


@njit(cache=True, nogil=True, error_model="numpy")
def adam_1d(param, grad, exp_avg, exp_avg_sq, one_minus_b1, beta2, one_minus_b2,
            step_size, bc2_sqrt, eps, weight_decay, decay_factor, use_wd, decoupled):
    for i in range(param.shape[0]):
        p = param[i]
        g = grad[i]
        if decoupled:
            p = p * decay_factor
        elif use_wd:
            g = g + weight_decay * p
        m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i])
        v = exp_avg_sq[i] * beta2 + one_minus_b2 * g * g
        exp_avg[i] = m
        exp_avg_sq[i] = v
        denom = math.sqrt(v) / bc2_sqrt + eps
        param[i] = p - step_size * (m / denom)


@njit(cache=True, nogil=True, error_model="numpy")
def rmsprop_1d(param, grad, square_avg, buf, grad_avg, lr, alpha, one_minus_alpha,
               eps, weight_decay, momentum, use_wd, centered, use_momentum):
    for i in range(param.shape[0]):
        g = grad[i]
        if use_wd:
            g = g + weight_decay * param[i]
        sq = square_avg[i] * alpha + one_minus_alpha * g * g
        square_avg[i] = sq
        if centered:
            ga = grad_avg[i] + one_minus_alpha * (g - grad_avg[i])
            grad_avg[i] = ga
            avg = math.sqrt(sq - ga * ga) + eps
        else:
            avg = math.sqrt(sq) + eps
        if use_momentum:
            b = buf[i] * momentum + g / avg
            buf[i] = b
            param[i] = param[i] - lr * b
        else:
            param[i] = param[i] - lr * (g / avg)


# The activation codes and GELU constants above are frozen into these kernels.
track_sources(globals(), activations)
