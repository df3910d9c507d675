"""fit's compiled fast path for small MLPs on the Numba backend.

``fit`` asks ``plan_fast_path``; when the model is a plain ``Sequential`` of
``Linear`` layers (each optionally followed by one of fastnn's elementwise
activations), the loss is MSELoss, CrossEntropyLoss, BCEWithLogitsLoss or
BCELoss (after a final Sigmoid, so the predictions are probabilities) and the
optimizer is SGD, Adam or AdamW, whole epochs run inside one Numba call
(backends/numba_mlp.py) on the optimizer's own flat buffers. Anything else, or
``FASTNN_FAST_PATH=0``, takes the ordinary path. Both give the same numbers up
to the summation order of the matmuls.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .backends import get_backend
from .backends.activations import get_activation
from .nn.activation import ElementwiseActivation
from .nn.linear import Linear
from .nn.losses import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .nn.module import Sequential
from .optim import SGD, Adam, AdamW

# Above this many weights per layer BLAS beats the kernel's plain loops.
MAX_LAYER_WEIGHTS = 64 * 64
# Measured on the project machine: an ordinary small-net step and a cold compile.
ORDINARY_STEP_S = 40e-6
COLD_COMPILE_S = 3.0
# The kernels' loss codes (numba_mlp / cuda_mlp LOSS_*); all but CrossEntropyLoss
# take float targets of the prediction's shape.
LOSS_KINDS = {MSELoss: 0, CrossEntropyLoss: 1, BCEWithLogitsLoss: 2, BCELoss: 3}
LOSS_XENT = LOSS_KINDS[CrossEntropyLoss]


@dataclass
class FastPlan:
    layout: np.ndarray  # (L, 4) int64: in, out, weight offset, bias offset (-1: none)
    acts: np.ndarray  # (L,) int64 activation codes
    alphas: np.ndarray  # (L,) param dtype
    loss_kind: int
    opt_kind: int
    group: object  # the optimizer's FlatGroup (flat_buffers.py)


def worth_compiling(steps: int) -> bool:
    """Use the kernel if it costs no compile now, or the run repays one."""
    mode = os.environ.get("FASTNN_FAST_PATH", "auto")
    if mode == "1":
        return True
    from .backends import numba_mlp

    kernel = numba_mlp.train_mlp
    return bool(kernel.signatures) or _on_disk(kernel) or steps * ORDINARY_STEP_S > COLD_COMPILE_S


def _on_disk(kernel) -> bool:
    """Whether Numba's cache holds a fresh copy of the kernel (jit_cache)."""
    from .backends.jit_cache import cached_on_disk

    return cached_on_disk(kernel)


def plan_fast_path(model, loss_fn, optimizer, backend_name: str = "numba") -> FastPlan | None:
    """A FastPlan when the compiled path applies exactly, else None.

    ``backend_name``: the backend the kernel runs on ("cupy": gpu_compiled)."""
    if os.environ.get("FASTNN_FAST_PATH") == "0" or get_backend().name != backend_name:
        return None
    if type(model) is not Sequential or type(loss_fn) not in LOSS_KINDS:
        return None
    if type(optimizer) not in (SGD, Adam, AdamW) or len(optimizer.groups) != 1 \
            or not optimizer.uniform_steps:  # one step count for every parameter
        return None
    group = optimizer.groups[0]
    group.sync()
    if group.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    offsets = {id(p): off for p, off in zip(group.params, group.offsets)}
    rows, acts, alphas, seen = [], [], [], 0
    for module, act in model._steps():
        if type(module) is not Linear or module.in_features * module.out_features > MAX_LAYER_WEIGHTS:
            return None
        if act is not None and not (isinstance(act, ElementwiseActivation) and act.fusable):
            return None
        params = [module.weight] + ([module.bias] if module.bias is not None else [])
        if any(id(p) not in offsets for p in params):
            return None
        seen += len(params)
        rows.append((module.in_features, module.out_features, offsets[id(module.weight)],
                     offsets[id(module.bias)] if module.bias is not None else -1))
        name = act.act_name if act is not None else "identity"
        acts.append(get_activation(name).code)
        alphas.append(act.alpha if act is not None else 0.0)
    if not rows or seen != len(group.params):
        return None  # the optimizer also updates parameters outside the model
    for (_, fo, _, _), (fi, _, _, _) in zip(rows, rows[1:]):
        if fo != fi:
            return None
    if type(loss_fn) is BCELoss and acts[-1] != get_activation("sigmoid").code:
        return None  # the ordinary path checks each batch lies in [0, 1]; a sigmoid's output does
    return FastPlan(
        layout=np.array(rows, dtype=np.int64), acts=np.array(acts, dtype=np.int64),
        alphas=np.array(alphas, dtype=group.dtype),
        loss_kind=LOSS_KINDS[type(loss_fn)],
        opt_kind=0 if type(optimizer) is SGD else 1, group=group,
    )


def fits_data(plan: FastPlan, X, y, label_range) -> bool:
    """Whether the kernels can take (X, y) as they are; when not, the ordinary
    path runs and raises the precise error, if any. ``label_range`` is fit's
    (min, max) of integer labels, read once on the host."""
    if X.ndim != 2 or X.shape[1] != plan.layout[0, 0]:
        return False
    classes = int(plan.layout[-1, 1])
    if plan.loss_kind != LOSS_XENT:
        return tuple(y.shape) == (len(X), classes) and y.dtype == X.dtype
    return (y.ndim == 1 and y.dtype.kind in "iu" and label_range is not None
            and label_range[0] >= 0 and label_range[1] < classes)


def _hyper(optimizer) -> np.ndarray:
    if type(optimizer) is SGD:
        return np.array([optimizer.lr, optimizer.momentum, optimizer.dampening,
                         optimizer.weight_decay, float(optimizer.nesterov)], dtype=np.float64)
    beta1, beta2 = optimizer.betas
    return np.array([optimizer.lr, beta1, beta2, optimizer.eps, optimizer.weight_decay,
                     float(optimizer.decoupled)], dtype=np.float64)


def kernel_inputs(plan, X, y, xp):
    """(state1, state2, float targets, int labels) in the form both the Numba and
    the CUDA kernel take: SGD passes its momentum buffer twice, and the unused
    target kind is a small dummy array."""
    state = plan.group.state
    if plan.opt_kind == 0:
        # Plain SGD has no momentum buffer; the kernels then never touch it.
        s1 = s2 = state.get("momentum_buffer", plan.group.grad)
    else:
        s1, s2 = state["exp_avg"], state["exp_avg_sq"]
    if plan.loss_kind != LOSS_XENT:
        yf = y if y.ndim == 2 else y.reshape(len(y), -1)
        yi = xp.zeros(1, dtype=np.int64)
    else:
        yf = xp.zeros((1, 1), dtype=X.dtype)
        # contiguous: a strided view would compile the kernel a second time (layout "A")
        yi = xp.ascontiguousarray(y.astype(np.int64, copy=False))
    return s1, s2, yf, yi


def after_run(optimizer, group, done: int) -> None:
    """The optimizer's step count and gradient views after ``done`` kernel steps."""
    optimizer.step_count += int(done)
    for p, gv in zip(group.params, group.grad_views):
        p.grad = gv


def run_epochs(plan: FastPlan, optimizer, X, y, orders: np.ndarray, batch_size: int) -> np.ndarray:
    """Train len(orders) epochs in one call; returns the per-batch losses run
    (shorter than expected when a loss turned non-finite: that batch is last)."""
    from .backends import numba_mlp

    g = plan.group
    s1, s2, yf, yi = kernel_inputs(plan, X, y, np)
    n_batches = -(-len(X) // batch_size)
    losses = np.empty(len(orders) * n_batches, dtype=np.float64)
    done = numba_mlp.train_mlp(
        X.reshape(len(X), -1), yf, yi, orders, batch_size, g.data, g.grad, s1, s2,
        plan.layout, plan.acts, plan.alphas, plan.loss_kind, plan.opt_kind,
        _hyper(optimizer), optimizer.step_count, losses,
    )
    after_run(optimizer, g, done)
    expected = len(losses)
    return losses[: done + 1] if done < expected else losses
