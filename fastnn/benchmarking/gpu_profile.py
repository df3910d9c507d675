"""Where a GPU training step's time goes: per layer and per op, device and host.

``python -m fastnn.benchmarking.gpu_profile --workloads c,a,e-bf16 --json out.json``

``fastnn bench`` says how fast a step is; this says why. For each workload
(bench's, at its GEMM precision) on the CuPy backend it measures:

* ``wall_ms``: one op-by-op step as fit runs it (k steps, then a synchronize);
* ``host_ms``: the host's time to queue one step (Python, argument checks,
  launches) and ``device_ms``: the device's time to run it once queued. The
  larger of the two bounds the wall time: ``bound`` says which one it is;
* ``graph``: the same step recorded as a CUDA graph (fit's path on CuPy):
  device and host time per replay;
* ``phases``: each layer's forward and backward, the loss's, the optimizer's,
  and inside each the device time of every backend op (GEMMs with their
  TFLOP/s; ``other`` is device work outside the backend's ops);
* ``peak_tflops``: a large square GEMM on fastnn's GEMM path at the same
  precision, measured in the same run: the device's practical GEMM rate, to
  read the per-layer GEMM rates against.

Method: a ``spin_ns`` kernel (kernels/profile.cu) holds the stream while the
host queues the step, with CUDA events recorded between phases and around
each backend op; when the spin ends the device runs the queue back to back, so
the time between two events is device time only, with no host gap in it. The
spin is doubled until the queueing fits inside it; ``queued_ahead: false`` in
a result means it never did (the device figures then include host gaps).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from fastnn.backends.base import gemm_array

# Every workload with a target, cheap ones first (the JSON is rewritten after each,
# so a time guard keeps those). Not x: on CuPy its fit and its target row run the
# one-launch kernel, and this profiles the op-by-op step and its graph instead.
DEFAULT_WORKLOADS = "c,a,d,d-tf32,d-bf16,e,e-tf32,e-bf16"
BACKEND_OPS = ("gemm", "gemm_operand", "bias_grad", "add_bias", "bias_act", "bias_act_operand",
               "act_backward", "act_backward_bias", "act_backward_operand", "mse", "bce", "bce_with_logits",
               "softmax_xent", "sgd_step",
               "adam_step", "rmsprop_step")
QUEUED_STEPS = 3     # steps per queued-ahead window (few: the launch queue must not fill)
PROFILED_STEPS = 2   # steps with events around every op (averaged)
WALL_MIN_S = 0.05    # the wall-time sample runs at least this long
SPIN_FIRST_S = 0.02  # first spin; doubled until the host's queueing fits in it
SPIN_MAX_S = 2.0
PEAK_SIZE = 8192     # square GEMM for the practical peak at each precision
OUTSIDE = "(between phases)"


# ---------------------------------------------------------------- timing primitives
def _event(cupy):
    event = cupy.cuda.Event()
    event.record()
    return event


def _ms(cupy, start, end) -> float:
    return float(cupy.cuda.get_elapsed_time(start, end))


@dataclass
class Window:
    host_s: float       # host time to queue the work
    device_ms: float    # device time to run it, from the first event to the last
    queued_ahead: bool  # the spin outlasted the queueing: device_ms has no host gaps
    result: object      # what the queueing function returned


def queued_ahead(backend, enqueue, spin_s: float = SPIN_FIRST_S, before=None) -> Window:
    """Run ``enqueue()`` (it queues device work) while the device spins.

    Retried with a spin twice as long until the host's queueing takes under
    80% of it (or SPIN_MAX_S is reached); ``enqueue`` must be safe to repeat.
    ``before()``, if given, runs ahead of each try, outside the timing (a host
    to device copy there could wait for the spin).
    """
    cupy = backend.xp
    spin = backend._kernel("profile.cu", "spin_ns")
    while True:
        if before is not None:
            before()
        backend.synchronize()
        spin((1,), (1,), (np.int64(int(spin_s * 1e9)),))
        start = _event(cupy)
        t0 = time.perf_counter()
        result = enqueue()
        host = time.perf_counter() - t0
        end = _event(cupy)
        end.synchronize()
        fits = host < 0.8 * spin_s
        if fits or spin_s >= SPIN_MAX_S:
            return Window(host, _ms(cupy, start, end), fits, result)
        spin_s = min(2 * spin_s, SPIN_MAX_S)


# ---------------------------------------------------------------- spans
class Timeline:
    """Named spans of one profiled window: ``(phase, op, flops, start, end)``;
    ``op`` is None for the span of a whole phase."""

    def __init__(self, cupy):
        self.cupy = cupy
        self.spans: list = []
        self.phase: str | None = None  # the open phase (phases do not nest)
        self.in_op = False             # a backend op is running (ops inside it are its own)

    @contextlib.contextmanager
    def span(self, phase, op=None, flops=0):
        start = _event(self.cupy)
        try:
            yield
        finally:
            self.spans.append((phase, op, flops, start, _event(self.cupy)))


def _gemm_flops(a, b, out=None, trans_a=False, trans_b=False) -> int:
    a, b = gemm_array(a), gemm_array(b)  # bf16 operands carry their float32 array
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    return 2 * int(m) * int(n) * int(k)


@contextlib.contextmanager
def instrumented(backend, model, loss_fn, optimizer, timeline: Timeline):
    """Spans around each layer's forward/backward, the loss's, the optimizer's
    and every backend op, for the duration of the block (instance attributes
    shadow the methods; removed on exit)."""
    patched: list = []

    def patch(obj, name, make):
        original = getattr(obj, name)
        obj.__dict__[name] = make(original)  # __dict__: Module.__setattr__ would register it
        patched.append((obj, name))

    def as_phase(label_of):
        def make(original):
            def wrapped(*args, **kwargs):
                if timeline.phase is not None:  # e.g. Linear.forward -> forward_fused
                    return original(*args, **kwargs)
                timeline.phase = label_of(*args, **kwargs)
                try:
                    with timeline.span(timeline.phase):
                        return original(*args, **kwargs)
                finally:
                    timeline.phase = None
            return wrapped
        return make

    def as_op(name):
        def make(original):
            def wrapped(*args, **kwargs):
                if timeline.in_op:
                    return original(*args, **kwargs)
                flops = _gemm_flops(*args, **kwargs) if name == "gemm" else 0
                timeline.in_op = True
                try:
                    with timeline.span(timeline.phase or OUTSIDE, name, flops):
                        return original(*args, **kwargs)
                finally:
                    timeline.in_op = False
            return wrapped
        return make

    try:
        for i, module in enumerate(m for m in model.modules() if not m.children()):
            tag = f"[{i}] {module._label()}"
            for name in ("forward", "forward_fused"):
                if hasattr(module, name):
                    patch(module, name, as_phase(
                        lambda x, act=None, *r, _t=tag, **k: f"{_t}{f' + {act}' if act else ''} forward"))
            for name in ("backward", "backward_fused"):
                if hasattr(module, name):
                    patch(module, name, as_phase(lambda *a, _t=tag, _m=module, **k:
                                                 f"{_t}{_saved_act(_m)} backward"))
        loss_name = type(loss_fn).__name__
        patch(loss_fn, "forward", as_phase(lambda *a, **k: f"{loss_name} forward"))
        patch(loss_fn, "backward", as_phase(lambda *a, **k: f"{loss_name} backward"))
        opt_name = type(optimizer).__name__
        patch(optimizer, "zero_grad", as_phase(lambda *a, **k: f"{opt_name} zero_grad"))
        patch(optimizer, "step", as_phase(lambda *a, **k: f"{opt_name} step"))
        for name in BACKEND_OPS:
            patch(backend, name, as_op(name))
        yield timeline
    finally:
        for obj, name in reversed(patched):
            del obj.__dict__[name]


def _saved_act(module) -> str:
    saved = getattr(module, "_saved", None)
    act = saved[4] if isinstance(saved, tuple) and len(saved) > 4 else None
    return f" + {act}" if isinstance(act, str) else ""


def summarize(timeline: Timeline, steps: int, device_ms: float) -> dict:
    """Per-phase and per-op device ms per step (first-seen order), and the GEMMs' share."""
    cupy = timeline.cupy
    phases: dict = {}
    for phase, op, flops, start, end in timeline.spans:
        entry = phases.setdefault(phase, {"phase": phase, "ms": 0.0, "ops": {}})
        ms = _ms(cupy, start, end)
        if op is None:
            entry["ms"] += ms
        else:
            o = entry["ops"].setdefault(op, {"op": op, "calls": 0, "ms": 0.0, "flops": 0})
            o["calls"] += 1
            o["ms"] += ms
            o["flops"] += flops
    gemm_ms = gemm_flops = 0.0
    rows = []
    for entry in phases.values():
        ops = list(entry["ops"].values())
        if entry["phase"] == OUTSIDE:
            entry["ms"] = sum(o["ms"] for o in ops)
        for o in ops:
            if o["op"] == "gemm":
                gemm_ms += o["ms"]
                gemm_flops += o["flops"]
            o["tflops"] = o["flops"] / (o["ms"] * 1e-3) / 1e12 if o["flops"] and o["ms"] > 0 else None
            o["calls"] /= steps
            o["ms"] /= steps
            o["flops"] /= steps
        entry["ms"] /= steps
        entry["other_ms"] = max(0.0, entry["ms"] - sum(o["ms"] for o in ops))
        entry["ops"] = ops
        rows.append(entry)
    per_step = device_ms / steps
    return {
        "profiled_device_ms": per_step,
        "phases": rows,
        "gemm_ms": gemm_ms / steps,
        "gemm_tflops": gemm_flops / (gemm_ms * 1e-3) / 1e12 if gemm_ms > 0 else None,
        "gemm_share": (gemm_ms / steps) / per_step if per_step > 0 else None,
    }


# ---------------------------------------------------------------- measurements
def peak_tflops(backend, precision: str, size: int = PEAK_SIZE, repeats: int = 3) -> float:
    """TFLOP/s of a ``size``-cubed float32 GEMM on fastnn's GEMM path at ``precision``
    (bf16: operands converted once, outside the timing, as a layer does)."""
    from fastnn.precision import using

    from fastnn.benchmarking.steps import uniform_on_device

    xp = backend.xp
    # Varied values, not constants: a GEMM of constant matrices flips fewer bits,
    # draws less power and can hold a higher clock than a training step's.
    a = uniform_on_device(xp, size * size, -1, 1, 31).reshape(size, size)
    b = uniform_on_device(xp, size * size, -1, 1, 32).reshape(size, size)
    out = xp.empty((size, size), dtype=np.float32)
    with using(precision):
        if backend.prepares_gemm_operands:
            a = backend.gemm_operand(a, lambda shape: xp.empty(shape, dtype=np.uint16))
            b = backend.gemm_operand(b, lambda shape: xp.empty(shape, dtype=np.uint16))
        backend.gemm(a, b, out=out)  # warm-up: cuBLAS picks its kernel
        backend.synchronize()
        start = _event(xp)
        for _ in range(repeats):
            backend.gemm(a, b, out=out)
        end = _event(xp)
        end.synchronize()
    ms = _ms(xp, start, end) / repeats
    return 2.0 * size ** 3 / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def profile_workload(w, backend, seed: int = 0, peaks: dict | None = None,
                     peak_size: int = PEAK_SIZE) -> dict:
    """The measurements of the module docstring for workload ``w`` (on CuPy)."""
    import fastnn as fn
    from fastnn.benchmarking.steps import build_fastnn_model, fastnn_graph_step, use_precision
    from fastnn.benchmarking.workloads import make_batch
    from fastnn.nn.module import label_range_of, training_step_mode

    peaks = {} if peaks is None else peaks
    with fn.use_backend(backend), use_precision(w.precision):
        model, loss_fn, opt = build_fastnn_model(w, seed)
        X, y = make_batch(w, seed)
        xb, yb = backend.asarray(X), backend.asarray(y)

        labels = label_range_of(y)

        def steps(k):
            # fit's inner loop: the loss left on the device, the labels' range known
            # (else CrossEntropyLoss reads it back every step, a device sync).
            with training_step_mode(model, labels):
                for _ in range(k):
                    opt.zero_grad()
                    loss = loss_fn.forward(model.forward(xb), yb)
                    model.backward(loss_fn.backward())
                    opt.step()
            return loss

        steps(2)  # compile, allocate, let cuBLAS choose
        backend.synchronize()
        t0 = time.perf_counter()
        steps(1)
        backend.synchronize()
        k = int(min(200, max(3, WALL_MIN_S / max(time.perf_counter() - t0, 1e-6))))
        t0 = time.perf_counter()
        steps(k)
        backend.synchronize()
        wall_ms = (time.perf_counter() - t0) / k * 1e3

        plain = queued_ahead(backend, lambda: steps(QUEUED_STEPS))
        timeline = Timeline(backend.xp)

        def profiled():
            timeline.spans.clear()
            with instrumented(backend, model, loss_fn, opt, timeline):
                steps(PROFILED_STEPS)

        window = queued_ahead(backend, profiled)
        result = {
            "workload": w.name, "label": w.label, "precision": w.precision,
            "wall_ms": wall_ms, "wall_steps": k,
            "host_ms": plain.host_s / QUEUED_STEPS * 1e3,
            "device_ms": plain.device_ms / QUEUED_STEPS,
            "queued_ahead": plain.queued_ahead and window.queued_ahead,
        }
        result["bound"] = "host" if result["host_ms"] > result["device_ms"] else "device"
        result.update(summarize(timeline, PROFILED_STEPS, window.device_ms))
        if w.precision not in peaks:
            peaks[w.precision] = peak_tflops(backend, w.precision, peak_size)
        result["peak_tflops"], result["peak_size"] = peaks[w.precision], peak_size
    result["graph"] = _graph_figures(w, backend, seed, fastnn_graph_step)
    return result


def _graph_figures(w, backend, seed, fastnn_graph_step) -> dict:
    """Device and host time per replay of the step recorded as a CUDA graph."""
    big = w.batch * w.sizes[0] > 1 << 20  # a few batches of e are already GiBs of host data
    try:
        run = fastnn_graph_step(w, seed, batches=3 if big else 16)
        run(2)
        # restart() (a new epoch: order and scalar table copied from the host)
        # runs before each try: fit pays it once per epoch, not per replay.
        window = queued_ahead(backend, lambda: run.enqueue(run.batches), before=run.restart)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"device_ms": window.device_ms / run.batches, "host_ms": window.host_s / run.batches * 1e3,
            "replays": run.batches, "queued_ahead": window.queued_ahead}


# ---------------------------------------------------------------- report
def format_profile(r: dict) -> str:
    lines = [r["label"]]
    lines.append(f"  op by op: {r['wall_ms']:.4f} ms/step wall | host queues a step in "
                 f"{r['host_ms']:.4f} ms | device runs it in {r['device_ms']:.4f} ms: "
                 f"{r['bound']}-bound" + ("" if r["queued_ahead"] else
                                          " (host outran the spin: device figures include gaps)"))
    g = r.get("graph", {})
    if "error" in g:
        lines.append(f"  CUDA graph: not recorded ({g['error']})")
    elif g:
        lines.append(f"  CUDA graph replay: device {g['device_ms']:.4f} ms/step, "
                     f"host {g['host_ms']:.4f} ms/replay")
    if r.get("gemm_tflops"):
        lines.append(f"  GEMMs: {r['gemm_ms']:.4f} ms/step ({100 * r['gemm_share']:.1f}% of the "
                     f"device time) at {r['gemm_tflops']:.1f} TFLOP/s; a {r['peak_size']}^3 GEMM here "
                     f"at {r['precision']}: {r['peak_tflops']:.1f} TFLOP/s")
    head = f"  {'phase / op':<46} {'ms/step':>9} {'share':>7} {'calls':>6} {'TFLOP/s':>8}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    total = r["profiled_device_ms"] or float("nan")
    for p in r["phases"]:
        lines.append(f"  {p['phase'][:46]:<46} {p['ms']:>9.4f} {100 * p['ms'] / total:>6.1f}%")
        for o in p["ops"]:
            rate = f"{o['tflops']:>8.1f}" if o["tflops"] else ""
            lines.append(f"    {o['op']:<44} {o['ms']:>9.4f} {100 * o['ms'] / total:>6.1f}% "
                         f"{o['calls']:>6g} {rate}")
        if p["ops"] and p["other_ms"] > 0.0005 * total:
            lines.append(f"    {'(other)':<44} {p['other_ms']:>9.4f} "
                         f"{100 * p['other_ms'] / total:>6.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    import fastnn as fn
    from fastnn.benchmarking.report import _git, gpu_environment
    from fastnn.benchmarking.workloads import ALL_WORKLOADS

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m fastnn.benchmarking.gpu_profile",
                                description="where a GPU training step's time goes")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help=f"comma-separated bench workloads (default {DEFAULT_WORKLOADS})")
    p.add_argument("--peak-size", type=int, default=PEAK_SIZE,
                   help=f"side of the square GEMM for the peak rate (default {PEAK_SIZE})")
    p.add_argument("--json", metavar="PATH", help="write the profiles, device and versions as JSON")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_WORKLOADS or ALL_WORKLOADS[n].kind != "step"]
    if unknown:
        p.error(f"unknown or non-step workloads: {', '.join(unknown)}")
    reason = fn.available_backends()["cupy"]
    if reason is not None:
        print(f"fastnn gpu_profile: the CuPy backend is unusable ({reason})", file=sys.stderr)
        return 2
    results, peaks = [], {}
    with fn.use_backend("cupy") as backend:
        gpu = gpu_environment()
        print(f"fastnn gpu_profile: {backend.device}; GEMMs: {backend.blas_status}", flush=True)
        for name in names:
            try:
                r = profile_workload(ALL_WORKLOADS[name], backend, peaks=peaks,
                                     peak_size=args.peak_size)
            except Exception as exc:  # one workload's failure must not lose the others
                r = {"workload": name, "error": f"{type(exc).__name__}: {exc}"}
                print(f"{name}: failed: {r['error']}", flush=True)
            else:
                print(format_profile(r), flush=True)
            results.append(r)
            if args.json:
                _write(args.json, gpu, backend, argv, results, fn, _git)
    return 0 if all("error" not in r for r in results) else 1


def _write(path, gpu, backend, argv, results, fn, git) -> None:
    from fastnn.benchmarking.report import write_json_atomic

    doc = {
        "benchmark": "GPU training step profile: host vs device, per phase and per op",
        "device": gpu.get("device", {}).get("name") or backend.device,
        "gemm_path": backend.blas_status,
        "versions": {"fastnn": fn.__version__, "numpy": np.__version__, "cupy": gpu.get("cupy"),
                     "cuda_runtime": gpu.get("cuda_runtime"), "cuda_driver": gpu.get("cuda_driver")},
        "gpu": gpu,
        "method": __doc__.split("Method: ", 1)[1].strip(),
        "command": shlex.join(["python", "-m", "fastnn.benchmarking.gpu_profile"] + argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git(),
        "results": results,
    }
    write_json_atomic(path, doc)  # rewritten after each workload: a cut-short run keeps its part


if __name__ == "__main__":
    raise SystemExit(main())
