"""CuPy backend: CuPy arrays on an NVIDIA GPU, fused CUDA kernels for the hot ops.

Only this module imports CuPy, and only when the backend is first created.
The fused ops (bias_act, act_backward, softmax_xent, sgd/adam/rmsprop steps)
launch the kernels in ``kernels/*.cu`` (contracts in kernels/README.md) for
C-contiguous float32/float64 arrays and fall back to the generic
``Backend`` implementation (``self.xp`` = cupy) for anything else.

Why fused kernels: on a GPU a small net is bound by launch overhead (~5-10 us
per op), so one launch per op (and one per optimizer buffer) is the speed.
Nothing here synchronizes with the host: softmax_xent's loss stays a 0-d
device array until the caller asks for it.

This module keeps set-up, arrays, kernel compile/launch and the fused
activation ops; GEMMs and bf16 operands are in cupy_gemm.py, losses and
optimizer steps in cupy_steps.py (mixins reaching CuPy through ``self.xp``),
helpers they share in cupy_support.py.
"""
from __future__ import annotations

import re
import threading

import numpy as np

from ..errors import BackendUnavailable
from . import kernel_sources
from .activations import get_activation
from .base import Backend, GemmOperand, host_array, on_host
from .cupy_gemm import CupyGemmOps
from .cupy_steps import CupyStepOps
from .cupy_support import (_BLOCK, _FLOATS, GPUOutOfMemory, _c_contiguous, _nbytes, _one_line,
                           _oom_guard)

# No FMA contraction: the optimizer kernels must round exactly like the NumPy
# reference (mul, then add), or trajectories drift by an ulp per step. CuPy
# appends -ftz=true after these (float32 subnormals flush to zero, as in its own
# kernels; a later -ftz=false of ours would lose): see kernels/README.md.
_COMPILE_OPTIONS = ("--fmad=false",)
_DLPACK_ON_GPU = {2, 13}  # kDLCUDA, kDLCUDAManaged
# act_backward_bias (one block per 32 columns) up to this many rows; larger
# batches keep act_backward + the ones-GEMM, which spread over the whole device.
FUSED_BIAS_GRAD_MAX_ROWS = 1024
_BIAS_ROWS = 32  # act_backward.cu's FN_BIAS_ROWS: the block's second dimension


# ---------------------------------------------------------------- set-up
def _import_cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA library load
        raise BackendUnavailable(f"cupy: import failed ({_one_line(exc)})") from exc
    return cupy


def _probe_device(cupy) -> dict:
    """Facts about the current CUDA device, or BackendUnavailable saying why not."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, driver too old for this CUDA, ...
        raise BackendUnavailable(f"cupy: no usable CUDA driver ({_one_line(exc)})") from exc
    if count <= 0:
        raise BackendUnavailable("cupy: no CUDA device found")
    try:
        device_id = int(cupy.cuda.runtime.getDevice())
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        # A tiny elementwise op allocates, compiles with NVRTC and launches:
        # it fails here, not mid-training, when any of the three is broken.
        probe = cupy.arange(4, dtype=np.float32)
        total = float((probe * 2).sum())
    except Exception as exc:
        raise BackendUnavailable(f"cupy: CUDA device unusable ({_one_line(exc)})") from exc
    if total != 12.0:
        raise BackendUnavailable(f"cupy: CUDA device computed 2*(0+1+2+3) = {total}, not 12")
    name = props.get("name", b"unknown GPU")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return {
        "id": device_id,
        "name": str(name).strip(),
        "total_bytes": int(props.get("totalGlobalMem", 0)),
        "sm_count": max(1, int(props.get("multiProcessorCount", 1))),
    }


def _compile_errors(cupy) -> tuple:
    """What RawModule raises for a kernel file that does not compile (NVRTC) or
    compiles but does not load (the driver: e.g. an architecture it cannot run)."""
    driver = getattr(cupy.cuda, "driver", None)
    loading = getattr(driver, "CUDADriverError", None)
    return (cupy.cuda.compiler.CompileException,) + ((loading,) if loading else ())


class CupyBackend(CupyGemmOps, CupyStepOps, Backend):
    name = "cupy"

    def __init__(self):
        cupy = _import_cupy()
        info = _probe_device(cupy)
        super().__init__(cupy)
        self._device_id = info["id"]
        self._device = f"cuda:{info['id']} ({info['name']}, {info['total_bytes'] / 2**30:.1f} GiB)"
        # Enough blocks to fill every SM several times over; the kernels
        # grid-stride over whatever is left.
        self._max_blocks = info["sm_count"] * 32
        self._oom_error = cupy.cuda.memory.OutOfMemoryError
        self._functions: dict = {}
        # Kept for the backend's life: CUDA graphs recorded with them point here.
        self._ones: dict = {}  # (n, dtype) -> ones (1, n) for bias_grad
        self._bf16: dict = {}  # (operand, size) -> uint16 scratch for bf16 GEMMs
        self._capture = None  # the CUDA-graph recording in progress (fastnn/cuda_graph.py)
        from ..precision import apply_to_cupy

        apply_to_cupy()  # exact float32 GEMMs unless fn.set_precision("tf32")
        self._blas = None  # fastnn's own cuBLAS handle, once it has passed its check
        self._blas_refused: set = set()  # precisions whose GEMMs failed there: left to CuPy
        self.blas_status = self._start_own_cublas()

    # ------------------------------------------------------------ arrays
    @property
    def device(self) -> str:
        return self._device

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    def resident(self, x):
        """CuPy arrays as they are, GPU DLPack producers (torch CUDA tensors)
        wrapped without a copy, anything else as a NumPy array."""
        if on_host(x):
            return x
        if isinstance(x, self.xp.ndarray) or _on_gpu(x) or hasattr(x, "__cuda_array_interface__"):
            return self.asarray(x)
        return host_array(x)

    def asarray(self, x, dtype=None):
        """Device array from NumPy arrays, lists, CuPy arrays or DLPack producers.

        GPU-resident DLPack producers (torch CUDA tensors) are wrapped without
        a copy; anything on the host is copied over once.
        """
        cupy = self.xp
        if isinstance(x, cupy.ndarray):
            return x if dtype is None else x.astype(dtype, copy=False)
        if _on_gpu(x):
            if type(x).__module__.split(".")[0] == "torch":
                x = x.detach()  # a tensor that requires grad refuses to export
            arr = cupy.from_dlpack(x)
            return arr if dtype is None else arr.astype(dtype, copy=False)
        if hasattr(x, "__cuda_array_interface__"):  # e.g. numba.cuda arrays
            return cupy.asarray(x, dtype=dtype)
        return cupy.asarray(host_array(x), dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, self.xp.ndarray):
            return x.get()
        return host_array(x)

    def upload(self, dst, host) -> None:
        """Host -> device copy into ``dst`` in place (no new device array)."""
        dst.set(np.ascontiguousarray(host, dtype=dst.dtype))

    def synchronize(self) -> None:
        """Wait until every queued kernel on this device has finished."""
        self.xp.cuda.Device(self._device_id).synchronize()

    def memory_info(self) -> tuple[int, int]:
        """``(free, total)`` device memory in bytes (CuPy's pool counts as used)."""
        free, total = self.xp.cuda.runtime.memGetInfo()
        return int(free), int(total)

    # ------------------------------------------------------------ kernels
    def _kernel(self, filename: str, name: str):
        """Compiled kernel ``name`` of ``kernels/<filename>``: compiled once per
        process and device (and cached on disk by CuPy across processes)."""
        key = (self.xp.cuda.Device().id, name)
        fn = self._functions.get(key)
        if fn is None:
            with _compile_lock:
                fn = self._functions.get(key)
                if fn is None:
                    fn = self._functions[key] = self._compile(filename, name)
        return fn

    def _compile(self, filename: str, name: str):
        cupy = self.xp
        module = _modules.get((cupy.cuda.Device().id, filename))
        try:
            if module is None:
                module = cupy.RawModule(
                    code=kernel_sources.read_kernel(filename), options=_COMPILE_OPTIONS
                )
                _modules[(cupy.cuda.Device().id, filename)] = module
            return module.get_function(name)
        except _compile_errors(cupy) as exc:
            raise RuntimeError(f"fastnn: compiling or loading kernels/{filename} failed "
                               f"({type(exc).__name__}):\n{exc}") from exc

    def _launch_1d(self, fn, n: int, args) -> None:
        """Launch an elementwise grid-stride kernel over ``n`` elements."""
        blocks = min((n + _BLOCK - 1) // _BLOCK, self._max_blocks)
        fn((blocks,), (_BLOCK,), args)

    def _fusable(self, *arrays, same_shape=True) -> bool:
        """All arrays C-contiguous CuPy arrays of one float dtype, one size
        (and one shape when asked), and not empty."""
        first = arrays[0]
        nd = self.xp.ndarray
        if not isinstance(first, nd) or first.dtype not in _FLOATS or first.size == 0:
            return False
        for a in arrays:
            if not (isinstance(a, nd) and a.dtype == first.dtype and _c_contiguous(a)):
                return False
            if a.size != first.size or (same_shape and a.shape != first.shape):
                return False
        return True

    def _memory_error(self, op: str, estimate: int, exc) -> GPUOutOfMemory:
        match = re.search(r"allocating ([\d,]+) bytes", str(exc))
        requested = int(match.group(1).replace(",", "")) if match else estimate
        try:
            free, total = self.memory_info()
            where = f"{free / 2**30:.2f} GiB free of {total / 2**30:.1f} GiB on {self._device}"
        except Exception:  # the device may be in a bad state: keep the message useful
            where = self._device
        return GPUOutOfMemory(
            f"cupy {op}: out of GPU memory requesting {requested:,} bytes "
            f"({where}); use a smaller batch or model"
        )

    # ------------------------------------------------------------ activations
    def add_bias(self, z, bias) -> None:
        """``z += bias`` as the identity case of the bias_act kernel (one launch)."""
        self.bias_act(z, bias, "identity")

    @_oom_guard("bias_act", lambda z, *a, **k: _nbytes(z))
    def bias_act(self, z, bias, act, alpha=0.0, out=None):
        """``z += bias`` (z (N, F), bias (F,) or None), ``out = act(z)``; out may be z."""
        out = z if out is None else out
        code = get_activation(act).code  # ValueError for an unknown name
        if not self._bias_act_fusable(z, bias, out):
            return super().bias_act(z, bias, act, alpha, out)
        self._launch_bias_act(z, bias, code, alpha, out, bits=None)
        return out

    @_oom_guard("bias_act", lambda z, *a, **k: 1.5 * _nbytes(z))
    def bias_act_operand(self, z, bias, act, alpha=0.0, out=None, bits_buffer=None):
        """Under bf16: bias_act and out's bf16 bits in one launch (bias_act_bf16)."""
        out = z if out is None else out
        code = get_activation(act).code
        if not (bits_buffer is not None and self._bf16_operand_ok(out)
                and self._bias_act_fusable(z, bias, out)):
            return super().bias_act_operand(z, bias, act, alpha, out, bits_buffer)
        bits = bits_buffer(out.shape)
        self._launch_bias_act(z, bias, code, alpha, out, bits=bits)
        return GemmOperand(out, bits)

    def _bias_act_fusable(self, z, bias, out) -> bool:
        bias_ok = bias is None or (
            self._fusable(bias) and bias.dtype == z.dtype and bias.shape == z.shape[-1:]
        )
        return z.ndim > 0 and bias_ok and self._fusable(z, out)

    def _launch_bias_act(self, z, bias, code: int, alpha, out, bits) -> None:
        """bias_act_f32/f64, or bias_act_bf16 writing ``bits`` too."""
        n_cols = z.shape[-1]
        head = (z, z if bias is None else bias, out)
        tail = (np.int64(z.size // n_cols), np.int64(n_cols), np.int32(bias is not None),
                np.int32(code), z.dtype.type(alpha))
        if bits is None:
            fn, args = self._kernel("bias_act.cu", f"bias_act_{_FLOATS[z.dtype]}"), head + tail
        else:
            fn, args = self._kernel("bias_act.cu", "bias_act_bf16"), head + (bits,) + tail
        self._launch_1d(fn, z.size, args)

    @_oom_guard("act_backward", lambda dy, *a, **k: 2 * _nbytes(dy))
    def act_backward(self, dy, y, act, pre=None, alpha=0.0, out=None):
        """``out = dy * act'(.)`` from y (or ``pre``, the pre-activation); out may be dy."""
        out = dy if out is None else out
        args = self._act_backward_args(dy, y, act, pre, alpha, out)
        if args is None:
            return super().act_backward(dy, y, act, pre, alpha, out)  # or its clear error
        fn = self._kernel("act_backward.cu", f"act_backward_{_FLOATS[dy.dtype]}")
        self._launch_1d(fn, dy.size, args)
        return out

    fuses_bias_grad = True

    @_oom_guard("act_backward", lambda dy, *a, **k: 2 * _nbytes(dy))
    def act_backward_bias(self, dy, y, act, pre=None, alpha=0.0, out=None, bias_grad_out=None):
        """act_backward and the bias gradient in one launch (act_backward_bias)
        for a batch of at most FUSED_BIAS_GRAD_MAX_ROWS rows."""
        out = dy if out is None else out
        args = self._act_backward_args(dy, y, act, pre, alpha, out) \
            if dy.ndim == 2 and dy.shape[0] <= FUSED_BIAS_GRAD_MAX_ROWS else None
        db = bias_grad_out
        if args is not None and db is None:
            db = self.xp.empty((dy.shape[1],), dtype=dy.dtype)
        if args is None or not (self._fusable(db) and db.dtype == dy.dtype
                                and db.shape == dy.shape[1:]):
            return super().act_backward_bias(dy, y, act, pre, alpha, out, bias_grad_out)
        n_rows, n_cols = dy.shape
        fn = self._kernel("act_backward.cu", f"act_backward_bias_{_FLOATS[dy.dtype]}")
        dy_, y_, pre_, out_, _, code, alpha_, use_pre = args
        fn(((n_cols + 31) // 32,), (32, _BIAS_ROWS),
           (dy_, y_, pre_, out_, db, np.int64(n_rows), np.int64(n_cols), code, alpha_, use_pre))
        return out, db

    @_oom_guard("act_backward", lambda dy, *a, **k: 2.5 * _nbytes(dy))
    def act_backward_operand(self, dy, y, act, pre=None, alpha=0.0, out=None, bits_buffer=None):
        """Under bf16: act_backward and out's bf16 bits in one launch (act_backward_bf16)."""
        out = dy if out is None else out
        args = self._act_backward_args(dy, y, act, pre, alpha, out) \
            if bits_buffer is not None and self._bf16_operand_ok(out) else None
        if args is None:
            return super().act_backward_operand(dy, y, act, pre, alpha, out, bits_buffer)
        bits = bits_buffer(out.shape)
        fn = self._kernel("act_backward.cu", "act_backward_bf16")
        self._launch_1d(fn, dy.size, args[:4] + (bits,) + args[4:])
        return GemmOperand(out, bits)

    def _act_backward_args(self, dy, y, act, pre, alpha, out):
        """act_backward's kernel arguments (dy, y, pre, out, n, act, alpha,
        use_pre), or None when the generic path must run (it raises the error)."""
        spec = get_activation(act)
        use_pre = pre is not None
        needs_y = act in ("sigmoid", "tanh") or not use_pre
        if (spec.needs_pre(alpha) and not use_pre) or (needs_y and y is None):
            return None
        y_arg = y if y is not None else pre
        if not self._fusable(*((dy, y_arg, out) + ((pre,) if use_pre else ()))):
            return None
        return (dy, y_arg, pre if use_pre else y_arg, out, np.int64(dy.size),
                np.int32(spec.code), dy.dtype.type(alpha), np.int32(use_pre))


# Compiled RawModules, one per (device id, kernel file), shared by every
# CupyBackend instance of the process; the lock keeps two threads from
# compiling the same file at once.
_modules: dict = {}
_compile_lock = threading.Lock()


def _on_gpu(x) -> bool:
    """True for a DLPack producer whose data lives in CUDA device memory."""
    probe = getattr(x, "__dlpack_device__", None)
    if probe is None or not callable(probe):
        return False
    try:
        return int(probe()[0]) in _DLPACK_ON_GPU
    except Exception:
        return False
