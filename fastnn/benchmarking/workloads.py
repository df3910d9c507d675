"""Workloads and the per-contender step builders of ``fastnn bench``.

The Workload dataclass, WORKLOADS and GPU_WORKLOADS; the contender sets per
device; the fixed batch and model builders; the in-process steps (fastnn, GEMM
floor on NumPy or CuPy, hand-written NumPy; the PyTorch ones are in
torch_steps.py and only ever run in a child process) and the digits fit runs
(the main job).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np


# ---------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple            # layer widths, input first
    batch: int
    loss: str = "xent"      # "xent" (int labels) or "mse"
    optimizer: str = "sgd"  # "sgd" (lr 0.01, momentum 0.9) or "adam" (lr 1e-3)
    hidden_act: str = "relu"
    out_act: str | None = None
    lr: float = 0.01
    public_api: bool = False  # x: plain model(x) / loss(pred, y) / opt.step() calls
    kind: str = "step"        # "step" or "fit" (the digits main job)
    epochs: int = 0           # fit: epochs per measured run
    default: bool = True      # part of the default table
    note: str = ""
    precision: str = "float32"  # GEMM precision (fn.set_precision; torch: TF32 flag / bf16 autocast)

    @property
    def label(self) -> str:
        tag = "" if self.precision == "float32" else f" {self.precision}"
        return f"{self.name}: {'-'.join(map(str, self.sizes))} batch {self.batch}{tag}"


WORKLOADS = {
    "a": Workload("a", (784, 1024, 1024, 10), 256),
    "b": Workload("b", (784, 1024, 1024, 10), 1024),
    "c": Workload("c", (784, 256, 10), 64),
    "d": Workload("d", (4096, 4096, 4096, 4096, 10), 512, default=False,
                  note="opt-in (--workloads d): ~1 s/step"),
    "x": Workload("x", (2, 8, 1), 4, loss="mse", optimizer="adam", hidden_act="tanh",
                  out_act="sigmoid", lr=0.05, public_api=True),
    "digits": Workload("digits", (64, 128, 10), 32, optimizer="adam", lr=1e-3,
                       kind="fit", epochs=10),
    "digits2": Workload("digits2", (64, 256, 256, 10), 32, optimizer="adam", lr=1e-3,
                        kind="fit", epochs=10, default=False),
}
DEFAULT_WORKLOADS = [k for k, w in WORKLOADS.items() if w.default]

# GPU-sized workloads (issue 6): opt-in, and outside WORKLOADS (which the CPU
# benchmarks in bench/ iterate) because one step is ~2.5 TFLOP: about 45 ms on
# an H100, minutes on a CPU. ``fastnn bench --workloads e`` still runs them anywhere.
GPU_WORKLOADS = {
    "e": Workload("e", (4096, 4096, 4096, 4096, 10), 8192, default=False,
                  note="opt-in (--workloads e), GPU-sized: ~45 ms/step on an H100"),
}
# The big GEMM-bound ones again at the faster GEMM precisions: TF32 (torch's
# allow_tf32 flag) and bf16 mixed precision (torch: bf16 autocast).
for _base in ("d", "e"):
    for _precision in ("tf32", "bf16"):
        _w = {**WORKLOADS, **GPU_WORKLOADS}[_base]
        GPU_WORKLOADS[f"{_base}-{_precision}"] = Workload(
            **{**_w.__dict__, "name": f"{_base}-{_precision}", "precision": _precision,
               "note": f"opt-in, GPU only: {_base} with {_precision} GEMMs"})
del _base, _precision, _w
ALL_WORKLOADS = {**WORKLOADS, **GPU_WORKLOADS}


def make_batch(w: Workload, seed: int = 0):
    """The fixed batch (X float32 (batch, in), y int64 labels or float32 targets)."""
    rng = np.random.default_rng(seed)
    if w.name == "x":
        X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
        return X, np.array([[0], [1], [1], [0]], np.float32)
    X = rng.standard_normal((w.batch, w.sizes[0]), dtype=np.float32)
    if w.loss == "mse":
        return X, rng.random((w.batch, w.sizes[-1]), dtype=np.float32)
    return X, rng.integers(0, w.sizes[-1], w.batch).astype(np.int64)


def fastnn_backends() -> list[str]:
    """Usable fastnn backends, in bench order."""
    import fastnn as fn

    return [name for name, reason in fn.available_backends().items() if reason is None]


# Contenders that run on the CUDA device; their ratios are taken against the
# GPU floor (floor-cupy) and PyTorch eager on the GPU (torch-cuda).
GPU_CONTENDERS = ("floor-cupy", "fastnn-cupy", "fastnn-cupy-graph", "fastnn-cupy-kernel",
                  "fastnn-cupy-kernel-global", "torch-cuda", "torch-cuda-graph")
TORCH_CONTENDERS = ("torch", "torch-cuda", "torch-cuda-graph")  # child-process ones


def is_gpu_contender(name: str) -> bool:
    return name in GPU_CONTENDERS


def floor_of(name: str) -> str:
    """The GEMM-only floor a contender's ``x floor`` is taken against."""
    return "floor-cupy" if is_gpu_contender(name) else "floor"


def torch_of(name: str) -> str:
    """The PyTorch eager contender its ``x torch`` is taken against."""
    return "torch-cuda" if is_gpu_contender(name) else "torch"


def cpu_contenders(w: Workload, torch_ok: bool = True) -> list[str]:
    """The CPU set: floor, numpy, fastnn on the CPU backends, torch (sklearn for fits)."""
    names = [f"fastnn-{b}" for b in fastnn_backends() if b != "cupy"]
    if w.kind == "fit":
        names.append("sklearn")
    else:
        names = ["floor", "numpy"] + names
    if torch_ok:
        names.append("torch")
    return names


def narrow(w: Workload) -> bool:
    """Small enough for fit's one-launch kernel (gpu_compiled: <= 64x64 weights,
    batch <= 256)."""
    return max(w.sizes) <= 64 and w.batch <= 256 and w.kind == "step"


def gpu_contenders(w: Workload, torch_cuda_ok: bool = True) -> list[str]:
    """The GPU set (the caller checks that CuPy is usable): floor-cupy, fastnn-cupy,
    fastnn-cupy-graph, torch-cuda, torch-cuda-graph; for fits fastnn-cupy and
    torch-cuda. bf16 has no GEMM-only floor (CuPy has no bf16 GEMM); narrow nets
    add fastnn-cupy-kernel (fit's one-launch numba.cuda kernel) and
    fastnn-cupy-kernel-global (the same kernel with every array in global memory:
    what shared memory is worth)."""
    if w.kind == "fit":
        return ["fastnn-cupy"] + (["torch-cuda"] if torch_cuda_ok else [])
    names = [] if w.precision == "bf16" else ["floor-cupy"]
    names += ["fastnn-cupy", "fastnn-cupy-graph"]
    if narrow(w):
        names += ["fastnn-cupy-kernel", "fastnn-cupy-kernel-global"]
    if torch_cuda_ok:
        names += ["torch-cuda", "torch-cuda-graph"]
    return names


def contenders(w: Workload, torch_ok: bool = True, device: str = "cpu",
               torch_cuda_ok: bool = False, wanted=None, cupy_ok: bool | None = None) -> list[str]:
    """Contenders of ``w``: the ``device`` set by default; with ``wanted`` (the
    ``--contenders`` names) every usable one named there, CPU or GPU.

    ``cupy_ok`` (default: fastnn's cupy backend is usable) gates the GPU set;
    ``torch_cuda_ok`` says torch sees a CUDA device (probed in a child process).
    """
    if cupy_ok is None:
        cupy_ok = "cupy" in fastnn_backends()
    cpu = cpu_contenders(w, torch_ok)
    gpu = gpu_contenders(w, torch_ok and torch_cuda_ok) if cupy_ok else []
    if wanted is None:
        return gpu if device == "gpu" else cpu
    return [c for c in cpu + gpu if c in wanted]


# ---------------------------------------------------------------- in-process steps
def build_fastnn_model(w: Workload, seed: int = 0):
    """(model, loss_fn, optimizer) on the current backend."""
    import fastnn as fn

    fn.manual_seed(seed)
    acts = {"relu": fn.ReLU, "tanh": fn.Tanh, "sigmoid": fn.Sigmoid}
    layers = []
    for i in range(len(w.sizes) - 1):
        layers.append(fn.Linear(w.sizes[i], w.sizes[i + 1]))
        if i < len(w.sizes) - 2:
            layers.append(acts[w.hidden_act]())
        elif w.out_act:
            layers.append(acts[w.out_act]())
    model = fn.Sequential(*layers)
    loss_fn = fn.CrossEntropyLoss() if w.loss == "xent" else fn.MSELoss()
    if w.optimizer == "adam":
        opt = fn.Adam(model.parameters(), lr=w.lr)
    else:
        opt = fn.SGD(model.parameters(), lr=w.lr, momentum=0.9)
    return model, loss_fn, opt


def fastnn_step(w: Workload, backend: str = "numba", seed: int = 0):
    """``run(k) -> last loss``: k training steps of fastnn on ``backend``."""
    import fastnn as fn
    from fastnn.nn.module import label_range_of, training_step_mode

    with fn.use_backend(backend) as B:
        model, loss_fn, opt = build_fastnn_model(w, seed)
        X, y = make_batch(w, seed)
        xb, yb = B.asarray(X), B.asarray(y)
    labels = label_range_of(y)  # as fit: checked once, not read back every step

    # fit's inner loop reads the loss every step on the CPU; on a GPU it keeps the
    # loss on the device (no host sync per step) and reads it once per epoch.
    on_cpu = str(B.device).startswith("cpu")
    if w.public_api:
        def steps(k):
            loss = None
            for _ in range(k):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                model.backward(loss_fn.backward())
                opt.step()
            return loss
    else:
        def steps(k):  # fit's inner loop
            loss = None
            with training_step_mode(model, labels):
                for _ in range(k):
                    opt.zero_grad()
                    loss = loss_fn.forward(model.forward(xb), yb)
                    if on_cpu:
                        loss = float(loss)
                    model.backward(loss_fn.backward())
                    opt.step()
            return loss

    def run(k: int) -> float:
        # B.synchronize(): the timer around run(k) stops only when the device is done.
        with fn.use_backend(B), use_precision(w.precision):
            loss = steps(k)
            B.synchronize()
        return loss if isinstance(loss, float) else float(loss)

    run.model = model
    return run


def graph_batches(w: Workload) -> int:
    """How many batches of data fastnn-cupy-graph gathers from (a new epoch every
    that many steps, as in fit): up to 256, fewer when that would pass 256 MiB
    of input (e: 3), so making the data costs little of a GPU check's time."""
    per_batch = w.batch * w.sizes[0] * 4
    return int(max(3, min(256, (256 << 20) // per_batch)))


def fastnn_graph_step(w: Workload, seed: int = 0, batches: int | None = None):
    """``run(k) -> last loss``: k steps of fit's CUDA-graph path on CuPy
    (fastnn-cupy-graph): the recorded step replayed, each replay gathering a
    new batch from ``batches`` (default ``graph_batches(w)``) batches of data
    by a shuffled order, as fit does (a new epoch, with its order and counter
    reset, every ``batches`` steps)."""
    import fastnn as fn
    from fastnn import cuda_graph
    from fastnn.nn.module import label_range_of, training_step_mode

    if batches is None:
        batches = graph_batches(w)

    with fn.use_backend("cupy") as B, use_precision(w.precision):
        model, loss_fn, opt = build_fastnn_model(w, seed)
        parts = [make_batch(w, seed + i) for i in range(batches)]
        Xd = B.asarray(np.concatenate([X for X, _ in parts]))
        yd = B.asarray(np.concatenate([y for _, y in parts]))
        xb, yb = B.empty((w.batch,) + Xd.shape[1:], Xd.dtype), B.empty((w.batch,) + yd.shape[1:], yd.dtype)
        losses = B.zeros((batches,), Xd.dtype)
        order = B.asarray(np.random.default_rng(seed).permutation(len(Xd)))
        graphed = cuda_graph.GraphedStep(B, model, loss_fn, opt, Xd, yd, xb, yb, losses)
        # fit's first step, op by op: it allocates the buffers. The label range
        # is known, as in fit: reading it from the device would break the recording.
        with training_step_mode(model, label_range_of(yd)):
            B.xp.take(Xd, order[:w.batch], axis=0, out=xb)
            B.xp.take(yd, order[:w.batch], axis=0, out=yb)
            opt.zero_grad()
            losses[0] = loss_fn.forward(model.forward(xb), yb)
            model.backward(loss_fn.backward())
            opt.step()
            graphed.ran_plain_step()
            graphed.new_epoch(order)
            if not graphed.ready(1):
                raise RuntimeError(f"fastnn-cupy-graph: recording failed: {graphed.failed}")
    position = {"batch": 1}

    def enqueue(k: int) -> None:
        """Queue k replays (no synchronize: the profiler times them with events).
        Under the workload's precision: a new epoch at another precision than the
        recording's would drop the graph."""
        with fn.use_backend(B), use_precision(w.precision):
            for _ in range(k):
                if position["batch"] == batches:
                    graphed.new_epoch(order)
                    position["batch"] = 0
                graphed.replay()
                position["batch"] += 1

    def restart() -> None:
        """A new epoch now, so the next ``batches`` replays queue no host copy."""
        with fn.use_backend(B), use_precision(w.precision):
            graphed.new_epoch(order)
        position["batch"] = 0

    def run(k: int) -> float:
        enqueue(k)
        B.synchronize()
        return float(losses[position["batch"] - 1])

    run.model = model
    run.enqueue, run.restart, run.batches = enqueue, restart, batches
    run.graph = graphed  # keeps the graph and what it points at alive
    return run


def fastnn_kernel_step(w: Workload, seed: int = 0, shared_memory: bool = True):
    """``run(k) -> last loss``: k steps of fit's one-launch kernel for narrow
    nets on CuPy (fastnn-cupy-kernel): ``gpu_compiled.run_epochs`` over k
    one-batch epochs of the workload's batch, one launch and one host read of
    the losses per call, as fit makes them. ``shared_memory=False``: every
    array in global memory (fastnn-cupy-kernel-global)."""
    import fastnn as fn
    from fastnn import gpu_compiled
    from fastnn.nn.module import label_range_of

    with fn.use_backend("cupy") as B:
        model, loss_fn, opt = build_fastnn_model(w, seed)
        X, y = make_batch(w, seed)
        Xd, yd = B.asarray(X), B.asarray(y)
        plan = gpu_compiled.plan_for_fit(model, loss_fn, opt, Xd, yd, 10**9, w.batch,
                                         label_range_of(y))
        if plan is None:
            why = ("FASTNN_FAST_PATH=0" if os.environ.get("FASTNN_FAST_PATH") == "0"
                   else gpu_compiled.unavailable_reason() or "not a narrow MLP")
            raise RuntimeError(f"fastnn-cupy-kernel: the one-launch kernel does not apply here: {why}")
        plan.shared_memory = shared_memory

    def run(k: int) -> float:
        with fn.use_backend(B):
            orders = np.tile(np.arange(w.batch), (k, 1))
            losses = gpu_compiled.run_epochs(plan, opt, Xd, yd, orders, w.batch)
        return float(losses[-1])

    run.model = model
    return run


def use_precision(mode: str):
    """``with use_precision("tf32"):`` fastnn's GEMM precision for a block."""
    from fastnn import precision

    return precision.using(mode)


def _init_weights(w: Workload, seed: int):
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((i, o)) * math.sqrt(2.0 / i)).astype(np.float32)
          for i, o in zip(w.sizes[:-1], w.sizes[1:])]
    bs = [np.zeros(o, np.float32) for o in w.sizes[1:]]
    return Ws, bs


def uniform_on_device(xp, n: int, lo: float, hi: float, seed: int):
    """``n`` float32 values spread over ``[lo, hi)``, made on the device.

    An integer hash of the index, not an RNG: identical on NumPy, CuPy and
    the tests' stand-in for it, and no 256 MiB host upload per array.
    """
    i = xp.arange(n, dtype=np.uint32)
    u = (i ^ np.uint32((seed * 0x5BD1E995) & 0xFFFFFFFF)) * np.uint32(2654435761)
    frac = (u >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    return frac * np.float32(hi - lo) + np.float32(lo)  # array first: CuPy's operators


def _gemm_floor(w: Workload, seed: int, xp, synchronize=None):
    """``run(k)``: the GEMMs of k steps alone, in float32 with preallocated
    outputs (forward one per layer, backward dW per layer and dx for all but
    the first), then ``synchronize()`` so a timer measures finished work."""
    Ws = [xp.asarray(W) for W in _init_weights(w, seed)[0]]
    X, _ = make_batch(w, seed)
    n = w.batch
    hs = [xp.asarray(X)] + [xp.full((n, o), 0.01, xp.float32) for o in w.sizes[1:]]
    # Varied gradients (a constant GEMM draws less power, so may clock higher on a GPU).
    dzs = [uniform_on_device(xp, n * o, -0.01, 0.01, 40 + i).reshape(n, o)
           for i, o in enumerate(w.sizes[1:])]
    dWs = [xp.empty_like(W) for W in Ws]
    L = len(Ws)

    def run(k: int) -> float:
        for _ in range(k):
            for i in range(L):
                xp.matmul(hs[i], Ws[i], out=hs[i + 1])
            for i in range(L - 1, -1, -1):
                xp.matmul(hs[i].T, dzs[i], out=dWs[i])
                if i > 0:
                    xp.matmul(dzs[i], Ws[i].T, out=dzs[i - 1])
        if synchronize is not None:
            synchronize()
        return float(dWs[0][0, 0])

    return run


def floor_step(w: Workload, seed: int = 0):
    """The GEMMs of a step alone (NumPy float32, preallocated outputs)."""
    return _gemm_floor(w, seed, np)


def floor_cupy_step(w: Workload, seed: int = 0):
    """The same GEMMs on the GPU with ``cupy.matmul`` (TF32 for tf32 workloads),
    then a device synchronize."""
    import cupy

    run = _gemm_floor(w, seed, cupy, cupy.cuda.Device().synchronize)

    def at_precision(k: int) -> float:
        with use_precision(w.precision):  # CuPy's compute type follows the policy
            return run(k)

    return at_precision


def numpy_step(w: Workload, seed: int = 0):
    """A hand-written NumPy training step with preallocated buffers."""
    Ws, bs = _init_weights(w, seed)
    X, y = make_batch(w, seed)
    n, L = w.batch, len(Ws)
    params = [p for pair in zip(Ws, bs) for p in pair]
    grads = [np.zeros_like(p) for p in params]
    st1 = [np.zeros_like(p) for p in params]
    st2 = [np.zeros_like(p) for p in params]
    tmp = [np.empty_like(p) for p in params]
    hs = [X] + [np.empty((n, o), np.float32) for o in w.sizes[1:]]
    dhs = [None] + [np.empty((n, o), np.float32) for o in w.sizes[1:]]
    ones = np.ones(n, np.float32)
    rows = np.arange(n)
    f = np.float32
    t = [0]

    def act(z, name):
        if name == "relu":
            np.maximum(z, f(0), out=z)
        elif name == "tanh":
            np.tanh(z, out=z)
        elif name == "sigmoid":
            np.negative(z, out=z); np.exp(z, out=z); z += f(1); np.reciprocal(z, out=z)

    def dact(dz, h, name):
        if name == "relu":
            np.multiply(dz, h > 0, out=dz)
        elif name == "tanh":
            dz *= f(1) - h * h
        elif name == "sigmoid":
            dz *= h * (f(1) - h)

    def run(k: int) -> float:
        loss = 0.0
        for _ in range(k):
            for i in range(L):
                z = hs[i + 1]
                np.matmul(hs[i], Ws[i], out=z)
                z += bs[i]
                act(z, w.hidden_act if i < L - 1 else w.out_act)
            out, g = hs[L], dhs[L]
            if w.loss == "xent":
                np.subtract(out, out.max(axis=1, keepdims=True), out=g)
                np.exp(g, out=g)
                s = g.sum(axis=1, keepdims=True)
                loss = float(-np.mean(np.log(g[rows, y] / s[:, 0])))
                g /= s
                g[rows, y] -= f(1)
                g *= f(1.0 / n)
            else:
                np.subtract(out, y, out=g)
                loss = float(np.mean(g * g))
                g *= f(2.0 / g.size)
                dact(g, out, w.out_act)
            for i in range(L - 1, -1, -1):
                dz = dhs[i + 1]
                np.matmul(hs[i].T, dz, out=grads[2 * i])
                np.matmul(ones, dz, out=grads[2 * i + 1])
                if i > 0:
                    np.matmul(dz, Ws[i].T, out=dhs[i])
                    dact(dhs[i], hs[i], w.hidden_act)
            t[0] += 1
            for p, gr, m, v, tm in zip(params, grads, st1, st2, tmp):
                if w.optimizer == "sgd":
                    m *= f(0.9); m += gr
                    np.multiply(m, f(w.lr), out=tm); p -= tm
                else:
                    m *= f(0.9); np.multiply(gr, f(0.1), out=tm); m += tm
                    v *= f(0.999); np.multiply(gr, gr, out=tm); tm *= f(0.001); v += tm
                    np.sqrt(v, out=tm); tm *= f(1 / math.sqrt(1 - 0.999 ** t[0])); tm += f(1e-8)
                    np.divide(m, tm, out=tm); tm *= f(w.lr / (1 - 0.9 ** t[0])); p -= tm
        return loss

    return run


def make_step(w: Workload, contender: str, threads: int | None = None, seed: int = 0):
    """``run(k) -> loss`` of a contender; the torch ones are built in TorchWorker's
    child process (``worker_main``), never in the parent."""
    if contender == "floor":
        return floor_step(w, seed)
    if contender == "numpy":
        return numpy_step(w, seed)
    if contender == "fastnn-cupy-graph":
        return fastnn_graph_step(w, seed)
    if contender in ("fastnn-cupy-kernel", "fastnn-cupy-kernel-global"):
        return fastnn_kernel_step(w, seed, shared_memory=contender == "fastnn-cupy-kernel")
    if contender.startswith("fastnn-"):
        return fastnn_step(w, contender.split("-", 1)[1], seed)
    if contender == "torch":
        from fastnn.benchmarking.torch_steps import torch_step

        return torch_step(w, threads or 1, seed)
    if contender == "floor-cupy":
        return floor_cupy_step(w, seed)
    if contender in ("torch-cuda", "torch-cuda-graph"):
        from fastnn.benchmarking.torch_steps import torch_cuda_step

        return torch_cuda_step(w, threads or 1, seed, graph=contender == "torch-cuda-graph")
    raise ValueError(f"unknown contender {contender!r}")


# ---------------------------------------------------------------- the main job (fit)
def _digits():
    from fastnn import data

    X, y = data.load_digits("train")
    Xt, yt = data.load_digits("test")
    return X, y.astype(np.int64), Xt, yt.astype(np.int64)


def fit_run(w: Workload, contender: str, threads: int | None = None, seed: int = 0):
    """``run(epochs) -> (seconds, samples, test accuracy)``: one fresh fit."""
    X, y, Xt, yt = _digits()
    hidden = w.sizes[1:-1]
    if contender.startswith("fastnn-"):
        import fastnn as fn

        backend = contender.split("-", 1)[1]

        def run(epochs):
            with fn.use_backend(backend):
                model, loss_fn, opt = build_fastnn_model(w, seed)
                t0 = time.perf_counter()
                fn.fit(model, loss_fn, opt, X, y, epochs=epochs, batch_size=w.batch,
                       seed=seed, progress=False)
                dt = time.perf_counter() - t0
                acc = float((fn.predict(model, Xt).argmax(1) == yt).mean())
            return dt, len(X) * epochs, acc
    elif contender == "sklearn":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        def run(epochs):
            clf = MLPClassifier(hidden_layer_sizes=hidden, solver="adam", learning_rate_init=w.lr,
                                batch_size=w.batch, max_iter=epochs, alpha=0.0, tol=0.0,
                                n_iter_no_change=epochs + 1, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                clf.fit(X, y)
                dt = time.perf_counter() - t0
            return dt, len(X) * epochs, float((clf.predict(Xt) == yt).mean())
    elif contender in ("torch", "torch-cuda"):
        import torch

        torch.set_num_threads(threads or 1)
        cuda = contender == "torch-cuda"
        if cuda:
            from fastnn.benchmarking.torch_steps import torch_gpu_settings

            info = torch_gpu_settings(torch)
            if not info["cuda_available"]:
                raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
        Xd, yd, Xtd = (torch.from_numpy(a).to(dev) for a in (X, y, Xt))

        def run(epochs):
            torch.manual_seed(seed)
            layers, sizes = [], w.sizes
            for i in range(len(sizes) - 1):
                layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
                if i < len(sizes) - 2:
                    layers.append(torch.nn.ReLU())
            model = torch.nn.Sequential(*layers).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=w.lr)
            loss_fn = torch.nn.CrossEntropyLoss()
            n = len(Xd)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(n, device=dev)
                for lo in range(0, n, w.batch):
                    idx = order[lo:lo + w.batch]
                    opt.zero_grad()
                    loss = loss_fn(model(Xd[idx]), yd[idx])
                    loss.backward()
                    opt.step()
                    if not cuda:  # like fastnn's fit: a loss read per step on the CPU only
                        loss.item()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            with torch.no_grad():
                acc = float((model(Xtd).argmax(1).cpu().numpy() == yt).mean())
            return dt, n * epochs, acc
    else:
        raise ValueError(f"unknown contender {contender!r}")
    return run
