"""Numba backend: NumPy arrays, fused JIT kernels for the hot elementwise ops.

Only this module (and numba_kernels) imports numba, and only when the backend
is first used. Shapes or layouts the kernels do not cover fall back to the
NumPy implementation.
"""
from __future__ import annotations

import numpy as np

from .activations import get_activation
from .base import adam_bias_correction
from .constants import BCE_EPSILON
from .numpy_backend import NumpyBackend

_FUSED_FORWARD = {"identity", "relu", "leaky_relu"}
# Transcendental activations go to Numba only below this many elements: above
# it NumPy's SIMD tanh/exp win (Numba here has no SVML: 30x slower per element).
SMALL_ARRAY = 2048
_SMALL_FORWARD = {"sigmoid", "tanh", "gelu"}
# BCE losses as one JIT pass up to this many elements: two scalar log/exp per
# element against NumPy's ~10 vectorised calls. Measured on the 2-core Xeon
# (us, numba vs NumPy): bce 3.0 vs 13 at 64, 7.9 vs 14.8 at 512, even near
# 1200; with logits 10.1 vs 13.2 at 512, even near 700.
FUSED_BINARY_LOSS_MAX = 512
_FUSED_BACKWARD = {"identity", "relu", "leaky_relu", "sigmoid", "tanh"}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_NO_BIAS = {dt: np.empty(0, dt) for dt in _FLOATS}  # typed placeholder when bias is None


def _kernel_layout(z, bias, out) -> bool:
    """The 2-D kernels take z (N, F) float, out like z, bias (F,) of the same dtype or None."""
    return (
        z.ndim == 2 and z.dtype in _FLOATS and out.dtype == z.dtype and out.shape == z.shape
        and (bias is None or (bias.dtype == z.dtype and bias.shape == (z.shape[1],)))
    )


def _same_layout(a, b) -> bool:
    """b matches a's shape and dtype and both are C-contiguous (flat views are free)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.flags.c_contiguous and b.flags.c_contiguous


class NumbaBackend(NumpyBackend):
    name = "numba"

    def __init__(self):
        super().__init__()
        from . import numba_kernels  # imports numba: only now

        self.k = numba_kernels
        from .. import threads

        threads.apply()

    @property
    def device(self) -> str:
        return "cpu (numba jit)"

    # ------------------------------------------------------------ activations
    def bias_act(self, z, bias, act, alpha=0.0, out=None):
        if out is None:
            out = z
        if not _kernel_layout(z, bias, out):
            return super().bias_act(z, bias, act, alpha, out)
        t = z.dtype.type
        b = bias if bias is not None else _NO_BIAS[z.dtype]  # z[0] fails for 0 rows
        if act in _FUSED_FORWARD:
            if out is z:
                self.k.bias_act_inplace_2d(z, b, self.k_code(act), t(alpha), bias is not None)
                return out
            if not np.may_share_memory(out, z):
                self.k.bias_act_2d(z, b, out, self.k_code(act), t(alpha), bias is not None)
                return out
        elif act in _SMALL_FORWARD and z.size <= SMALL_ARRAY and (
                out is z or not np.may_share_memory(out, z)):
            self.k.bias_act_small_2d(z, b, out, self.k_code(act), t(alpha), bias is not None,
                                     out is z)
            return out
        return super().bias_act(z, bias, act, alpha, out)

    def act_backward(self, dy, y, act, pre=None, alpha=0.0, out=None):
        if out is None:
            out = dy
        use_pre = pre is not None
        ref = pre if use_pre else y
        if (
            act in _FUSED_BACKWARD
            and dy.dtype in _FLOATS
            and not (act == "leaky_relu" and alpha <= 0 and not use_pre)
            and _same_layout(dy, y) and _same_layout(dy, ref) and _same_layout(dy, out)
        ):
            self.k.act_backward_1d(
                dy.reshape(-1), y.reshape(-1), ref.reshape(-1), out.reshape(-1),
                self.k_code(act), dy.dtype.type(alpha), use_pre,
            )
            return out
        return super().act_backward(dy, y, act, pre, alpha, out)

    @staticmethod
    def k_code(act: str) -> int:
        return get_activation(act).code

    # ------------------------------------------------------------ losses
    def _fused_binary(self, x, target, grad_out):
        """Whether a binary loss runs as one JIT pass: small batches, where the
        NumPy chain's ~10 calls cost more than the math."""
        return (x.size <= FUSED_BINARY_LOSS_MAX and x.dtype in _FLOATS
                and _same_layout(x, target) and _same_layout(x, grad_out))

    def bce(self, pred, target, grad_out, seen=None):
        if seen is not None or not self._fused_binary(pred, target, grad_out):
            return super().bce(pred, target, grad_out, seen)
        t = pred.dtype.type
        total = self.k.bce_1d(pred.reshape(-1), target.reshape(-1), grad_out.reshape(-1),
                              t(1.0 / pred.size), t(BCE_EPSILON))
        return t(total / pred.size), grad_out

    def bce_with_logits(self, logits, target, grad_out):
        if not self._fused_binary(logits, target, grad_out):
            return super().bce_with_logits(logits, target, grad_out)
        t = logits.dtype.type
        total = self.k.bce_logits_1d(logits.reshape(-1), target.reshape(-1),
                                     grad_out.reshape(-1), t(1.0 / logits.size))
        return t(total / logits.size), grad_out

    def softmax_xent(self, logits, labels, grad_out=None):
        if logits.ndim != 2 or logits.dtype not in _FLOATS or not logits.flags.c_contiguous:
            return super().softmax_xent(logits, labels, grad_out)
        n = logits.shape[0]
        grad = np.empty_like(logits) if grad_out is None else grad_out
        total = self.k.softmax_xent_2d(logits, labels, grad, logits.dtype.type(1.0 / n))
        return logits.dtype.type(total / n), grad

    # ------------------------------------------------------------ optimizers
    def sgd_step(self, param, grad, buf, *, lr, momentum, dampening, nesterov,
                 weight_decay, first_step):
        t = param.dtype.type
        self.k.sgd_1d(
            param, grad, grad if buf is None else buf, t(lr), t(momentum),
            t(1 - dampening), t(weight_decay), bool(nesterov), bool(first_step),
            bool(momentum), bool(weight_decay),
        )

    def adam_step(self, param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1,
                  beta2, eps, weight_decay, decoupled):
        t = param.dtype.type
        step_size, bc2_sqrt = adam_bias_correction(step, lr, beta1, beta2)
        self.k.adam_1d(
            param, grad, exp_avg, exp_avg_sq, t(1 - beta1), t(beta2), t(1 - beta2),
            t(step_size), t(bc2_sqrt), t(eps),
            t(weight_decay), t(1 - lr * weight_decay), bool(weight_decay), bool(decoupled),
        )

    def rmsprop_step(self, param, grad, square_avg, *, lr, alpha, eps,
                     weight_decay, momentum, buf, centered, grad_avg):
        t = param.dtype.type
        self.k.rmsprop_1d(
            param, grad, square_avg, param if buf is None else buf,
            param if grad_avg is None else grad_avg, t(lr), t(alpha), t(1 - alpha),
            t(eps), t(weight_decay), t(momentum), bool(weight_decay), bool(centered),
            momentum > 0,
        )
