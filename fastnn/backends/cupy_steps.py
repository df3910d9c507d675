"""CupyBackend's losses (softmax_xent, mse, bce, bce_with_logits) and optimizer
steps (SGD, Adam/AdamW, RMSprop), each one or two fused launches of
kernels/{softmax_xent,reduce,bce,optim}.cu. A mixin: it relies on CupyBackend's
``xp``, ``asarray``, ``_kernel``, ``_launch_1d``, ``_fusable``, ``_capture`` and
(for ``_oom_guard``) ``_oom_error`` / ``_memory_error``.
"""
from __future__ import annotations

import numpy as np

from ..errors import CaptureUnsupported
from .base import adam_bias_correction
from .constants import BCE_EPSILON
from .cupy_support import _BLOCK, _FLOATS, _nbytes, _oom_guard

_LABELS = {np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}
_MAX_ROW_BLOCKS = 1 << 24  # softmax_xent walks further rows with a grid-stride loop
# softmax_xent_small (one block, a thread per row, the mean included) up to
# these sizes: a batch of a small classifier in one launch instead of two.
_SMALL_XENT_ROWS, _SMALL_XENT_COLS = 1024, 32
_MSE_BLOCKS = 1024  # fixed partial-sum count per size: the loss is deterministic
_SMALL_MSE = 8192  # mse in one block (one launch) up to this many elements
_SMALL_BCE = 1 << 16  # bce / bce_with_logits in one block (one launch) up to this many

# Most threads per block of the block-reduction kernels. The kernels allow 1024,
# but a 1024-thread block gets at most 64 registers a thread and the float64
# softmax_xent_small already needs 62 (NVRTC 13, sm_90): another compiler's
# choice must not make the launch fail ("too many resources requested").
_MAX_REDUCE_THREADS = 512


def _one_block_threads(n: int) -> int:
    """Block size of a one-block kernel over n items: whole warps, at most 512."""
    return min(-(-n // 32) * 32, _MAX_REDUCE_THREADS)


def _row_threads(n_cols: int) -> int:
    """Block size for one row of softmax_xent: ~4 columns per thread, 32..512."""
    threads = 32
    while threads * 4 < n_cols and threads < _MAX_REDUCE_THREADS:
        threads *= 2
    return threads


class CupyStepOps:
    """Loss and optimizer methods of CupyBackend (before Backend in its MRO:
    ``super()`` here is Backend's generic CuPy path)."""

    # ------------------------------------------------------------ losses
    @_oom_guard("softmax_xent", lambda logits, *a, **k: _nbytes(logits) + 8 * logits.shape[0])
    def softmax_xent(self, logits, labels, grad_out=None):
        """Mean cross-entropy of logits (N, C) against int labels (N,).

        Returns ``(loss, dlogits)``: loss a 0-d device array of logits' dtype
        (no host sync), dlogits (N, C) = (softmax - onehot) / N, written to
        ``grad_out`` when given (which may be ``logits`` itself).
        """
        cupy = self.xp
        if not (self._fusable(logits) and logits.ndim == 2 and logits.shape[1] > 0):
            return super().softmax_xent(logits, labels, grad_out)
        n, c = logits.shape
        dev_labels = self._device_labels(labels, n)
        if dev_labels is None or not (grad_out is None or self._fusable(logits, grad_out)):
            return super().softmax_xent(
                logits, labels if dev_labels is None else dev_labels, grad_out
            )
        grad = cupy.empty_like(logits) if grad_out is None else grad_out
        suffix = f"{_FLOATS[logits.dtype]}_{_LABELS[dev_labels.dtype]}"
        inv_n = logits.dtype.type(1.0 / n)
        if n <= _SMALL_XENT_ROWS and c <= _SMALL_XENT_COLS:
            loss = cupy.empty((), dtype=logits.dtype)
            fn = self._kernel("softmax_xent.cu", f"softmax_xent_small_{suffix}")
            # a thread per row (two for n > 512)
            fn((1,), (_one_block_threads(n),), (logits, dev_labels, grad, loss, np.int64(n),
                                                 np.int64(c), inv_n))
            return loss, grad
        row_loss = cupy.empty((n,), dtype=logits.dtype)
        fn = self._kernel("softmax_xent.cu", f"softmax_xent_{suffix}")
        fn((min(n, _MAX_ROW_BLOCKS),), (_row_threads(c),), (
            logits, dev_labels, grad, row_loss, np.int64(n), np.int64(c), inv_n,
        ))
        # Per-row losses + a tree mean: deterministic, unlike atomicAdd.
        return self._scaled_sum(row_loss, 1.0 / n), grad

    def _scaled_sum(self, x, scale: float):
        """0-d device array ``scale * sum(x)`` (x 1-D, contiguous), one block."""
        out = self.xp.empty((), dtype=x.dtype)
        fn = self._kernel("reduce.cu", f"sum_scaled_{_FLOATS[x.dtype]}")
        fn((1,), (_row_threads(x.size),), (x, out, np.int64(x.size), x.dtype.type(scale)))
        return out

    @_oom_guard("mse", lambda pred, *a, **k: 2 * _nbytes(pred))
    def mse(self, pred, target, grad_out):
        """Mean squared error and its gradient (no cuBLAS dot: recordable in a
        CUDA graph), deterministic for a given size: one launch up to
        _SMALL_MSE elements (one block, its partial sum is the loss), else
        per-block partial sums and their mean (two)."""
        if not self._fusable(pred, target, grad_out):
            return super().mse(pred, target, grad_out)
        n = pred.size
        t = pred.dtype.type
        fn = self._kernel("reduce.cu", f"mse_partial_{_FLOATS[pred.dtype]}")
        if n <= _SMALL_MSE:
            loss = self.xp.empty((), dtype=pred.dtype)
            fn((1,), (_one_block_threads(n),), (pred, target, grad_out, loss, np.int64(n),
                                                 t(2.0 / n), t(1.0 / n)))
            return loss, grad_out
        blocks = min((n + _BLOCK - 1) // _BLOCK, _MSE_BLOCKS)
        partial = self.xp.empty((blocks,), dtype=pred.dtype)
        fn((blocks,), (_BLOCK,), (pred, target, grad_out, partial, np.int64(n), t(2.0 / n),
                                  t(1.0)))
        return self._scaled_sum(partial, 1.0 / n), grad_out

    @_oom_guard("bce", lambda pred, *a, **k: 3 * _nbytes(pred))
    def bce(self, pred, target, grad_out, seen=None):
        """Binary cross-entropy, its gradient and fit's range check in one launch
        (kernels/bce.cu) for up to _SMALL_BCE elements; else the generic ops."""
        seen_ok = seen is None or (isinstance(seen, self.xp.ndarray) and seen.dtype == pred.dtype
                                   and seen.flags.c_contiguous and seen.size >= 3)
        if not (self._fusable(pred, target, grad_out) and pred.size <= _SMALL_BCE and seen_ok):
            return super().bce(pred, target, grad_out, seen)
        n, t = pred.size, pred.dtype.type
        loss = self.xp.empty((), dtype=pred.dtype)
        fn = self._kernel("bce.cu", f"bce_{_FLOATS[pred.dtype]}")
        fn((1,), (_one_block_threads(n),), (
            pred, target, grad_out, loss, loss if seen is None else seen,  # (unread without seen)
            np.int32(seen is not None), np.int64(n), t(1.0 / n), t(BCE_EPSILON),
        ))
        return loss, grad_out

    @_oom_guard("bce_with_logits", lambda logits, *a, **k: 3 * _nbytes(logits))
    def bce_with_logits(self, logits, target, grad_out):
        """Binary cross-entropy of logits and its gradient in one launch for up to
        _SMALL_BCE elements; else the generic ops."""
        if not (self._fusable(logits, target, grad_out) and logits.size <= _SMALL_BCE):
            return super().bce_with_logits(logits, target, grad_out)
        n = logits.size
        loss = self.xp.empty((), dtype=logits.dtype)
        fn = self._kernel("bce.cu", f"bce_logits_{_FLOATS[logits.dtype]}")
        fn((1,), (_one_block_threads(n),), (logits, target, grad_out, loss, np.int64(n),
                                             logits.dtype.type(1.0 / n)))
        return loss, grad_out

    def _device_labels(self, labels, n: int):
        """Labels as a contiguous int32/int64 device vector of length n, else None."""
        cupy = self.xp
        if not isinstance(labels, cupy.ndarray):
            labels = self.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            return None
        if labels.dtype not in _LABELS:
            labels = labels.astype(np.int64)
        return cupy.ascontiguousarray(labels)

    # ------------------------------------------------------------ optimizers
    # One launch per flat buffer; the math order is that of Backend.*_step
    # (torch.optim's single-tensor path), see kernels/optim.cu.
    @_oom_guard("sgd_step", lambda param, *a, **k: 2 * _nbytes(param))
    def sgd_step(self, param, grad, buf, *, lr, momentum, dampening, nesterov,
                 weight_decay, first_step):
        use_momentum = bool(momentum)
        arrays = (param, grad) + ((buf,) if use_momentum else ())
        if self._capture is not None and first_step and use_momentum:
            raise CaptureUnsupported("SGD's first momentum step differs from the later ones")
        if not self._fusable(*arrays, same_shape=False):
            return super().sgd_step(
                param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                nesterov=nesterov, weight_decay=weight_decay, first_step=first_step,
            )
        t = param.dtype.type
        fn = self._kernel("optim.cu", f"sgd_{_FLOATS[param.dtype]}")
        self._launch_1d(fn, param.size, (
            param, grad, buf if use_momentum else grad, np.int64(param.size), t(lr),
            t(momentum), t(1 - dampening), t(weight_decay), np.int32(bool(nesterov)),
            np.int32(bool(first_step)), np.int32(use_momentum), np.int32(bool(weight_decay)),
        ))

    @_oom_guard("adam_step", lambda param, *a, **k: 3 * _nbytes(param))
    def adam_step(self, param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1,
                  beta2, eps, weight_decay, decoupled):
        if not self._fusable(param, grad, exp_avg, exp_avg_sq, same_shape=False):
            if self._capture is not None:  # the generic path would freeze the bias corrections
                raise CaptureUnsupported("Adam on buffers the fused kernel does not take")
            return super().adam_step(
                param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
            )
        t = param.dtype.type
        suffix = _FLOATS[param.dtype]
        # Host-side scalars in double, rounded once to the array dtype (as base.py).
        head = (param, grad, exp_avg, exp_avg_sq, np.int64(param.size), t(1 - beta1), t(beta2),
                t(1 - beta2))
        tail = (t(eps), t(weight_decay), t(1 - lr * weight_decay), np.int32(bool(weight_decay)),
                np.int32(bool(decoupled)))
        if self._capture is None:
            fn = self._kernel("optim.cu", f"adam_{suffix}")
            step_scalars = tuple(map(t, adam_bias_correction(step, lr, beta1, beta2)))
        else:  # a graph replays this launch every step: the bias corrections come from memory
            fn = self._kernel("optim.cu", f"adam_captured_{suffix}")
            step_scalars = (self._capture.step_scalars(
                lambda s: adam_bias_correction(s, lr, beta1, beta2), param.dtype),)
        self._launch_1d(fn, param.size, head + step_scalars + tail)

    @_oom_guard("rmsprop_step", lambda param, *a, **k: 3 * _nbytes(param))
    def rmsprop_step(self, param, grad, square_avg, *, lr, alpha, eps,
                     weight_decay, momentum, buf, centered, grad_avg):
        use_momentum = momentum > 0
        arrays = (param, grad, square_avg) + ((buf,) if use_momentum else ()) + (
            (grad_avg,) if centered else ()
        )
        if not self._fusable(*arrays, same_shape=False):
            return super().rmsprop_step(
                param, grad, square_avg, lr=lr, alpha=alpha, eps=eps,
                weight_decay=weight_decay, momentum=momentum, buf=buf, centered=centered,
                grad_avg=grad_avg,
            )
        t = param.dtype.type
        fn = self._kernel("optim.cu", f"rmsprop_{_FLOATS[param.dtype]}")
        self._launch_1d(fn, param.size, (
            param, grad, square_avg, buf if use_momentum else param,
            grad_avg if centered else param, np.int64(param.size), t(lr), t(alpha),
            t(1 - alpha), t(eps), t(weight_decay), t(momentum), np.int32(bool(weight_decay)),
            np.int32(bool(centered)), np.int32(use_momentum),
        ))


# Compiled RawModules, one per (device id, kernel file), shared by every
# CupyBackend instance of the process; the lock keeps two threads from
