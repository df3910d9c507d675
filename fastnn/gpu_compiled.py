"""fit's fused fast path for narrow MLPs on the CuPy backend (GPU twin of compiled.py).

Same eligibility as ``compiled.plan_fast_path`` (a plain ``Sequential`` of
``Linear`` layers of <= 64x64 weights with fusable activations, MSELoss,
CrossEntropyLoss, BCEWithLogitsLoss or BCELoss after a final Sigmoid,
SGD/Adam/AdamW over one flat group), on the cupy backend:
whole epochs then run in ONE launch of ``backends/cuda_mlp.train_mlp_cuda``
on the optimizer's own flat device buffers, with the same math as
``numba_mlp.train_mlp``.

Nothing here raises because CUDA is unusable for Numba: when numba.cuda cannot
import, finds no driver/NVVM, is the simulator, or the kernel fails to compile
or to give the right answer on a tiny probe, ``plan_fast_path`` / ``ready``
say no (the reason is cached: ``unavailable_reason(dtype)``) and fit takes the
ordinary path; any other exception in ``plan_for_fit`` (a bug) is warned once
as a RuntimeWarning and kept in ``last_error()``, and fit still takes the
ordinary path. Importing this module imports neither numba.cuda nor CuPy.

Interface as compiled.py: ``plan_fast_path(model, loss_fn, optimizer)``,
``worth_compiling(steps)``, ``run_epochs(plan, optimizer, X, y, orders,
batch_size) -> losses`` (a host float64 array), plus ``ready(plan)``, to call
last, which compiles (or loads) the kernel for the plan's dtype, and
``plan_for_fit``, which does all of fit's checks in one call.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from . import compiled
from .backends import get_backend
from .errors import warn_at_caller

MAX_BATCH = 256  # cuda_mlp.MAX_BATCH (not imported: that module imports numba.cuda)
# One plain CuPy step of a small net (issue 6: 0.18-0.39 ms) and a cold NVVM compile.
ORDINARY_STEP_S = 200e-6
COLD_COMPILE_S = 3.0

_lock = threading.Lock()
_status: dict = {}  # "cuda" -> reason or None; dtype str -> reason or None (probe);
# "shared <dtype>" -> why the shared-memory layout failed its probe (then plans use global);
# "error" -> plan_for_fit's last unexpected failure (warned once per message)


@dataclass
class GpuPlan:
    base: compiled.FastPlan  # its layout/acts/alphas are the host copies
    layout: object = None  # device copies, made by ready()
    acts: object = None
    alphas: object = None
    shared_memory: bool = True  # False: every array in global memory (the benchmark's A/B)
    fixed: dict = field(default_factory=dict)  # _fixed_args' views, for the data they were made of

    @property
    def group(self):
        return self.base.group

    @property
    def loss_kind(self) -> int:
        return self.base.loss_kind

    @property
    def opt_kind(self) -> int:
        return self.base.opt_kind


def unavailable_reason(dtype=None) -> str | None:
    """Why numba.cuda cannot run the fused kernel here (None: it can).

    With a dtype, also whether the kernel compiled and passed its probe for it
    (only known after ``ready``; None before)."""
    with _lock:
        if "cuda" not in _status:
            _status["cuda"] = _probe_cuda()
        reason = _status["cuda"]
    if reason is None and dtype is not None:
        reason = _status.get(np.dtype(dtype).name)
    return reason


def shared_memory_reason(dtype) -> str | None:
    """Why fit runs the kernel for ``dtype`` from global memory, not shared
    (None: shared, or not probed yet)."""
    with _lock:
        return _status.get(f"shared {np.dtype(dtype).name}")


def _probe_cuda() -> str | None:
    try:
        from numba import config
        if config.ENABLE_CUDASIM:
            return "numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        from numba import cuda
    except Exception as exc:  # ImportError, a broken toolkit lookup, ...
        return f"numba.cuda import failed ({type(exc).__name__}: {exc})".splitlines()[0]
    try:
        if not cuda.is_available():
            return "numba.cuda: no usable CUDA driver or device"
    except Exception as exc:
        return f"numba.cuda: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def worth_compiling(steps: int) -> bool:
    """The kernel is compiled once per process (and cached on disk by Numba)."""
    mode = os.environ.get("FASTNN_FAST_PATH", "auto")
    if mode == "1":
        return True
    compiled_here = any(k in _status and _status[k] is None for k in ("float32", "float64"))
    return compiled_here or steps * ORDINARY_STEP_S > COLD_COMPILE_S


def plan_fast_path(model, loss_fn, optimizer) -> GpuPlan | None:
    """A GpuPlan when the fused kernel applies exactly and numba.cuda is usable, else None."""
    base = compiled.plan_fast_path(model, loss_fn, optimizer, backend_name="cupy")
    if base is None or unavailable_reason() is not None:
        return None
    # The probe and the launches run in numba.cuda's context, device 0's: on
    # another device fit keeps its ordinary (CUDA-graph) path.
    if getattr(get_backend(), "_device_id", 0) != 0:
        return None
    return GpuPlan(base=base)


def ready(plan: GpuPlan) -> bool:
    """Compile (or load) the kernel for the plan's dtype and check it on a tiny
    problem; False (reason cached) instead of raising when that fails."""
    key = np.dtype(plan.group.dtype).name
    with _lock:
        if key not in _status:
            _status[key] = _probe_kernel(np.dtype(key))
        ok = _status[key] is None
        if _status.get(f"shared {key}") is not None:
            plan.shared_memory = False
    if ok and plan.layout is None:
        import cupy

        plan.layout = cupy.asarray(plan.base.layout)
        plan.acts = cupy.asarray(plan.base.acts)
        plan.alphas = cupy.asarray(plan.base.alphas)
    return ok


def plan_for_fit(model, loss_fn, optimizer, Xd, yd, steps: int, batch_size: int,
                 label_range=None) -> GpuPlan | None:
    """Everything fit needs in one call: a ready GpuPlan for this exact data, or
    None (the ordinary path then runs, and raises the precise error, if any).
    Never raises: an unexpected failure is cached as the reason and gives None."""
    try:
        plan = plan_fast_path(model, loss_fn, optimizer)
        if plan is None or batch_size > MAX_BATCH or not worth_compiling(steps):
            return None
        if label_range is None and yd.dtype.kind in "iu":
            label_range = (int(yd.min()), int(yd.max()))  # a caller other than fit
        if not compiled.fits_data(plan.base, Xd, yd, label_range):
            return None
        return plan if ready(plan) else None
    except Exception as exc:  # never fail fit because of the fast path, but say why
        reason = f"gpu_compiled: {type(exc).__name__}: {exc}".splitlines()[0]
        with _lock:
            new = _status.get("error") != reason
            _status["error"] = reason
        if new:
            warn_at_caller(f"fastnn: the one-launch CUDA kernel for narrow MLPs failed, fit "
                           f"runs the ordinary path ({reason})")
        return None


def last_error() -> str | None:
    """plan_for_fit's last unexpected failure (a bug, not a missing GPU), or None."""
    with _lock:
        return _status.get("error")


PROBE_WANT = (0.125, 0.55, 0.05)  # the probe's loss, w and b after its one step
PROBE_GRADS = (-0.5, -0.5)  # dw, db of that step, left in the gradient buffer


def probe_problem(dtype, to_device):
    """``(launch args, losses)`` of the probe: one SGD step (lr 0.1, MSE) of
    y = w*x + b from w = 0.5, b = 0 on the samples x = 1 and x = 2, both with
    target 1. By hand: predictions 0.5, 1.0, loss (0.25 + 0) / 2 = 0.125,
    dw = db = -0.5 (PROBE_GRADS), so w = 0.55 and b = 0.05 (PROBE_WANT). ``losses`` (2
    float64) gets the loss, then the step count (1). ``to_device`` makes a
    device array of a NumPy one (cupy.asarray; cuda.to_device in the simulator
    test, tests/test_cuda_mlp.py)."""
    from .backends import cuda_mlp

    dtype = np.dtype(dtype)
    layout = np.array([[1, 1, 0, 1]], dtype=np.int64)  # in 1, out 1, weight at 0, bias at 1
    grads = to_device(np.zeros(2, dtype))
    losses = to_device(np.zeros(2, np.float64))
    work = {k: to_device(v) for k, v in cuda_mlp.scratch(layout, 2, dtype).items()}
    args = (
        to_device(np.array([[1.0], [2.0]], dtype)),  # X
        to_device(np.array([[1.0], [1.0]], dtype)),  # Yf
        to_device(np.zeros(1, np.int64)),  # Yi (unused by MSE)
        to_device(np.array([[0, 1]], np.int64)),  # one epoch: sample 0, then sample 1
        2,  # batch size
        to_device(np.array([0.5, 0.0], dtype)),  # params: w, b
        grads,
        grads, grads,  # plain SGD's state: the gradient buffer, as kernel_inputs passes it
        to_device(layout), to_device(np.zeros(1, np.int64)),  # identity activation
        to_device(np.zeros(1, dtype)),  # alphas
        0, 0,  # MSE, SGD
        to_device(np.array([0.1, 0.0, 0.0, 0.0, 0.0])),  # lr, momentum, dampening, wd, nesterov
        0,  # step0
        losses[:1], losses[1:], work,
    )
    return args, losses


def probe_verdict(losses, params, grads) -> str | None:
    """None when the probe's host results are PROBE_WANT and PROBE_GRADS, else
    what it gave."""
    loss, w, b = float(losses[0]), float(params[0]), float(params[1])
    dw, db = float(grads[0]), float(grads[1])
    if losses[1] != 1 or not np.allclose([loss, w, b], PROBE_WANT, rtol=1e-5):
        want = ", ".join(f"{v:g}" for v in PROBE_WANT)
        return f"numba.cuda kernel probe gave loss {loss:g}, w {w:g}, b {b:g} (want {want})"
    if not np.allclose([dw, db], PROBE_GRADS, rtol=1e-5):
        want = ", ".join(f"{v:g}" for v in PROBE_GRADS)
        return f"numba.cuda kernel probe left the gradients dw {dw:g}, db {db:g} (want {want})"
    return None


def _probe_kernel(dtype) -> str | None:
    """The kernel on the probe problem (probe_problem), on the GPU."""
    try:
        import cupy

        from .backends import cuda_mlp

        args, losses = probe_problem(dtype, cupy.asarray)
        cuda_mlp.launch(*args, threads=32, stream=_stream(), shared=(cuda_mlp.TIER_GLOBAL, 0))
        verdict = probe_verdict(losses.get(), args[5].get(), args[6].get())
    except Exception as exc:  # NVVM missing, driver/toolkit mismatch, launch failure
        return f"numba.cuda kernel unusable ({type(exc).__name__}: {exc})".splitlines()[0]
    if verdict is None:  # the same kernel with all of it in shared memory (fit's layout)
        _status[f"shared {dtype.name}"] = _probe_shared(dtype)
    return verdict


def _probe_shared(dtype) -> str | None:
    """The probe again with every array in shared memory; a failure only turns
    that layout off (fit then runs the kernel from global memory)."""
    try:
        import cupy

        from .backends import cuda_mlp

        args, losses = probe_problem(dtype, cupy.asarray)
        cuda_mlp.launch(*args, threads=32, stream=_stream())
        verdict = probe_verdict(losses.get(), args[5].get(), args[6].get())
    except Exception as exc:
        verdict = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None if verdict is None else f"shared-memory layout off: {verdict}"


def _stream():
    """CuPy's current stream as a Numba stream (0: the legacy default stream)."""
    import cupy
    from numba import cuda

    ptr = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def _dev(a):
    """A Numba view of a CuPy array with no stream sync (the launch is stream-ordered)."""
    from numba import cuda

    return cuda.as_cuda_array(a, sync=False)


def _fixed_args(plan: GpuPlan, X, y, batch_size: int) -> dict:
    """What every launch of one fit passes unchanged, as Numba views made once:
    the data, the flat parameter/gradient/state buffers, the layout and the work
    arrays (``as_cuda_array`` costs host time per array and call, which a fit
    that returns to Python after every epoch, for ``stop_when`` or a progress
    bar, would pay every epoch). Made again if any of them is not the same. A
    plan lives for one fit (plan_for_fit makes a new one), so the views never
    outlive a fit whose caller then changes X or y in place."""
    import cupy

    from .backends import cuda_mlp

    g = plan.group
    arrays = (X, y, g.data, g.grad, *g.state.values())
    key = (batch_size, plan.shared_memory, *map(id, arrays))
    if plan.fixed.get("key") == key:
        return plan.fixed
    s1, s2, yf, yi = compiled.kernel_inputs(plan, X, y, cupy)
    work = cuda_mlp.scratch(plan.base.layout, batch_size, g.dtype, cupy)
    shared = (cuda_mlp.TIER_GLOBAL, 0)
    if plan.shared_memory:
        shared = cuda_mlp.shared_plan(plan.base.layout, batch_size, g.data.size, g.dtype,
                                      plan.opt_kind)
    data = (cupy.ascontiguousarray(X.reshape(len(X), -1)), cupy.ascontiguousarray(yf), yi)
    plan.fixed = {
        "key": key,
        "keep": (arrays, data, work),  # alive while the views point into them (and the ids stay theirs)
        "data": tuple(map(_dev, data)),
        "buffers": tuple(map(_dev, (g.data, g.grad, s1, s2))),
        "layout": tuple(map(_dev, (plan.layout, plan.acts, plan.alphas))),
        "work": {k: _dev(v) for k, v in work.items()},
        "threads": cuda_mlp.pick_threads(plan.base.layout, batch_size),
        "shared": shared,
    }
    return plan.fixed


def run_epochs(plan: GpuPlan, optimizer, X, y, orders: np.ndarray, batch_size: int) -> np.ndarray:
    """Train len(orders) epochs in one launch; returns the per-batch losses run
    (host float64; shorter when a loss turned non-finite: that batch is last).
    One host sync per call (reading the losses back)."""
    import cupy

    from .backends import cuda_mlp

    if plan.layout is None and not ready(plan):
        raise RuntimeError(f"gpu_compiled: {unavailable_reason(plan.group.dtype)}")
    g = plan.group
    fixed = _fixed_args(plan, X, y, batch_size)
    n_batches = -(-len(X) // batch_size)
    expected = len(orders) * n_batches
    out = cupy.zeros(expected + 1, dtype=np.float64)  # the losses, then the step count
    orders_d = cupy.asarray(np.ascontiguousarray(orders, dtype=np.int64))
    cuda_mlp.launch(
        *fixed["data"], _dev(orders_d), batch_size, *fixed["buffers"], *fixed["layout"],
        plan.loss_kind, plan.opt_kind, _dev(cupy.asarray(compiled._hyper(optimizer))),
        optimizer.step_count, _dev(out[:expected]), _dev(out[expected:]), fixed["work"],
        threads=fixed["threads"], stream=_stream(), shared=fixed["shared"],
    )
    host = out.get()  # the one sync
    done = int(host[expected])
    compiled.after_run(optimizer, g, done)
    losses = host[:expected]
    return losses[: done + 1] if done < expected else losses
