"""Losses. ``loss_fn(pred, target)`` returns a Python float; ``loss_fn.backward()``
returns d loss / d pred for that call. Reductions are means (as PyTorch), so
gradients are divided by the number of elements (or samples, for
CrossEntropyLoss)."""
from __future__ import annotations

import numpy as np

from ..backends import (asarray, get_backend, host_array, refuse_foreign, refuse_non_real,
                        value_range)
from ..errors import CaptureUnsupported, DTypeError, InputError, ShapeError, out_of_memory
from .module import in_step_mode, known_label_range


class Loss:
    """Base: ``__call__`` = ``float(forward(pred, target))``.

    ``forward`` leaves the loss on the device as a 0-d array (fit reads it
    only when it must), ``backward`` returns the gradient of the last call.
    """

    name = "Loss"
    # True where targets are values of the prediction's shape (MSE, BCE): fit
    # then casts integer targets to the model's dtype once, not every step.
    value_targets = False

    def __call__(self, pred, target) -> float:
        return float(self.forward(pred, target))

    def forward(self, pred, target):
        raise NotImplementedError

    def check_targets(self, target) -> None:
        """Raise if the whole target array cannot be this loss's targets; fit
        and evaluate call it once for their data (a step then need not)."""

    def deferred_input_error(self):
        """An input error this loss noticed on the device without reading it
        back (inside fit on a GPU), or None; fit asks when a batch loss is not
        finite, so the user sees the cause rather than only the NaN."""
        return None

    def backward(self):
        grad = self.__dict__.get("_grad")
        if grad is None:
            raise RuntimeError(f"{self.name}: backward() called before the loss was computed")
        return grad

    def _grad_buffer(self, pred):
        """Gradient buffer: reused inside fit; fresh outside it, since a caller
        may keep what backward() returned."""
        grad = self.__dict__.get("_grad") if in_step_mode() else None
        backend = get_backend()
        if grad is None or grad.shape != pred.shape or grad.dtype != pred.dtype \
                or not backend.is_array(grad):
            try:  # outside fit a new buffer per call: the message only on failure
                grad = backend.empty(pred.shape, pred.dtype)
            except MemoryError as exc:
                raise out_of_memory(self.name, f"its gradient buffer {tuple(pred.shape)} "
                                    f"{pred.dtype}", pred.size * pred.dtype.itemsize,
                                    backend.device) from exc
        return grad

    # ------------------------------------------------------------ checks
    def _pred(self, pred):
        backend = get_backend()
        if not backend.is_array(pred):
            refuse_foreign(pred, backend, self.name, "predictions")
            pred = asarray(pred)
        if pred.dtype.kind != "f":
            raise DTypeError(f"{self.name}: predictions must be floating point, got {pred.dtype}")
        return pred

    def _same_shape_target(self, pred, target):
        backend = get_backend()
        if not backend.is_array(target):
            refuse_foreign(target, backend, self.name, "targets")
            target = backend.asarray(target)
        if target.dtype.kind not in "fiub":
            refuse_non_real(target.dtype, self.name, "targets")
        if target.dtype != pred.dtype:
            target = target.astype(pred.dtype)
        if tuple(target.shape) != tuple(pred.shape):
            hint = ""
            if target.size == pred.size:
                hint = f"; reshape the target to {tuple(pred.shape)}"
            raise ShapeError(
                f"{self.name}: target shape {tuple(target.shape)} does not match "
                f"prediction shape {tuple(pred.shape)}{hint}"
            )
        if pred.size == 0:
            raise InputError(f"{self.name}: empty prediction {tuple(pred.shape)}")
        return target

    def __repr__(self) -> str:
        return f"{self.name}()"


class MSELoss(Loss):
    """mean((pred - target)^2) over all elements, as ``torch.nn.MSELoss``."""

    name = "MSELoss"
    value_targets = True

    def forward(self, pred, target):
        pred = self._pred(pred)
        target = self._same_shape_target(pred, target)
        loss, self._grad = get_backend().mse(pred, target, self._grad_buffer(pred))
        return loss


class BCELoss(Loss):
    """Binary cross-entropy on probabilities in [0, 1]; logs clamped at -100
    as in torch, whose gradient ``(p - t) / max(p (1 - p), 1e-12) / N`` this
    matches."""

    name = "BCELoss"
    value_targets = True

    def forward(self, pred, target):
        backend = get_backend()
        pred = self._pred(pred)
        target = self._same_shape_target(pred, target)
        seen = None
        if in_step_mode() and not backend.device.startswith("cpu"):
            # Inside fit on a GPU: no host read per step. The range seen is kept
            # on the device, an out-of-range batch gets a NaN loss, and fit, which
            # reads the losses once per epoch, raises the error below.
            seen = self.__dict__.get("_seen")  # [finite min, finite max, NaN batches]
            if seen is None or seen.dtype != pred.dtype or not backend.is_array(seen):
                seen = self._seen = backend.asarray(np.array([np.inf, -np.inf, 0], pred.dtype))
        else:
            _raise_unless_probabilities(self.name, float(pred.min()), float(pred.max()))
        if not in_step_mode():  # inside fit and evaluate the whole y was checked once
            self.check_targets(target)
        loss, self._grad = backend.bce(pred, target, self._grad_buffer(pred), seen)
        return loss

    def check_targets(self, target) -> None:
        """Targets are probabilities too (as torch's BCELoss requires): a 0/255
        mask would give a negative loss and train towards nonsense."""
        if get_backend().is_array(target) and target.size:
            lo, hi = (float(v) for v in value_range(target))
            if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
                raise InputError(f"{self.name}: targets must be in [0, 1], got values in "
                                 f"[{lo:g}, {hi:g}]")

    def deferred_input_error(self):
        seen = self.__dict__.pop("_seen", None)
        if seen is None:
            return None
        lo, hi, nan_batches = (float(v) for v in host_array(seen))  # the error path: one read
        if lo > hi:  # no finite prediction seen at all
            lo = hi = float("nan")
        try:
            _raise_unless_probabilities(self.name, lo, hi)
            if nan_batches:
                _raise_unless_probabilities(self.name, float("nan"), float("nan"))
        except InputError as exc:
            return exc
        return None


def _raise_unless_probabilities(name: str, lo: float, hi: float) -> None:
    """InputError unless [lo, hi] (the predictions' range) lies within [0, 1]."""
    if lo != lo or hi != hi:
        raise InputError(
            f"{name}: predictions must be probabilities in [0, 1], got nan; "
            "use BCEWithLogitsLoss for raw scores"
        )
    if not (lo >= 0.0 and hi <= 1.0):
        raise InputError(
            f"{name}: predictions must be probabilities in [0, 1], got values in "
            f"[{lo:g}, {hi:g}]; use BCEWithLogitsLoss for raw scores"
        )


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on raw logits; stable for any logit:
    ``max(x, 0) - x t + log1p(exp(-|x|))``."""

    name = "BCEWithLogitsLoss"
    value_targets = True

    def forward(self, logits, target):
        logits = self._pred(logits)
        target = self._same_shape_target(logits, target)
        loss, self._grad = get_backend().bce_with_logits(logits, target, self._grad_buffer(logits))
        return loss


class CrossEntropyLoss(Loss):
    """Mean cross-entropy of logits (N, C) against integer labels (N,):
    fused, stable log-softmax (``softmax_xent``); gradient (softmax - onehot) / N."""

    name = "CrossEntropyLoss"

    def __init__(self, check_labels: bool = True):
        self.check_labels = check_labels

    def forward(self, logits, labels):
        backend = get_backend()
        logits = self._pred(logits)
        if logits.ndim != 2:
            raise ShapeError(f"{self.name}: expected logits (N, C), got {tuple(logits.shape)}")
        if not backend.is_array(labels):
            refuse_foreign(labels, backend, self.name, "labels")
            labels = asarray(labels)
        if labels.dtype.kind not in "iu":
            raise DTypeError(
                f"{self.name}: labels must be integer class indices of shape (N,), got dtype "
                f"{labels.dtype}" + ("; one-hot targets? pass labels.argmax(1)" if labels.ndim == 2
                                     else "; convert them with labels.astype(int)")
            )
        n, c = logits.shape
        if tuple(labels.shape) != (n,):
            raise ShapeError(
                f"{self.name}: expected labels ({n},) for logits {tuple(logits.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        if n == 0:
            raise InputError(f"{self.name}: empty batch")
        if self.check_labels:
            # Inside fit the range was read once from the host copy of y.
            known = known_label_range()
            if known is None and backend.capturing:
                raise CaptureUnsupported(
                    f"{self.name}: the labels' range is unknown while a CUDA graph records "
                    "(reading it back would stop the recording); pass it to training_step_mode"
                )
            lo, hi = known or (int(labels.min()), int(labels.max()))
            if lo < 0 or hi >= c:
                raise InputError(
                    f"{self.name}: labels must be in [0, {c - 1}] for {c} classes, got values in [{lo}, {hi}]"
                )
        loss, grad = backend.softmax_xent(logits, labels, grad_out=self._grad_buffer(logits))
        self._grad = grad
        return loss
