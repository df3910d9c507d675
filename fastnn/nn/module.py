"""Module and Sequential.

A module's ``forward`` keeps what its ``backward`` needs; ``backward(dy)``
returns ``dx`` and *accumulates* into each parameter's ``grad``.

Inside ``fit`` (``training_step_mode``) layers reuse their work buffers from
step to step and the first layer skips the input gradient nobody reads. Outside
it every call returns fresh arrays, so ``a = model(x1); b = model(x2)`` never
overwrites ``a``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from ..backends import get_backend, host_array, value_range
from ..errors import OutOfMemory, ShapeError, out_of_memory
from .parameter import Parameter

_step_mode: contextvars.ContextVar[bool] = contextvars.ContextVar("fastnn_step_mode", default=False)
# The model whose input gradient nobody reads (fit's top-level model).
_no_input_grad: contextvars.ContextVar[object] = contextvars.ContextVar(
    "fastnn_no_input_grad", default=None
)


# (min, max) of the integer labels of the whole data set, checked once by fit,
# so a loss need not read the batch's labels back from the device every step.
_label_range: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "fastnn_label_range", default=None
)


@contextlib.contextmanager
def training_step_mode(model=None, label_range=None):
    """Let layers reuse buffers across calls (used by fit/predict); ``model``'s
    own input gradient is not computed; ``label_range`` is the (min, max) of
    every label the losses will see."""
    token = _step_mode.set(True)
    token2 = _no_input_grad.set(model)
    token3 = _label_range.set(label_range)
    try:
        yield
    finally:
        _label_range.reset(token3)
        _no_input_grad.reset(token2)
        _step_mode.reset(token)


def label_range_of(y):
    """(min, max) of integer labels, read once (for ``training_step_mode``'s
    ``label_range``); None for other targets, seen from the dtype. Device
    arrays are reduced where they live: two numbers come back, not the labels."""
    try:
        kind = np.dtype(y.dtype).kind
    except (AttributeError, TypeError):  # a list, or a torch tensor (torch dtypes)
        y = host_array(y)
        kind = y.dtype.kind
    if kind not in "iu" or y.size == 0:
        return None
    low, high = value_range(y)
    return int(low), int(high)


def known_label_range():
    return _label_range.get()


def in_step_mode() -> bool:
    return _step_mode.get()


class Module:
    """Base class: subclasses define ``forward`` and ``backward``.

    Parameters and sub-modules assigned as attributes are registered in
    assignment order (PyTorch-style), so subclasses need not call
    ``super().__init__()``.
    """

    training = True

    def __setattr__(self, name, value):
        d = self.__dict__
        if isinstance(value, Parameter):
            d.setdefault("_parameters", OrderedDict())[name] = value
            d.get("_modules", {}).pop(name, None)
        elif isinstance(value, Module):
            d.setdefault("_modules", OrderedDict())[name] = value
            d.get("_parameters", {}).pop(name, None)
            if d.get("_plan") is not None:
                d["_plan"] = None  # a Sequential's fusion plan is recomputed
        else:
            d.get("_parameters", {}).pop(name, None)
            d.get("_modules", {}).pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self.__dict__.get("_parameters", {}).pop(name, None)
        self.__dict__.get("_modules", {}).pop(name, None)
        object.__delattr__(self, name)

    # ------------------------------------------------------------ computation
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, dy):
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    # ------------------------------------------------------------ tree
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self.__dict__.get("_modules", {}).items()

    def children(self) -> list["Module"]:
        return [m for _, m in self.named_children()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for name, p in self._named_parameters_all(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _named_parameters_all(self, prefix):
        for name, p in self.__dict__.get("_parameters", {}).items():
            yield prefix + name, p
        for name, child in self.named_children():
            yield from child._named_parameters_all(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{dotted name: numpy copy}`` of every parameter."""
        return {name: np.array(host_array(p.data), copy=True) for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters in place (shapes must match)."""
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            from ..errors import StateKeyError

            raise StateKeyError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for name, p in params.items():
            if name not in state:
                continue
            value = host_array(state[name])
            if value.dtype.kind not in "fiu":
                from ..errors import DTypeError

                raise DTypeError(f"{type(self).__name__}.load_state_dict: {name!r} must hold real "
                                 f"numbers, got an array of {value.dtype}")
            if tuple(value.shape) != p.shape:
                raise ShapeError(
                    f"{type(self).__name__}.load_state_dict: {name!r} expects shape "
                    f"{p.shape}, got {tuple(value.shape)}"
                )
            backend = get_backend()
            if not backend.is_array(p.data):
                raise TypeError(
                    f"{type(self).__name__}.load_state_dict: parameter {name!r} is a "
                    f"{type(p.data).__module__}.{type(p.data).__name__} but the current backend "
                    f"is {backend.name}; load under the model's backend, or move it first with "
                    f"model.to({backend.name!r})"
                )
            p.data[...] = backend.asarray(value, dtype=p.data.dtype)

    def to(self, backend) -> "Module":
        """Move every parameter to ``backend`` (a name or a Backend); grads are dropped."""
        from ..backends import use_backend

        with use_backend(backend) as target:
            for p in self.parameters():
                p.data = target.asarray(host_array(p.data), dtype=p.data.dtype)
                p.grad = None
                p._grad_view = None  # an optimizer's slot on the old backend
        for m in self.modules():
            m.__dict__.pop("_buffers", None)
        return self

    def astype(self, dtype) -> "Module":
        """Cast every parameter (e.g. to float64 for a gradient check)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
            p._grad_view = None
        return self

    # ------------------------------------------------------------ helpers
    def _buffer(self, tag: str, shape: tuple, dtype, backend=None):
        """Work buffer: reused across steps inside fit, fresh outside it."""
        if backend is None:
            backend = get_backend()
        if not _step_mode.get():
            return self._allocate(tag, shape, dtype, backend)
        buffers = self.__dict__.get("_buffers")
        if buffers is None:
            buffers = self.__dict__["_buffers"] = {}
        # Hot path: the buffer (or view) of this exact shape, one dict lookup.
        key = (tag, shape, dtype)
        buf = buffers.get(key)
        if buf is not None:
            return buf
        return self._buffer_rows(buffers, key, backend)

    def _buffer_rows(self, buffers: dict, key: tuple, backend):
        """A new shape for a work buffer: one allocation per tag and row shape,
        as many rows as the largest batch so far; a smaller batch (an epoch's
        last, a predict call) gets a view of its leading rows (contiguous), so
        memory does not grow with every batch size seen."""
        tag, shape, dtype = key
        if not shape:  # 0-d: no rows to share
            buf = buffers[key] = self._allocate(tag, shape, dtype, backend)
            return buf
        rows, row_shape = shape[0], tuple(shape[1:])
        whole_key = ("rows", tag, row_shape, dtype)
        whole = buffers.get(whole_key)
        if whole is None or whole.shape[0] < rows:
            whole = buffers[whole_key] = self._allocate(tag, shape, dtype, backend)
            for k in [k for k in buffers if len(k) == 3 and k[0] == tag and k[2] == dtype
                      and len(k[1]) == len(shape) and tuple(k[1][1:]) == row_shape]:
                del buffers[k]  # views of the smaller buffer it replaces: let it go
        buf = buffers[key] = whole if whole.shape[0] == rows else whole[:rows]
        return buf

    def _allocate(self, tag, shape, dtype, backend):
        # Outside fit every forward allocates: the message is built only on failure.
        try:
            return backend.empty(shape, dtype)
        except OutOfMemory:
            raise
        except MemoryError as exc:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            raise out_of_memory(self._label(), f"its {tag!r} buffer {tuple(shape)} "
                                f"{np.dtype(dtype)}", nbytes, backend.device) from exc

    def _label(self) -> str:
        """How error messages name this module, e.g. ``Linear(3 -> 4)``."""
        return type(self).__name__

    def _op_out_of_memory(self, what: str, exc: MemoryError) -> MemoryError:
        """A backend op (cuBLAS's workspace, a kernel's scratch) ran out of
        memory: the error to raise, naming this layer (one from deeper down
        already names its own)."""
        if isinstance(exc, OutOfMemory):
            return exc
        return OutOfMemory(f"{self._label()}: out of memory in {what}: {exc}")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            lines.append("  (" + name + "): " + repr(child).replace("\n", "\n  "))
        lines.append(")")
        return "\n".join(lines)


class Sequential(Module):
    """Modules applied in order; indexable, iterable, ``len()``.

    A ``Linear`` directly followed by one of fastnn's elementwise activations
    runs as one fused step: the bias and the activation are applied in place on
    the GEMM output (``bias_act``) and undone in one pass (``act_backward``).
    """

    def __init__(self, *modules: Module):
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                hint = "; pass the modules as arguments: Sequential(*layers)" \
                    if isinstance(m, (list, tuple)) else ""
                raise TypeError(
                    f"Sequential: item {i} is a {type(m).__name__}, expected a fastnn Module{hint}"
                )
            setattr(self, str(i), m)
        self._plan = None

    def __len__(self) -> int:
        return len(self.__dict__.get("_modules", {}))

    def append(self, module: Module) -> "Sequential":
        """Add ``module`` at the end (as ``torch.nn.Sequential.append``)."""
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.append: expected a fastnn Module, got {type(module).__name__}")
        setattr(self, str(len(self)), module)
        return self

    def __iter__(self):
        return iter(self.children())

    def __getitem__(self, index):
        items = self.children()
        if isinstance(index, slice):
            return Sequential(*items[index])
        return items[index]

    def _steps(self):
        """[(module, fused activation or None)], computed once."""
        if self._plan is None:
            from .activation import ElementwiseActivation
            from .linear import Linear

            items = self.children()
            steps, i = [], 0
            while i < len(items):
                m = items[i]
                nxt = items[i + 1] if i + 1 < len(items) else None
                if (
                    type(m) is Linear and m.activation is None
                    and isinstance(nxt, ElementwiseActivation) and nxt.fusable
                ):
                    steps.append((m, nxt))
                    i += 2
                else:
                    steps.append((m, None))
                    i += 1
            # Fused steps whose output goes straight into another Linear: they
            # may hand it over as that layer's GEMM operand (bf16 bits made in
            # the activation's own pass).
            into_linear = {j for j, (m, act) in enumerate(steps[:-1])
                           if act is not None and type(steps[j + 1][0]) is Linear}
            object.__setattr__(self, "_into_linear", into_linear)
            object.__setattr__(self, "_plan", steps)
        return self._plan

    def forward(self, x):
        steps = self._steps()
        into_linear = self._into_linear
        for i, (module, act) in enumerate(steps):
            if act is None:
                x = module.forward(x)
            else:
                x = module.forward_fused(x, act.act_name, act.alpha, emit_operand=i in into_linear)
        return x

    def backward(self, dy):
        steps = self._steps()
        last = len(steps) - 1
        for i in range(last, -1, -1):
            module, act = steps[i]
            skip_dx = i == 0 and _no_input_grad.get() is self and hasattr(module, "backward_fused")
            if act is not None or skip_dx:
                dy = module.backward_fused(dy, need_input_grad=not skip_dx)
            else:
                dy = module.backward(dy)
        return dy
