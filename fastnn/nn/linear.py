"""Linear: ``y = x @ weight + bias`` with weight (in_features, out_features)."""
from __future__ import annotations

import numbers

import numpy as np

from ..backends import asarray, get_backend, get_default_dtype, refuse_foreign, refuse_non_real
from ..backends.base import GemmOperand, gemm_array
from ..backends.activations import get_activation
from ..errors import DTypeError, ShapeError
from ..random import generator
from .init import initial_weight
from .module import Module
from .parameter import Parameter


class Linear(Module):
    """Fully connected layer on inputs of shape ``(..., in_features)``.

    Inside a Sequential, a following elementwise activation is fused into this
    layer's GEMM output (``forward_fused``), so ``Linear -> ReLU`` costs one
    GEMM plus one in-place pass.
    """

    activation = None  # reserved: a Linear never applies an activation on its own

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init="he", seed=None):
        sizes = []
        for label, v in (("in_features", in_features), ("out_features", out_features)):
            # any integer (np.int64 from y.max() + 1 too), but not a bool or a float
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"Linear: {label} must be a positive int, got {v!r}")
            sizes.append(int(v))
        in_features, out_features = sizes
        self.in_features = in_features
        self.out_features = out_features
        rng = generator() if seed is None else get_backend().rng(seed)
        dtype = get_default_dtype()
        w = initial_weight(init, (in_features, out_features), in_features, out_features,
                           rng, dtype, self._label())
        self.weight = Parameter(get_backend().asarray(w), name="weight")
        self.bias = Parameter(get_backend().zeros((out_features,), dtype), name="bias") if bias else None
        self._saved = None

    def _label(self) -> str:
        return f"Linear({self.in_features} -> {self.out_features})"

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bias={self.bias is not None}"

    def _check_input(self, x, backend):
        w = self.weight.data
        if not backend.is_array(w):
            if type(w).__name__ not in ("ndarray", "Tensor"):  # a list assigned to .data
                raise TypeError(f"{self._label()}: weight.data is a {type(w).__name__}; assign "
                                "an array of the backend (fastnn.asarray(...))")
            raise TypeError(
                f"{self._label()}: its parameters are {type(w).__module__}.{type(w).__name__} "
                f"arrays but the current backend is {backend.name}; move the model with "
                f"model.to({backend.name!r})"
            )
        if w.shape != (self.in_features, self.out_features) or w.dtype.kind != "f":
            self._refuse_weight(w)
        if not backend.is_array(x):
            refuse_foreign(x, backend, self._label())
            x = asarray(x)
        if x.dtype.kind not in "fiub":
            refuse_non_real(x.dtype, self._label())
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{self._label()}: expected input (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if x.dtype != w.dtype:
            x = x.astype(w.dtype)  # ints/float64 data into a float32 net, as Keras does
        return x

    def _refuse_weight(self, w):
        """A weight assigned to ``.data`` that the layer cannot use, with why."""
        if w.dtype.kind != "f":
            raise DTypeError(f"{self._label()}: weight.data must be floating point, got {w.dtype}")
        raise ShapeError(f"{self._label()}: weight.data has shape {tuple(w.shape)}, expected "
                         f"({self.in_features}, {self.out_features}) (weights are stored "
                         "(in_features, out_features): y = x @ W + b)")

    # ------------------------------------------------------------ forward
    def forward(self, x):
        return self.forward_fused(x, None, 0.0)

    def forward_fused(self, x, act, alpha, emit_operand=False):
        """``act(x @ W + b)`` with the bias and activation applied in place.

        Inside a Sequential, a Linear followed by a Linear gets ``emit_operand``:
        under bf16 on a GPU it then returns its output as the next layer's GEMM
        operand (a ``GemmOperand``, bf16 bits written in the activation's own
        pass), and the next layer takes ``x`` in that form.
        """
        backend = get_backend()
        x_operand = x if isinstance(x, GemmOperand) else None
        x = self._check_input(gemm_array(x), backend)
        lead = x.shape[:-1]
        x2 = x if x.ndim == 2 else x.reshape(-1, self.in_features)
        n = x2.shape[0]
        w = self.weight.data
        z = self._buffer("z", (n, self.out_features), w.dtype, backend)
        # Operands prepared once for this forward and its backward (bf16 bits on
        # a GPU under fn.set_precision("bf16"); the arrays themselves otherwise).
        xq, wq = x2, w
        if backend.prepares_gemm_operands:
            prepared = x_operand is not None and x_operand.array is x2
            xq = x_operand if prepared else backend.gemm_operand(x2, self._bits_buffer("x_bits", backend))
            wq = backend.gemm_operand(w, self._bits_buffer("w_bits", backend))
        try:
            backend.gemm(xq, wq, out=z)
        except MemoryError as exc:
            raise self._op_out_of_memory(f"forward ({n}, {self.in_features}) @ weight", exc) from exc
        bias = self.bias.data if self.bias is not None else None
        pre = None
        if act is None:
            if bias is not None:
                try:
                    backend.add_bias(z, bias)
                except MemoryError as exc:
                    raise self._op_out_of_memory("forward (bias)", exc) from exc
            y = z
        else:
            keep_pre = get_activation(act).needs_pre(alpha) and self.training
            y = self._buffer("y", z.shape, w.dtype, backend) if keep_pre else z
            emit_operand = emit_operand and backend.prepares_gemm_operands and len(lead) == 1
            try:
                if emit_operand:
                    y_out = backend.bias_act_operand(
                        z, bias, act, alpha, out=y, bits_buffer=self._bits_buffer("y_bits", backend))
                else:
                    backend.bias_act(z, bias, act, alpha, out=y)
            except MemoryError as exc:
                raise self._op_out_of_memory(f"forward (bias + {act})", exc) from exc
            pre = z if keep_pre else None
        # __dict__ directly: skips Module.__setattr__'s registry checks (hot path).
        self.__dict__["_saved"] = (x2, x.shape, y, pre, act, alpha, xq, wq)
        if act is not None and emit_operand:
            return y_out
        return y.reshape(*lead, self.out_features) if len(lead) != 1 else y

    def _bits_buffer(self, tag, backend):
        """``shape -> uint16 buffer``: where gemm_operand puts an operand's bf16
        bits (a work buffer of this layer, so it lives from forward to backward)."""
        return lambda shape: self._buffer(tag, tuple(shape), np.uint16, backend)

    # ------------------------------------------------------------ backward
    def backward(self, dy):
        return self.backward_fused(dy, need_input_grad=True)

    def backward_fused(self, dy, need_input_grad=True):
        try:
            return self._backward(dy, need_input_grad)
        except MemoryError as exc:
            raise self._op_out_of_memory("backward", exc) from exc

    def _backward(self, dy, need_input_grad):
        if self._saved is None:
            raise RuntimeError(f"{self._label()}: backward() called before forward()")
        x2, x_shape, y, pre, act, alpha, xq, wq = self._saved
        backend = get_backend()
        n = x2.shape[0]
        if not backend.is_array(dy):
            refuse_foreign(dy, backend, self._label(), "dy")
            dy = asarray(dy)
        if tuple(dy.shape) != tuple(x_shape[:-1]) + (self.out_features,):
            raise ShapeError(
                f"{self._label()}: backward expected dy {tuple(x_shape[:-1]) + (self.out_features,)}, "
                f"got {tuple(dy.shape)}"
            )
        dy2 = dy.reshape(n, self.out_features)
        dz_bits = self._bits_buffer("dz_bits", backend) if backend.prepares_gemm_operands else None
        b = self.bias
        bias_scratch = (lambda: self._buffer("db", b.shape, b.dtype, backend)) if b is not None else None
        bias_done = False
        if act is not None:
            dz = self._buffer("dz", dy2.shape, y.dtype, backend)
            if dz_bits is None and b is not None and backend.fuses_bias_grad:  # one pass
                b.accumulate_grad(
                    lambda out: backend.act_backward_bias(dy2, y, act, pre, alpha, dz, out)[1],
                    scratch=bias_scratch,
                )
                dzq, bias_done = dz, True
            elif dz_bits is None:
                backend.act_backward(dy2, y, act, pre, alpha, out=dz)
                dzq = dz
            else:  # dz and its bf16 bits in one pass
                dzq = backend.act_backward_operand(dy2, y, act, pre, alpha, out=dz, bits_buffer=dz_bits)
        else:
            dz = dy2
            dzq = dz if dz_bits is None else backend.gemm_operand(dz, dz_bits)
        w = self.weight
        w.accumulate_grad(
            lambda out: backend.gemm(xq, dzq, out=out, trans_a=True),
            scratch=lambda: self._buffer("dw", w.shape, w.dtype, backend),
        )
        if b is not None and not bias_done:
            b.accumulate_grad(lambda out: backend.bias_grad(dz, out=out), scratch=bias_scratch)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", (n, self.in_features), y.dtype, backend)
        backend.gemm(dzq, wq, out=dx, trans_b=True)
        return dx.reshape(x_shape)
