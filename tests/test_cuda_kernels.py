"""The CUDA kernels (kernels/*.cu) and the CuPy backend that launches them.

Three layers, from "runs anywhere" to "needs the GPU":

1. Sources: kernel_sources finds every .cu; each compiles to PTX for sm_90 with
   nvcc (no GPU needed; skipped without nvcc); the activation numbering and
   the kernel names match the Python side and kernels/README.md.
2. Launch contract, on the CPU: a fake ``cupy`` module (NumPy arrays, a
   RawModule that parses the kernel signatures from the source it is given)
   checks that CupyBackend passes every kernel arguments of exactly the C
   types, and in the C order: each launch is emulated by name from the
   signature and must reproduce the NumPy backend.
3. GPU parity: every CupyBackend op against the NumPy backend on random and
   edge inputs, float32 and float64, twice: on the GPU (``-m gpu``; skipped
   with the reason from ``fastnn.available_backends()["cupy"]`` when CuPy
   cannot run), and on the CPU with each kernel's own CUDA code built by g++
   (``[cuda-on-cpu]``, tests/cuda_on_cpu.py), same inputs and tolerances.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn
from fastnn.backends import kernel_sources
from fastnn.backends.activations import ACTIVATIONS, GELU_C, GELU_K
from fastnn.backends.numpy_backend import NumpyBackend
from fastnn.errors import BackendUnavailable

from fake_cupy import (_C_TYPES, _fake_cupy, bias_grad_in_kernel_order,  # noqa: F401
                       kernel_signatures, on_device)  # (tests/fake_cupy.py)

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels"
CU_FILES = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))
FLOATS = (np.float32, np.float64)
SUFFIX = {np.float32: "f32", np.float64: "f64"}
ACTS = tuple(ACTIVATIONS)
LEAKY_ALPHA = 0.1

def all_signatures() -> dict:
    sigs = {}
    for name in CU_FILES:
        sigs.update(kernel_signatures(kernel_sources.read_kernel(name)))
    return sigs


# =========================================================== 1. sources
def test_kernel_sources_finds_every_cu_file():
    assert CU_FILES, "kernels/ has no .cu files"
    assert kernel_sources.kernel_dir().resolve() == KERNEL_DIR.resolve()
    assert kernel_sources.list_kernels() == CU_FILES
    for name in CU_FILES:
        text = kernel_sources.read_kernel(name)
        assert kernel_sources.read_kernel(name[:-3]) == text  # ".cu" is optional
        # Local headers are inlined: NVRTC gets one self-contained string.
        assert not re.search(r'^\s*#\s*include\s*"', text, re.MULTILINE), name
        assert text.count("fn_act_forward(T x") <= 1, f"{name}: header inlined twice"


def test_kernel_sources_override_and_missing(tmp_path, monkeypatch):
    (tmp_path / "only.cu").write_text('extern "C" __global__ void k() {}\n')
    monkeypatch.setenv("FASTNN_KERNEL_DIR", str(tmp_path))
    assert kernel_sources.kernel_dir() == tmp_path
    assert kernel_sources.list_kernels() == ["only.cu"]
    with pytest.raises(FileNotFoundError, match="no_such_kernel"):
        kernel_sources.read_kernel("no_such_kernel")


def test_activation_codes_match_python_table():
    header = (KERNEL_DIR / "fastnn_common.cuh").read_text()
    codes = {m[0].lower(): int(m[1]) for m in re.findall(r"#define FASTNN_ACT_(\w+) (\d+)", header)}
    assert codes == {name: spec.code for name, spec in ACTIVATIONS.items()}
    consts = dict(re.findall(r"#define FASTNN_GELU_(\w) ([0-9.]+)", header))
    assert float(consts["C"]) == pytest.approx(GELU_C, rel=1e-15)
    assert float(consts["K"]) == GELU_K


def test_every_kernel_has_both_dtypes_and_is_documented():
    sigs = all_signatures()
    readme = (KERNEL_DIR / "README.md").read_text()
    expected = {"bias_act", "act_backward", "sgd", "adam", "rmsprop", "adam_captured",
                "sum_scaled", "mse_partial", "step_end", "bce", "bce_logits"}
    for base in expected:
        assert {f"{base}_f32", f"{base}_f64"} <= set(sigs), base
    for t in ("f32", "f64"):
        for lab in ("i32", "i64"):
            assert {f"softmax_xent_{t}_{lab}", f"softmax_xent_small_{t}_{lab}"} <= set(sigs)
    for name, params in sigs.items():
        assert all(ctype in _C_TYPES for ctype, _ in params), (name, params)
        stem = re.sub(r"_f(32|64)(_i(32|64))?$", "", name)
        assert stem in readme, f"kernels/README.md does not document {name}"


@pytest.fixture(scope="module")
def nvcc():
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc not on PATH: cannot compile the CUDA kernels here")
    return path


@pytest.mark.parametrize("filename", CU_FILES)
def test_nvcc_compiles_to_ptx_for_sm90(nvcc, filename, tmp_path):
    """The file itself and the inlined text NVRTC will get both compile."""
    inlined = tmp_path / filename  # alone in tmp_path: no header to find
    inlined.write_text(kernel_sources.read_kernel(filename))
    for source in (KERNEL_DIR / filename, inlined):
        ptx = tmp_path / f"{source.parent.name}-{filename}.ptx"
        proc = subprocess.run(
            [nvcc, "--ptx", "-arch=sm_90", "--fmad=false", "-o", str(ptx), str(source)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr}"
        text = ptx.read_text()
        for kernel in kernel_signatures(inlined.read_text()):
            assert re.search(rf"\.entry\s+{kernel}\s*\(", text), f"{kernel} missing in PTX"
        if filename == "optim.cu":
            # Parity with the NumPy reference depends on it: no fused multiply-add.
            assert not re.search(r"\bfma\.", text), "optim.cu PTX contains FMA"


# NVRTC itself, with CuPy's options: tests/test_nvrtc.py.


# =========================================================== 2. launch contract (CPU)
@pytest.fixture
def fake_gpu(monkeypatch):
    """(CupyBackend on the fake cupy, list of launched kernel names)."""
    from fastnn.backends import cupy_backend

    launches: list[str] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(launches))
    monkeypatch.setattr(cupy_backend, "_modules", {})  # never leak fakes to a real GPU run
    return cupy_backend.CupyBackend(), launches


@pytest.mark.parametrize("error", ["CompileException", "CUDADriverError"])
def test_a_kernel_file_that_does_not_compile_or_load_is_named(fake_gpu, monkeypatch, error):
    """NVRTC's error, or the driver's for a module that compiled but does not
    load: one RuntimeError naming the kernel file, the cause chained."""
    gpu, _ = fake_gpu
    cuda = sys.modules["cupy"].cuda
    raised = getattr(cuda.compiler if error == "CompileException" else cuda.driver, error)

    class Broken:
        def __init__(self, code, options=()):
            pass

        def get_function(self, name):
            raise raised("CUDA_ERROR_NO_BINARY_FOR_GPU")

    monkeypatch.setattr(sys.modules["cupy"], "RawModule", Broken)
    with pytest.raises(RuntimeError, match=r"(?s)kernels/bias_act\.cu failed .*NO_BINARY") as info:
        gpu.bias_act(on_device(np.ones((2, 3), np.float32)), None, "relu", LEAKY_ALPHA)
    assert type(info.value.__cause__) is raised


@pytest.mark.parametrize("setup, reason", [
    (dict(count_error=RuntimeError("cudaErrorInsufficientDriver: driver too old\nmore")),
     "cupy: no usable CUDA driver (RuntimeError: cudaErrorInsufficientDriver: driver too old)"),
    (dict(device_count=0), "cupy: no CUDA device found"),
    (dict(probe_error=OSError("libnvrtc.so.13: cannot open shared object file")),
     "cupy: CUDA device unusable (OSError: libnvrtc.so.13: cannot open shared object file)"),
])
def test_unusable_cuda_gives_one_line_reason(monkeypatch, setup, reason):
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([], **setup))
    with pytest.raises(BackendUnavailable) as info:
        cupy_backend.CupyBackend()
    assert str(info.value) == reason


def test_cupy_import_failure_gives_one_line_reason(monkeypatch):
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"^cupy: import failed \((ModuleNotFound|Import)Error") as info:
        cupy_backend.CupyBackend()
    assert "\n" not in str(info.value)


def test_fake_backend_device_and_memory(fake_gpu):
    gpu, _ = fake_gpu
    assert gpu.device == "cuda:0 (Fake GPU, 80.0 GiB)"
    assert gpu.memory_info() == (2**30, 80 * 2**30)
    gpu.synchronize()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act", ACTS)
def test_launch_args_bias_act_and_backward(fake_gpu, act, dtype):
    gpu, launches = fake_gpu
    ref = NumpyBackend()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 5)).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    z_gpu, z_ref = on_device(x), x.copy()
    y_gpu = gpu.bias_act(z_gpu, on_device(bias), act, LEAKY_ALPHA, out=gpu.xp.empty_like(z_gpu))
    y_ref = ref.bias_act(z_ref, bias, act, LEAKY_ALPHA, out=np.empty_like(x))
    assert launches == [f"bias_act_{SUFFIX[dtype]}"]
    np.testing.assert_allclose(z_gpu, z_ref, rtol=1e-6)  # z += bias in place, on the device
    np.testing.assert_allclose(y_gpu, y_ref, rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal(x.shape).astype(dtype)
    for pre in (None, z_ref):
        if pre is None and act == "gelu":
            continue
        got = gpu.act_backward(on_device(dy), on_device(y_ref), act,
                               None if pre is None else on_device(pre), LEAKY_ALPHA)
        want = ref.act_backward(dy.copy(), y_ref, act, pre, LEAKY_ALPHA)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert launches[-1].startswith("act_backward_")


@pytest.mark.parametrize("act", ACTS)
def test_launch_args_bf16_operand_kernels(fake_gpu, act, monkeypatch):
    """Under bf16 the *_operand ops are one launch each and give the plain op's
    result with its bf16 bits; outside bf16 (or for float64) they are the plain op."""
    from fastnn.precision import bf16_bits, using

    gpu, launches = fake_gpu
    monkeypatch.setattr(type(gpu), "prepares_gemm_operands", property(
        lambda self: fastnn.get_precision() == "bf16"))  # no cuBLAS handle in this fake
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    bits = lambda shape: gpu.xp.zeros(shape, np.uint16)  # noqa: E731
    want = NumpyBackend().bias_act(x.copy(), bias, act, LEAKY_ALPHA)
    with using("bf16"):
        got = gpu.bias_act_operand(on_device(x), on_device(bias), act, LEAKY_ALPHA,
                                   bits_buffer=bits)
    assert launches == ["bias_act_bf16"]
    np.testing.assert_allclose(got.array, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.bits, bf16_bits(got.array))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    pre = x + bias
    with using("bf16"):
        got = gpu.act_backward_operand(on_device(dy), on_device(want), act, on_device(pre),
                                       LEAKY_ALPHA, bits_buffer=bits)
    assert launches[-1] == "act_backward_bf16"
    np.testing.assert_allclose(got.array, NumpyBackend().act_backward(dy.copy(), want, act, pre,
                                                                      LEAKY_ALPHA), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.bits, bf16_bits(got.array))
    launches.clear()
    plain = gpu.bias_act_operand(on_device(x), on_device(bias), act, LEAKY_ALPHA, bits_buffer=bits)
    as_f64 = gpu.bias_act_operand(on_device(x, np.float64), on_device(bias, np.float64), act,
                                  LEAKY_ALPHA, bits_buffer=bits)
    # plain device arrays, not GemmOperands
    assert isinstance(plain, gpu.xp.ndarray) and isinstance(as_f64, gpu.xp.ndarray)
    assert launches == ["bias_act_f32", "bias_act_f64"]


# A small batch of narrow rows is one launch (softmax_xent_small, the mean
# included); past 1024 rows or 32 columns, one block per row plus the mean.
XENT_LAUNCHES = [((9, 4), ["softmax_xent_small"]), ((1024, 32), ["softmax_xent_small"]),
                 ((9, 33), ["softmax_xent", "sum_scaled"]),
                 ((1025, 10), ["softmax_xent", "sum_scaled"])]


@pytest.mark.parametrize("shape, kernels", XENT_LAUNCHES)
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("dtype", FLOATS)
def test_launch_args_softmax_xent(fake_gpu, dtype, label_dtype, shape, kernels):
    gpu, launches = fake_gpu
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(shape).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    loss, grad = gpu.softmax_xent(on_device(logits), on_device(labels))
    want_loss, want_grad = NumpyBackend().softmax_xent(logits, labels.astype(np.int64))
    assert [re.sub(r"_f(32|64)(_i(32|64))?$", "", name) for name in launches] == kernels
    assert loss.shape == () and loss.dtype == dtype
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)



# mse: one block (its partial is the loss) up to 8192 elements, else partial sums + mean.
MSE_LAUNCHES = [((64, 1), ["mse_partial"]), ((8192,), ["mse_partial"]),
                ((8193,), ["mse_partial", "sum_scaled"]), ((300, 40), ["mse_partial", "sum_scaled"])]


@pytest.mark.parametrize("shape, kernels", MSE_LAUNCHES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_launch_args_mse(fake_gpu, dtype, shape, kernels):
    gpu, launches = fake_gpu
    rng = np.random.default_rng(3)
    pred, target = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    want_loss, want_grad = NumpyBackend().mse(pred.copy(), target, np.empty_like(pred))
    pred, target = on_device(pred), on_device(target)
    loss, grad = gpu.mse(pred, target, pred)  # grad may alias pred
    assert [re.sub(r"_f(32|64)$", "", name) for name in launches] == kernels
    assert loss.shape == () and loss.dtype == dtype and grad is pred
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def bce_case(case, shape, dtype, seed=0):
    """(probabilities, targets) for the BCE kernels: random in (0, 1), the
    exact 0 and 1 (logs clamped at -100), a value outside [0, 1], or a NaN."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, shape).astype(dtype)
    t = rng.integers(0, 2, shape).astype(dtype)
    flat = p.reshape(-1)
    if case == "edges":
        flat[:2] = [0.0, 1.0]
        t.reshape(-1)[:2] = [1.0, 0.0]  # the clamped logs are the ones used
    elif case == "out_of_range":
        flat[-1] = 1.5
    elif case == "nan":
        flat[0] = np.nan
    return p, t


def check_bce(gpu, p, t, with_seen, to_device, to_host_fn):
    """gpu.bce against the generic ops on NumPy: loss (NaN when out of range),
    gradient, and the range kept in ``seen``."""
    dtype = p.dtype.type
    seen0 = np.array([np.inf, -np.inf, 0], p.dtype)
    want_seen = seen0.copy() if with_seen else None
    with np.errstate(invalid="ignore", divide="ignore"):
        want_loss, want_grad = NumpyBackend().bce(p, t, np.empty_like(p), want_seen)
    seen = to_device(seen0) if with_seen else None
    with np.errstate(invalid="ignore", divide="ignore"):  # the fake's generic path is NumPy
        loss, grad = gpu.bce(to_device(p), to_device(t), to_device(np.empty_like(p)), seen)
    assert loss.shape == () and loss.dtype == p.dtype
    tol = TOL[dtype]
    if with_seen and not np.isfinite(float(want_loss)):
        assert np.isnan(float(loss))
    else:
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=tol["rtol"] * 10,
                                   atol=tol["atol"])
    np.testing.assert_allclose(to_host_fn(grad), want_grad, **tol, equal_nan=True)
    if with_seen:
        np.testing.assert_array_equal(to_host_fn(seen), want_seen)


BCE_LAUNCHES = [((64, 1), ["bce"]), ((1 << 16,), ["bce"]), (((1 << 16) + 1,), [])]


@pytest.mark.parametrize("with_seen", [False, True])
@pytest.mark.parametrize("case", ["random", "edges", "out_of_range", "nan"])
@pytest.mark.parametrize("shape, kernels", BCE_LAUNCHES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_launch_args_bce(fake_gpu, dtype, shape, kernels, case, with_seen):
    """One launch up to 2^16 elements (the generic CuPy ops past it)."""
    gpu, launches = fake_gpu
    p, t = bce_case(case, shape, dtype)
    if case in ("out_of_range", "nan") and not with_seen:
        pytest.skip("without seen the caller has checked the range")
    check_bce(gpu, p, t, with_seen, on_device, to_host)
    assert [re.sub(r"_f(32|64)$", "", name) for name in launches] == kernels


@pytest.mark.parametrize("shape, kernels", [((64, 1), ["bce_logits"]), (((1 << 16) + 1,), [])])
@pytest.mark.parametrize("dtype", FLOATS)
def test_launch_args_bce_with_logits(fake_gpu, dtype, shape, kernels):
    gpu, launches = fake_gpu
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 30).astype(dtype)  # far into both tails
    t = rng.integers(0, 2, shape).astype(dtype)
    want_loss, want_grad = NumpyBackend().bce_with_logits(x, t, np.empty_like(x))
    loss, grad = gpu.bce_with_logits(on_device(x), on_device(t), gpu.xp.empty_like(x))
    assert [re.sub(r"_f(32|64)$", "", name) for name in launches if "bias_act" not in name] == kernels
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_block_reductions_launch_at_most_512_threads(fake_gpu):
    """The kernels allow 1024 threads, but then only 64 registers a thread, and
    the float64 softmax_xent_small needs 62 with NVRTC 13: the backend stays at 512."""
    import fake_cupy

    gpu, _ = fake_gpu
    rng = np.random.default_rng(0)
    fake_cupy.launch_shapes.clear()
    for dtype in FLOATS:
        for n, c in ((1024, 32), (3, 5000), (2000, 10)):
            gpu.softmax_xent(on_device(rng.standard_normal((n, c)).astype(dtype)),
                             on_device(rng.integers(0, c, n)))
        for n in (8192, 300_000):
            x = on_device(rng.standard_normal(n).astype(dtype))
            gpu.mse(x, x.copy(), gpu.xp.empty_like(x))
        p = on_device(rng.uniform(0, 1, 1 << 16).astype(dtype))
        gpu.bce(p, p.copy(), gpu.xp.empty_like(p))
        gpu.bce_with_logits(p, p.copy(), gpu.xp.empty_like(p))
    blocks = {name: block[0] for name, _, block in fake_cupy.launch_shapes}
    assert {re.sub(r"_f(32|64)(_i(32|64))?$", "", k) for k in blocks} >= {
        "softmax_xent", "softmax_xent_small", "sum_scaled", "mse_partial", "bce", "bce_logits"}
    assert max(blocks.values()) == 512

OPTIM_CASES = [
    ("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0)),
    ("adam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)),
    ("adam", dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=False)),
    ("adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)),
    ("rmsprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False)),
    ("rmsprop", dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.9, centered=True)),
]


def run_optimizer(backend, kind, hyper, param, grads):
    """Apply ``len(grads)`` steps of optimizer ``kind``; returns the buffers."""
    state = {k: backend.zeros(param.shape, param.dtype)
             for k in ("buf", "exp_avg", "exp_avg_sq", "square_avg", "grad_avg")}
    for step, grad in enumerate(grads, start=1):
        if kind == "sgd":
            backend.sgd_step(param, grad, state["buf"], first_step=step == 1, **hyper)
        elif kind == "adam":
            backend.adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, **hyper)
        else:
            backend.rmsprop_step(param, grad, state["square_avg"], buf=state["buf"],
                                 grad_avg=state["grad_avg"], **hyper)
    return {"param": param, **state}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind, hyper", OPTIM_CASES)
def test_launch_args_optimizers(fake_gpu, kind, hyper, dtype):
    """Same bits as the NumPy backend: the emulation follows the C signature,
    so a swapped argument or a wrong host constant shows up here."""
    gpu, launches = fake_gpu
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(33).astype(dtype)
    grads = [rng.standard_normal(33).astype(dtype) for _ in range(4)]
    got = run_optimizer(gpu, kind, hyper, on_device(p0), [on_device(g) for g in grads])
    want = run_optimizer(NumpyBackend(), kind, hyper, p0.copy(), [g.copy() for g in grads])
    assert launches == [f"{kind}_{SUFFIX[dtype]}"] * len(grads)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("shape", [(7, 5), (70, 65), (1024, 3), (1024, 1)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act", ACTS)
def test_launch_args_act_backward_bias(fake_gpu, act, dtype, shape):
    gpu, launches = fake_gpu
    ref = NumpyBackend()
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(dtype)
    y = ACTIVATIONS[act].forward(np, x, LEAKY_ALPHA).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    want = ref.act_backward(dy.copy(), y, act, x, LEAKY_ALPHA)
    y_dev, x_dev = on_device(y), on_device(x)
    for out in (None, gpu.xp.empty_like(dy)):  # in place in dy, or a separate dz
        d = on_device(dy)
        dz, db = gpu.act_backward_bias(d, y_dev, act, x_dev, LEAKY_ALPHA, out=out)
        assert launches[-1] == f"act_backward_bias_{SUFFIX[dtype]}"
        assert dz is (d if out is None else out) and db.shape == (shape[1],) and db.dtype == dtype
        np.testing.assert_allclose(dz, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(db, bias_grad_in_kernel_order(dz))
        np.testing.assert_allclose(db, want.sum(axis=0), rtol=1e-4, atol=1e-4)
    given = gpu.xp.full(shape[1], np.nan, dtype)
    assert gpu.act_backward_bias(on_device(dy), y_dev, act, x_dev, LEAKY_ALPHA,
                                 bias_grad_out=given)[1] is given
    np.testing.assert_allclose(given, want.sum(axis=0), rtol=1e-4, atol=1e-4)


def test_act_backward_bias_of_a_large_batch_is_the_two_ops(fake_gpu):
    """Above FUSED_BIAS_GRAD_MAX_ROWS one block per 32 columns would serialise
    the rows: act_backward (spread over the device) and the column sums instead."""
    from fastnn.backends.cupy_backend import FUSED_BIAS_GRAD_MAX_ROWS

    gpu, launches = fake_gpu
    dy = np.random.default_rng(0).standard_normal((FUSED_BIAS_GRAD_MAX_ROWS + 1, 3)).astype(np.float32)
    y = np.maximum(dy, 0)
    dz, db = gpu.act_backward_bias(on_device(dy), on_device(y), "relu")
    assert launches == ["act_backward_f32"]
    np.testing.assert_allclose(db, np.where(y > 0, dy, 0).sum(axis=0), rtol=1e-5)


def test_linear_backward_takes_the_fused_bias_gradient_and_accumulates(fake_gpu, monkeypatch):
    """A Linear with an activation: one act_backward_bias launch; a second
    backward without zero_grad adds to the bias gradient (accumulate_grad's
    scratch path) as on the NumPy backend."""
    gpu, launches = fake_gpu
    monkeypatch.setitem(fastnn.backends._instances, "cupy", gpu)
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((9, 5)).astype(np.float32), rng.standard_normal((9, 40)).astype(np.float32)
    grads = {}
    for name in ("numpy", "cupy"):
        fastnn.manual_seed(0)
        with fastnn.use_backend(name):
            model = fastnn.Sequential(fastnn.Linear(5, 40), fastnn.Tanh())  # tanh fused into the Linear
            for _ in range(2):
                model(fastnn.asarray(x))  # on the current backend's device
                model.backward(fastnn.asarray(dy))
            grads[name] = {n: np.array(p.grad) for n, p in model.named_parameters()}
    assert launches.count("act_backward_bias_f32") == 2 and "act_backward_f32" not in launches
    for n, g in grads["numpy"].items():
        np.testing.assert_allclose(grads["cupy"][n], g, rtol=1e-5, atol=1e-5, err_msg=n)


def test_fallback_for_non_contiguous_launches_nothing(fake_gpu):
    gpu, launches = fake_gpu
    z = on_device(np.arange(24, dtype=np.float32).reshape(4, 6))[:, ::2]  # a strided device view
    assert isinstance(z, gpu.xp.ndarray) and not z.flags.c_contiguous
    want = np.maximum(z, 0)
    np.testing.assert_array_equal(gpu.bias_act(z, None, "relu", out=gpu.xp.empty_like(z)), want)
    assert launches == []


# =========================================================== 3. GPU parity
gpu_mark = pytest.mark.gpu
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}
KINDS = ("random", "zeros", "large", "tiny")


@pytest.fixture(scope="module")
def real_gpu():
    """CupyBackend on the GPU; skipped, with the reason, where CuPy cannot run."""
    reason = fastnn.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(reason)
    from fastnn.backends.cupy_backend import CupyBackend

    return CupyBackend()


@pytest.fixture(params=[pytest.param("cupy", marks=gpu_mark), "cuda-on-cpu"])
def gpu(request):
    """The kernels' parity tests run twice: on the GPU (``-m gpu``), and on the
    CPU with each kernel's own CUDA code built by g++ (``source_gpu``,
    tests/cuda_on_cpu.py): same inputs, same tolerances, so a wrong index, a
    missing barrier or a bad reduction shows in CI, not first on the device."""
    if request.param == "cupy":
        return request.getfixturevalue("real_gpu")
    return request.getfixturevalue("source_gpu")[0]


def make_input(kind, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    scale = {"random": 1.0, "zeros": 0.0, "large": 1e4, "tiny": 1e-30}[kind]
    return (base * scale).astype(dtype)


def to_host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(37, 53), (4, 5, 6)])
def test_gpu_bias_act_matches_numpy(gpu, act, kind, dtype, shape):
    ref = NumpyBackend()
    x = make_input(kind, shape, dtype)
    bias = make_input("random", shape[-1:], dtype, seed=1)
    for b in (bias, None):
        for separate_out in (False, True):
            z_ref = x.copy()
            y_ref = ref.bias_act(z_ref, b, act, LEAKY_ALPHA,
                                 out=np.empty_like(x) if separate_out else None)
            z = gpu.asarray(x)
            out = gpu.xp.empty_like(z) if separate_out else None
            y = gpu.bias_act(z, None if b is None else gpu.asarray(b), act, LEAKY_ALPHA, out=out)
            assert y.dtype == dtype and (separate_out or y is z)
            np.testing.assert_allclose(to_host(z), z_ref, **TOL[dtype])
            np.testing.assert_allclose(to_host(y), y_ref, **TOL[dtype])


def test_gpu_float32_subnormals_flush_float64_keep(gpu):
    """CuPy compiles with -ftz=true (kernels/README.md): z + 0 of a float32
    subnormal is 0 on the GPU, where NumPy keeps it; float64 keeps it on both."""
    tiny32 = np.array([[1e-40, -1e-40, 2e-38, 1.0]], dtype=np.float32)
    z = gpu.asarray(tiny32)
    gpu.bias_act(z, gpu.asarray(np.zeros(4, np.float32)), "identity", LEAKY_ALPHA)
    np.testing.assert_array_equal(to_host(z), [[0.0, 0.0, np.float32(2e-38), 1.0]])
    tiny64 = np.array([[1e-310, -1e-310, 1.0]])
    z = gpu.asarray(tiny64)
    gpu.bias_act(z, gpu.asarray(np.zeros(3)), "identity", LEAKY_ALPHA)
    np.testing.assert_array_equal(to_host(z), tiny64)


@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_bias_act_propagates_nan(gpu, dtype):
    x = np.array([[np.nan, 1.0, -1.0]], dtype=dtype)
    for act in ACTS:
        y = to_host(gpu.bias_act(gpu.asarray(x), None, act, LEAKY_ALPHA))
        assert np.isnan(y[0, 0]), act


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTS)
def test_gpu_act_backward_matches_numpy(gpu, act, kind, dtype):
    ref = NumpyBackend()
    x = make_input(kind, (41, 29), dtype)
    y = ACTIVATIONS[act].forward(np, x, LEAKY_ALPHA).astype(dtype)
    dy = make_input("random", x.shape, dtype, seed=2)
    for pre in (None, x):
        if pre is None and ACTIVATIONS[act].needs_pre(LEAKY_ALPHA):
            continue
        want = ref.act_backward(dy.copy(), y, act, pre, LEAKY_ALPHA)
        for in_place in (True, False):
            d = gpu.asarray(dy)
            out = None if in_place else gpu.xp.empty_like(d)
            got = gpu.act_backward(d, gpu.asarray(y), act,
                                   None if pre is None else gpu.asarray(pre), LEAKY_ALPHA, out=out)
            assert got.dtype == dtype and (not in_place or got is d)
            assert_close_within(to_host(got), want, act_backward_atol(act, x, dy, dtype),
                                TOL[dtype]["rtol"], act)


def act_backward_atol(act, x, dy, dtype):
    """The absolute tolerance of act_backward on the device: TOL's, but for
    GELU in float32, whose derivative 0.5 (1 + t) + 0.5 x (1 - t^2) u'(x), t =
    tanh(u(x)), carries tanhf's error magnified by (0.5 + |x| u'(x)) |dy|. CUDA's
    tanhf is within 2 ulps (the CUDA C++ Programming Guide's table), NumPy's
    (the reference's) within 1.35, so 4 half-ulps of 1 (t's ulp below 1) bound
    it: up to 2.5e-6 near |x| = 5, where TOL's 1e-6 would fail. Where both
    round t to +-1 (|u| over 9.1 for CUDA and glibc, about 10 for NumPy) they
    saturate exactly and add nothing."""
    atol = TOL[dtype]["atol"]
    if act != "gelu" or dtype != np.float32:
        return atol
    x64 = x.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x64 ** 2)
    # NumPy's float32 tanh, the reference's, reaches +-1 only near |u| = 10
    unsaturated = (np.abs(u) < 9.5) | (np.abs(np.tanh(u.astype(np.float32))) < 1)
    amplified = np.where(unsaturated, 0.5 + np.abs(x64) * du, 0.5)
    return atol + 4 * 2.0 ** -24 * np.abs(dy.astype(np.float64)) * amplified


def assert_close_within(got, want, atol, rtol, what=""):
    """assert_allclose with an absolute tolerance per element."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = ~((np.abs(got64 - want64) <= atol + rtol * np.abs(want64))
            | (np.isnan(got64) & np.isnan(want64)) | (got64 == want64))
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements outside the tolerance; first at "
        f"{np.argwhere(bad)[0].tolist()}: got {got64[bad][0]!r}, want {want64[bad][0]!r}, "
        f"allowed {np.broadcast_to(atol, bad.shape)[bad][0] + rtol * abs(want64[bad][0]):.3g}")


def test_gpu_gelu_backward_meets_its_tolerance_on_a_dense_sweep(gpu):
    """Every x in [-10, 10] at a step of 5e-5, the transition to saturation
    included (random inputs rarely land there), with dy = +-1 and +-4."""
    ref = NumpyBackend()
    x = np.linspace(-10, 10, 400_001, dtype=np.float32).reshape(-1, 1)
    y = ACTIVATIONS["gelu"].forward(np, x, LEAKY_ALPHA).astype(np.float32)
    dy = np.resize(np.array([1, -1, 4, -4], np.float32), x.shape)
    want = ref.act_backward(dy.copy(), y, "gelu", x, LEAKY_ALPHA)
    got = gpu.act_backward(gpu.asarray(dy), gpu.asarray(y), "gelu", gpu.asarray(x), LEAKY_ALPHA)
    assert_close_within(to_host(got), want, act_backward_atol("gelu", x, dy, np.float32),
                        TOL[np.float32]["rtol"], "gelu sweep")


def _bf16_edge_values(shape, seed):
    """Random values with the bf16 rounding edge cases mixed in: ties, the
    largest finite float32 (rounds to inf), subnormals, +-inf, NaN."""
    x = make_input("random", shape, np.float32, seed).reshape(-1)
    edges = np.array([1.00390625, 1.01171875, -2.0078125, 3.4e38, -3.4e38, 1e-40, -1e-40,
                      np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    x[:edges.size] = edges
    return x.reshape(shape)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ("random", "large"))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(41, 29), (256, 1024), (1024, 33), (700, 1)])
def test_gpu_act_backward_bias_matches_numpy(gpu, shape, act, kind, dtype):
    """dz as act_backward; the bias gradient bit for bit the kernel-order sum of
    the dz it wrote, and close to NumPy's column sums."""
    ref = NumpyBackend()
    x = make_input(kind, shape, dtype)
    y = ACTIVATIONS[act].forward(np, x, LEAKY_ALPHA).astype(dtype)
    dy = make_input("random", shape, dtype, seed=2)
    want = ref.act_backward(dy.copy(), y, act, x, LEAKY_ALPHA)
    dz, db = gpu.act_backward_bias(gpu.asarray(dy), gpu.asarray(y), act, gpu.asarray(x), LEAKY_ALPHA,
                                   out=gpu.xp.empty(shape, dtype))
    dz, db = to_host(dz), to_host(db)
    atol = act_backward_atol(act, x, dy, dtype)
    assert_close_within(dz, want, atol, TOL[dtype]["rtol"], act)
    np.testing.assert_array_equal(db, bias_grad_in_kernel_order(dz))
    scale = np.abs(want).sum(axis=0) + 1
    # (each column's sum may carry its elements' errors, all of one sign at worst)
    carried = (np.broadcast_to(atol, shape) - TOL[dtype]["atol"]).sum(axis=0) / scale
    assert_close_within(db / scale, want.sum(axis=0) / scale,
                        (1e-5 if dtype == np.float32 else 1e-12) + carried, 0, "bias grad")


@pytest.mark.parametrize("act", ACTS)
def test_gpu_bf16_operand_kernels_write_the_plain_result_and_its_bits(gpu, act):
    """bias_act_bf16 / act_backward_bf16 against bias_act / act_backward and
    fastnn.precision.bf16_bits of their result, bit for bit (random and edge inputs)."""
    from fastnn.backends.base import GemmOperand
    from fastnn.precision import bf16_bits, using

    x = _bf16_edge_values((37, 53), 3)
    bias = make_input("random", (53,), np.float32, seed=4)
    bits_buffer = lambda shape: gpu.xp.empty(shape, dtype=np.uint16)  # noqa: E731
    with np.errstate(all="ignore"):
        plain_z, plain_y = gpu.asarray(x), gpu.xp.empty(x.shape, np.float32)
        gpu.bias_act(plain_z, gpu.asarray(bias), act, LEAKY_ALPHA, out=plain_y)
        z, y = gpu.asarray(x), gpu.xp.empty(x.shape, np.float32)
        with using("bf16"):
            got = gpu.bias_act_operand(z, gpu.asarray(bias), act, LEAKY_ALPHA, out=y,
                                       bits_buffer=bits_buffer)
        assert isinstance(got, GemmOperand) and got.array is y
        np.testing.assert_array_equal(to_host(y), to_host(plain_y))
        np.testing.assert_array_equal(to_host(got.bits), bf16_bits(to_host(plain_y)))

        dy = _bf16_edge_values(x.shape, 5)
        pre = None if not ACTIVATIONS[act].needs_pre(LEAKY_ALPHA) and act != "gelu" else plain_z
        plain = gpu.act_backward(gpu.asarray(dy), plain_y, act, pre, LEAKY_ALPHA)
        with using("bf16"):
            got = gpu.act_backward_operand(gpu.asarray(dy), plain_y, act, pre, LEAKY_ALPHA,
                                           bits_buffer=bits_buffer)
        np.testing.assert_array_equal(to_host(got.array), to_host(plain))
        np.testing.assert_array_equal(to_host(got.bits), bf16_bits(to_host(plain)))


def test_gpu_act_backward_gelu_without_pre_is_an_error(gpu):
    y = gpu.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="pre-activation"):
        gpu.act_backward(y.copy(), y, "gelu")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", [(64, 10), (3, 1000), (5, 3000), (2, 1), (1024, 32), (1025, 10),
                                   (40, 33)])
def test_gpu_softmax_xent_matches_numpy(gpu, shape, label_dtype, kind, dtype):
    cupy = gpu.xp
    logits = make_input(kind, shape, dtype)
    labels = np.random.default_rng(4).integers(0, shape[1], shape[0]).astype(label_dtype)
    want_loss, want_grad = NumpyBackend().softmax_xent(logits, labels)
    for mode in ("fresh", "grad_out", "alias"):
        lg = gpu.asarray(logits)
        grad_out = {"fresh": None, "grad_out": cupy.empty_like(lg), "alias": lg}[mode]
        loss, grad = gpu.softmax_xent(lg, gpu.asarray(labels), grad_out=grad_out)
        # The loss stays on the device: a 0-d array of the logits' dtype.
        assert isinstance(loss, cupy.ndarray) and loss.ndim == 0 and loss.dtype == dtype
        assert grad.dtype == dtype and grad.shape == shape
        if grad_out is not None:
            assert grad is grad_out
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=TOL[dtype]["rtol"] * 10,
                                   atol=TOL[dtype]["atol"])
        np.testing.assert_allclose(to_host(grad), want_grad, **TOL[dtype])



@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5,), (64, 3), (8192,), (8193,), (1000, 300)])
def test_gpu_mse_matches_numpy(gpu, shape, kind, dtype):
    pred = make_input(kind, shape, dtype)
    target = make_input("random", shape, dtype, seed=1)
    want_loss, want_grad = NumpyBackend().mse(pred.copy(), target, np.empty_like(pred))
    for alias in (False, True):
        p = gpu.asarray(pred)
        grad_out = p if alias else gpu.xp.empty_like(p)
        loss, grad = gpu.mse(p, gpu.asarray(target), grad_out)
        assert isinstance(loss, gpu.xp.ndarray) and loss.ndim == 0 and loss.dtype == dtype
        assert grad is grad_out
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=TOL[dtype]["rtol"] * 10,
                                   atol=TOL[dtype]["atol"])
        np.testing.assert_allclose(to_host(grad), want_grad, **TOL[dtype])


@pytest.mark.parametrize("with_seen", [False, True])
@pytest.mark.parametrize("case", ["random", "edges", "out_of_range", "nan"])
@pytest.mark.parametrize("shape", [(5, 1), (256, 3), (1 << 16,), ((1 << 16) + 1,)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_bce_matches_numpy(gpu, dtype, shape, case, with_seen):
    if case in ("out_of_range", "nan") and not with_seen:
        pytest.skip("without seen the caller has checked the range")
    p, t = bce_case(case, shape, dtype)
    check_bce(gpu, p, t, with_seen, gpu.asarray, to_host)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(5, 1), (256, 3), ((1 << 16) + 1,)])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gpu_bce_with_logits_matches_numpy(gpu, dtype, shape, kind):
    x = make_input(kind, shape, dtype)
    t = np.random.default_rng(6).integers(0, 2, shape).astype(dtype)
    want_loss, want_grad = NumpyBackend().bce_with_logits(x, t, np.empty_like(x))
    loss, grad = gpu.bce_with_logits(gpu.asarray(x), gpu.asarray(t), gpu.xp.empty(shape, dtype))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=TOL[dtype]["rtol"] * 10,
                               atol=TOL[dtype]["atol"])
    np.testing.assert_allclose(to_host(grad), want_grad, **TOL[dtype])

@pytest.mark.parametrize("n_cols", [4, 40])  # softmax_xent_small, softmax_xent + sum_scaled
def test_gpu_softmax_xent_nan_logit_gives_nan_loss(gpu, n_cols):
    logits = np.zeros((3, n_cols), np.float32)
    logits[1, 2] = np.nan
    loss, _ = gpu.softmax_xent(gpu.asarray(logits), gpu.asarray(np.array([0, 1, 2])))
    assert np.isnan(float(loss))


@pytest.mark.parametrize("n_cols", [4, 40])
def test_gpu_softmax_xent_label_out_of_range_gives_nan_not_a_bad_read(gpu, n_cols):
    logits = np.random.default_rng(5).standard_normal((3, n_cols)).astype(np.float32)
    labels = np.array([0, n_cols, -1])  # the loss layer rejects these; the kernel stays in bounds
    loss, grad = gpu.softmax_xent(gpu.asarray(logits), gpu.asarray(labels))
    assert np.isnan(float(loss))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True) / 3
    want[0, 0] -= 1 / 3  # rows 1 and 2 get no one-hot term
    np.testing.assert_allclose(to_host(grad), want, **TOL[np.float32])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind, hyper", OPTIM_CASES)
def test_gpu_optimizers_match_numpy_bit_for_bit(gpu, kind, hyper, dtype):
    """Same operation order, no FMA (--fmad=false), IEEE div/sqrt: same bits."""
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(10_007).astype(dtype)
    grads = [rng.standard_normal(10_007).astype(dtype) for _ in range(5)]
    grads[2][:10] = 0.0  # exact zeros and tiny values in the mix
    grads[3][:10] = dtype(1e-30)
    want = run_optimizer(NumpyBackend(), kind, hyper, p0.copy(), [g.copy() for g in grads])
    got = run_optimizer(gpu, kind, hyper, gpu.asarray(p0), [gpu.asarray(g) for g in grads])
    for key in want:
        assert got[key].dtype == dtype
        np.testing.assert_array_equal(to_host(got[key]), want[key], err_msg=key)


@gpu_mark
def test_gpu_asarray_accepts_host_device_and_dlpack(real_gpu):
    gpu = real_gpu
    cupy = gpu.xp
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev = gpu.asarray(host)
    assert isinstance(dev, cupy.ndarray) and dev.dtype == np.float32
    assert gpu.asarray(dev) is dev
    assert gpu.asarray([[1, 2], [3, 4]]).shape == (2, 2)
    assert gpu.asarray(dev, dtype=np.float64).dtype == np.float64
    np.testing.assert_array_equal(gpu.to_numpy(dev), host)
    assert isinstance(gpu.to_numpy(dev), np.ndarray)
    torch = pytest.importorskip("torch")
    t_cpu = torch.arange(4, dtype=torch.float32)
    np.testing.assert_array_equal(gpu.to_numpy(gpu.asarray(t_cpu)), np.arange(4))
    if torch.cuda.is_available():
        t_gpu = torch.ones(3, device="cuda", requires_grad=True)
        arr = gpu.asarray(t_gpu)
        assert isinstance(arr, cupy.ndarray)
        np.testing.assert_array_equal(gpu.to_numpy(arr), np.ones(3))


@gpu_mark
def test_gpu_device_string_and_memory_info(real_gpu):
    gpu = real_gpu
    assert re.fullmatch(r"cuda:\d+ \(.+, \d+\.\d GiB\)", gpu.device), gpu.device
    free, total = gpu.memory_info()
    assert 0 < free <= total
    gpu.synchronize()


@gpu_mark
def test_gpu_out_of_memory_names_op_and_size(real_gpu):
    gpu = real_gpu
    from fastnn.backends.cupy_backend import GPUOutOfMemory

    cupy = gpu.xp
    logits = cupy.zeros((2048, 1024), dtype=cupy.float32)
    labels = cupy.zeros(2048, dtype=cupy.int64)
    pool = cupy.get_default_memory_pool()
    old_limit = pool.get_limit()
    pool.free_all_blocks()  # cached free blocks could otherwise serve the request
    pool.set_limit(size=pool.used_bytes() + 1024)  # nothing more fits
    try:
        with pytest.raises(MemoryError) as info:
            gpu.softmax_xent(logits, labels)
    finally:
        pool.set_limit(size=old_limit)
    assert isinstance(info.value, GPUOutOfMemory)
    assert "softmax_xent" in str(info.value) and "bytes" in str(info.value)


class _OnCuda:
    """A DLPack producer in CUDA memory, as a torch CUDA tensor is (here over a
    stand-in device array)."""

    def __init__(self, device_array):
        self.device_array = device_array

    def __dlpack__(self, **kwargs):
        return self.device_array.view(np.ndarray).__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0


class _RequiresGrad(_OnCuda):
    """A torch CUDA tensor that requires grad: it refuses to export until detached."""

    __module__ = "torch"

    def __dlpack__(self, **kwargs):
        raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")

    def detach(self):
        return _OnCuda(self.device_array)


class _CudaArrayInterface:
    """Another library's device array by ``__cuda_array_interface__`` (numba.cuda's)."""

    def __init__(self, device_array):
        self.device_array = device_array

    @property
    def __cuda_array_interface__(self):
        a = self.device_array
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False),
                "strides": None, "version": 3}


def test_device_arrays_of_other_libraries_are_taken_without_a_host_copy(fake_gpu):
    """torch CUDA tensors (DLPack), requires_grad or not, and numba.cuda arrays
    (__cuda_array_interface__): the backend wraps their memory, and fit's input
    check keeps them there, with no read back to the host."""
    import fake_cupy
    from fastnn import inputs

    gpu, _ = fake_gpu
    X = fake_cupy.on_device(np.arange(12, dtype=np.float32).reshape(4, 3))
    y = fake_cupy.on_device(np.array([0, 1, 1, 0]))
    reads = fake_cupy.host_reads[0]
    for wrap in (_OnCuda, _RequiresGrad, _CudaArrayInterface):
        for a in (gpu.resident(wrap(X)), gpu.asarray(wrap(X))):
            assert isinstance(a, fake_cupy.DeviceArray) and np.shares_memory(a, X), wrap
        wide = gpu.asarray(wrap(X), dtype=np.float64)  # a cast on the device
        assert isinstance(wide, fake_cupy.DeviceArray) and wide.dtype == np.float64
        np.testing.assert_array_equal(wide.view(np.ndarray), X.view(np.ndarray))
        assert fake_cupy.host_reads[0] == reads, wrap
        with fastnn.use_backend(gpu):
            Xd, yd, labels = inputs.prepare(wrap(X), wrap(y), np.float32, "fit")
        assert np.shares_memory(Xd, X) and np.shares_memory(yd, y) and labels == (0, 1), wrap
        # Two small reads, no copy of the data: X's (min, max) for the NaN
        # check and the labels' range.
        assert fake_cupy.host_reads[0] == reads + 2, wrap
        reads = fake_cupy.host_reads[0]


def test_cupys_out_of_memory_becomes_one_naming_the_op_the_bytes_and_the_free_memory(
        fake_gpu, monkeypatch):
    """CuPy's OutOfMemoryError inside a fused op: the backend names the op, the
    bytes CuPy asked for (else its own estimate) and the device's free memory;
    the layer around it adds its name (the real-GPU twin above runs the pool dry)."""
    gpu, _ = fake_gpu
    oom = sys.modules["cupy"].cuda.memory.OutOfMemoryError
    message = {"text": "Out of memory allocating 2,048 bytes (allocated so far: 0 bytes)."}

    def full(*args, **kwargs):
        raise oom(message["text"])

    monkeypatch.setattr(gpu, "_launch_bias_act", full)
    x = gpu.asarray(np.ones((5, 3), np.float32))
    with fastnn.use_backend(gpu):
        layer = fastnn.Sequential(fastnn.Linear(3, 4), fastnn.ReLU())
        with pytest.raises(fastnn.OutOfMemory) as info:
            layer(x)
    text = str(info.value)
    assert text.startswith("Linear(3 -> 4): out of memory in forward (bias + relu): "), text
    assert ("cupy bias_act: out of GPU memory requesting 2,048 bytes "
            "(1.00 GiB free of 80.0 GiB on cuda:0 (Fake GPU, 80.0 GiB)); "
            "use a smaller batch or model") in text, text
    assert isinstance(info.value.__cause__, MemoryError)

    z = gpu.asarray(np.ones((5, 4), np.float32))
    message["text"] = "out of memory"  # no size in the message: the op's estimate (z's 80 bytes)

    def device_gone():
        raise RuntimeError("cudaErrorIllegalAddress")

    monkeypatch.setattr(gpu, "memory_info", device_gone)
    with pytest.raises(MemoryError, match=re.escape(
            "cupy bias_act: out of GPU memory requesting 80 bytes (cuda:0 (Fake GPU, 80.0 GiB)); ")):
        gpu.bias_act(z, None, "relu")


def test_the_fake_knows_every_kernel_that_calls_block_reduce():
    """tests/fake_cupy.py refuses a block of part-warps for the kernels in
    _BLOCK_REDUCE_KERNELS: every kernel of a file that calls block_reduce."""
    from fake_cupy import _BLOCK_REDUCE_KERNELS

    found = set()
    for path in sorted((REPO / "kernels").glob("*.cu")):
        text = path.read_text()
        if "block_reduce<" in text:
            names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(',
                               text)
            found |= {re.sub(r"_f(32|64)(_i(32|64))?$", "", name) for name in names}
    assert found == _BLOCK_REDUCE_KERNELS


def test_c_contiguous_reads_the_cached_bit_and_falls_back_to_flags():
    """An array with CuPy's ``_c_contiguous`` bit is judged by it (no Flags
    object built); one without it (NumPy, the CPU stand-in) by its flags."""
    from fastnn.backends.cupy_support import _c_contiguous

    class Cached:  # what CuPy's ndarray offers: the bit, and a flags property
        def __init__(self, bit):
            self._c_contiguous = bit

        @property
        def flags(self):
            raise AssertionError("flags built although the bit was there")

    for bit in (True, False):
        assert _c_contiguous(Cached(bit)) is bit
    a = np.ones((4, 3), np.float32)
    assert _c_contiguous(a) and not _c_contiguous(a.T) and not _c_contiguous(a[:, :2])


@gpu_mark
def test_gpu_c_contiguous_bit_agrees_with_flags(real_gpu):
    gpu = real_gpu
    """CuPy's cached ``_c_contiguous`` bit (what the hot path reads instead of
    building ``flags``) says what ``flags.c_contiguous`` says."""
    from fastnn.backends.cupy_support import _c_contiguous

    a = gpu.xp.ones((4, 3), np.float32)
    assert hasattr(a, "_c_contiguous")
    for view in (a, a.T, a[:, :2], a[1:], a[::2], a.reshape(-1)):
        assert _c_contiguous(view) == view.flags.c_contiguous
