"""Timing the contenders: runners and the alternating-block method.

LocalRunner (in-process contenders), TorchWorker (PyTorch -- CPU, CUDA eager or
CUDA graph -- in a child process, driven over a pipe) with ``worker_main``, the
child's entry point; Result and ``measure``, which alternates the contenders in
blocks. GPU contenders synchronize the device inside ``run(k)``, so the host
timer around it measures finished work.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fastnn.benchmarking.workloads import (TORCH_CONTENDERS, Workload, fit_run, floor_of,
                                           is_gpu_contender, make_step, torch_of)

MIN_SAMPLE_S = 0.002


# ---------------------------------------------------------------- runners
class LocalRunner:
    """Times an in-process contender in blocks of samples of k steps."""

    def __init__(self, w: Workload, contender: str, threads: int, seed: int = 0):
        self.w, self.name = w, contender
        self.fit = w.kind == "fit"
        self.run = fit_run(w, contender, threads, seed) if self.fit else make_step(w, contender, threads, seed)
        self.k = 1
        self.info: dict = {}
        if getattr(self.run, "info", None):  # torch-cuda*: versions, device, TF32 flags
            self.info["setup"] = dict(self.run.info)

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
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fastnn.benchmarking.runner import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        try:
            self.setup = self._call(cmd="setup", workload=w.__dict__, contender=contender,
                                    threads=threads, seed=seed)
        except BaseException:
            self.close()  # the child stays alive after a failed setup: end it
            raise
        if contender != "torch":
            self.info["setup"] = self.setup

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
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()


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

                reply = {**runner.info.get("setup", {}), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}
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
    x_graph: float | None = None  # GPU rows: torch-cuda-graph time / time
    k: int = 1
    blocks_ms: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def measure(w: Workload, names: list[str], threads: int, rounds: int = 5,
            samples: int = 5, log=None, skipped: dict | None = None) -> list[Result]:
    """Alternate the contenders in blocks; ratios from the same round.

    A contender that fails to build or warm up is left out (named in ``skipped``
    with the reason, and always on stderr); the others are still measured.
    """
    runners = []
    try:
        for name in names:
            cls = TorchWorker if name in TORCH_CONTENDERS else LocalRunner
            try:
                r = cls(w, name, threads)
                try:
                    r.calibrate()
                except BaseException:
                    r.close()
                    raise
                runners.append(r)
            except Exception as exc:  # one broken contender must not sink the table
                why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if skipped is not None:
                    skipped[f"{w.name}/{name}"] = why
                print(f"  {w.name}/{name}: skipped ({why})", file=sys.stderr, flush=True)
        if not runners:
            return []
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
        # GPU rows: against floor-cupy and torch-cuda (eager); CPU rows: floor, torch
        if w.kind == "step" and r.name != floor_of(r.name):
            res.x_floor = ratio(r.name, floor_of(r.name))
        if r.name != torch_of(r.name):
            res.x_torch = ratio(torch_of(r.name), r.name)
        if is_gpu_contender(r.name) and r.name != "torch-cuda-graph":
            res.x_graph = ratio("torch-cuda-graph", r.name)
        results.append(res)
    return results
