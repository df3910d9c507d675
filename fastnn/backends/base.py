"""Backend: the array-module abstraction.

Every op is implemented here once, generically, against ``self.xp`` (NumPy's
API, which CuPy mirrors), so a new backend works on day one. Backends that can
fuse override only the hot ops and fall back to ``super()`` for shapes or
dtypes their kernels do not handle (the Thinc ``Ops`` pattern).

Rules every op keeps: shapes are checked by the caller (the layer), float32
stays float32, and ``out=`` (when given) is written in place and returned.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .activations import get_activation
from .constants import BCE_EPSILON


class Backend:
    """Generic implementation of the backend contract; also the NumPy backend."""

    name = "base"

    def __init__(self, xp=np):
        self.xp = xp

    # ------------------------------------------------------------ arrays
    @property
    def device(self) -> str:
        return "cpu"

    @property
    def capturing(self) -> bool:
        """True while a CUDA graph records (the CuPy backend): work queued now
        is recorded, not run, so a value meant to persist cannot be made now."""
        return False

    def __repr__(self) -> str:
        return f"<fastnn backend {self.name!r} on {self.device}>"

    # ``with fn.use_backend(name):`` restores the previous backend on exit.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from . import _exit_backend

        _exit_backend(self)
        return False

    def asarray(self, x, dtype=None):
        """Array on this backend's device; see ``fastnn.asarray`` for dtype rules."""
        return self.xp.asarray(host_array(x), dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        return host_array(x)

    def resident(self, x):
        """``x`` as an array this backend can compute on without a copy when it
        already is one (fit and predict validate it where it lives); anything
        else as a NumPy array, for ``asarray`` to move over once."""
        return host_array(x)

    def is_array(self, x) -> bool:
        return isinstance(x, self.xp.ndarray)

    def rng(self, seed=None) -> np.random.Generator:
        """Host generator for parameter init and shuffling (same draws on every backend)."""
        return np.random.default_rng(seed)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def upload(self, dst, host) -> None:
        """Copy the host array ``host`` into ``dst`` (same shape), in place."""
        dst[...] = host

    # ------------------------------------------------------------ linear algebra
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False):
        """``out = op(a) @ op(b)``; op transposes when asked (no copy: BLAS flags)."""
        if trans_a:
            a = a.T
        if trans_b:
            b = b.T
        return self.xp.matmul(a, b, out=out)

    # True when gemm_operand does work (CuPy under bf16); a layer skips the call
    # otherwise, which keeps the small-net CPU step as short as it was.
    prepares_gemm_operands = False
    # Whether act_backward_bias is one pass (CuPy); elsewhere a Linear calls the
    # two ops itself and skips the indirection (its CPU step stays as short).
    fuses_bias_grad = False

    def gemm_operand(self, x, bits_buffer):
        """``x`` prepared once for several GEMMs (forward and backward reuse it);
        pass the result to ``gemm`` in place of ``x``. Here simply ``x``; the
        CuPy backend converts it to bf16 under ``fn.set_precision("bf16")``,
        into ``bits_buffer(shape)`` (a uint16 buffer the caller keeps)."""
        return x

    def bias_act_operand(self, z, bias, act: str, alpha: float = 0.0, out=None, bits_buffer=None):
        """``bias_act``, its result prepared as the next layer's GEMM input
        (``gemm_operand``): a Linear followed by a Linear asks for both at once,
        which the CuPy backend under bf16 does in one pass. Here, two calls."""
        return self.gemm_operand(self.bias_act(z, bias, act, alpha, out), bits_buffer)

    def act_backward_operand(self, dy, y, act: str, pre=None, alpha: float = 0.0, out=None,
                             bits_buffer=None):
        """``act_backward``, its result (a layer's dz) prepared as the input of
        the layer's two backward GEMMs (``gemm_operand``), as bias_act_operand."""
        return self.gemm_operand(self.act_backward(dy, y, act, pre, alpha, out), bits_buffer)

    def bias_grad(self, dz, out=None):
        """Sum of ``dz`` (N, F) over the batch -> (F,)."""
        return dz.sum(axis=0, out=out)

    # ------------------------------------------------------------ activations
    def add_bias(self, z, bias) -> None:
        """``z += bias`` in place, z (N, F), bias (F,): a Linear with no activation."""
        z += bias

    def bias_act(self, z, bias, act: str, alpha: float = 0.0, out=None):
        """``out = act(z + bias)`` for z (N, F), bias (F,) or None.

        ``z`` itself receives ``z + bias`` (it is scratch from the GEMM and
        becomes the pre-activation that GELU's backward needs); ``out``
        defaults to ``z`` (fully in place).
        """
        if bias is not None:
            z += bias
        y = get_activation(act).forward(self.xp, z, alpha)
        if out is None:
            out = z
        out[...] = y
        return out

    def act_backward(self, dy, y, act: str, pre=None, alpha: float = 0.0, out=None):
        """``out = dy * act'(x)``, from the saved output ``y`` where exact,
        else from the pre-activation ``pre``; ``out`` defaults to ``dy``."""
        spec = get_activation(act)
        if spec.needs_pre(alpha) and pre is None:
            raise ValueError(f"act_backward({act!r}) needs the pre-activation")
        dz = spec.backward(self.xp, dy, y, pre, alpha)
        if out is None:
            out = dy
        out[...] = dz
        return out

    def act_backward_bias(self, dy, y, act: str, pre=None, alpha: float = 0.0, out=None,
                          bias_grad_out=None):
        """``act_backward`` and the column sums of its result (a Linear's bias
        gradient): returns ``(dz, db)``, db written to ``bias_grad_out`` when
        given. One launch on CuPy for small batches; two ops elsewhere."""
        dz = self.act_backward(dy, y, act, pre, alpha, out)
        return dz, self.bias_grad(dz, out=bias_grad_out)

    # ------------------------------------------------------------ losses
    def mse(self, pred, target, grad_out):
        """Mean squared error: returns ``(loss, grad)``, loss a 0-d array of
        pred's dtype (left on the device), grad = 2 (pred - target) / size
        written to ``grad_out`` (pred's shape; it may be pred itself)."""
        xp = self.xp
        t = pred.dtype.type
        xp.subtract(pred, target, out=grad_out)
        flat = grad_out.reshape(-1)
        # BLAS, no temporary. (No errstate here: it costs more than the whole
        # dot on a small net; an overflow warning precedes TrainingDiverged.)
        loss = xp.dot(flat, flat) * t(1.0 / flat.size)
        grad_out *= t(2.0 / flat.size)
        return loss, grad_out

    def bce(self, pred, target, grad_out, seen=None):
        """Binary cross-entropy of probabilities against targets of pred's shape,
        as torch's BCELoss: returns ``(loss, grad)``, loss a 0-d array of pred's
        dtype (left on the device), logs clamped at -100, grad =
        (pred - target) / max(pred (1 - pred), 1e-12) / size written to ``grad_out``.

        ``seen`` (a device array [min, max, NaN batches] or None) is for fit on a
        GPU, which must not read the predictions back to check them: the batch's
        range is folded in (fmin/fmax: a NaN batch does not hide the values seen
        before) and a batch with a value outside [0, 1] or NaN gets a NaN loss.
        Without it the caller has checked the range.
        """
        xp = self.xp
        t = pred.dtype.type
        if seen is not None:
            lo, hi = pred.min(), pred.max()  # NaN if any prediction is NaN
            xp.fmin(seen[0:1], lo, out=seen[0:1])
            xp.fmax(seen[1:2], hi, out=seen[1:2])
            xp.add(seen[2:3], xp.isnan(lo), out=seen[2:3])
            in_range = (lo >= t(0)) & (hi <= t(1))
        # p = 0 or 1 is valid input: log(0) = -inf is clamped, not warned about.
        errstate = getattr(xp, "errstate", None)
        with errstate(divide="ignore") if errstate else contextlib.nullcontext():
            log_p = xp.maximum(xp.log(pred), t(-100))
            log_1mp = xp.maximum(xp.log1p(-pred), t(-100))
        loss = -(target * log_p + (t(1) - target) * log_1mp).mean()
        if seen is not None:
            loss = xp.where(in_range, loss, t(np.nan))
        denom = xp.maximum((t(1) - pred) * pred, t(BCE_EPSILON))
        xp.multiply((pred - target) / denom, t(1.0 / pred.size), out=grad_out)
        return loss, grad_out

    def bce_with_logits(self, logits, target, grad_out):
        """Binary cross-entropy of raw logits, stable for any logit, as torch's
        BCEWithLogitsLoss: ``(loss, grad)``, loss = mean(max(x, 0) - x t +
        log1p(exp(-|x|))), grad = (sigmoid(x) - t) / size written to ``grad_out``."""
        xp = self.xp
        t = logits.dtype.type
        loss = (xp.maximum(logits, t(0)) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))).mean()
        prob = self.bias_act(logits, None, "sigmoid", out=grad_out)
        prob -= target
        prob *= t(1.0 / logits.size)
        return loss, prob

    def softmax_xent(self, logits, labels, grad_out=None):
        """Mean cross-entropy of logits (N, C) against int labels (N,).

        Returns ``(loss, dlogits)``: loss a 0-d array of logits' dtype (left on
        the device), dlogits = (softmax - onehot) / N, written to ``grad_out``.
        Stable for any finite logits (shifted by the row max).
        """
        xp = self.xp
        n = logits.shape[0]
        rows = xp.arange(n)
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        picked = shifted[rows, labels] - xp.log(s[:, 0])
        loss = -picked.mean()
        grad = e if grad_out is None else grad_out
        xp.divide(e, s, out=grad)
        grad[rows, labels] -= 1
        grad *= logits.dtype.type(1.0 / n)
        return loss, grad

    # ------------------------------------------------------------ optimizers
    # Each update is one pass over flat 1-D buffers, following torch.optim's
    # single-tensor code path step by step so trajectories match.
    def sgd_step(self, param, grad, buf, *, lr, momentum, dampening, nesterov,
                 weight_decay, first_step):
        t = param.dtype.type
        if weight_decay:
            grad = grad + t(weight_decay) * param
        if momentum:
            if first_step:
                buf[...] = grad
            else:
                buf *= t(momentum)
                buf += t(1 - dampening) * grad
            grad = grad + t(momentum) * buf if nesterov else buf
        param -= t(lr) * grad

    def adam_step(self, param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1,
                  beta2, eps, weight_decay, decoupled):
        t = param.dtype.type
        xp = self.xp
        if decoupled:
            param *= t(1 - lr * weight_decay)
        elif weight_decay:
            grad = grad + t(weight_decay) * param
        exp_avg += t(1 - beta1) * (grad - exp_avg)
        exp_avg_sq *= t(beta2)
        exp_avg_sq += t(1 - beta2) * grad * grad
        step_size, bc2_sqrt = adam_bias_correction(step, lr, beta1, beta2)
        denom = xp.sqrt(exp_avg_sq) / t(bc2_sqrt) + t(eps)
        param -= t(step_size) * (exp_avg / denom)

    def rmsprop_step(self, param, grad, square_avg, *, lr, alpha, eps,
                     weight_decay, momentum, buf, centered, grad_avg):
        t = param.dtype.type
        xp = self.xp
        if weight_decay:
            grad = grad + t(weight_decay) * param
        square_avg *= t(alpha)
        square_avg += t(1 - alpha) * grad * grad
        if centered:
            grad_avg += t(1 - alpha) * (grad - grad_avg)
            avg = xp.sqrt(square_avg - grad_avg * grad_avg) + t(eps)
        else:
            avg = xp.sqrt(square_avg) + t(eps)
        if momentum > 0:
            buf *= t(momentum)
            buf += grad / avg
            param -= t(lr) * buf
        else:
            param -= t(lr) * (grad / avg)


def adam_bias_correction(step: int, lr: float, beta1: float, beta2: float):
    """``(lr / (1 - beta1**step), sqrt(1 - beta2**step))`` in double precision on
    the host, as torch.optim.Adam computes them; every backend casts these."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


class GemmOperand:
    """A float32 GEMM operand with its bf16 bits, made once by ``gemm_operand``
    (or ``*_operand``) and passed to several GEMMs in place of the array."""

    __slots__ = ("array", "bits")

    def __init__(self, array, bits):
        self.array, self.bits = array, bits


def gemm_array(x):
    """The array of a GEMM operand (itself, or a GemmOperand's float32 array)."""
    return x.array if isinstance(x, GemmOperand) else x


def on_host(x) -> bool:
    """True for arrays of NumPy's own classes (host memory, whatever the backend)."""
    return isinstance(x, np.ndarray) and type(x).__module__.split(".")[0] == "numpy"


def host_array(x) -> np.ndarray:
    """A NumPy view/copy of any array-like: NumPy, CuPy, DLPack producers, lists."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return x.get()
    if isinstance(x, np.ndarray):
        return x
    if module == "torch":
        return x.detach().cpu().numpy()
    if hasattr(x, "__dlpack__") and not np.isscalar(x):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError):
            pass
    return np.asarray(x)
