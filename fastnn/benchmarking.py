"""Training-throughput workloads, shared by ``fastnn bench`` and ``bench/``.

Workloads (issue 5): a full training step -- forward, loss, backward, optimizer
update -- of an MLP on a fixed, pre-generated batch (steady state, real weight
updates), and the main job: ``fit`` on the bundled digits data.

Contenders, all measured in the same run:

* ``fastnn-<backend>``: the step ``fit`` runs per batch (``training_step_mode``;
  workload ``x`` goes through the plain public Module / loss / optimizer calls);
* ``floor``: the same GEMMs alone in NumPy float32 (forward one per layer,
  backward two per layer except the first layer's input gradient): the limit;
* ``numpy``: a hand-written NumPy step with preallocated buffers;
* ``torch``: PyTorch eager on the CPU, in a child process with the same thread
  count (OpenBLAS and OpenMP pools spin against each other in one process);
  the parent sleeps on a pipe while the child runs a block.
* digits only: ``sklearn`` (``MLPClassifier``) and ``torch`` fitting the same data.

Method (DESIGN.md "Measuring"): warm up; each sample runs ``k`` steps so that
it lasts >= 2 ms; contenders alternate in blocks (order rotated every round);
reported: median ms/step over all samples, the quiet figure (lowest block
median), and ratios taken round by round from adjacent blocks, then the median.
``x floor`` = step time / floor time (1.0 is the limit, lower is better);
``x torch`` = torch time / step time (speed-up over PyTorch, higher is better).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

MIN_SAMPLE_S = 0.002


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

    @property
    def label(self) -> str:
        return f"{self.name}: {'-'.join(map(str, self.sizes))} batch {self.batch}"


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


def contenders(w: Workload, torch_ok: bool = True) -> list[str]:
    names = [f"fastnn-{b}" for b in fastnn_backends()]
    if w.kind == "fit":
        names.append("sklearn")
    else:
        names = ["floor", "numpy"] + names
    if torch_ok:
        names.append("torch")
    return names


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
    from fastnn.nn.module import training_step_mode

    with fn.use_backend(backend) as B:
        model, loss_fn, opt = build_fastnn_model(w, seed)
        X, y = make_batch(w, seed)
        xb, yb = B.asarray(X), B.asarray(y)

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
            with training_step_mode(model):
                for _ in range(k):
                    opt.zero_grad()
                    loss = float(loss_fn.forward(model.forward(xb), yb))
                    model.backward(loss_fn.backward())
                    opt.step()
            return loss

    def run(k: int) -> float:
        with fn.use_backend(B):
            loss = steps(k)
            B.synchronize()
        return loss

    run.model = model
    return run


def _init_weights(w: Workload, seed: int):
    rng = np.random.default_rng(seed)
    Ws = [(rng.standard_normal((i, o)) * math.sqrt(2.0 / i)).astype(np.float32)
          for i, o in zip(w.sizes[:-1], w.sizes[1:])]
    bs = [np.zeros(o, np.float32) for o in w.sizes[1:]]
    return Ws, bs


def floor_step(w: Workload, seed: int = 0):
    """The GEMMs of a step alone (NumPy float32, preallocated outputs)."""
    Ws, _ = _init_weights(w, seed)
    X, _ = make_batch(w, seed)
    n = w.batch
    hs = [X] + [np.ones((n, o), np.float32) * 0.01 for o in w.sizes[1:]]
    dzs = [np.ones((n, o), np.float32) * 0.01 for o in w.sizes[1:]]
    dWs = [np.empty_like(W) for W in Ws]
    L = len(Ws)

    def run(k: int) -> float:
        for _ in range(k):
            for i in range(L):
                np.matmul(hs[i], Ws[i], out=hs[i + 1])
            for i in range(L - 1, -1, -1):
                np.matmul(hs[i].T, dzs[i], out=dWs[i])
                if i > 0:
                    np.matmul(dzs[i], Ws[i].T, out=dzs[i - 1])
        return float(dWs[0][0, 0])

    return run


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


def torch_step(w: Workload, threads: int, seed: int = 0):
    """PyTorch eager step (imported here: only ever called in the child process)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    layers = []
    for i in range(len(w.sizes) - 1):
        layers.append(torch.nn.Linear(w.sizes[i], w.sizes[i + 1]))
        if i < len(w.sizes) - 2:
            layers.append(acts[w.hidden_act]())
        elif w.out_act:
            layers.append(acts[w.out_act]())
    model = torch.nn.Sequential(*layers)
    loss_fn = torch.nn.CrossEntropyLoss() if w.loss == "xent" else torch.nn.MSELoss()
    if w.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=w.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=0.9)
    X, y = make_batch(w, seed)
    xb, yb = torch.from_numpy(X), torch.from_numpy(y)

    def run(k: int) -> float:
        loss = None
        for _ in range(k):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            loss = loss.item()  # fastnn's step reads the loss too
        return loss

    return run


def make_step(w: Workload, contender: str, threads: int | None = None, seed: int = 0):
    """``run(k) -> loss`` for an in-process contender (not torch: see TorchWorker)."""
    if contender == "floor":
        return floor_step(w, seed)
    if contender == "numpy":
        return numpy_step(w, seed)
    if contender.startswith("fastnn-"):
        return fastnn_step(w, contender.split("-", 1)[1], seed)
    if contender == "torch":
        return torch_step(w, threads or 1, seed)
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
    elif contender == "torch":
        import torch

        torch.set_num_threads(threads or 1)
        Xd, yd, Xtd = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(Xt)

        def run(epochs):
            torch.manual_seed(seed)
            layers, sizes = [], w.sizes
            for i in range(len(sizes) - 1):
                layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
                if i < len(sizes) - 2:
                    layers.append(torch.nn.ReLU())
            model = torch.nn.Sequential(*layers)
            opt = torch.optim.Adam(model.parameters(), lr=w.lr)
            loss_fn = torch.nn.CrossEntropyLoss()
            n = len(Xd)
            t0 = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(n)
                for lo in range(0, n, w.batch):
                    idx = order[lo:lo + w.batch]
                    opt.zero_grad()
                    loss = loss_fn(model(Xd[idx]), yd[idx])
                    loss.backward()
                    opt.step()
                    loss.item()
            dt = time.perf_counter() - t0
            with torch.no_grad():
                acc = float((model(Xtd).argmax(1).numpy() == yt).mean())
            return dt, n * epochs, acc
    else:
        raise ValueError(f"unknown contender {contender!r}")
    return run


# ---------------------------------------------------------------- runners
class LocalRunner:
    """Times an in-process contender in blocks of samples of k steps."""

    def __init__(self, w: Workload, contender: str, threads: int, seed: int = 0):
        self.w, self.name = w, contender
        self.fit = w.kind == "fit"
        self.run = fit_run(w, contender, threads, seed) if self.fit else make_step(w, contender, threads, seed)
        self.k = 1
        self.info: dict = {}

    def calibrate(self, min_sample: float = MIN_SAMPLE_S, warmup_s: float = 0.2) -> int:
        if self.fit:
            self.run(1)  # compiles / warms caches
            return 1
        t_end = time.perf_counter() + warmup_s
        calls = 0
        while calls < 2 or (time.perf_counter() < t_end and calls < 50):
            t0 = time.perf_counter()
            self.run(1)
            dt = time.perf_counter() - t0
            calls += 1
        self.k = max(1, math.ceil(min_sample / max(dt, 1e-7)))
        return self.k

    def block(self, samples: int) -> list[float]:
        """Per-step seconds of ``samples`` samples (fit: seconds per sample of data)."""
        out = []
        for _ in range(samples):
            if self.fit:
                dt, n, acc = self.run(self.w.epochs)
                self.info["accuracy"] = acc
                out.append(dt / n)
            else:
                t0 = time.perf_counter()
                loss = self.run(self.k)
                out.append((time.perf_counter() - t0) / self.k)
                self.info["loss"] = loss
        return out

    def close(self):
        pass


class TorchWorker:
    """A contender running in a child process, driven over a pipe (JSON lines)."""

    def __init__(self, w: Workload, contender: str, threads: int, seed: int = 0):
        self.w, self.name, self.info = w, contender, {}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fastnn.benchmarking import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self._call(cmd="setup", workload=w.__dict__, contender=contender, threads=threads, seed=seed)

    def _call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} worker: {reply['error']}")
        return reply

    def calibrate(self, min_sample: float = MIN_SAMPLE_S, warmup_s: float = 0.2) -> int:
        return self._call(cmd="calibrate", min_sample=min_sample, warmup_s=warmup_s)["k"]

    def block(self, samples: int) -> list[float]:
        reply = self._call(cmd="block", samples=samples)
        self.info.update(reply.get("info", {}))
        return reply["times"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self._call(cmd="quit")
            except (RuntimeError, OSError, ValueError):
                pass
            self.proc.wait(timeout=10)


def worker_main() -> None:
    """Child-process side of TorchWorker (stdin/stdout JSON lines)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not break the protocol
    runner = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "setup":
                w = Workload(**{**msg["workload"], "sizes": tuple(msg["workload"]["sizes"])})
                runner = LocalRunner(w, msg["contender"], msg["threads"], msg["seed"])
                import torch

                reply = {"torch": torch.__version__, "threads": torch.get_num_threads()}
            elif cmd == "calibrate":
                reply = {"k": runner.calibrate(msg["min_sample"], msg["warmup_s"])}
            elif cmd == "block":
                reply = {"times": runner.block(msg["samples"]), "info": runner.info}
            elif cmd == "quit":
                out.write("{}\n")
                out.flush()
                return
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# ---------------------------------------------------------------- measuring
@dataclass
class Result:
    workload: str
    contender: str
    ms_per_step: float          # median over all samples
    quiet_ms_per_step: float    # lowest block median
    samples_per_s: float        # from the median
    x_floor: float | None = None
    x_torch: float | None = None
    k: int = 1
    blocks_ms: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def measure(w: Workload, names: list[str], threads: int, rounds: int = 5,
            samples: int = 5, log=None) -> list[Result]:
    """Alternate the contenders in blocks; ratios from the same round."""
    runners = []
    try:
        for name in names:
            cls = TorchWorker if name == "torch" else LocalRunner
            try:
                r = cls(w, name, threads)
                r.calibrate()
                runners.append(r)
            except Exception as exc:  # one broken contender must not sink the table
                if log:
                    log(f"  {w.name}/{name}: skipped ({type(exc).__name__}: {exc})")
        times = {r.name: [] for r in runners}
        blocks = {r.name: [] for r in runners}
        for rnd in range(rounds):
            order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
            for r in order:
                t = r.block(samples)
                times[r.name] += t
                blocks[r.name].append(statistics.median(t))
            if log:
                log(f"  {w.name} round {rnd + 1}/{rounds}: " + ", ".join(
                    f"{n} {blocks[n][-1] * 1e3:.4g}" for n in blocks))
    finally:
        for r in runners:
            r.close()

    def ratio(num, den):
        if num not in blocks or den not in blocks:
            return None
        return statistics.median(a / b for a, b in zip(blocks[num], blocks[den]))

    results = []
    per_sample = w.batch if w.kind == "step" else 1
    for r in runners:
        med = statistics.median(times[r.name])
        res = Result(w.name, r.name, med * 1e3 * (w.batch if w.kind == "fit" else 1),
                     min(blocks[r.name]) * 1e3 * (w.batch if w.kind == "fit" else 1),
                     per_sample / med, k=getattr(r, "k", 1),
                     blocks_ms=[b * 1e3 for b in blocks[r.name]], info=dict(r.info))
        if w.kind == "step" and r.name != "floor":
            res.x_floor = ratio(r.name, "floor")
        if r.name != "torch":
            res.x_torch = ratio("torch", r.name)
        results.append(res)
    return results


# ---------------------------------------------------------------- report
def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(results: list[Result]) -> str:
    head = (f"{'workload':<28} {'contender':<13} {'ms/step':>9} {'quiet ms':>9} "
            f"{'samples/s':>11} {'x floor':>8} {'x torch':>8}  note")
    lines = [head, "-" * len(head)]
    last = None
    for r in results:
        w = WORKLOADS[r.workload]
        label = w.label if r.workload != last else ""
        last = r.workload
        note = ""
        if "accuracy" in r.info:
            note = f"test acc {r.info['accuracy']:.3f}"
        elif r.info.get("loss") is not None and r.contender != "floor":
            note = f"loss {r.info['loss']:.4g}"
        lines.append(
            f"{label:<28} {r.contender:<13} {r.ms_per_step:>9.4g} {r.quiet_ms_per_step:>9.4g} "
            f"{r.samples_per_s:>11,.0f} {_fmt(r.x_floor, '8.2f')} {_fmt(r.x_torch, '8.2f')}  {note}")
    lines.append("x floor = step time / GEMM-only floor (lower is better); "
                 "x torch = PyTorch eager time / time (higher is better);")
    lines.append("ratios: median over rounds of adjacent blocks; digits: ms per batch of 32 "
                 "over whole fits (shuffle, loss read, update)")
    return "\n".join(lines)


def command_line(args) -> str:
    """``fastnn bench`` plus the options that differ from their defaults."""
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = ["fastnn", "bench"]
    for key, default in defaults.items():
        value = getattr(args, key, default)
        if value != default:
            flag = "--" + key.replace("_", "-")
            parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def _git() -> dict | None:
    """Commit of the source tree being measured, and whether fastnn/ differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastnn"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": [ln[3:] for ln in dirty if ln.strip()]} if head else None


def environment(threads: int, command: str = "fastnn bench") -> dict:
    import importlib.metadata as md

    import fastnn as fn
    from fastnn import threads as fthreads

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    blas = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer",
                                    "architecture", "filepath")} for p in fthreads.thread_info()]
    return {
        "machine": {"node": platform.node(), "cpu": cpu, "arch": platform.machine(),
                    "cores": os.cpu_count(), "usable_cores": fthreads.default_threads(),
                    "os": platform.platform(), "python": platform.python_version()},
        "versions": {"fastnn": fn.__version__, "numpy": np.__version__, "numba": version("numba"),
                     "torch": version("torch"), "scikit-learn": version("scikit-learn"),
                     "cupy": version("cupy-cuda12x") or version("cupy-cuda13x") or version("cupy")},
        "blas": blas,
        "threads": threads,
        "backends": fn.available_backends(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": _git(),
    }


def plot(results: list[Result], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.2 + 1.1 * len(names) * 2), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [r for r in results if r.workload == name]
        labels = [r.contender for r in rows]
        colors = ["0.6" if lb in ("floor", "numpy", "torch", "sklearn") else "tab:blue" for lb in labels]
        batch = WORKLOADS[name].batch  # quiet figures: the medians swing with machine noise
        ax.barh(labels, [batch * 1e3 / r.quiet_ms_per_step for r in rows], color=colors)
        ax.set_title(WORKLOADS[name].label, fontsize=9, loc="left")
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("training samples / s, quiet (lowest-block) figure; higher is better")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, from {','.join(WORKLOADS)} or 'all' "
                             f"(default {','.join(DEFAULT_WORKLOADS)}; d is opt-in)")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset (floor,numpy,fastnn-numpy,fastnn-numba,"
                             "fastnn-cupy,torch,sklearn); default: all usable")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter fits")
    parser.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 5, quick 2)")
    parser.add_argument("--samples", type=int, default=None, help="samples per block (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every library")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--json", metavar="PATH", help="write results, machine and versions as JSON")
    parser.add_argument("--plot", metavar="PATH", help="bar chart (PNG, needs matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each round")


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def main(args) -> int:
    import fastnn as fn
    from fastnn.errors import InputError

    names = list(WORKLOADS) if args.workloads == "all" else \
        [s.strip() for s in args.workloads.split(",") if s.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        raise InputError(f"bench: unknown workload(s) {bad}; choose from {list(WORKLOADS)}")
    threads = fn.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    samples = args.samples or (3 if args.quick else 5)
    torch_ok = _torch_available() and not args.no_torch
    wanted = set(args.contenders.split(",")) if args.contenders else None
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    env = environment(threads, command_line(args))
    print(f"fastnn bench: {env['machine']['cpu']}, {threads} threads, numpy {np.__version__} "
          f"({', '.join(str(b['internal_api']) + ' ' + str(b['version']) for b in env['blas'])}), "
          f"torch {env['versions']['torch'] if torch_ok else 'not used'}", flush=True)
    results: list[Result] = []
    for name in names:
        w = WORKLOADS[name]
        if w.kind == "fit" and args.quick:
            w = Workload(**{**w.__dict__, "epochs": 2})
        cs = [c for c in contenders(w, torch_ok) if wanted is None or c in wanted]
        r, s = rounds, samples
        if name == "d":  # ~1 s per step: one step per sample, fewer blocks
            r, s = min(rounds, 3), min(samples, 2)
        if w.kind == "fit":
            s = 1
        t0 = time.perf_counter()
        results += measure(w, cs, threads, r, s, log)
        if log:
            log(f"  {name}: {time.perf_counter() - t0:.1f} s")
    table = format_table(results)
    print(table)
    if args.json:
        doc = dict(env, method={"min_sample_s": MIN_SAMPLE_S, "rounds": rounds,
                                "samples_per_block": samples, "quick": bool(args.quick),
                                "sgd": "lr 0.01 momentum 0.9", "adam": "torch defaults"},
                   workloads={n: {**WORKLOADS[n].__dict__, "label": WORKLOADS[n].label} for n in names},
                   results=[r.__dict__ for r in results], table=table)
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        print(f"results written to {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"bar chart written to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover - ``fastnn bench`` is the entry point
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastnn.benchmarking")
    add_arguments(p)
    sys.exit(main(p.parse_args()))
