"""Training-throughput workloads, shared by ``fastnn bench`` and ``bench/``.

Workloads (issue 5): a full training step -- forward, loss, backward, optimizer
update -- of an MLP on a fixed, pre-generated batch (steady state, real weight
updates), and the main job: ``fit`` on the bundled digits data.

Contenders, all measured in the same run (``--device cpu``, the default where
CuPy is unusable):

* ``fastnn-<backend>``: the step ``fit`` runs per batch (``training_step_mode``;
  workload ``x`` goes through the plain public Module / loss / optimizer calls);
* ``floor``: the same GEMMs alone in NumPy float32 (forward one per layer,
  backward two per layer except the first layer's input gradient): the limit;
* ``numpy``: a hand-written NumPy step with preallocated buffers;
* ``torch``: PyTorch eager on the CPU, in a child process with the same thread
  count (OpenBLAS and OpenMP pools spin against each other in one process);
  the parent sleeps on a pipe while the child runs a block.
* digits only: ``sklearn`` (``MLPClassifier``) and ``torch`` fitting the same data.

``--device gpu`` (the default where fastnn's CuPy backend is usable): ``fastnn-cupy``
(loss left on the device, as in ``fit``), ``fastnn-cupy-graph`` (fit's CUDA-graph
path: the recorded step replayed, a new batch gathered every step),
``fastnn-cupy-kernel`` for narrow nets (fit's one-launch numba.cuda kernel; with
``-global``: the same kernel with every array in global memory instead of shared),
``floor-cupy`` (the same GEMMs with ``cupy.matmul`` into preallocated outputs),
``torch-cuda`` (PyTorch eager on the GPU) and ``torch-cuda-graph`` (the whole step
captured once in a CUDA graph and replayed). GEMM precision is the workload's:
float32 with TF32 off, or the ``-tf32`` / ``-bf16`` variants of d and e (fastnn's
``set_precision``; torch's TF32 flag or bf16 autocast; no floor for bf16). Each
GPU ``run(k)`` synchronizes the device before returning. The CPU contenders join
only when named in ``--contenders``. Workload ``e`` (4096x3 hidden, batch 8192)
is GPU-sized and opt-in.

Method (DESIGN.md "Measuring"): warm up; each sample runs ``k`` steps so that
it lasts >= 2 ms; contenders alternate in blocks (order rotated every round);
reported: median ms/step over all samples, the quiet figure (lowest block
median), and ratios taken round by round from adjacent blocks, then the median.
``x floor`` = step time / floor time (1.0 is the limit, lower is better);
``x torch`` = torch time / step time (speed-up over PyTorch, higher is better);
GPU rows take them against floor-cupy and torch-cuda, and add ``x graph`` =
torch-cuda-graph time / step time.

Modules: workloads.py (the workloads and contender sets), steps.py (the
in-process steps), torch_steps.py (PyTorch, in a child), fit_runs.py (the digits
fits), runner.py (the alternating measurement), report.py (table, JSON, plot).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from fastnn.benchmarking.report import (command_line, environment, format_table, gpu_environment,
                                        fastnn_gemm_path, plot, probe_torch_cuda,
                                        write_json_atomic)
from fastnn.benchmarking.runner import (MIN_SAMPLE_S, LocalRunner, Result, ChildWorker, _why,
                                        measure, shutdown_workers, worker_main)
from fastnn.benchmarking.fit_runs import fit_run
from fastnn.benchmarking.steps import (build_fastnn_model, fastnn_step, floor_cupy_step, floor_step,
                                       make_step, numpy_step)
from fastnn.benchmarking.workloads import (ALL_WORKLOADS, DEFAULT_WORKLOADS, GPU_CONTENDERS,
                                           GPU_WORKLOADS, WORKLOADS, Workload, contenders,
                                           cpu_contenders, fastnn_backends, gpu_contenders,
                                           make_batch)
from fastnn.benchmarking.torch_steps import torch_cuda_step, torch_gpu_settings, torch_step

__all__ = [
    "ALL_WORKLOADS", "DEFAULT_WORKLOADS", "GPU_CONTENDERS", "GPU_WORKLOADS", "MIN_SAMPLE_S",
    "WORKLOADS", "LocalRunner", "Result", "ChildWorker", "Workload", "add_arguments",
    "build_fastnn_model", "command_line", "contenders", "cpu_contenders", "environment",
    "fastnn_backends", "fastnn_step", "fit_run", "floor_cupy_step", "floor_step",
    "format_table", "gpu_contenders", "gpu_environment", "main", "make_batch", "make_step",
    "measure", "numpy_step", "plot", "probe_torch_cuda", "resolve_device", "torch_cuda_step",
    "torch_gpu_settings", "torch_step", "worker_main",
]


# ---------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, from {','.join(ALL_WORKLOADS)} or 'all' "
                             f"(default {','.join(DEFAULT_WORKLOADS)}; d and e are opt-in)")
    parser.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"],
                        help="which contender set runs by default: gpu (fastnn-cupy, floor-cupy, "
                             "torch-cuda, torch-cuda-graph) or cpu; auto = gpu when fastnn's "
                             "CuPy backend is usable")
    parser.add_argument("--contenders", default=None,
                        help="comma-separated subset (floor,numpy,fastnn-numpy,fastnn-numba,"
                             "fastnn-cupy,torch,sklearn,floor-cupy,torch-cuda,torch-cuda-graph); "
                             "default: the device's usable set")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter fits")
    parser.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 5, quick 2)")
    parser.add_argument("--samples", type=int, default=None, help="samples per block (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every library")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--json", metavar="PATH", help="write results, machine and versions as JSON "
                                                       "(rewritten after every workload)")
    parser.add_argument("--plot", metavar="PATH", help="bar chart (PNG, needs matplotlib)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each round")


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def resolve_device(requested: str = "auto") -> tuple[str, str | None]:
    """``(device, cupy_reason)``: "gpu" or "cpu" for ``--device``; cupy_reason is
    None when fastnn's CuPy backend is usable, else why not. "gpu" is returned
    even when unusable (the caller reports the reason)."""
    import fastnn as fn

    reason = fn.available_backends().get("cupy")
    if requested == "auto":
        return ("gpu" if reason is None else "cpu"), reason
    return requested, reason


def _rounds_samples(w: Workload, device: str, rounds: int, samples: int) -> tuple[int, int]:
    if w.kind == "fit":
        return rounds, 1
    base = w.name.split("-")[0]  # e-tf32, e-bf16: e's shape
    if (base == "d" and device == "cpu") or base == "e":  # ~1 s (CPU d) / ~45 ms (GPU e)
        return min(rounds, 3), min(samples, 2)
    return rounds, samples


def gemm_path_of(results: list[Result]) -> dict | None:
    """Where fastnn's GEMMs ran: this process's CuPy backend, or (fastnn's GPU
    rows run in child processes) the latest such row's report at its setup."""
    children = [r.info["setup"]["fastnn_gemms"] for r in results
                if (r.info.get("setup") or {}).get("fastnn_gemms")]
    return fastnn_gemm_path() or (children[-1] if children else None)


def main(args) -> int:
    import fastnn as fn
    from fastnn.errors import InputError

    device, cupy_reason = resolve_device(getattr(args, "device", "auto") or "auto")
    if device == "gpu" and cupy_reason is not None:
        print(f"fastnn bench: --device gpu: CuPy/CUDA unavailable ({cupy_reason})", file=sys.stderr)
        return 2
    pool = {**WORKLOADS, **GPU_WORKLOADS} if device == "gpu" else WORKLOADS
    names = list(pool) if args.workloads == "all" else \
        [s.strip() for s in args.workloads.split(",") if s.strip()]
    bad = [n for n in names if n not in ALL_WORKLOADS]
    if bad:
        raise InputError(f"bench: unknown workload(s) {bad}; choose from {list(ALL_WORKLOADS)}")
    threads = fn.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    samples = args.samples or (3 if args.quick else 5)
    torch_ok = _torch_available() and not args.no_torch
    wanted = set(args.contenders.split(",")) if args.contenders else None
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    env = environment(threads, command_line(args))
    gpu = None
    torch_cuda_ok = False
    if cupy_reason is None and (device == "gpu" or (wanted and wanted & set(GPU_CONTENDERS))):
        probe = None
        if torch_ok and (wanted is None or wanted & {"torch-cuda", "torch-cuda-graph"}):
            torch_cuda_ok, probe = probe_torch_cuda()
            if not torch_cuda_ok:
                print(f"fastnn bench: torch-cuda contenders not offered "
                      f"(torch sees no CUDA device: {probe.get('error') or probe})", file=sys.stderr)
        gpu = gpu_environment(probe)
    print(f"fastnn bench: {env['machine']['cpu']}, {threads} threads, numpy {np.__version__} "
          f"({', '.join(str(b['internal_api']) + ' ' + str(b['version']) for b in env['blas'])}), "
          f"torch {env['versions']['torch'] if torch_ok else 'not used'}", flush=True)
    if gpu is not None:
        dev = gpu.get("device", {})
        t = gpu.get("torch") or {}
        print(f"fastnn bench: device {device}: {dev.get('name', '?')} (sm {dev.get('capability', '?')}, "
              f"{dev.get('memory_gib', '?')} GiB), CUDA runtime {gpu.get('cuda_runtime')}, driver "
              f"{gpu.get('cuda_driver')}, cupy {gpu.get('cupy')}, torch {t.get('torch', 'not used')} "
              f"(CUDA {t.get('torch_cuda')}), GEMM precision per workload", flush=True)
    results: list[Result] = []
    skipped: dict = {}

    def write_json(complete: bool) -> None:
        if not args.json:
            return
        if gpu is not None:  # a cuBLAS failure mid-run leaves a precision to CuPy
            gpu["fastnn_gemms"] = gemm_path_of(results)
        doc = dict(env, device=device, gpu=gpu, complete=complete,
                   method={"min_sample_s": MIN_SAMPLE_S,
                           "k": "after the warm-up, doubled from the linear estimate until "
                                "one sample lasts >= min_sample_s", "rounds": rounds,
                           "samples_per_block": samples, "quick": bool(args.quick),
                           "sgd": "lr 0.01 momentum 0.9", "adam": "torch defaults",
                           "timing": "host perf_counter around k steps; GPU contenders "
                                     "synchronize the device at the end of every sample",
                           "graph_batches": "fastnn-cupy-graph gathers a new batch from device "
                                            "data in every replay (fit's path, a new epoch "
                                            "order every 256 batches, fewer for large "
                                            "batches); torch-cuda-graph replays one static "
                                            "batch"},
                   workloads={n: {**ALL_WORKLOADS[n].__dict__, "label": ALL_WORKLOADS[n].label}
                              for n in names},
                   results=[r.__dict__ for r in results], skipped=skipped,
                   table=format_table(results) if results else "")
        write_json_atomic(args.json, doc)  # rewritten after each workload

    offered: set = set()
    try:
        for name in names:
            done = len(results)
            try:
                w = ALL_WORKLOADS[name]
                if w.kind == "fit" and args.quick:
                    w = Workload(**{**w.__dict__, "epochs": 2})
                cs = contenders(w, torch_ok, device, torch_cuda_ok, wanted,
                                cupy_ok=cupy_reason is None)
                offered.update(cs)
                r, s = _rounds_samples(w, device, rounds, samples)
                t0 = time.perf_counter()
                results += measure(w, cs, threads, r, s, log, skipped)
                if log:
                    log(f"  {name}: {time.perf_counter() - t0:.1f} s")
                write_json(complete=False)  # a run cut short still leaves what it measured
            except Exception as exc:  # one broken workload must not lose the ones after it
                del results[done:]  # its rows may be what broke the table or the JSON
                skipped[name] = _why(exc)
                print(f"fastnn bench: workload {name} skipped ({skipped[name]})",
                      file=sys.stderr, flush=True)
                write_json(complete=False)  # raises only if the file itself cannot be written
    finally:
        shutdown_workers()  # the torch processes kept idle between workloads
    if wanted and wanted - offered:
        print(f"fastnn bench: not usable here (or not for these workloads): "
              f"{', '.join(sorted(wanted - offered))}", file=sys.stderr)
    table = format_table(results)
    print(table)
    if args.json:
        write_json(complete=True)
        print(f"results written to {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"bar chart written to {args.plot}")
    return 0
