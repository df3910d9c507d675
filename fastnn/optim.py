"""Optimizers with torch.optim's update rules and defaults.

Each optimizer packs its parameters into one flat buffer per dtype (each
``Parameter.data`` / ``.grad`` becomes a view into it), so an update is a
single backend op over contiguous memory; ``zero_grad`` sets the gradients to
None and the next backward writes straight into the flat gradient buffer.
State buffers exist only when the hyper-parameters need them (no momentum
buffer for plain SGD), created on first use. If a user rebinds ``p.data`` or
``p.grad`` to a new array, ``step`` copies it back into the buffer first, so
the views never go stale silently. The buffers themselves: flat_buffers.py.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .backends import get_backend, host_array
from .errors import CaptureUnsupported, DTypeError, InputError
from .flat_buffers import FlatGroup
from .nn.parameter import Parameter


def _check_on(backend, p: Parameter, who: str) -> None:
    """TypeError unless the parameter's data (and grad) are arrays of ``backend``."""
    for what, arr in (("data", p.data), ("grad", p.grad)):
        if arr is not None and not backend.is_array(arr):
            raise TypeError(
                f"{who}: parameter {p.name or ''} {p.shape} {what} is a "
                f"{type(arr).__module__}.{type(arr).__name__} but the current backend is "
                f"{backend.name}; create the optimizer under the model's backend, or move the "
                f"model first with model.to({backend.name!r})"
            )


def _shapes(params) -> str:
    """The parameter shapes of a group, e.g. ``"(2, 3) (3,)"`` (stored in state dicts)."""
    return " ".join(str(p.shape) for p in params)


class Optimizer:
    """Base class: flat buffers, ``step`` / ``zero_grad`` / state dicts."""

    state_names: tuple = ()  # every state buffer the update can use
    hyper_names: tuple = ()

    def _needed_state(self) -> tuple:
        """The state buffers the current hyper-parameters use (made up front)."""
        return self.state_names

    def __init__(self, params):
        from .nn.module import Module

        if isinstance(params, (Parameter, Module)):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Parameters "
                            f"(e.g. model.parameters()), got a {'single Parameter' if isinstance(params, Parameter) else type(params).__name__}")
        params = list(params)
        if not params:
            raise InputError(f"{type(self).__name__}: got an empty parameter list")
        seen, unique = set(), []
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                library = type(p).__module__.split(".")[0]
                kind = type(p).__qualname__ if library == "builtins" else \
                    f"{library}.{type(p).__qualname__}"
                raise TypeError(f"{type(self).__name__}: item {i} is a {kind}, expected a "
                                "fastnn Parameter (e.g. model.parameters() of a fastnn model)")
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        backend = get_backend()
        for p in unique:
            _check_on(backend, p, type(self).__name__)
        by_dtype: dict = {}
        for p in unique:
            by_dtype.setdefault(np.dtype(p.data.dtype).str, []).append(p)
        self.groups = [FlatGroup(ps, backend, self._needed_state()) for ps in by_dtype.values()]
        self.step_count = 0

    def _check_hyper(self, **values) -> None:
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise DTypeError(f"{type(self).__name__}: {name} must be a number, got {v!r} "
                                 f"(a {type(v).__name__})")
            if not math.isfinite(v) or v < 0:
                raise InputError(f"{type(self).__name__}: {name} must be a finite number >= 0, got {v!r}")

    def zero_grad(self) -> None:
        for g in self.groups:
            g.zero_grad()

    def step(self) -> None:
        self.step_count += 1
        uneven = False
        for g in self.groups:
            active = g.sync()
            if active is None and not any(g.skipped):  # the usual step: one update over the buffer
                self._update(g, None, self.step_count)
                continue
            uneven = True
            active = active or [True] * len(g.params)
            # As torch: a parameter without a gradient is not updated (no decay,
            # no momentum), and Adam's bias correction counts its own steps.
            if g.backend.capturing:
                raise CaptureUnsupported("optimizer: some parameters have no gradient or "
                                         "missed steps; the recorded step updates all at once")
            g.skipped = [k + (not a) for k, a in zip(g.skipped, active)]
            for lo, hi, i in g.spans(active):
                self._update(g, slice(lo, hi), self.step_count - g.skipped[i])
        if uneven:
            self._settle()

    def _own_counts_matter(self) -> bool:
        """Whether the update still depends on each parameter's own step count
        (Adam's bias correction always does)."""
        return True

    def _settle(self) -> None:
        """After a step some parameters sat out. A history that no longer
        changes any update is forgotten, and steps that all of them sat out
        count for none (torch: no step at all), so equal counts stay uniform
        for the compiled and graph paths."""
        if not self._own_counts_matter():
            for g in self.groups:
                g.skipped = [0] * len(g.params)
            return
        common = min(min(g.skipped) for g in self.groups)
        if common:
            self.step_count -= common
            for g in self.groups:
                g.skipped = [k - common for k in g.skipped]

    @property
    def uniform_steps(self) -> bool:
        """Every parameter has taken every step (the compiled and CUDA-graph
        paths update all of them with one step count)."""
        return not any(any(g.skipped) for g in self.groups)

    def _update(self, group: FlatGroup, span, step: int) -> None:
        """Update ``group``'s flat range ``span`` (a slice; None: all of it) at
        the parameters' own step number ``step`` (1 on their first)."""
        raise NotImplementedError

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Hyper-parameters, step count and flat state buffers (numpy, no pickle)."""
        state = {"type": np.array(type(self).__name__), "step": np.array(self.step_count)}
        for name in self.hyper_names:
            state[name] = np.array(getattr(self, name))
        for gi, g in enumerate(self.groups):
            state[f"shapes.{gi}"] = np.array(_shapes(g.params))
            if any(g.skipped):
                state[f"skipped.{gi}"] = np.array(g.skipped, dtype=np.int64)
            for name, buf in g.state.items():
                state[f"{name}.{gi}"] = np.array(host_array(buf), copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        kind = str(host_array(state.get("type", type(self).__name__)))
        if kind != type(self).__name__:
            raise InputError(f"{type(self).__name__}.load_state_dict: state is from {kind}")
        # Validate everything before changing anything. Padded flat buffers of two
        # different models can have the same length, so the shapes are compared too.
        for gi, g in enumerate(self.groups):
            saved = state.get(f"shapes.{gi}")
            if saved is not None and str(host_array(saved)) != _shapes(g.params):
                raise InputError(
                    f"{type(self).__name__}.load_state_dict: the state is for parameters "
                    f"{str(host_array(saved))}, this optimizer has {_shapes(g.params)} (different model?)"
                )
            skipped = state.get(f"skipped.{gi}")
            if skipped is not None:
                skipped, step = host_array(skipped), int(host_array(state["step"]))
                if skipped.shape != (len(g.params),):
                    raise InputError(
                        f"{type(self).__name__}.load_state_dict: skipped.{gi} has shape "
                        f"{skipped.shape}, expected {(len(g.params),)} (different model?)")
                if skipped.size and not (skipped.min() >= 0 and skipped.max() <= step):
                    raise InputError(
                        f"{type(self).__name__}.load_state_dict: skipped.{gi} must count steps "
                        f"in [0, {step}], got {skipped.tolist()}")
            for name in self._loaded_names(state, g, gi):
                value = host_array(state[f"{name}.{gi}"])
                if value.shape != (g.size,):
                    raise InputError(
                        f"{type(self).__name__}.load_state_dict: {name}.{gi} has shape "
                        f"{value.shape}, expected {(g.size,)} (different model?)"
                    )
        self.step_count = int(host_array(state["step"]))
        for name in self.hyper_names:
            if name in state:
                value = host_array(state[name])
                setattr(self, name, value.item() if value.ndim == 0 else tuple(value.tolist()))
        for gi, g in enumerate(self.groups):
            skipped = state.get(f"skipped.{gi}")
            g.skipped = [0] * len(g.params) if skipped is None else \
                [int(k) for k in host_array(skipped)]
            for name in self._loaded_names(state, g, gi):
                buf = g.buffer(name)
                buf[...] = g.backend.asarray(host_array(state[f"{name}.{gi}"]), dtype=buf.dtype)

    def _loaded_names(self, state: dict, group: FlatGroup, gi: int) -> list:
        """The buffers a state dict restores: those this optimizer holds now
        (they must be there) and any other one it can use that was saved."""
        return [name for name in self.state_names
                if name in group.state or f"{name}.{gi}" in state]
    def __repr__(self) -> str:
        hyper = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.hyper_names)
        return f"{type(self).__name__}({hyper})"


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``::

        g = grad + weight_decay * param
        if momentum != 0:
            buf = g                                      (first step)
            buf = momentum * buf + (1 - dampening) * g   (later steps)
            g = g + momentum * buf if nesterov else buf
        param = param - lr * g
    """

    state_names = ("momentum_buffer",)
    hyper_names = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

    def _needed_state(self) -> tuple:
        return self.state_names if self.momentum else ()

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        self._check_hyper(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InputError("SGD: nesterov momentum requires momentum > 0 and dampening = 0")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.nesterov, self.weight_decay = bool(nesterov), weight_decay
        super().__init__(params)

    def _own_counts_matter(self) -> bool:
        # Only momentum's first step (buf = g) depends on a parameter's own count.
        return bool(self.momentum) and any(self.step_count - k < 1
                                           for g in self.groups for k in g.skipped)

    def _update(self, g, span, step):
        g.backend.sgd_step(
            *g.arrays(span, "momentum_buffer" if self.momentum else None),
            lr=self.lr, momentum=self.momentum,
            dampening=self.dampening, nesterov=self.nesterov, weight_decay=self.weight_decay,
            first_step=step == 1,
        )


class Adam(Optimizer):
    """Adam with bias correction, as ``torch.optim.Adam``::

        g = grad + weight_decay * param          (Adam; AdamW decays param instead)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        step_size = lr / (1 - beta1 ** t)
        denom = sqrt(v) / sqrt(1 - beta2 ** t) + eps
        param = param - step_size * m / denom
    """

    state_names = ("exp_avg", "exp_avg_sq")
    hyper_names = ("lr", "betas", "eps", "weight_decay")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self._check_hyper(lr=lr, eps=eps, weight_decay=weight_decay)
        pair = tuple(betas) if isinstance(betas, (tuple, list)) else None
        if pair is None or len(pair) != 2:
            raise InputError(f"{type(self).__name__}: betas must be a pair (beta1, beta2), "
                             f"got {betas!r}")
        self._check_hyper(beta1=pair[0], beta2=pair[1])
        betas = tuple(float(b) for b in pair)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise InputError(f"{type(self).__name__}: betas must be two numbers in [0, 1), got {betas}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        super().__init__(params)

    def _update(self, g, span, step):
        beta1, beta2 = self.betas
        g.backend.adam_step(
            *g.arrays(span, "exp_avg", "exp_avg_sq"), step=step,
            lr=self.lr, beta1=beta1, beta2=beta2, eps=self.eps,
            weight_decay=self.weight_decay, decoupled=self.decoupled,
        )


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``::

        param = param * (1 - lr * weight_decay)
        (then the Adam update without weight decay)
    """

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop``::

        g = grad + weight_decay * param
        v = alpha * v + (1 - alpha) * g * g
        if centered: a = a + (1 - alpha) * (g - a); avg = sqrt(v - a * a) + eps
        else:        avg = sqrt(v) + eps
        if momentum > 0: buf = momentum * buf + g / avg; param = param - lr * buf
        else:            param = param - lr * g / avg
    """

    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    hyper_names = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def _needed_state(self) -> tuple:
        return ("square_avg",) + (("momentum_buffer",) if self.momentum > 0 else ()) \
            + (("grad_avg",) if self.centered else ())

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False):
        self._check_hyper(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
        self.lr, self.alpha, self.eps = lr, alpha, eps
        self.weight_decay, self.momentum, self.centered = weight_decay, momentum, bool(centered)
        super().__init__(params)

    def _own_counts_matter(self) -> bool:
        return False  # torch's RMSprop update never reads its step count

    def _update(self, g, span, step):
        data, grad, square_avg, buf, grad_avg = g.arrays(
            span, "square_avg", "momentum_buffer" if self.momentum > 0 else None,
            "grad_avg" if self.centered else None)
        g.backend.rmsprop_step(
            data, grad, square_avg, lr=self.lr, alpha=self.alpha, eps=self.eps,
            weight_decay=self.weight_decay, momentum=self.momentum, buf=buf,
            centered=self.centered, grad_avg=grad_avg,
        )
