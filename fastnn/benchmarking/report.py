"""Reporting ``fastnn bench`` results.

The table, the command line string, the environment recorded in the JSON
(machine, versions, BLAS, git commit; for GPU runs the device, CUDA runtime and
driver, CuPy, PyTorch and its CUDA, and the TF32 settings) and the bar chart.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

from fastnn.benchmarking.runner import Result
from fastnn.benchmarking.workloads import ALL_WORKLOADS, GPU_CONTENDERS


def write_json_atomic(path, doc: dict) -> None:
    """``doc`` as indented JSON at ``path``, written whole to a temporary file and
    then renamed: a bench rewrites its file after each part, and a time guard
    stopping it mid-write leaves the previous complete file, never a broken one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    os.replace(tmp, path)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(results: list[Result]) -> str:
    gpu = any(r.x_graph is not None or r.contender in GPU_CONTENDERS for r in results)
    cw = max([13] + [len(r.contender) for r in results])
    head = (f"{'workload':<28} {'contender':<{cw}} {'ms/step':>9} {'quiet ms':>9} "
            f"{'samples/s':>11} {'x floor':>8} {'x torch':>8}"
            + (f" {'x graph':>8}" if gpu else "") + "  note")
    lines = [head, "-" * len(head)]
    last = None
    for r in results:
        w = ALL_WORKLOADS[r.workload]
        label = w.label if r.workload != last else ""
        last = r.workload
        note = ""
        if "accuracy" in r.info:
            note = f"test acc {r.info['accuracy']:.3f}"
        elif r.info.get("loss") is not None and not r.contender.startswith("floor"):
            note = f"loss {r.info['loss']:.4g}"
        lines.append(
            f"{label:<28} {r.contender:<{cw}} {r.ms_per_step:>9.4g} {r.quiet_ms_per_step:>9.4g} "
            f"{r.samples_per_s:>11,.0f} {_fmt(r.x_floor, '8.2f')} {_fmt(r.x_torch, '8.2f')}"
            + (f" {_fmt(r.x_graph, '8.2f')}" if gpu else "") + f"  {note}")
    lines.append("x floor = step time / GEMM-only floor (lower is better); "
                 "x torch = PyTorch eager time / time (higher is better);")
    if gpu:
        lines.append("GPU rows: x floor against floor-cupy, x torch against torch-cuda (eager), "
                     "x graph = torch-cuda-graph time / time (higher is better);")
        lines.append("GPU timing: host clock around k steps with a device synchronize at both ends; "
                     "GEMM precision per workload: float32 = TF32 off; tf32 = fn.set_precision('tf32') "
                     "/ torch allow_tf32; bf16 = fn.set_precision('bf16') / torch bf16 autocast;")
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
    """Commit of the source tree being measured, and whether fastnn/ differs from
    it; in a copy without .git (a GPU machine's), FASTNN_GIT_COMMIT as given."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    given = os.environ.get("FASTNN_GIT_COMMIT")
    fallback = {"commit": given, "dirty": "unknown (FASTNN_GIT_COMMIT)"} if given else None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastnn"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return fallback
    return {"commit": head, "dirty": [ln[3:] for ln in dirty if ln.strip()]} if head else fallback


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


def gpu_environment(torch_probe: dict | None = None) -> dict:
    """The CUDA device, CUDA runtime/driver, CuPy/cuBLAS/NVRTC versions and the
    TF32 settings (CUPY_TF32; PyTorch's flags as its child process reported them
    in ``torch_probe``). Never raises: a failing query is recorded as its error."""
    out: dict = {"CUPY_TF32": os.environ.get("CUPY_TF32"), "tf32": "per workload (precision)",
                 "timing": "perf_counter around run(k), device synchronize at both ends"}
    try:
        import cupy

        rt = cupy.cuda.runtime
        dev = int(rt.getDevice())
        props = rt.getDeviceProperties(dev)
        name = props.get("name", b"")
        out.update({
            "cupy": cupy.__version__,
            "cuda_runtime": rt.runtimeGetVersion(),
            "cuda_driver": rt.driverGetVersion(),
            "device": {"id": dev, "name": (name.decode(errors="replace") if isinstance(name, bytes)
                                           else str(name)).strip(),
                       "capability": f"{props.get('major')}.{props.get('minor')}",
                       "sm_count": props.get("multiProcessorCount"),
                       "memory_gib": round(props.get("totalGlobalMem", 0) / 2**30, 2),
                       "clock_khz": props.get("clockRate")},
        })
        try:
            out["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        except Exception as exc:  # pragma: no cover - GPU only
            out["nvrtc"] = f"unavailable ({type(exc).__name__})"
        try:
            from cupy_backends.cuda.libs import cublas

            out["cublas"] = cublas.getVersion(cupy.cuda.device.get_cublas_handle())
        except Exception as exc:  # pragma: no cover - GPU only
            out["cublas"] = f"unavailable ({type(exc).__name__})"
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["nvidia_driver"] = _nvidia_driver()
    out["fastnn_gemms"] = fastnn_gemm_path()
    if torch_probe is not None:
        out["torch"] = torch_probe
    return out


def fastnn_gemm_path() -> dict | None:
    """Where the CuPy backend's GEMMs run: its status line (fastnn's own cuBLAS
    handle or CuPy's matmul, and why) and the precisions it left to CuPy, whose
    rows are then not the precision's speed. None before the backend exists."""
    from fastnn import backends

    backend = backends._instances.get("cupy")
    if backend is None:
        return None
    return {"status": getattr(backend, "blas_status", None),
            "left_to_cupy": sorted(getattr(backend, "_blas_refused", ())),
            "own_handle": getattr(backend, "_blas", None) is not None}


GEMMS_ON_CUPY = "CuPy's matmul"  # a row's info["gemms"] when fastnn's handle refused them


def gemm_route(precision: str) -> str | None:
    """Where the CuPy backend's GEMMs at ``precision`` run now: "own cuBLAS
    handle", or "CuPy's matmul" when it was left to CuPy (at start or after a
    cuBLAS failure mid-run: a row measured then is not the precision's speed).
    None before the backend exists."""
    path = fastnn_gemm_path()
    if path is None:
        return None
    if path["own_handle"] and precision not in path["left_to_cupy"]:
        return "own cuBLAS handle"
    return GEMMS_ON_CUPY


def _nvidia_driver() -> str | None:
    """The NVIDIA driver release (e.g. "580.159.03"; cuda_driver is the CUDA
    version it supports), from nvidia-smi; None where it cannot be asked."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def probe_torch_cuda(timeout: float = 90.0) -> tuple[bool, dict]:
    """Whether PyTorch sees a CUDA device, asked in a child process (the parent
    never imports torch), with its versions, device and TF32 flags."""
    code = ("import json, sys\n"
            "from fastnn.benchmarking.torch_steps import torch_gpu_settings\n"
            "import torch\n"
            "sys.stdout.write(json.dumps(torch_gpu_settings(torch)))\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, {"error": f"{type(exc).__name__}: {exc}"}
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, {"error": f"torch probe exited {proc.returncode}: {tail}"}
    return bool(info.get("cuda_available")), info


def plot(results: list[Result], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.workload for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.2 + 1.1 * len(names) * 2), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [r for r in results if r.workload == name]
        labels = [r.contender for r in rows]
        colors = ["0.6" if lb in ("floor", "numpy", "torch", "sklearn", "floor-cupy", "torch-cuda",
                                  "torch-cuda-graph") else "tab:blue" for lb in labels]
        batch = ALL_WORKLOADS[name].batch  # quiet figures: the medians swing with machine noise
        ax.barh(labels, [batch * 1e3 / r.quiet_ms_per_step for r in rows], color=colors)
        ax.set_title(ALL_WORKLOADS[name].label, fontsize=9, loc="left")
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel("training samples / s, quiet (lowest-block) figure; higher is better")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
