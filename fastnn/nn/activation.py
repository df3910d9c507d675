"""Activation modules. The elementwise ones share the backend's fused ops
(``bias_act`` / ``act_backward``), so standalone and fused-after-Linear give
the same numbers."""
from __future__ import annotations

import numbers

from ..backends import float_array, get_backend
from ..backends.activations import get_activation
from .module import Module


class ElementwiseActivation(Module):
    """Base of ReLU, LeakyReLU, Sigmoid, Tanh, GELU: ``y = f(x)`` elementwise."""

    act_name = "identity"
    alpha = 0.0

    @property
    def fusable(self) -> bool:
        # A subclass that changes the math must not be fused into Linear.
        cls = type(self)
        return cls.forward is ElementwiseActivation.forward and cls.backward is ElementwiseActivation.backward

    def forward(self, x):
        backend = get_backend()
        if not backend.is_array(x) or x.dtype.kind != "f":
            x = float_array(x, type(self).__name__)
        y = self._buffer("y", x.shape, x.dtype, backend)
        try:
            backend.bias_act(x, None, self.act_name, self.alpha, out=y)
        except MemoryError as exc:  # a fallback's temporaries
            raise self._op_out_of_memory(f"forward {tuple(x.shape)}", exc) from exc
        keep_pre = get_activation(self.act_name).needs_pre(self.alpha)
        self.__dict__["_saved"] = (y, x if keep_pre else None)  # hot path: no registry checks
        return y

    def backward(self, dy):
        saved = self.__dict__.get("_saved")
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}: backward() called before forward()")
        y, pre = saved
        if type(dy) is not type(y):  # a list, or another library's array (refused)
            dy = float_array(dy, type(self).__name__, "dy")
        if tuple(dy.shape) != tuple(y.shape):
            from ..errors import ShapeError

            raise ShapeError(
                f"{type(self).__name__}: backward expected dy {tuple(y.shape)}, got {tuple(dy.shape)}"
            )
        dx = self._buffer("dx", y.shape, y.dtype)
        try:
            return get_backend().act_backward(dy, y, self.act_name, pre, self.alpha, out=dx)
        except MemoryError as exc:
            raise self._op_out_of_memory(f"backward {tuple(y.shape)}", exc) from exc


class ReLU(ElementwiseActivation):
    act_name = "relu"


class LeakyReLU(ElementwiseActivation):
    act_name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01):
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
            raise TypeError(f"LeakyReLU: negative_slope must be a number, got {negative_slope!r}")
        self.alpha = float(negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.alpha}"


class Sigmoid(ElementwiseActivation):
    act_name = "sigmoid"


class Tanh(ElementwiseActivation):
    act_name = "tanh"


class GELU(ElementwiseActivation):
    """GELU, tanh approximation (as ``torch.nn.GELU(approximate="tanh")``)."""

    act_name = "gelu"


class Softmax(Module):
    """``softmax(x)`` along ``axis``; stable (shifted by the max)."""

    def __init__(self, axis: int = -1):
        self.axis = axis

    def extra_repr(self) -> str:
        return f"axis={self.axis}"

    def forward(self, x):
        from ..functional import softmax

        ndim = getattr(x, "ndim", None)
        if ndim is not None and not -ndim <= self.axis < ndim:
            from ..errors import ShapeError

            raise ShapeError(f"Softmax(axis={self.axis}): input {tuple(x.shape)} has no axis "
                             f"{self.axis}")
        try:
            y = softmax(x, self.axis)
        except MemoryError as exc:
            raise self._op_out_of_memory(f"forward {tuple(getattr(x, 'shape', ()))}", exc) from exc
        self._saved = y
        return y

    def backward(self, dy):
        y = self.__dict__.get("_saved")
        if y is None:
            raise RuntimeError("Softmax: backward() called before forward()")
        if not get_backend().is_array(dy):
            dy = float_array(dy, "Softmax")
        if tuple(dy.shape) != tuple(y.shape):
            from ..errors import ShapeError

            raise ShapeError(f"Softmax: backward expected dy {tuple(y.shape)}, got {tuple(dy.shape)}")
        try:
            dot = (dy * y).sum(axis=self.axis, keepdims=True)
            return y * (dy - dot)
        except MemoryError as exc:
            raise self._op_out_of_memory(f"backward {tuple(y.shape)}", exc) from exc
