"""In-process training steps of ``fastnn bench``: ``run(k) -> last loss``.

fastnn on each backend (per op, CUDA-graph replay, the one-launch kernel for
narrow nets), the GEMM-only floor on NumPy or CuPy and a hand-written NumPy
step; ``make_step`` picks one by contender name. The PyTorch steps are in
torch_steps.py and run only in a child process.
"""
from __future__ import annotations

import math
import os

import numpy as np

from fastnn.benchmarking.workloads import Workload, make_batch


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
                   else gpu_compiled.last_error()
                   or gpu_compiled.unavailable_reason(opt.groups[0].dtype)
                   or f"not a narrow MLP of batch <= {gpu_compiled.MAX_BATCH}")
            raise RuntimeError(f"fastnn-cupy-kernel: the one-launch kernel does not apply here: {why}")
        if shared_memory and not plan.shared_memory:
            raise RuntimeError(f"fastnn-cupy-kernel: {gpu_compiled.shared_memory_reason(plan.group.dtype)}")
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
    """``run(k) -> loss`` of a contender; the torch ones are built in ChildWorker's
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
