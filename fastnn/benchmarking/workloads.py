"""The workloads of ``fastnn bench`` and who runs each.

The Workload dataclass, WORKLOADS and GPU_WORKLOADS, each one's fixed batch,
and the contender sets per device. What each contender runs is in steps.py
(in-process training steps), torch_steps.py (PyTorch, only ever in a child
process) and fit_runs.py (the digits main job).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    precision: str = "float32"  # GEMM precision (fn.set_precision; torch: TF32 flag / bf16 autocast)

    @property
    def label(self) -> str:
        tag = "" if self.precision == "float32" else f" {self.precision}"
        return f"{self.name}: {'-'.join(map(str, self.sizes))} batch {self.batch}{tag}"


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

# GPU-sized workloads (issue 6): opt-in, and outside WORKLOADS (which the CPU
# benchmarks in bench/ iterate) because one step is ~2.5 TFLOP: about 45 ms on
# an H100, minutes on a CPU. ``fastnn bench --workloads e`` still runs them anywhere.
GPU_WORKLOADS = {
    "e": Workload("e", (4096, 4096, 4096, 4096, 10), 8192, default=False,
                  note="opt-in (--workloads e), GPU-sized: ~45 ms/step on an H100"),
}
# The big GEMM-bound ones again at the faster GEMM precisions: TF32 (torch's
# allow_tf32 flag) and bf16 mixed precision (torch: bf16 autocast).
for _base in ("d", "e"):
    for _precision in ("tf32", "bf16"):
        _w = {**WORKLOADS, **GPU_WORKLOADS}[_base]
        GPU_WORKLOADS[f"{_base}-{_precision}"] = Workload(
            **{**_w.__dict__, "name": f"{_base}-{_precision}", "precision": _precision,
               "note": f"opt-in, GPU only: {_base} with {_precision} GEMMs"})
del _base, _precision, _w
ALL_WORKLOADS = {**WORKLOADS, **GPU_WORKLOADS}


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


# Contenders that run on the CUDA device; their ratios are taken against the
# GPU floor (floor-cupy) and PyTorch eager on the GPU (torch-cuda).
GPU_CONTENDERS = ("floor-cupy", "fastnn-cupy", "fastnn-cupy-graph", "fastnn-cupy-kernel",
                  "fastnn-cupy-kernel-global", "torch-cuda", "torch-cuda-graph")
TORCH_CONTENDERS = ("torch", "torch-cuda", "torch-cuda-graph")
# Contenders measured in a child process: PyTorch (never imported by the parent)
# and fastnn on the GPU, whose kernels, CUDA graphs and one-launch MLP kernels
# are the code least often run on a real device: a fault there (a sticky CUDA
# error) ends that child and its rows, not every row measured after it.
FASTNN_GPU_CONTENDERS = ("fastnn-cupy", "fastnn-cupy-graph", "fastnn-cupy-kernel",
                         "fastnn-cupy-kernel-global")
CHILD_CONTENDERS = TORCH_CONTENDERS + FASTNN_GPU_CONTENDERS


def is_gpu_contender(name: str) -> bool:
    return name in GPU_CONTENDERS


def floor_of(name: str) -> str:
    """The GEMM-only floor a contender's ``x floor`` is taken against."""
    return "floor-cupy" if is_gpu_contender(name) else "floor"


def torch_of(name: str) -> str:
    """The PyTorch eager contender its ``x torch`` is taken against."""
    return "torch-cuda" if is_gpu_contender(name) else "torch"


def cpu_contenders(w: Workload, torch_ok: bool = True) -> list[str]:
    """The CPU set: floor, numpy, fastnn on the CPU backends, torch (sklearn for fits)."""
    names = [f"fastnn-{b}" for b in fastnn_backends() if b != "cupy"]
    if w.kind == "fit":
        names.append("sklearn")
    else:
        names = ["floor", "numpy"] + names
    if torch_ok:
        names.append("torch")
    return names


def narrow(w: Workload) -> bool:
    """Small enough for fit's one-launch kernel (gpu_compiled: <= 64x64 weights,
    batch <= 256)."""
    return max(w.sizes) <= 64 and w.batch <= 256 and w.kind == "step"


def gpu_contenders(w: Workload, torch_cuda_ok: bool = True) -> list[str]:
    """The GPU set (the caller checks that CuPy is usable): floor-cupy, fastnn-cupy,
    fastnn-cupy-graph, torch-cuda, torch-cuda-graph; for fits fastnn-cupy and
    torch-cuda. bf16 has no GEMM-only floor (CuPy has no bf16 GEMM); narrow nets
    add fastnn-cupy-kernel (fit's one-launch numba.cuda kernel) and
    fastnn-cupy-kernel-global (the same kernel with every array in global memory:
    what shared memory is worth)."""
    if w.kind == "fit":
        return ["fastnn-cupy"] + (["torch-cuda"] if torch_cuda_ok else [])
    names = [] if w.precision == "bf16" else ["floor-cupy"]
    names += ["fastnn-cupy", "fastnn-cupy-graph"]
    if narrow(w):
        names += ["fastnn-cupy-kernel", "fastnn-cupy-kernel-global"]
    if torch_cuda_ok:
        names += ["torch-cuda", "torch-cuda-graph"]
    return names


def contenders(w: Workload, torch_ok: bool = True, device: str = "cpu",
               torch_cuda_ok: bool = False, wanted=None, cupy_ok: bool | None = None) -> list[str]:
    """Contenders of ``w``: the ``device`` set by default; with ``wanted`` (the
    ``--contenders`` names) every usable one named there, CPU or GPU.

    ``cupy_ok`` (default: fastnn's cupy backend is usable) gates the GPU set;
    ``torch_cuda_ok`` says torch sees a CUDA device (probed in a child process).
    """
    if cupy_ok is None:
        cupy_ok = "cupy" in fastnn_backends()
    cpu = cpu_contenders(w, torch_ok)
    gpu = gpu_contenders(w, torch_ok and torch_cuda_ok) if cupy_ok else []
    if wanted is None:
        return gpu if device == "gpu" else cpu
    return [c for c in cpu + gpu if c in wanted]
