"""Parameter: a backend array that training updates, plus its gradient."""
from __future__ import annotations

from ..backends import get_backend, host_array


class Parameter:
    """``data`` (backend array, dtype kept as given), ``grad`` (None until a
    backward pass), ``name``.

    ``_grad_view`` is the slot an optimizer reserved for this gradient in its
    flat buffer: when ``grad`` is None a layer writes there directly.
    """

    __slots__ = ("data", "grad", "name", "_grad_view")

    def __init__(self, array, name: str | None = None):
        backend = get_backend()
        if isinstance(array, Parameter):
            array = array.data
        if not backend.is_array(array):
            array = backend.asarray(host_array(array))
        if array.dtype.kind != "f":
            raise TypeError(f"Parameter {name or ''}: expected a floating array, got {array.dtype}")
        self.data = array
        self.grad = None
        self.name = name
        self._grad_view = None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    def accumulate_grad(self, compute, scratch=None):
        """Add a freshly computed gradient to ``grad``.

        ``compute(out)`` writes the gradient into ``out`` (or a new array when
        ``out`` is None) and returns it. A cleared gradient is written straight
        into the optimizer's slot (no zero fill, no extra pass); an existing
        one gets the new gradient computed into ``scratch()`` (a callable, so
        the buffer exists only for modules that really accumulate) and added.
        """
        if self.grad is None:
            view = self._grad_view
            if view is not None and type(view) is type(self.data) \
                    and view.shape == self.data.shape and view.dtype == self.data.dtype:
                self.grad = compute(view)
            else:
                self.grad = compute(None)
        else:
            self.grad += compute(scratch() if scratch is not None else None)

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"Parameter{label}(shape={self.shape}, dtype={self.dtype})"
