"""The activation table: every elementwise activation defined once.

Each entry carries a generic forward and derivative written against an array
namespace ``xp`` (the NumPy reference every backend kernel is tested against),
and an integer ``code`` shared by the Numba and CUDA kernels (kernels/*.cu use
the same numbering, see kernels/README.md).

The derivative is expressed from the *output* ``y`` where that is exact, so the
layer need not keep the input; GELU (and LeakyReLU with a slope <= 0) need the
pre-activation ``x``: ``needs_pre(alpha)`` says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

GELU_C = math.sqrt(2.0 / math.pi)
GELU_K = 0.044715


def _identity_fwd(xp, x, alpha):
    return x.copy()


def _identity_bwd(xp, dy, y, x, alpha):
    return dy.copy()


def _relu_fwd(xp, x, alpha):
    return xp.maximum(x, 0)


def _relu_bwd(xp, dy, y, x, alpha):
    ref = y if x is None else x
    return xp.where(ref > 0, dy, xp.zeros_like(dy))


def _leaky_fwd(xp, x, alpha):
    return xp.where(x > 0, x, x * x.dtype.type(alpha))


def _leaky_bwd(xp, dy, y, x, alpha):
    # With alpha > 0 the output has the sign of the input, so y decides.
    ref = y if x is None else x
    return xp.where(ref > 0, dy, dy * dy.dtype.type(alpha))


def _sigmoid_fwd(xp, x, alpha):
    # Stable for any x: never exp of a large positive number.
    e = xp.exp(-xp.abs(x))
    one = x.dtype.type(1)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


def _sigmoid_bwd(xp, dy, y, x, alpha):
    return dy * y * (y.dtype.type(1) - y)


def _tanh_fwd(xp, x, alpha):
    return xp.tanh(x)


def _tanh_bwd(xp, dy, y, x, alpha):
    return dy * (y.dtype.type(1) - y * y)


def _gelu_fwd(xp, x, alpha):
    t = x.dtype.type
    inner = t(GELU_C) * (x + t(GELU_K) * x * x * x)
    return t(0.5) * x * (t(1) + xp.tanh(inner))


def _gelu_bwd(xp, dy, y, x, alpha):
    t = x.dtype.type
    inner = t(GELU_C) * (x + t(GELU_K) * x * x * x)
    th = xp.tanh(inner)
    d_inner = t(GELU_C) * (t(1) + t(3 * GELU_K) * x * x)
    return dy * (t(0.5) * (t(1) + th) + t(0.5) * x * (t(1) - th * th) * d_inner)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    forward: Callable  # (xp, x, alpha) -> y
    backward: Callable  # (xp, dy, y, x_or_None, alpha) -> dx
    always_needs_pre: bool = False

    def needs_pre(self, alpha: float = 0.0) -> bool:
        """True if the derivative cannot be recovered from the output alone."""
        if self.name == "leaky_relu":
            return alpha <= 0
        return self.always_needs_pre


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", 0, _identity_fwd, _identity_bwd),
        Activation("relu", 1, _relu_fwd, _relu_bwd),
        Activation("leaky_relu", 2, _leaky_fwd, _leaky_bwd),
        Activation("sigmoid", 3, _sigmoid_fwd, _sigmoid_bwd),
        Activation("tanh", 4, _tanh_fwd, _tanh_bwd),
        Activation("gelu", 5, _gelu_fwd, _gelu_bwd, always_needs_pre=True),
    )
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None
