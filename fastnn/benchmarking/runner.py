"""Timing the contenders: runners and the alternating-block method.

LocalRunner (in-process contenders), ChildWorker (PyTorch -- CPU, CUDA eager or
CUDA graph -- and fastnn's GPU contenders, each in a child process driven over a
pipe) with ``worker_main``, the child's entry point; Result and ``measure``,
which alternates the contenders in blocks. GPU contenders synchronize the device inside ``run(k)``, so the host
timer around it measures finished work.
"""
from __future__ import annotations

import atexit
import gc
import json
import math
import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from fastnn.benchmarking.fit_runs import fit_run
from fastnn.benchmarking.steps import make_step
from fastnn.benchmarking.workloads import (CHILD_CONTENDERS, TORCH_CONTENDERS, Workload, floor_of,
                                           is_gpu_contender, torch_of)

MIN_SAMPLE_S = 0.002
MAX_K = 1 << 20              # steps per sample, at most
MAX_CALIBRATE_S = 2.0        # time for growing k after the warm-up, at most
# How long the parent waits for a child's reply before it kills the child
# (read at call time: tests lower them). Setup imports torch (or CuPy and
# compiles fastnn's kernels), starts CUDA and captures the graph of the largest
# workload; a block or a calibration is seconds at most; release syncs and
# frees the device memory.
SETUP_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
RELEASE_TIMEOUT_S = 30.0
WORKER_CODE = "from fastnn.benchmarking.runner import worker_main; worker_main()"


# Contenders whose GEMMs go through the CuPy backend (its own cuBLAS handle, or
# CuPy's matmul for a precision it refused): their rows say which. (floor-cupy
# calls cupy.matmul itself; the one-launch kernels make no GEMM calls.)
GEMM_ON_BACKEND = ("fastnn-cupy", "fastnn-cupy-graph")


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
        """Warm up, then pick k so that one run(k) lasts >= min_sample.

        k starts from the linear estimate and doubles (as timeit's autorange
        does) until run(k) lasts a sample and doubling no longer lowers the time
        per step: a contender with a fixed cost per call (one kernel launch of
        k steps, its uploads and read-back) would otherwise get a k far too
        small and be reported several times slower than it is."""
        if self.fit:
            self.run(1)  # compiles / warms caches
            return 1
        t_end = time.perf_counter() + warmup_s
        calls, dt = 0, math.inf
        while calls < 2 or (time.perf_counter() < t_end and calls < 50):
            t0 = time.perf_counter()
            self.run(1)
            if calls:  # the best warm call (the first compiles; a preempted one is slow)
                dt = min(dt, time.perf_counter() - t0)
            calls += 1
        k = min(MAX_K, max(1, math.ceil(min_sample / max(dt, 1e-7))))
        best_k, best_dt = 1, dt  # run(1)
        if k == 1:
            k = 2  # run(1) lasts a sample already; a fixed cost may still hide in it
        t_stop = time.perf_counter() + MAX_CALIBRATE_S
        # two runs of k last about 2 k times the best time per step so far, or less
        while k <= MAX_K and time.perf_counter() + 2 * k * best_dt / best_k <= t_stop:
            dt = min(self._time(k), self._time(k))  # one preempted run must not decide
            if dt >= min_sample and dt / k > 0.9 * best_dt / best_k:
                # long enough, and the fixed cost per call (if any) is spread thin;
                # a run(1) that was a sample already stays the choice (slow steps)
                if best_k > 1 or best_dt < min_sample:
                    best_k = k
                break
            best_k, best_dt = k, dt
            k *= 2
        self.k = best_k
        return self.k

    def _time(self, k: int) -> float:
        t0 = time.perf_counter()
        self.run(k)
        return time.perf_counter() - t0

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
        if self.name in GEMM_ON_BACKEND:
            from fastnn.benchmarking.report import gemm_route

            # after the block: a GEMM that failed in it sent the precision to CuPy
            self.info["gemms"] = gemm_route(self.w.precision)
        return out

    def close(self):
        pass


# Idle worker processes by (contender, threads), reused by the next workload:
# a new child costs a torch import and, on a GPU, a CUDA context (seconds each,
# times every workload and torch contender of a GPU bench).
_IDLE_WORKERS: dict = {}


def _spawn_worker(threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_CODE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)


def _end_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()  # our own child, by its handle
            proc.wait()


def shutdown_workers() -> None:
    """End every idle worker process (``fastnn bench`` calls this when done)."""
    while _IDLE_WORKERS:
        _, proc = _IDLE_WORKERS.popitem()
        _end_worker(proc)


atexit.register(shutdown_workers)


class ChildWorker:
    """A contender running in a child process, driven over a pipe (JSON lines).

    The process outlives the contender: ``close`` releases its model (and its
    GPU memory) and keeps the process idle for the same contender of the next
    workload."""

    def __init__(self, w: Workload, contender: str, threads: int, seed: int = 0):
        self.w, self.name, self.info = w, contender, {}
        self._key = (contender, threads)
        proc = _IDLE_WORKERS.pop(self._key, None)
        self.proc = proc if proc is not None and proc.poll() is None else _spawn_worker(threads)
        try:
            self.setup = self._call(SETUP_TIMEOUT_S, cmd="setup", workload=w.__dict__,
                                    contender=contender, threads=threads, seed=seed)
        except BaseException:
            _end_worker(self.proc)  # a child whose setup failed is not reused
            raise
        if contender != "torch":
            # torch-cuda*: versions, device, TF32 flags; fastnn-cupy*: the GEMM path
            self.info["setup"] = self.setup

    def _call(self, timeout: float, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self._read_reply(msg["cmd"], timeout)
        if not line:
            raise RuntimeError(f"{self.name} worker died (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name} worker: {reply['error']}")
        return reply

    def _read_reply(self, cmd: str, timeout: float) -> str:
        """One reply line ("" if the child died), or kill a child that hangs.

        Reads the pipe's fd directly: select cannot see what a buffered
        readline() has already taken in (the child writes one line per reply,
        and only after a request, so nothing is left over between calls)."""
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait()
                raise RuntimeError(f"{self.name} worker: no reply to {cmd!r} in {timeout:g} s "
                                   f"(child killed)")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return ""
            data += chunk
        return data.decode()

    def calibrate(self, min_sample: float = MIN_SAMPLE_S, warmup_s: float = 0.2) -> int:
        return self._call(CALL_TIMEOUT_S, cmd="calibrate", min_sample=min_sample,
                          warmup_s=warmup_s)["k"]

    def block(self, samples: int) -> list[float]:
        reply = self._call(CALL_TIMEOUT_S, cmd="block", samples=samples)
        self.info.update(reply.get("info", {}))
        return reply["times"]

    def close(self):
        """Release the contender and keep its process idle for reuse; end the
        process instead if it cannot release or one of its kind is kept already."""
        if self.proc.poll() is not None:
            return
        try:
            self._call(RELEASE_TIMEOUT_S, cmd="release")
        except (RuntimeError, OSError, ValueError):
            _end_worker(self.proc)
            return
        if self._key in _IDLE_WORKERS:
            _end_worker(self.proc)
        else:
            _IDLE_WORKERS[self._key] = self.proc


def _release_device_memory() -> None:
    """Give back the device memory this child's cached allocators hold."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()


def worker_main() -> None:
    """Child-process side of ChildWorker (stdin/stdout JSON lines)."""
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
                reply = dict(runner.info.get("setup", {}))
                if msg["contender"] in TORCH_CONTENDERS:
                    import torch

                    reply.update(torch=torch.__version__, threads=torch.get_num_threads())
                elif msg["contender"].startswith("fastnn-cupy"):
                    from fastnn.benchmarking.report import fastnn_gemm_path

                    reply["fastnn_gemms"] = fastnn_gemm_path()  # this child's backend
            elif cmd == "calibrate":
                reply = {"k": runner.calibrate(msg["min_sample"], msg["warmup_s"])}
            elif cmd == "block":
                reply = {"times": runner.block(msg["samples"]), "info": runner.info}
            elif cmd == "release":  # the parent keeps this process for another workload
                runner = None
                gc.collect()
                _release_device_memory()  # the next workload's model gets the memory
                reply = {}
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


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _drop_failed(w: Workload, runner, why: str, skipped: dict | None) -> None:
    """Record a contender that failed after its warm-up, and end it."""
    if skipped is not None:
        skipped[f"{w.name}/{runner.name}"] = f"failed in {why}"
    print(f"  {w.name}/{runner.name}: dropped (failed in {why})", file=sys.stderr, flush=True)
    try:
        runner.close()
    except Exception:  # already broken: its first error is the one reported
        pass


def measure(w: Workload, names: list[str], threads: int, rounds: int = 5,
            samples: int = 5, log=None, skipped: dict | None = None) -> list[Result]:
    """Alternate the contenders in blocks; ratios from the same round.

    A contender that fails to build or warm up is left out (named in ``skipped``
    with the reason, and always on stderr); the others are still measured.
    """
    runners = []
    try:
        for name in names:
            cls = ChildWorker if name in CHILD_CONTENDERS else LocalRunner
            try:
                r = cls(w, name, threads)
                try:
                    r.calibrate()
                except BaseException:
                    r.close()
                    raise
                runners.append(r)
            except Exception as exc:  # one broken contender must not sink the table
                why = _why(exc)
                if skipped is not None:
                    skipped[f"{w.name}/{name}"] = why
                print(f"  {w.name}/{name}: skipped ({why})", file=sys.stderr, flush=True)
        if not runners:
            return []
        times = {r.name: [] for r in runners}
        blocks = {r.name: [] for r in runners}
        for rnd in range(rounds):
            if not runners:  # every contender failed mid-run
                break
            order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
            for r in order:
                try:
                    t = r.block(samples)
                except Exception as exc:  # failing mid-run: drop it, the others go on
                    _drop_failed(w, r, f"round {rnd + 1}: {_why(exc)}", skipped)
                    runners.remove(r)
                    del times[r.name], blocks[r.name]  # its ratios would miss rounds
                    continue
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
