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
"""
from __future__ import annotations

import functools
import re
import threading

import numpy as np

from ..errors import BackendUnavailable, CaptureUnsupported, FastnnError
from ..precision import get_precision
from . import cublas, kernel_sources
from .activations import get_activation
from .base import Backend, GemmOperand, adam_bias_correction, gemm_array, host_array
from .constants import BCE_EPSILON

_FLOATS = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_LABELS = {np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}
# No FMA contraction: the optimizer kernels must round exactly like the NumPy
# reference (mul, then add), or trajectories drift by an ulp per step. CuPy
# appends -ftz=true after these (float32 subnormals flush to zero, as in its own
# kernels; a later -ftz=false of ours would lose): see kernels/README.md.
_COMPILE_OPTIONS = ("--fmad=false",)
_BLOCK = 256  # threads per block of the elementwise (grid-stride) kernels
_MAX_ROW_BLOCKS = 1 << 24  # softmax_xent walks further rows with a grid-stride loop
# softmax_xent_small (one block, a thread per row, the mean included) up to
# these sizes: a batch of a small classifier in one launch instead of two.
_SMALL_XENT_ROWS, _SMALL_XENT_COLS = 1024, 32
_DLPACK_ON_GPU = {2, 13}  # kDLCUDA, kDLCUDAManaged
_MSE_BLOCKS = 1024  # fixed partial-sum count per size: the loss is deterministic
_SMALL_MSE = 8192  # mse in one block (one launch) up to this many elements
_SMALL_BCE = 1 << 16  # bce / bce_with_logits in one block (one launch) up to this many
# act_backward_bias (one block per 32 columns) up to this many rows; larger
# batches keep act_backward + the ones-GEMM, which spread over the whole device.
FUSED_BIAS_GRAD_MAX_ROWS = 1024
_BIAS_ROWS = 32  # act_backward.cu's FN_BIAS_ROWS: the block's second dimension


class GPUOutOfMemory(FastnnError, MemoryError):
    """A CuPy op ran out of device memory; the message names the op and the size."""


# ---------------------------------------------------------------- set-up
def _one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (reasons must fit on one line)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


# Most threads per block of the block-reduction kernels. The kernels allow 1024,
# but a 1024-thread block gets at most 64 registers a thread and the float64
# softmax_xent_small already needs 62 (NVRTC 13, sm_90): another compiler's
# choice must not make the launch fail ("too many resources requested").
_MAX_REDUCE_THREADS = 512


def _compile_errors(cupy) -> tuple:
    """What RawModule raises for a kernel file that does not compile (NVRTC) or
    compiles but does not load (the driver: e.g. an architecture it cannot run)."""
    driver = getattr(cupy.cuda, "driver", None)
    loading = getattr(driver, "CUDADriverError", None)
    return (cupy.cuda.compiler.CompileException,) + ((loading,) if loading else ())


def _one_block_threads(n: int) -> int:
    """Block size of a one-block kernel over n items: whole warps, at most 512."""
    return min(-(-n // 32) * 32, _MAX_REDUCE_THREADS)


def _row_threads(n_cols: int) -> int:
    """Block size for one row of softmax_xent: ~4 columns per thread, 32..512."""
    threads = 32
    while threads * 4 < n_cols and threads < _MAX_REDUCE_THREADS:
        threads *= 2
    return threads


def _oom_guard(op: str, estimate):
    """Turn CuPy's OutOfMemoryError inside ``op`` into GPUOutOfMemory.

    ``estimate(*args, **kwargs)`` gives the bytes the op works on, used when
    CuPy's message does not say how much was requested.
    """

    def decorate(method):
        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except self._oom_error as exc:
                try:
                    size = int(estimate(*args, **kwargs))
                except Exception:  # never let the estimate hide the real error
                    size = 0
                raise self._memory_error(op, size, exc) from exc

        return guarded

    return decorate


def _nbytes(*arrays) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)


class CupyBackend(Backend):
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
        self.blas_status = self._start_own_cublas()

    # ------------------------------------------------------------ arrays
    @property
    def device(self) -> str:
        return self._device

    @property
    def capturing(self) -> bool:
        return self._capture is not None

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

    # ------------------------------------------------------------ cuBLAS
    def _start_own_cublas(self) -> str:
        """Start fastnn's own cuBLAS handle (CUDA graphs can record its GEMMs,
        not CuPy's) and check its exact GEMM on every transpose case against the
        product computed on the host (not ``cupy.matmul``, which is TF32 when the
        backend starts under ``set_precision("tf32")``); returns the status line
        ``fastnn info`` prints. On any failure GEMMs stay with CuPy and training
        steps are not captured."""
        cupy = self.xp
        try:
            lib = cublas.load_library(cupy)
            self._blas = cublas.Handle(cupy, lib)
            rng = np.random.default_rng(0)
            for dtype in (np.float32, np.float64):
                a_host = rng.standard_normal((5, 3)).astype(dtype)
                b_host = rng.standard_normal((3, 4)).astype(dtype)
                want = a_host.astype(np.float64) @ b_host.astype(np.float64)
                a, b = cupy.asarray(a_host), cupy.asarray(b_host)
                at, bt = cupy.ascontiguousarray(a.T), cupy.ascontiguousarray(b.T)
                for x, y, ta, tb in ((a, b, False, False), (at, b, True, False),
                                     (a, bt, False, True), (at, bt, True, True)):
                    got = self._gemm(x, y, None, ta, tb, "float32")
                    # exact float32 is ~1e-7 here; TF32 or a wrong layout is >= 1e-4
                    err = float(np.abs(host_array(got) - want).max())
                    if not err <= 1e-5:
                        raise RuntimeError(f"{dtype.__name__} trans=({ta}, {tb}) differs from "
                                           f"the exact product by {err:.3g}")
        except Exception as exc:
            self._blas = None
            return f"CuPy's matmul (own cuBLAS handle unusable: {_one_line(exc)})"
        # Which libcublas file: another package may have mapped a second one.
        name = str(getattr(lib, "_name", "") or "").rsplit("/", 1)[-1]
        on = f" on {name}" if name else ""
        return f"own cuBLAS handle{on} (training steps can be captured in CUDA graphs)"

    def _blas_operands(self, a, b, out) -> bool:
        nd = self.xp.ndarray
        if not (isinstance(a, nd) and isinstance(b, nd) and a.ndim == 2 and b.ndim == 2):
            return False
        if a.dtype not in _FLOATS or b.dtype != a.dtype:
            return False
        if not (a.flags.c_contiguous and b.flags.c_contiguous):
            return False
        return out is None or (isinstance(out, nd) and out.dtype == a.dtype
                               and out.flags.c_contiguous)

    @_oom_guard("gemm", lambda a, b, *r, **k: _nbytes(gemm_array(a), gemm_array(b)))
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False):
        """``out = op(a) @ op(b)`` on fastnn's cuBLAS handle, at the GEMM precision
        of ``fn.set_precision`` (float32, TF32 or bf16 inputs; float64 exact).
        ``a``/``b`` may be ``gemm_operand`` results (bf16 bits converted once)."""
        return self._gemm(a, b, out, trans_a, trans_b, get_precision())

    @property
    def prepares_gemm_operands(self) -> bool:
        return self._blas is not None and get_precision() == "bf16"

    def gemm_operand(self, x, bits_buffer):
        """Under bf16, ``x`` (float32, 2-D, C-contiguous) with its bf16 bits in
        ``bits_buffer(shape)``: a layer converts its input and weight once in the
        forward pass and its ``dz`` once in the backward pass, not per GEMM."""
        if not (self._bf16_operand_ok(x) and self._fusable(x)):
            return x
        return GemmOperand(x, self._write_bf16(x, bits_buffer(x.shape)))

    def _gemm(self, a, b, out, trans_a, trans_b, precision: str):
        a_bits, b_bits = getattr(a, "bits", None), getattr(b, "bits", None)
        a, b = gemm_array(a), gemm_array(b)
        blas = self._blas
        if blas is None or not self._blas_operands(a, b, out):
            if precision == "bf16" and a.dtype == b.dtype == np.float32:
                # CuPy's matmul has no bf16 inputs: give it the bf16 values (their
                # products are exact in float32, as in a bf16 GEMM's accumulation)
                a, b = self._bf16_rounded(a), self._bf16_rounded(b)
            return super().gemm(a, b, out, trans_a, trans_b)
        m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
        kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
        if kb != k or 0 in (m, n, k) or (out is not None and out.shape != (m, n)):
            return super().gemm(a, b, out, trans_a, trans_b)  # CuPy's error, or an empty product
        if out is None:
            out = self.xp.empty((m, n), dtype=a.dtype)
        if a.dtype == np.float64:
            blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_64F,
                      compute=cublas.COMPUTE_64F)
        elif precision == "bf16":
            blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_16BF,
                      compute=cublas.COMPUTE_32F,
                      a_bits=self._to_bf16(a, "a") if a_bits is None else a_bits,
                      b_bits=self._to_bf16(b, "b") if b_bits is None else b_bits)
        else:
            compute = cublas.COMPUTE_32F_FAST_TF32 if precision == "tf32" else cublas.COMPUTE_32F
            blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_32F, compute=compute)
        return out

    def _to_bf16(self, x, operand: str):
        """bf16 bits of float32 ``x`` (round to nearest even) in a reused scratch buffer."""
        key = (operand, x.size)
        bits = self._bf16.get(key)
        if bits is None:
            bits = self._bf16[key] = self.xp.empty((x.size,), dtype=np.uint16)
        return self._write_bf16(x, bits)

    def _bf16_rounded(self, x):
        """float32 ``x`` rounded to bf16, as float32 values (a new array)."""
        x = self.xp.ascontiguousarray(x)
        if x.size == 0:
            return x  # nothing to round (and a launch of no blocks is an error)
        bits = self._write_bf16(x, self.xp.empty((x.size,), dtype=np.uint16))
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(x.shape)

    def _write_bf16(self, x, bits):
        """One f32_to_bf16 launch: ``bits`` (uint16, x.size elements) = bf16(x)."""
        self._launch_1d(self._kernel("convert.cu", "f32_to_bf16"), x.size,
                        (x, bits, np.int64(x.size)))
        return bits

    def bias_grad(self, dz, out=None):
        """Column sums of dz (N, F) as ``ones(1, N) @ dz`` on cuBLAS, always exact
        float32 (gradients never take TF32/bf16 shortcuts)."""
        ok_out = out is None or (self._fusable(out) and out.dtype == dz.dtype
                                 and out.shape == dz.shape[1:])
        if self._blas is None or dz.ndim != 2 or not self._fusable(dz) \
                or not ok_out:
            return super().bias_grad(dz, out)
        n, f = dz.shape
        ones = self._ones.get((n, dz.dtype))
        if ones is None:
            # While recording, the fill is recorded, not run: garbage if the recording fails.
            if self.capturing:
                raise CaptureUnsupported(f"bias_grad over {n} rows first runs while a CUDA graph "
                                         "records (run one ordinary step first)")
            ones = self._ones[(n, dz.dtype)] = self.xp.ones((1, n), dtype=dz.dtype)
        if out is None:
            out = self.xp.empty((f,), dtype=dz.dtype)
        self._gemm(ones, dz, out.reshape(1, f), False, False, "float32")
        return out

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
            if not (isinstance(a, nd) and a.dtype == first.dtype and a.flags.c_contiguous):
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

    def _bf16_operand_ok(self, x) -> bool:
        """``x`` can take its bf16 bits in the pass that writes it (gemm_operand's test)."""
        return self.prepares_gemm_operands and x.dtype == np.float32 and x.ndim == 2

    # ------------------------------------------------------------ losses
    @_oom_guard("softmax_xent", lambda logits, *a, **k: _nbytes(logits) + 8 * logits.shape[0])
    def softmax_xent(self, logits, labels, grad_out=None):
        """Mean cross-entropy of logits (N, C) against int labels (N,).

        Returns ``(loss, dlogits)``: loss a 0-d device array of logits' dtype
        (no host sync), dlogits (N, C) = (softmax - onehot) / N, written to
        ``grad_out`` when given (which may be ``logits`` itself).
        """
        cupy = self.xp
        if not (self._fusable(logits) and logits.ndim == 2 and logits.shape[1] > 0):
            return super().softmax_xent(logits, labels, grad_out)
        n, c = logits.shape
        dev_labels = self._device_labels(labels, n)
        if dev_labels is None or not (grad_out is None or self._fusable(logits, grad_out)):
            return super().softmax_xent(
                logits, labels if dev_labels is None else dev_labels, grad_out
            )
        grad = cupy.empty_like(logits) if grad_out is None else grad_out
        suffix = f"{_FLOATS[logits.dtype]}_{_LABELS[dev_labels.dtype]}"
        inv_n = logits.dtype.type(1.0 / n)
        if n <= _SMALL_XENT_ROWS and c <= _SMALL_XENT_COLS:
            loss = cupy.empty((), dtype=logits.dtype)
            fn = self._kernel("softmax_xent.cu", f"softmax_xent_small_{suffix}")
            # a thread per row (two for n > 512)
            fn((1,), (_one_block_threads(n),), (logits, dev_labels, grad, loss, np.int64(n),
                                                 np.int64(c), inv_n))
            return loss, grad
        row_loss = cupy.empty((n,), dtype=logits.dtype)
        fn = self._kernel("softmax_xent.cu", f"softmax_xent_{suffix}")
        fn((min(n, _MAX_ROW_BLOCKS),), (_row_threads(c),), (
            logits, dev_labels, grad, row_loss, np.int64(n), np.int64(c), inv_n,
        ))
        # Per-row losses + a tree mean: deterministic, unlike atomicAdd.
        return self._scaled_sum(row_loss, 1.0 / n), grad

    def _scaled_sum(self, x, scale: float):
        """0-d device array ``scale * sum(x)`` (x 1-D, contiguous), one block."""
        out = self.xp.empty((), dtype=x.dtype)
        fn = self._kernel("reduce.cu", f"sum_scaled_{_FLOATS[x.dtype]}")
        fn((1,), (_row_threads(x.size),), (x, out, np.int64(x.size), x.dtype.type(scale)))
        return out

    @_oom_guard("mse", lambda pred, *a, **k: 2 * _nbytes(pred))
    def mse(self, pred, target, grad_out):
        """Mean squared error and its gradient (no cuBLAS dot: recordable in a
        CUDA graph), deterministic for a given size: one launch up to
        _SMALL_MSE elements (one block, its partial sum is the loss), else
        per-block partial sums and their mean (two)."""
        if not self._fusable(pred, target, grad_out):
            return super().mse(pred, target, grad_out)
        n = pred.size
        t = pred.dtype.type
        fn = self._kernel("reduce.cu", f"mse_partial_{_FLOATS[pred.dtype]}")
        if n <= _SMALL_MSE:
            loss = self.xp.empty((), dtype=pred.dtype)
            fn((1,), (_one_block_threads(n),), (pred, target, grad_out, loss, np.int64(n),
                                                 t(2.0 / n), t(1.0 / n)))
            return loss, grad_out
        blocks = min((n + _BLOCK - 1) // _BLOCK, _MSE_BLOCKS)
        partial = self.xp.empty((blocks,), dtype=pred.dtype)
        fn((blocks,), (_BLOCK,), (pred, target, grad_out, partial, np.int64(n), t(2.0 / n),
                                  t(1.0)))
        return self._scaled_sum(partial, 1.0 / n), grad_out

    @_oom_guard("bce", lambda pred, *a, **k: 3 * _nbytes(pred))
    def bce(self, pred, target, grad_out, seen=None):
        """Binary cross-entropy, its gradient and fit's range check in one launch
        (kernels/bce.cu) for up to _SMALL_BCE elements; else the generic ops."""
        seen_ok = seen is None or (isinstance(seen, self.xp.ndarray) and seen.dtype == pred.dtype
                                   and seen.flags.c_contiguous and seen.size >= 3)
        if not (self._fusable(pred, target, grad_out) and pred.size <= _SMALL_BCE and seen_ok):
            return super().bce(pred, target, grad_out, seen)
        n, t = pred.size, pred.dtype.type
        loss = self.xp.empty((), dtype=pred.dtype)
        fn = self._kernel("bce.cu", f"bce_{_FLOATS[pred.dtype]}")
        fn((1,), (_one_block_threads(n),), (
            pred, target, grad_out, loss, loss if seen is None else seen,  # (unread without seen)
            np.int32(seen is not None), np.int64(n), t(1.0 / n), t(BCE_EPSILON),
        ))
        return loss, grad_out

    @_oom_guard("bce_with_logits", lambda logits, *a, **k: 3 * _nbytes(logits))
    def bce_with_logits(self, logits, target, grad_out):
        """Binary cross-entropy of logits and its gradient in one launch for up to
        _SMALL_BCE elements; else the generic ops."""
        if not (self._fusable(logits, target, grad_out) and logits.size <= _SMALL_BCE):
            return super().bce_with_logits(logits, target, grad_out)
        n = logits.size
        loss = self.xp.empty((), dtype=logits.dtype)
        fn = self._kernel("bce.cu", f"bce_logits_{_FLOATS[logits.dtype]}")
        fn((1,), (_one_block_threads(n),), (logits, target, grad_out, loss, np.int64(n),
                                             logits.dtype.type(1.0 / n)))
        return loss, grad_out

    def _device_labels(self, labels, n: int):
        """Labels as a contiguous int32/int64 device vector of length n, else None."""
        cupy = self.xp
        if not isinstance(labels, cupy.ndarray):
            labels = self.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            return None
        if labels.dtype not in _LABELS:
            labels = labels.astype(np.int64)
        return cupy.ascontiguousarray(labels)

    # ------------------------------------------------------------ optimizers
    # One launch per flat buffer; the math order is that of Backend.*_step
    # (torch.optim's single-tensor path), see kernels/optim.cu.
    @_oom_guard("sgd_step", lambda param, *a, **k: 2 * _nbytes(param))
    def sgd_step(self, param, grad, buf, *, lr, momentum, dampening, nesterov,
                 weight_decay, first_step):
        use_momentum = bool(momentum)
        arrays = (param, grad) + ((buf,) if use_momentum else ())
        if self._capture is not None and first_step and use_momentum:
            raise CaptureUnsupported("SGD's first momentum step differs from the later ones")
        if not self._fusable(*arrays, same_shape=False):
            return super().sgd_step(
                param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                nesterov=nesterov, weight_decay=weight_decay, first_step=first_step,
            )
        t = param.dtype.type
        fn = self._kernel("optim.cu", f"sgd_{_FLOATS[param.dtype]}")
        self._launch_1d(fn, param.size, (
            param, grad, buf if use_momentum else grad, np.int64(param.size), t(lr),
            t(momentum), t(1 - dampening), t(weight_decay), np.int32(bool(nesterov)),
            np.int32(bool(first_step)), np.int32(use_momentum), np.int32(bool(weight_decay)),
        ))

    @_oom_guard("adam_step", lambda param, *a, **k: 3 * _nbytes(param))
    def adam_step(self, param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1,
                  beta2, eps, weight_decay, decoupled):
        if not self._fusable(param, grad, exp_avg, exp_avg_sq, same_shape=False):
            if self._capture is not None:  # the generic path would freeze the bias corrections
                raise CaptureUnsupported("Adam on buffers the fused kernel does not take")
            return super().adam_step(
                param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
            )
        t = param.dtype.type
        suffix = _FLOATS[param.dtype]
        # Host-side scalars in double, rounded once to the array dtype (as base.py).
        head = (param, grad, exp_avg, exp_avg_sq, np.int64(param.size), t(1 - beta1), t(beta2),
                t(1 - beta2))
        tail = (t(eps), t(weight_decay), t(1 - lr * weight_decay), np.int32(bool(weight_decay)),
                np.int32(bool(decoupled)))
        if self._capture is None:
            fn = self._kernel("optim.cu", f"adam_{suffix}")
            step_scalars = tuple(map(t, adam_bias_correction(step, lr, beta1, beta2)))
        else:  # a graph replays this launch every step: the bias corrections come from memory
            fn = self._kernel("optim.cu", f"adam_captured_{suffix}")
            step_scalars = (self._capture.step_scalars(
                lambda s: adam_bias_correction(s, lr, beta1, beta2), param.dtype),)
        self._launch_1d(fn, param.size, head + step_scalars + tail)

    @_oom_guard("rmsprop_step", lambda param, *a, **k: 3 * _nbytes(param))
    def rmsprop_step(self, param, grad, square_avg, *, lr, alpha, eps,
                     weight_decay, momentum, buf, centered, grad_avg):
        use_momentum = momentum > 0
        arrays = (param, grad, square_avg) + ((buf,) if use_momentum else ()) + (
            (grad_avg,) if centered else ()
        )
        if not self._fusable(*arrays, same_shape=False):
            return super().rmsprop_step(
                param, grad, square_avg, lr=lr, alpha=alpha, eps=eps,
                weight_decay=weight_decay, momentum=momentum, buf=buf, centered=centered,
                grad_avg=grad_avg,
            )
        t = param.dtype.type
        fn = self._kernel("optim.cu", f"rmsprop_{_FLOATS[param.dtype]}")
        self._launch_1d(fn, param.size, (
            param, grad, square_avg, buf if use_momentum else param,
            grad_avg if centered else param, np.int64(param.size), t(lr), t(alpha),
            t(1 - alpha), t(eps), t(weight_decay), t(momentum), np.int32(bool(weight_decay)),
            np.int32(bool(centered)), np.int32(use_momentum),
        ))


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
