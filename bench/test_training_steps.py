"""Training-step benchmarks: every workload of issue 5 on every usable backend,
plus the GEMM-only floor and hand-written NumPy, grouped by workload.

The workloads are ``fastnn.benchmarking``'s (the same as ``fastnn bench``).
PyTorch is not here: in one process its OpenMP pool and OpenBLAS spin against
each other; ``fastnn bench`` runs it in a child process and prints the ratios.

``make bench`` times them; ``make test`` (``--benchmark-disable``) runs each
body once and checks that it trains: finite loss that went down from the first
step (the floor only checks finite output). Under ``--benchmark-disable`` the
big workload d runs at a reduced width (same depth and code path), keeping the
whole file to a few seconds.
"""
from __future__ import annotations

import math

import pytest

import fastnn as fn
from fastnn import benchmarking as bm

STEP_WORKLOADS = [n for n, w in bm.WORKLOADS.items() if w.kind == "step"]
FIT_WORKLOADS = [n for n, w in bm.WORKLOADS.items() if w.kind == "fit"]
STEP_CONTENDERS = ["floor", "numpy", "fastnn-numpy", "fastnn-numba", "fastnn-cupy"]
FIT_CONTENDERS = ["fastnn-numpy", "fastnn-numba", "fastnn-cupy", "sklearn"]


def _skip_unusable(contender: str) -> None:
    if contender.startswith("fastnn-"):
        reason = fn.available_backends()[contender.split("-", 1)[1]]
        if reason is not None:
            pytest.skip(reason)
    if contender == "sklearn":
        pytest.importorskip("sklearn")


def _workload(name: str, disabled: bool) -> bm.Workload:
    w = bm.WORKLOADS[name]
    if disabled and name == "d":  # ~1 s per step at full width
        w = bm.Workload(**{**w.__dict__, "sizes": (256, 256, 256, 256, 10), "batch": 64})
    return w


@pytest.mark.parametrize("contender", STEP_CONTENDERS)
@pytest.mark.parametrize("workload", STEP_WORKLOADS)
def test_training_step(benchmark, workload, contender):
    _skip_unusable(contender)
    w = _workload(workload, benchmark.disabled)
    benchmark.group = f"step {w.label}"
    benchmark.extra_info.update(workload=w.name, contender=contender, batch=w.batch)
    run = bm.make_step(w, contender)
    first = run(1)  # warm-up (and Numba compile / cache load)
    run(2)
    last = benchmark(run, 1)
    assert math.isfinite(first) and math.isfinite(last)
    if contender != "floor":
        # fixed batch, real updates: at least 4 steps since `first`, loss must drop
        assert last < first, f"{contender} on {w.label}: loss {first} -> {last}"


@pytest.mark.parametrize("contender", FIT_CONTENDERS)
@pytest.mark.parametrize("workload", FIT_WORKLOADS)
def test_fit_main_job(benchmark, workload, contender):
    _skip_unusable(contender)
    w = bm.WORKLOADS[workload]
    epochs = 1 if benchmark.disabled else w.epochs
    benchmark.group = f"fit {w.label} x {epochs} epochs"
    benchmark.extra_info.update(workload=w.name, contender=contender, epochs=epochs)
    run = bm.fit_run(w, contender)
    if benchmark.disabled:
        seconds, samples, accuracy = benchmark(run, epochs)
    else:
        run(1)  # warm-up
        seconds, samples, accuracy = benchmark.pedantic(run, args=(epochs,), rounds=5)
    benchmark.extra_info["samples_per_second"] = samples / seconds
    assert seconds > 0 and samples > 0
    assert accuracy > 0.5, f"{contender}: test accuracy {accuracy} after {epochs} epoch(s)"
