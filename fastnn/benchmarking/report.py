"""Reporting ``fastnn bench`` results.

The table, the command line string, the environment recorded in the JSON
(machine, versions, BLAS, git commit) and the bar chart.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import numpy as np

from fastnn.benchmarking.runner import Result
from fastnn.benchmarking.workloads import WORKLOADS


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

    from fastnn.benchmarking import add_arguments  # the package: imports this module

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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
