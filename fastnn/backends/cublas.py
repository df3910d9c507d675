"""cuBLAS GEMMs through a handle of fastnn's own, so a training step can be
captured in a CUDA graph.

Why not CuPy's matmul: CuPy sets the cuBLAS stream before every call and
refuses to while a stream captures (``NotImplementedError: calling cuBLAS API
during stream capture is currently unsupported``, cupy/cupy#6290). cuBLAS
itself captures fine when the handle's stream and workspace are set *before*
the capture starts (cublasSetWorkspace after cublasSetStream, which resets it;
without a preset workspace the graph gets alloc/free nodes). So the CuPy
backend keeps one handle with a fixed workspace and binds it to a stream
only when the stream changes.

The library is the libcublas CuPy already loaded (same version, no second
copy); the six C functions used here have had the same signatures since
CUDA 11. ``gemm_arguments`` turns a row-major product into the column-major
call and is tested on the CPU; everything else needs a GPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

OP_N, OP_T = 0, 1
R_32F, R_64F, R_16BF = 0, 1, 14  # cudaDataType
COMPUTE_32F, COMPUTE_64F, COMPUTE_32F_FAST_TF32 = 68, 70, 77  # cublasComputeType_t
DEFAULT_MATH = 0
GEMM_DEFAULT = -1
WORKSPACE_BYTES = 32 << 20  # what cuBLAS asks for on Hopper (its docs: 32 MiB)
_INT_MAX = 2**31 - 1

_P, _I, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {  # name: argument types; every one returns cublasStatus_t (int)
    "cublasCreate_v2": [_P],
    "cublasDestroy_v2": [_P],
    "cublasSetStream_v2": [_P, _P],
    "cublasSetWorkspace_v2": [_P, _P, _SZ],
    "cublasSetMathMode": [_P, _I],
    "cublasGemmEx": [_P, _I, _I, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _I, _I],
}


class CublasError(RuntimeError):
    """A cuBLAS call returned a status other than CUBLAS_STATUS_SUCCESS."""


def gemm_arguments(a_shape, b_shape, trans_a: bool, trans_b: bool):
    """The column-major cublasGemmEx call for row-major ``C = op(a) @ op(b)``.

    Row-major C (m, n) is column-major C^T (n, m) = op(b)^T op(a)^T, so cuBLAS
    gets b first: returns ``(op_first, op_second, m_cm, n_cm, k, ld_first,
    ld_second, ldc)`` for operands (b, a), with a, b and C C-contiguous 2-D.
    """
    m, k = (a_shape[1], a_shape[0]) if trans_a else tuple(a_shape)
    kb, n = (b_shape[1], b_shape[0]) if trans_b else tuple(b_shape)
    if kb != k:
        raise ValueError(f"gemm: inner dimensions differ: op(a) is ({m}, {k}), op(b) is ({kb}, {n})")
    return (OP_T if trans_b else OP_N, OP_T if trans_a else OP_N,
            n, m, k, b_shape[1], a_shape[1], n)


def _mapped_paths(fragment: str) -> list[str]:
    """Paths of the shared libraries this process has mapped whose name starts
    with ``fragment``, in /proc/self/maps order (by address, so no preference)."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:  # address perms offset dev inode [path]
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                name = path.rsplit("/", 1)[-1]
                if name.startswith(fragment) and ".so" in name and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    return paths


def _cuda_major(cupy):
    """CUDA major version of CuPy's runtime (13 for 13010), or None if unknown."""
    try:
        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # an old or stand-in CuPy: fall back to any mapped libcublas
        return None


def _is_soname(path: str, soname: str) -> bool:
    name = path.rsplit("/", 1)[-1]  # libcublas.so.13 or, from a toolkit, libcublas.so.13.1.0.3
    return name == soname or name.startswith(soname + ".")


def load_library(cupy):
    """CDLL of the libcublas CuPy uses (CuPy loads it with its first handle).

    Another package may have mapped a second libcublas (a CUDA 12 torch next to
    a CUDA 13 CuPy), so the one whose soname matches CuPy's CUDA major comes
    first; dlopen of a bare soname returns the copy already loaded.
    """
    cupy.cuda.device.get_cublas_handle()
    major = _cuda_major(cupy)
    soname = f"libcublas.so.{major}" if major else None
    mapped = _mapped_paths("libcublas.so")
    matching = [path for path in mapped if soname and _is_soname(path, soname)]
    candidates = [*matching, soname, *mapped, ctypes.util.find_library("cublas"),
                  "libcublas.so.13", "libcublas.so.12"]
    errors = []
    for path in dict.fromkeys(filter(None, candidates)):
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(str(exc))
            continue
        declare(lib)
        return lib
    raise OSError("libcublas not found: " + ("; ".join(errors) or "no candidate path"))


def declare(lib) -> None:
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int


def pointer(array) -> int:
    """Device address of a CuPy array (host address for NumPy stand-ins in tests)."""
    data = array.data
    return int(data.ptr) if hasattr(data, "ptr") else int(array.ctypes.data)


class Handle:
    """One cuBLAS handle with a fixed workspace, bound to one stream at a time.

    The workspace serves every stream in turn: on a change of stream the new
    one first waits for what is queued on the old, so two never use it at
    once; a lock keeps a thread's bind and GEMM together."""

    def __init__(self, cupy, lib):
        self._cupy = cupy
        self._lib = lib
        self._lock = threading.Lock()
        handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", ctypes.addressof(handle))
        self._handle = handle.value
        self._check("cublasSetMathMode", self._handle, DEFAULT_MATH)
        # Owned here for the handle's whole life: captured graphs point into it.
        self.workspace = cupy.empty((WORKSPACE_BYTES,), dtype=cupy.uint8)
        self._stream = None  # the bound stream (kept alive: the next one waits on it)
        self._scalars = {
            COMPUTE_32F: (ctypes.c_float(1.0), ctypes.c_float(0.0)),
            COMPUTE_64F: (ctypes.c_double(1.0), ctypes.c_double(0.0)),
        }

    def _check(self, name: str, *args) -> None:
        status = getattr(self._lib, name)(*args)
        if status != 0:
            raise CublasError(f"{name} failed with cublasStatus {status}")

    def bind(self, stream) -> None:
        """Run later GEMMs on the CuPy ``stream`` (call before a capture begins)."""
        previous = self._stream
        if previous is not None and int(previous.ptr) == int(stream.ptr):
            return
        if previous is not None and not (previous.is_capturing() or stream.is_capturing()):
            # GEMMs still queued on the old stream use the one workspace.
            queued = self._cupy.cuda.Event(disable_timing=True)
            queued.record(previous)
            stream.wait_event(queued)
        self._check("cublasSetStream_v2", self._handle, int(stream.ptr))
        # cublasSetStream drops a user workspace: set it again, after.
        self._check("cublasSetWorkspace_v2", self._handle, pointer(self.workspace),
                    WORKSPACE_BYTES)
        self._stream = stream

    def gemm(self, a, b, out, trans_a: bool, trans_b: bool, *, data_type: int,
             compute: int, a_bits=None, b_bits=None) -> None:
        """``out = op(a) @ op(b)`` for C-contiguous 2-D arrays (no checks here).

        ``data_type`` is the cudaDataType of the inputs; for bf16 the caller
        passes the converted inputs as ``a_bits``/``b_bits`` (uint16 arrays
        of a's and b's shapes) and ``out`` stays float32.
        """
        # m_cm, n_cm: the column-major call's dimensions (C^T is n x m)
        op_1, op_2, m_cm, n_cm, k, ld_1, ld_2, ldc = gemm_arguments(a.shape, b.shape, trans_a,
                                                                    trans_b)
        if max(m_cm, n_cm, k, ld_1, ld_2) > _INT_MAX:
            raise ValueError(f"gemm: dimension over 2^31-1 for cuBLAS: {a.shape} @ {b.shape}")
        out_type = R_64F if compute == COMPUTE_64F else R_32F
        alpha, beta = self._scalars[COMPUTE_64F if compute == COMPUTE_64F else COMPUTE_32F]
        first = b if b_bits is None else b_bits
        second = a if a_bits is None else a_bits
        with self._lock:
            self.bind(self._cupy.cuda.get_current_stream())
            self._check(
                "cublasGemmEx", self._handle, op_1, op_2, m_cm, n_cm, k, ctypes.addressof(alpha),
                pointer(first), data_type, ld_1, pointer(second), data_type, ld_2,
                ctypes.addressof(beta), pointer(out), out_type, ldc, compute, GEMM_DEFAULT,
            )

    def close(self) -> None:
        if self._handle is not None:
            self._lib.cublasDestroy_v2(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass
