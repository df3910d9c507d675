"""fn.set_precision: the GEMM precision policy (exact float32 unless asked for TF32 or bf16).

The bf16 rounding itself (bf16_bits / bf16_round, kernels/convert.cu) is tested in
tests/test_bf16.py."""
import sys
import types

import numpy as np
import pytest

import fastnn as fn
from fastnn import precision


@pytest.fixture(autouse=True)
def restore_policy():
    yield
    fn.set_precision("float32")  # also CuPy's compute type, where CuPy is loaded


def test_default_is_exact_float32():
    assert fn.get_precision() == "float32"


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of .*'float32', 'tf32', 'bf16'.*got 'fp8'"):
        fn.set_precision("fp8")
    with pytest.raises(ValueError, match="got 'bfloat16'"):  # only the exact names
        fn.set_precision("bfloat16")
    assert fn.get_precision() == "float32"  # a refused mode changes nothing


@pytest.mark.parametrize("mode", precision.PRECISIONS)
def test_every_mode_is_accepted_and_reported(mode):
    fn.set_precision(mode)
    assert fn.get_precision() == mode


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_cpu_results_do_not_change_with_a_gpu_mode(mode):
    x = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    with fn.use_backend("numpy"):  # not "auto": that is cupy on a GPU machine
        model = fn.Sequential(fn.Linear(5, 3))
        before = fn.to_numpy(model(x))
        fn.set_precision(mode)
        np.testing.assert_array_equal(fn.to_numpy(model(x)), before)


def test_policy_sets_cupys_float32_compute_type(monkeypatch):
    """Stand-in for cupy._core._routines_linalg, with CuPy's constants and
    set_compute_type signature: the policy must pick TF32 or the default.
    bf16 keeps CuPy exact: fastnn's own cuBLAS handle runs the bf16 GEMMs."""
    calls = []
    linalg = types.SimpleNamespace(
        COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
        set_compute_type=lambda dtype, kind: calls.append((np.dtype(dtype), kind)),
    )
    core = types.SimpleNamespace(_routines_linalg=linalg)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(_core=core))
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    fn.set_precision("tf32")
    fn.set_precision("bf16")
    fn.set_precision("float32")
    f32 = np.dtype(np.float32)
    assert calls == [(f32, 7), (f32, 1), (f32, 1)]


@pytest.mark.gpu
def test_tf32_changes_gpu_gemms_and_float32_is_exact():
    if fn.available_backends()["cupy"] is not None:
        pytest.skip(fn.available_backends()["cupy"])
    import cupy

    with fn.use_backend("cupy") as b:
        a = cupy.full((256, 256), 1.0001, cupy.float32)
        exact = float(b.gemm(a, a)[0, 0])
        fn.set_precision("tf32")
        fast = float(b.gemm(a, a)[0, 0])
        fn.set_precision("float32")
        assert abs(exact - 256 * 1.0001 ** 2) < 1e-3 and abs(fast - exact) > 1e-3


def test_a_cupy_without_the_switch_only_fails_for_tf32(monkeypatch):
    core = types.SimpleNamespace(_routines_linalg=types.SimpleNamespace())  # no constants
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(_core=core))
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", core._routines_linalg)
    fn.set_precision("float32")  # exact is CuPy's own default: nothing to do
    fn.set_precision("bf16")  # leaves CuPy exact too
    assert fn.get_precision() == "bf16"
    fn.set_precision("float32")
    with pytest.raises(NotImplementedError, match="CUPY_TF32=1"):
        fn.set_precision("tf32")
    assert fn.get_precision() == "float32"  # a refused switch changes nothing


def test_cupy_installed_without_a_gpu_takes_every_mode(monkeypatch):
    """CuPy on a laptop with no usable GPU: its TF32 switch fails (it reads the
    device's compute capability), but no CuPy GEMM can run there, so
    set_precision takes the mode; with a device, the same failure is raised."""

    class CUDARuntimeError(RuntimeError):
        pass

    def set_compute_type(dtype, kind):
        if kind == 7:
            raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                                   "insufficient for CUDA runtime version")

    def no_driver():
        raise CUDARuntimeError("cudaErrorInsufficientDriver")

    linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
                                   set_compute_type=set_compute_type)
    core = types.SimpleNamespace(_routines_linalg=linalg)
    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        _core=core, cuda=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    try:
        for mode in ("tf32", "bf16", "float32", "tf32"):
            fn.set_precision(mode)
            assert fn.get_precision() == mode
        fn.set_precision("float32")
        runtime.getDeviceCount = lambda: 1  # a device there: its failure is the user's to see
        with pytest.raises(CUDARuntimeError, match="InsufficientDriver"):
            fn.set_precision("tf32")
        assert fn.get_precision() == "float32"
    finally:
        fn.set_precision("float32")
