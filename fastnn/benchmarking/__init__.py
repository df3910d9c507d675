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

import json
import sys
import time

import numpy as np

from fastnn.benchmarking.report import command_line, environment, format_table, plot
from fastnn.benchmarking.runner import (MIN_SAMPLE_S, LocalRunner, Result, TorchWorker,
                                        measure, worker_main)
from fastnn.benchmarking.workloads import (DEFAULT_WORKLOADS, WORKLOADS, Workload,
                                           build_fastnn_model, contenders, fastnn_backends,
                                           fastnn_step, fit_run, floor_step, make_batch,
                                           make_step, numpy_step, torch_step)

__all__ = [
    "DEFAULT_WORKLOADS", "MIN_SAMPLE_S", "WORKLOADS", "LocalRunner", "Result", "TorchWorker",
    "Workload", "add_arguments", "build_fastnn_model", "command_line", "contenders",
    "environment", "fastnn_backends", "fastnn_step", "fit_run", "floor_step", "format_table",
    "main", "make_batch", "make_step", "measure", "numpy_step", "plot", "torch_step",
    "worker_main",
]


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
