"""Parameter: a backend array that training updates, plus its gradient."""
from __future__ import annotations

from ..backends import get_backend, host_array


class Parameter:
    """``data`` (backend array, dtype kept as given), ``grad`` (None until a
    backward pass), ``name``.

    ``_grad_zero`` marks a gradient buffer that the optimizer has just zeroed:
    a layer may then write its gradient straight into it instead of adding.
    """

    __slots__ = ("data", "_grad", "name", "_grad_zero")

    def __init__(self, array, name: str | None = None):
        backend = get_backend()
        if isinstance(array, Parameter):
            array = array.data
        if not backend.is_array(array):
            array = backend.asarray(host_array(array))
        if array.dtype.kind != "f":
            raise TypeError(f"Parameter {name or ''}: expected a floating array, got {array.dtype}")
        self.data = array
        self._grad = None
        self._grad_zero = False
        self.name = name

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = value
        self._grad_zero = False

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
        ``out`` is None) and returns it. Writes go straight into the gradient
        buffer when it is new or freshly zeroed, so the common step costs no
        extra pass; otherwise into ``scratch`` (reused) and then added.
        """
        if self._grad is None:
            self._grad = compute(None)
        elif self._grad_zero:
            compute(self._grad)
        else:
            self._grad += compute(scratch)
        self._grad_zero = False

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"Parameter{label}(shape={self.shape}, dtype={self.dtype})"
