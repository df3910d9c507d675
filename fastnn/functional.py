"""Functional forms of the activations (forward only, new arrays)."""
from __future__ import annotations

from .backends import float_array, get_backend


def _apply(name: str, x, alpha: float = 0.0):
    backend = get_backend()
    x = float_array(x, name)  # ints in the default dtype, as the modules take them
    out = backend.empty(x.shape, x.dtype)
    return backend.bias_act(x, None, name, alpha, out=out)


def relu(x):
    return _apply("relu", x)


def leaky_relu(x, negative_slope: float = 0.01):
    return _apply("leaky_relu", x, negative_slope)


def sigmoid(x):
    return _apply("sigmoid", x)


def tanh(x):
    return _apply("tanh", x)


def gelu(x):
    """GELU, tanh approximation."""
    return _apply("gelu", x)


def softmax(x, axis: int = -1):
    xp = get_backend().xp
    x = float_array(x, "softmax")
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(x, axis: int = -1):
    xp = get_backend().xp
    x = float_array(x, "log_softmax")
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


__all__ = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax"]
