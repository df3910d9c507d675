"""Fused elementwise CUDA kernels against the device-to-device copy bandwidth.

``python -m fastnn.benchmarking.gpu_kernels --json out.json`` times each fused
elementwise op of the CuPy backend (bias_act, act_backward, the SGD and Adam
steps, the float32 -> bf16 conversion) on big float32 arrays, launched through
the public backend methods, next to a plain device copy measured in the same
run. These kernels are bandwidth-bound, so the figure of merit is the bytes
they move per second as a fraction of what a copy moves: the target is
``fraction_of_copy >= 0.8`` (TARGET). At small, launch-bound shapes it also
times the fused activation backward + bias gradient against the two ops it
replaces (``measure_bias_grad_fusion``).

Bytes per element count the reads and writes of the big arrays only (the
(1024,) bias row stays in cache); an element written twice by the same thread
(bias_act in place: ``z[i]`` then ``out[i]`` at the same address) counts once,
as the second store merges in L2 before it reaches DRAM.

Timing: ``repeats`` back-to-back launches are queued behind a spin kernel
(``gpu_profile.queued_ahead``) with CUDA events around them, so when the spin
ends the device runs them with no host gap: the time is the device's alone,
not the host's launch loop (which at the small fusion shapes would be most of
it, and which a CUDA-graph replay does not pay); the median of three such
batches is reported. ``queued_ahead: false`` in the JSON means some batch was
queued slower than the longest spin, so its figure includes host gaps.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import operator
import shlex
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fastnn.benchmarking.report import write_json_atomic
from fastnn.benchmarking.steps import uniform_on_device

TARGET = 0.8  # issue target: fused elementwise kernels >= 80% of the device copy bandwidth
ROW = 1024  # columns of the 2-D (rows, ROW) activations; n_elements must be a multiple
BATCHES = 3  # timed batches of ``repeats`` launches per op; the median is reported
_WARMUP = 2  # first launches compile (NVRTC) and load the kernel: not timed


@dataclass(frozen=True)
class Op:
    """One measured op: ``build(backend, n)`` makes its inputs on the device and
    returns a zero-argument callable launching it once (a ``functools.partial``
    of the backend call, so ``.args`` / ``.keywords`` are the inputs)."""

    name: str
    bytes_per_element: int  # float32 bytes read + written per element of the big arrays
    build: Callable


def _copy(backend, n):
    # Same shape, dtype and C order: CuPy turns this into one cudaMemcpyAsync
    # device-to-device on the current stream, the reference bandwidth.
    xp = backend.xp
    src = uniform_on_device(xp, n, -1, 1, 1)
    dst = xp.empty_like(src)
    return functools.partial(operator.setitem, dst, Ellipsis, src)


def _bias_act_relu_in_place(backend, n):
    xp = backend.xp
    z = uniform_on_device(xp, n, -1, 1, 2).reshape(n // ROW, ROW)
    # Small bias: z drifts by it on every timed launch (in place) and must stay ordinary.
    bias = uniform_on_device(xp, ROW, -1e-3, 1e-3, 3)
    return functools.partial(backend.bias_act, z, bias, "relu", out=z)


def _bias_act_gelu_to_out(backend, n):
    xp = backend.xp
    z = uniform_on_device(xp, n, -3, 3, 4).reshape(n // ROW, ROW)
    bias = uniform_on_device(xp, ROW, -1e-3, 1e-3, 5)
    out = xp.empty_like(z)
    return functools.partial(backend.bias_act, z, bias, "gelu", out=out)


def _act_backward(act: str, y_range: tuple[float, float]):
    def build(backend, n):
        xp = backend.xp
        dy = uniform_on_device(xp, n, -1, 1, 6).reshape(n // ROW, ROW)
        y = uniform_on_device(xp, n, *y_range, 7).reshape(n // ROW, ROW)
        return functools.partial(backend.act_backward, dy, y, act, out=dy)

    return build


def _sgd_momentum(backend, n):
    xp = backend.xp
    param, grad = uniform_on_device(xp, n, -1, 1, 8), uniform_on_device(xp, n, -1, 1, 9)
    buf = uniform_on_device(xp, n, -0.1, 0.1, 10)
    return functools.partial(backend.sgd_step, param, grad, buf, lr=0.01, momentum=0.9,
                             dampening=0.0, nesterov=False, weight_decay=0.0, first_step=False)


def _adam(backend, n):
    xp = backend.xp
    param, grad = uniform_on_device(xp, n, -1, 1, 11), uniform_on_device(xp, n, -1, 1, 12)
    exp_avg, exp_avg_sq = uniform_on_device(xp, n, -0.1, 0.1, 13), uniform_on_device(xp, n, 0, 1e-2, 14)
    return functools.partial(backend.adam_step, param, grad, exp_avg, exp_avg_sq, step=10,
                             lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                             decoupled=False)


def _under_bf16(op, *args, **kwargs):
    """Launch ``op`` with fn.set_precision("bf16") in force: only then does an
    ``*_operand`` op write the bf16 copy in its own pass (else it measures the
    plain op). The copy goes to one preallocated buffer, as a layer's is."""
    from fastnn.precision import using

    bits = {}

    def bits_buffer(shape):
        if shape not in bits:
            bits[shape] = op.__self__.xp.empty(shape, dtype=np.uint16)
        return bits[shape]

    def launch():
        with using("bf16"):
            op(*args, bits_buffer=bits_buffer, **kwargs)

    launch.func, launch.args, launch.keywords = op, args, kwargs  # as a functools.partial's
    return launch


def _bias_act_bf16_relu(backend, n):
    xp = backend.xp
    z = uniform_on_device(xp, n, -1, 1, 16).reshape(n // ROW, ROW)
    bias = uniform_on_device(xp, ROW, -1e-3, 1e-3, 17)
    return _under_bf16(backend.bias_act_operand, z, bias, "relu", out=z)


def _act_backward_bf16_relu(backend, n):
    xp = backend.xp
    dy = uniform_on_device(xp, n, -1, 1, 18).reshape(n // ROW, ROW)
    y = uniform_on_device(xp, n, -1, 1, 19).reshape(n // ROW, ROW)
    return _under_bf16(backend.act_backward_operand, dy, y, "relu", out=dy)


def _f32_to_bf16(backend, n):
    # The GEMM-input conversion of fn.set_precision("bf16"); no public op of its own.
    return functools.partial(backend._to_bf16, uniform_on_device(backend.xp, n, -1, 1, 15), "a")


OPS: tuple[Op, ...] = (
    Op("copy", 8, _copy),                                          # read src, write dst
    Op("bias_act relu in place", 8, _bias_act_relu_in_place),      # read z, write z (= out)
    Op("bias_act gelu to out", 12, _bias_act_gelu_to_out),         # read z, write z and out
    # tanh's y in [-0.1, 0.1]: dy *= 1 - y^2 >= 0.99 per launch, far from subnormals.
    Op("act_backward relu", 12, _act_backward("relu", (-1, 1))),   # read dy, y; write dy
    Op("act_backward tanh", 12, _act_backward("tanh", (-0.1, 0.1))),
    Op("sgd momentum", 20, _sgd_momentum),            # read param, grad, buf; write param, buf
    Op("adam", 28, _adam),                            # read p, g, m, v; write p, m, v
    Op("f32_to_bf16", 6, _f32_to_bf16),               # read 4 B, write 2 B
    # Under bf16 (the op sets it): the plain pass plus a 2-byte copy of its output.
    Op("bias_act_bf16 relu in place", 10, _bias_act_bf16_relu),    # read z; write z, bits
    Op("act_backward_bf16 relu", 14, _act_backward_bf16_relu),     # read dy, y; write dy, bits
)


# act_backward + the bias gradient at the hidden layers of workloads c and a
# (batch, features): launch-bound shapes where one fused launch replaces two.
BIAS_GRAD_SHAPES = ((64, 256), (256, 1024))


def measure_bias_grad_fusion(backend, repeats: int = 20, timer=None) -> list[dict]:
    """Device time of ``act_backward_bias`` (one launch) against
    ``act_backward`` + ``bias_grad`` (two) on BIAS_GRAD_SHAPES, relu, float32."""
    xp = backend.xp
    timer = timer or _queued_timer(backend)
    results = []
    for rows, cols in BIAS_GRAD_SHAPES:
        n = rows * cols
        dy = uniform_on_device(xp, n, -1, 1, 20).reshape(rows, cols)
        y = uniform_on_device(xp, n, -1, 1, 21).reshape(rows, cols)
        dz, db = xp.empty_like(dy), xp.empty((cols,), dtype=np.float32)

        def fused():
            backend.act_backward_bias(dy, y, "relu", out=dz, bias_grad_out=db)

        def separate():
            backend.act_backward(dy, y, "relu", out=dz)
            backend.bias_grad(dz, out=db)

        row = {"shape": [rows, cols]}
        for name, launch in (("fused", fused), ("separate", separate)):
            for _ in range(_WARMUP):
                launch()
            backend.synchronize()
            row[f"{name}_us"] = 1e6 * statistics.median(
                float(timer(launch, repeats)) for _ in range(BATCHES))
        row["speedup"] = row["separate_us"] / row["fused_us"]
        results.append(row)
    return results


def format_fusion_table(results: list[dict]) -> str:
    lines = [f"{'act_backward + bias grad':<26} {'fused us':>9} {'two ops us':>11} {'speedup':>8}"]
    for r in results:
        lines.append(f"{'relu ' + 'x'.join(map(str, r['shape'])):<26} {r['fused_us']:>9.2f} "
                     f"{r['separate_us']:>11.2f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def _queued_timer(backend):
    """``timer(fn, repeats)`` -> device seconds per launch, the launches queued
    behind a spin (module docstring); ``timer.gaps`` counts the batches whose
    queueing outlasted the longest spin (their time includes host gaps)."""
    from fastnn.benchmarking.gpu_profile import queued_ahead

    def timer(fn, repeats: int) -> float:
        def enqueue():
            for _ in range(repeats):
                fn()

        window = queued_ahead(backend, enqueue)
        timer.gaps += not window.queued_ahead
        return window.device_ms / 1e3 / repeats  # ms -> s

    timer.gaps = 0
    return timer


def measure(backend, n_elements: int = 1 << 26, repeats: int = 20, timer=None,
            on_result=None) -> list[dict]:
    """Time every op of OPS on ``n_elements`` float32 elements; one dict per op.

    ``timer(fn, repeats)`` returns seconds per launch (default: launches queued
    behind a spin, CUDA events around them). ``fraction_of_copy`` is against the copy of this run.
    An op that raises is recorded as ``{"op": name, "error": "ExcType: message"}``
    and the next one is measured; ``on_result(results)`` runs after each op (main
    writes the JSON there, so a run cut short keeps the ops it finished).
    """
    from fastnn.errors import InputError

    if n_elements <= 0 or n_elements % ROW:
        raise InputError(f"gpu_kernels: n_elements must be a positive multiple of {ROW}, "
                         f"got {n_elements}")
    if repeats < 1:
        raise InputError(f"gpu_kernels: repeats must be >= 1, got {repeats}")
    timer = timer or _queued_timer(backend)
    scratch = getattr(backend, "_bf16", {})  # _to_bf16's buffers, kept for the backend's life
    results = []
    for op in OPS:
        kept = set(scratch)
        launch = None
        try:
            launch = op.build(backend, n_elements)
            for _ in range(_WARMUP):
                launch()
            backend.synchronize()
            batches = [float(timer(launch, repeats)) for _ in range(BATCHES)]
            seconds = statistics.median(batches)
            results.append({
                "op": op.name,
                "bytes_per_element": op.bytes_per_element,
                "n_elements": n_elements,
                "seconds": seconds,
                "batch_seconds": batches,
                "gb_per_s": op.bytes_per_element * n_elements / seconds / 1e9,
            })
        except Exception as exc:  # one op's failure (bf16 path, OOM) must not lose the others
            results.append({"op": op.name, "bytes_per_element": op.bytes_per_element,
                            "n_elements": n_elements, "error": _why(exc)})
            print(f"fastnn gpu_kernels: {op.name} failed: {results[-1]['error']}",
                  file=sys.stderr, flush=True)
        finally:
            # Free this op's arrays before the next op allocates its own (256 MiB
            # each at the default size); a benchmark-sized bf16 scratch would
            # otherwise stay pinned in the backend.
            del launch
            for key in set(scratch) - kept:
                del scratch[key]
        _fractions(results)
        if on_result is not None:
            on_result(results)
    return results


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _fractions(results: list[dict]) -> None:
    """``fraction_of_copy`` / ``meets_target`` where an op has a figure, against
    this run's copy; None where the op or the copy has none (failed, not run)."""
    copy = next((r.get("gb_per_s") for r in results if r["op"] == "copy"), None)
    for r in results:
        fraction = r["gb_per_s"] / copy if copy and "gb_per_s" in r else None
        r["fraction_of_copy"] = fraction
        r["meets_target"] = None if fraction is None else fraction >= TARGET


def format_table(results: list[dict]) -> str:
    head = f"{'op':<24} {'B/elem':>6} {'ms':>9} {'GB/s':>9} {'% of copy':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['op']:<24} {r['bytes_per_element']:>6} failed: {r['error']}")
            continue
        fraction = r.get("fraction_of_copy")
        share = "-" if fraction is None else f"{100 * fraction:.1f}%"
        flag = "" if r.get("meets_target") is not False else "  below target"
        lines.append(f"{r['op']:<24} {r['bytes_per_element']:>6} {r['seconds'] * 1e3:>9.4f} "
                     f"{r['gb_per_s']:>9.1f} {share:>10}{flag}")
    lines.append(f"target: fused elementwise kernels >= {TARGET:.0%} of the device copy bandwidth "
                 f"(copy = dst[...] = src, device to device); GB/s = bytes read + written / time")
    return "\n".join(lines)


def main(argv=None) -> int:
    import fastnn as fn
    from fastnn.benchmarking.report import _git, gpu_environment

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m fastnn.benchmarking.gpu_kernels",
        description="fused elementwise CUDA kernels vs the device copy bandwidth")
    p.add_argument("--elements", type=int, default=1 << 26,
                   help=f"float32 elements per array, a multiple of {ROW} (default 2**26: 256 MiB)")
    p.add_argument("--repeats", type=int, default=20, help="launches per timed batch (default 20)")
    p.add_argument("--json", metavar="PATH", help="write results, device and versions as JSON")
    args = p.parse_args(argv)
    if args.elements <= 0 or args.elements % ROW:
        p.error(f"--elements must be a positive multiple of {ROW}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    reason = fn.available_backends()["cupy"]
    if reason is not None:
        print(f"fastnn gpu_kernels: the CuPy backend is unusable ({reason})", file=sys.stderr)
        return 2
    with fn.use_backend("cupy") as backend:
        gpu = gpu_environment()
        gpu["timing"] = (f"CUDA events around {args.repeats} launches queued behind a spin "
                         f"kernel (device time, no host gaps), median of {BATCHES} batches, "
                         f"after {_WARMUP} warm-up launches")
        print(f"fastnn gpu_kernels: {backend.device}, CUDA runtime {gpu.get('cuda_runtime')}, "
              f"driver {gpu.get('cuda_driver')}, cupy {gpu.get('cupy')}; "
              f"{args.elements:,} float32 elements, {args.repeats} launches x {BATCHES}",
              flush=True)
        timer = _queued_timer(backend)
        results: list[dict] = []
        fusion: dict = {}
        git = _git()  # once, not per rewrite of the file

        def write(complete: bool) -> None:
            if not args.json:
                return
            doc = {
                "benchmark": "fused elementwise kernels vs device-to-device copy",
                "target": {"fraction_of_copy": TARGET,
                           "text": f"fused elementwise kernels >= {TARGET:.0%} of the device "
                                   f"copy bandwidth"},
                "device": gpu.get("device", {}).get("name") or backend.device,
                "versions": {"fastnn": fn.__version__, "numpy": np.__version__,
                             "cupy": gpu.get("cupy"), "cuda_runtime": gpu.get("cuda_runtime"),
                             "cuda_driver": gpu.get("cuda_driver")},
                "gpu": gpu,
                "n_elements": args.elements,
                "repeats": args.repeats,
                "batches": BATCHES,
                "queued_ahead": timer.gaps == 0,
                "bytes": "float32 bytes read + written per element of the big arrays "
                         "(bias row ignored)",
                "command": shlex.join(["python", "-m", "fastnn.benchmarking.gpu_kernels"] + argv),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "git": git,
                "complete": complete,  # false: cut short (or still running), later ops missing
                "ops": [op.name for op in OPS],  # what a complete run measures (targets.py)
                "results": results,
                "table": format_table(results),
                "bias_grad_fusion": {
                    "what": "act_backward_bias (one launch) vs act_backward + bias_grad (two), "
                            "relu, float32, at the hidden layers of workloads c and a; device us "
                            "per call",
                    **fusion,
                },
            }
            write_json_atomic(args.json, doc)

        def on_result(done: list[dict]) -> None:
            results[:] = done
            write(complete=False)

        measure(backend, args.elements, args.repeats, timer=timer, on_result=on_result)
        try:  # its own try: a failure here keeps the bandwidth figures
            rows = measure_bias_grad_fusion(backend, args.repeats, timer=timer)
            fusion.update(results=rows, table=format_fusion_table(rows))
        except Exception as exc:
            fusion["error"] = _why(exc)
            print(f"fastnn gpu_kernels: bias-grad fusion failed: {fusion['error']}",
                  file=sys.stderr, flush=True)
    if timer.gaps:
        print(f"fastnn gpu_kernels: {timer.gaps} batches were queued slower than the spin: "
              "their figures include host gaps", file=sys.stderr)
    print(format_table(results))
    if "table" in fusion:
        print(fusion["table"])
    if args.json:
        write(complete=True)
        print(f"results written to {args.json}")
    return 1 if "error" in fusion or any("error" in r for r in results) else 0

if __name__ == "__main__":
    raise SystemExit(main())
