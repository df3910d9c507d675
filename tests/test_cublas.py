"""fastnn/backends/cublas.py through real ctypes, against a C stand-in for libcublas.

``tests/native/cublas_shim.c`` has the C prototypes of cublas_api.h and does
the column-major GEMM in host memory, so these tests exercise what the fake
Python cuBLAS of tests/fake_cupy.py cannot: the declared argument types, the
int/pointer widths, alpha/beta passed as host pointers, the workspace being
set after the stream (the shim drops it on setStream, as cuBLAS does), and
finding the library CuPy loaded. On a GPU the same calls get device pointers
(tests/test_cuda_graph.py's ``gpu`` tests).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_cupy import _fake_cupy, on_device
from fastnn.backends import cublas
from fastnn.precision import bf16_bits, bf16_round

SHIM = Path(__file__).resolve().parent / "native" / "cublas_shim.c"
REPO = Path(__file__).resolve().parents[1]


def _build(out: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the libcublas stand-in")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(SHIM)], check=True,
                   capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The stand-in, loaded under a name no real libcublas has."""
    lib = ctypes.CDLL(str(_build(tmp_path_factory.mktemp("shim") / "libfastnn_cublas_shim.so")))
    cublas.declare(lib)
    lib.shim_gemm_count.restype = ctypes.c_longlong
    return lib


@pytest.fixture
def fake_cupy():
    return _fake_cupy([])


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_through_ctypes_matches_numpy(shim, fake_cupy, trans_a, trans_b, dtype):
    handle = cublas.Handle(fake_cupy, shim)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3)).astype(dtype), rng.standard_normal((3, 5)).astype(dtype)
    a_arg = np.ascontiguousarray(a.T) if trans_a else a
    b_arg = np.ascontiguousarray(b.T) if trans_b else b
    out = np.full((7, 5), np.nan, dtype)
    wide = dtype == np.float64
    before = shim.shim_gemm_count()
    handle.gemm(a_arg, b_arg, out, trans_a, trans_b,
                data_type=cublas.R_64F if wide else cublas.R_32F,
                compute=cublas.COMPUTE_64F if wide else cublas.COMPUTE_32F)
    assert shim.shim_gemm_count() == before + 1
    np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-6 if not wide else 1e-13)


def test_bf16_gemm_reads_the_bits_and_writes_float32(shim, fake_cupy):
    handle = cublas.Handle(fake_cupy, shim)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    out = np.zeros((4, 3), np.float32)
    handle.gemm(a, b, out, False, False, data_type=cublas.R_16BF, compute=cublas.COMPUTE_32F,
                a_bits=bf16_bits(a), b_bits=bf16_bits(b))
    np.testing.assert_allclose(out, bf16_round(a).astype(np.float64) @ bf16_round(b), rtol=1e-6)


def test_workspace_is_set_again_after_every_stream_change(shim, fake_cupy):
    """The shim fails a GEMM without a workspace, as a capture would record
    allocations: binding a new stream must set the workspace again after it."""
    handle = cublas.Handle(fake_cupy, shim)
    a = np.eye(3, dtype=np.float32)
    for stream in (fake_cupy.cuda.Stream(non_blocking=True), fake_cupy.cuda.Stream(non_blocking=True)):
        with stream:
            handle.gemm(a, a, np.empty_like(a), False, False, data_type=cublas.R_32F,
                        compute=cublas.COMPUTE_32F)


def test_a_failed_call_raises_with_its_name_and_status(shim, fake_cupy):
    handle = cublas.Handle(fake_cupy, shim)
    a = np.eye(3, dtype=np.float32)
    handle.gemm(a, a, np.empty_like(a), False, False, data_type=cublas.R_32F,
                compute=cublas.COMPUTE_32F)  # live: bound to the current stream
    handle.close()
    handle._handle = ctypes.addressof(ctypes.c_int(0))  # the shim: NOT_INITIALIZED (1)
    with pytest.raises(cublas.CublasError, match=r"cublasGemmEx failed with cublasStatus 1"):
        handle.gemm(a, a, np.empty_like(a), False, False, data_type=cublas.R_32F,
                    compute=cublas.COMPUTE_32F)


def test_cupy_backend_probe_and_ops_through_ctypes(shim, monkeypatch):
    """CupyBackend's start-up check and its GEMM ops, with real ctypes calls."""
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cublas, "load_library", lambda cupy: shim)
    backend = cupy_backend.CupyBackend()
    assert backend._blas is not None, backend.blas_status
    assert backend.blas_status.startswith("own cuBLAS handle on libfastnn_cublas_shim.so (")
    rng = np.random.default_rng(2)
    dz = rng.standard_normal((9, 4)).astype(np.float32)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    # Both through the shim, not CuPy's matmul (the generic fallback).
    monkeypatch.setattr(sys.modules["cupy"], "matmul", None, raising=False)
    np.testing.assert_allclose(backend.gemm(on_device(x), on_device(dz), trans_a=True), x.T @ dz,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(backend.bias_grad(on_device(dz)), dz.sum(0), rtol=1e-5, atol=1e-6)


def _load_library_in_a_fresh_process(tmp_path, mapped: list[Path], runtime_version):
    """Run cublas.load_library in a new process whose stand-in CuPy maps the
    libraries ``mapped`` (in that order) on its first handle and reports
    ``runtime_version`` (None: a CuPy without runtimeGetVersion). A fresh
    process, so no real libcublas is around to be found instead. Returns
    (path of the library loaded, its maps lines were found, flags)."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps here")
    runtime = ("" if runtime_version is None
               else f"runtime=types.SimpleNamespace(runtimeGetVersion=lambda: {runtime_version}),")
    script = f"""
import ctypes, sys, types
sys.path.insert(0, {str(REPO)!r})
from fastnn.backends import cublas
loaded = []
def get_cublas_handle():  # what CuPy does: load libcublas
    loaded.extend(ctypes.CDLL(path) for path in {[str(p) for p in mapped]!r})
cupy = types.SimpleNamespace(cuda=types.SimpleNamespace({runtime}
    device=types.SimpleNamespace(get_cublas_handle=get_cublas_handle)))
found = cublas.load_library(cupy)
print(found._name)
print(len(cublas._mapped_paths("libcublas.so")))
print(hasattr(found, "shim_gemm_count"), found.cublasGemmEx.restype is ctypes.c_int)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    path, count, flags = proc.stdout.split("\n")[:3]
    return Path(path), int(count), flags


def test_load_library_finds_the_libcublas_this_process_mapped(tmp_path):
    """After CuPy's first handle, libcublas is in /proc/self/maps: that file is
    the one loaded (same version as CuPy's, no second copy)."""
    lib = _build(tmp_path / "libcublas.so.13")
    for runtime_version in (13010, None):
        path, count, flags = _load_library_in_a_fresh_process(tmp_path, [lib], runtime_version)
        assert (path, count, flags) == (lib, 1, "True True")


@pytest.mark.parametrize("runtime_version, expected", [(13010, "13"), (12040, "12")])
@pytest.mark.parametrize("map_first", ["12", "13"])
def test_load_library_picks_cupys_cuda_major_when_two_are_mapped(tmp_path, runtime_version,
                                                                  expected, map_first):
    """A CUDA 12 torch next to a CUDA 13 CuPy maps two libcublas; maps lines are
    sorted by address, so which comes first says nothing. The one whose soname
    is CuPy's CUDA major is loaded, whatever the mapping order."""
    libs = {}
    for major in ("12", "13"):
        folder = tmp_path / f"cuda{major}"
        folder.mkdir()
        # A toolkit's file name carries the full version after the soname.
        libs[major] = _build(folder / f"libcublas.so.{major}.1.0.3")
    order = [libs[map_first]] + [lib for major, lib in libs.items() if major != map_first]
    path, count, flags = _load_library_in_a_fresh_process(tmp_path, order, runtime_version)
    assert (path, count, flags) == (libs[expected], 2, "True True")


def test_gemm_arguments_are_the_column_major_call():
    # C (2, 5) = a (2, 3) @ b (3, 5): cuBLAS computes C^T (5, 2) = b^T a^T.
    assert cublas.gemm_arguments((2, 3), (3, 5), False, False) == (
        cublas.OP_N, cublas.OP_N, 5, 2, 3, 5, 3, 5)
    # a stored (3, 2) used as a.T; b stored (5, 3) used as b.T
    assert cublas.gemm_arguments((3, 2), (5, 3), True, True) == (
        cublas.OP_T, cublas.OP_T, 5, 2, 3, 3, 2, 5)


def _raw_gemm(handle, transa, transb, m, n, k, lda, ldb, ldc, *, ab_type=cublas.R_32F,
              c_type=cublas.R_32F, compute=cublas.COMPUTE_32F):
    """cublasGemmEx straight into the shim through ``handle``, column-major
    arguments as given (buffers big enough for any of them)."""
    handle.bind(handle._cupy.cuda.get_current_stream())
    size = max(lda, ldb, ldc, 1) * max(m, n, k, 1)
    a, b = np.zeros(size, np.float64), np.zeros(size, np.float64)
    c = np.zeros(size, np.float64)
    alpha, beta = handle._scalars[cublas.COMPUTE_64F if compute == cublas.COMPUTE_64F
                                  else cublas.COMPUTE_32F]
    handle._check("cublasGemmEx", handle._handle, transa, transb, m, n, k,
                  ctypes.addressof(alpha), cublas.pointer(a), ab_type, lda, cublas.pointer(b),
                  ab_type, ldb, ctypes.addressof(beta), cublas.pointer(c), c_type, ldc, compute,
                  cublas.GEMM_DEFAULT)


@pytest.mark.parametrize("transa", [cublas.OP_N, cublas.OP_T])
@pytest.mark.parametrize("transb", [cublas.OP_N, cublas.OP_T])
@pytest.mark.parametrize("short", ["lda", "ldb", "ldc"])
def test_shim_rejects_a_too_small_leading_dimension(shim, fake_cupy, transa, transb, short):
    """As cuBLAS: lda >= max(1, op N ? m : k), ldb >= max(1, op N ? k : n),
    ldc >= max(1, m), else CUBLAS_STATUS_INVALID_VALUE (7). m, n, k differ, so
    a leading dimension taken from the wrong extent fails."""
    handle = cublas.Handle(fake_cupy, shim)
    m, n, k = 5, 2, 3
    lds = {"lda": m if transa == cublas.OP_N else k,
           "ldb": k if transb == cublas.OP_N else n, "ldc": m}
    _raw_gemm(handle, transa, transb, m, n, k, **lds)  # the smallest valid ones pass
    lds[short] -= 1
    with pytest.raises(cublas.CublasError, match=r"cublasGemmEx failed with cublasStatus 7$"):
        _raw_gemm(handle, transa, transb, m, n, k, **lds)


@pytest.mark.parametrize("ab_type, c_type, compute", [
    (cublas.R_16BF, cublas.R_32F, cublas.COMPUTE_64F),
    (cublas.R_32F, cublas.R_64F, cublas.COMPUTE_32F),
    (cublas.R_64F, cublas.R_64F, cublas.COMPUTE_32F),
    (cublas.R_16BF, cublas.R_16BF, cublas.COMPUTE_32F),
])
def test_shim_rejects_an_unsupported_type_combination(shim, fake_cupy, ab_type, c_type, compute):
    handle = cublas.Handle(fake_cupy, shim)
    with pytest.raises(cublas.CublasError, match=r"cublasGemmEx failed with cublasStatus 15$"):
        _raw_gemm(handle, cublas.OP_N, cublas.OP_N, 4, 4, 4, 4, 4, 4, ab_type=ab_type,
                  c_type=c_type, compute=compute)
