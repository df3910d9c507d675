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

import numpy as np
from numba import njit

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH = 0, 1, 2, 3, 4


@njit(cache=True, nogil=True)
def bias_act_2d(z, bias, out, act, alpha, has_bias):
    """z += bias; out = act(z) for act in {identity, relu, leaky_relu}."""
    n, m = z.shape
    zero = alpha - alpha  # a zero of the array's dtype
    for i in range(n):
        for j in range(m):
            v = z[i, j]
            if has_bias:
                v += bias[j]
                z[i, j] = v
            if act == RELU:
                out[i, j] = v if (v > zero or v != v) else zero  # NaN propagates
            elif act == LEAKY_RELU:
                out[i, j] = v if v > zero else v * alpha
            else:
                out[i, j] = v


@njit(cache=True, nogil=True)
def act_backward_1d(dy, y, pre, out, act, alpha, use_pre):
    """out = dy * act'(.) over flat contiguous buffers, from y (or pre)."""
    one = alpha - alpha + 1
    zero = alpha - alpha
    for i in range(dy.shape[0]):
        g = dy[i]
        if act == RELU:
            r = pre[i] if use_pre else y[i]
            out[i] = g if r > zero else zero
        elif act == LEAKY_RELU:
            r = pre[i] if use_pre else y[i]
            out[i] = g if r > zero else g * alpha
        elif act == SIGMOID:
            v = y[i]
            out[i] = g * (v * (one - v))
        elif act == TANH:
            v = y[i]
            out[i] = g * (one - v * v)
        else:
            out[i] = g


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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
