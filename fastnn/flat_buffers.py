"""One flat buffer per dtype for an optimizer's parameters, gradients and state.

Each ``Parameter.data`` / ``.grad`` becomes a view into the group's flat
buffers, so an optimizer's update is one backend op over contiguous memory
(optim.py holds the update rules).
"""
from __future__ import annotations

from .backends import refuse_foreign
from .errors import CaptureUnsupported, ShapeError, naming_out_of_memory
from .nn.parameter import Parameter

ALIGN = 16  # elements: keeps every view 64-byte aligned for SIMD


class FlatGroup:
    """The parameters of one dtype, packed into flat data/grad buffers."""

    def __init__(self, params: list[Parameter], backend, state_names: tuple):
        self.backend = backend
        self.params = params
        self.dtype = params[0].data.dtype
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.size // ALIGN) * ALIGN
        self.size = total
        self.offsets = offsets
        nbytes = total * self.dtype.itemsize * (2 + len(state_names))
        with naming_out_of_memory("optimizer", f"flat parameter, gradient and {len(state_names)} "
                                  f"state buffers of {total:,} {self.dtype}", nbytes,
                                  backend.device):
            self.data = backend.zeros((total,), self.dtype)
            self.grad = backend.zeros((total,), self.dtype)
            self.state = {name: backend.zeros((total,), self.dtype) for name in state_names}
        self.data_views, self.grad_views = [], []
        for p, off in zip(params, offsets):
            dv = self.data[off:off + p.size].reshape(p.shape)
            gv = self.grad[off:off + p.size].reshape(p.shape)
            dv[...] = p.data
            if p.grad is not None:
                gv[...] = p.grad
                p.grad = gv
            p.data = dv
            p._grad_view = gv
            self.data_views.append(dv)
            self.grad_views.append(gv)
        # Steps each parameter sat out (no gradient), as torch skips a parameter
        # whose grad is None: its own step count is step_count - skipped.
        self.skipped = [0] * len(params)  # a list: checked every step, any() is cheapest
        self._whole: dict = {}  # state names -> (data, grad, *state buffers), see arrays()

    def buffer(self, name: str):
        """The flat state buffer ``name``, created (zeros) on first use."""
        buf = self.state.get(name)
        if buf is None:
            if self.backend.capturing:  # the zero fill would be recorded and rerun every replay
                raise CaptureUnsupported(f"optimizer state {name!r} first needed while a CUDA "
                                         "graph records (run one ordinary step first)")
            with naming_out_of_memory("optimizer", f"its {name!r} buffer of {self.size:,} "
                                      f"{self.dtype}", self.size * self.dtype.itemsize,
                                      self.backend.device):
                buf = self.state[name] = self.backend.zeros((self.size,), self.dtype)
        return buf

    def arrays(self, span, *state_names):
        """data, grad and the named state buffers (None for a None name), all
        cut to ``span`` (a slice; None: the whole flat buffers)."""
        if span is None:  # every step: the tuple is kept (buffers are only written in place)
            whole = self._whole.get(state_names)
            if whole is None:
                whole = self._whole[state_names] = (
                    self.data, self.grad,
                    *[None if name is None else self.buffer(name) for name in state_names])
            return whole
        return [self.data[span], self.grad[span]] + [
            None if name is None else self.buffer(name)[span] for name in state_names]

    def sync(self):
        """Copy back any data/grad array a user rebound since the last step;
        returns None when every parameter has a gradient, else which ones do
        (torch skips the others)."""
        missing = False
        for p, dv, gv in zip(self.params, self.data_views, self.grad_views):
            if p.data is not dv:
                if not self.backend.is_array(p.data):
                    raise TypeError(
                        f"optimizer: parameter {p.name or ''} {p.shape} is no longer on the "
                        f"{self.backend.name} backend; create the optimizer after moving the model"
                    )
                check_slot("data", p, p.data, dv)
                dv[...] = p.data
                p.data = dv
            grad = p.grad
            if grad is not gv:  # the usual case is one identity check: backward wrote the slot
                if grad is None:
                    missing = True
                else:
                    refuse_foreign(grad, self.backend, "optimizer",
                                   f"the gradient of parameter {p.name or ''} {p.shape}")
                    if not self.backend.is_array(grad):  # a list or a scalar
                        grad = self.backend.asarray(grad, dtype=gv.dtype)
                    check_slot("grad", p, grad, gv)
                    gv[...] = grad
                    p.grad = gv
            p._grad_view = gv
        return [p.grad is not None for p in self.params] if missing else None

    def spans(self, active: list):
        """``(lo, hi, i)``: flat ranges of consecutive parameters that have a
        gradient and the same step count (parameter i's), padding included."""
        ends = self.offsets[1:] + [self.size]
        i, n = 0, len(self.params)
        while i < n:
            if not active[i]:
                i += 1
                continue
            j = i + 1
            while j < n and active[j] and self.skipped[j] == self.skipped[i]:
                j += 1
            yield self.offsets[i], ends[j - 1], i
            i = j

    def zero_grad(self) -> None:
        """Clear the gradients (``grad = None``, as torch's default). The next
        backward writes straight into the flat buffer, so no fill pass is needed."""
        for p in self.params:
            p.grad = None


def check_slot(what: str, p: Parameter, arr, slot) -> None:
    """A rebound data/grad array must still fit its slot: copying it in would
    silently cast it (after ``model.astype``) or broadcast it."""
    if tuple(arr.shape) != tuple(slot.shape):
        raise ShapeError(
            f"optimizer: parameter {p.name or ''} {what} has shape {tuple(arr.shape)}, the "
            f"parameter {tuple(slot.shape)}; assign an array of the parameter's shape (or create "
            "the optimizer after changing the model's shapes)"
        )
    if arr.dtype != slot.dtype:
        advice = (f"assign a gradient of the parameter's dtype (.astype({slot.dtype.name!r}))"
                  if what == "grad" else "create the optimizer after changing the model's dtype")
        raise TypeError(
            f"optimizer: parameter {p.name or ''} {tuple(slot.shape)} {what} is now {arr.dtype}, "
            f"its slot {slot.dtype}; {advice}"
        )
