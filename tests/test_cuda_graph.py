"""fastnn's own cuBLAS handle and the CUDA-graph training step (fastnn/cuda_graph.py).

On the CPU, ``tests/fake_cupy.py`` stands in for CuPy and libcublas: a fake
capture keeps each kernel launch and GEMM with the very arrays it was given
and the graph's launch runs them again, as a CUDA graph replays the device
pointers it recorded. So a fit that replays its recorded step must end with
the same bits as the same fit op by op; a buffer that moved, a counter off by
one or a per-step scalar frozen at its recorded value shows up as a
difference. The ``gpu`` tests do the same on a real device.
"""
from __future__ import annotations

import re
import sys
import warnings

import numpy as np
import pytest

import fastnn as fn
from fake_cupy import FakeCublas, FakeGraph, _fake_cupy, on_device
from fastnn import cuda_graph
from fastnn.backends import cublas
from fastnn.backends.base import Backend
from fastnn.backends.numpy_backend import NumpyBackend
from fastnn.precision import bf16_round


# =========================================================== cuBLAS argument mapping
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_own_cublas_gemm_matches_numpy_for_every_transpose(fake_gpu, trans_a, trans_b, dtype):
    backend, _, lib = fake_gpu
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 3)).astype(dtype)   # op(a) is (7, 3)
    b = rng.standard_normal((3, 5)).astype(dtype)   # op(b) is (3, 5)
    a_arg = on_device(np.ascontiguousarray(a.T) if trans_a else a)
    b_arg = on_device(np.ascontiguousarray(b.T) if trans_b else b)
    lib.calls.clear()
    out = backend.xp.full((7, 5), np.nan, dtype=dtype)
    got = backend.gemm(a_arg, b_arg, out=out, trans_a=trans_a, trans_b=trans_b)
    assert got is out and ("gemm", (5, 7, 3)) in lib.calls  # column-major: C^T = op(b)^T op(a)^T
    np.testing.assert_allclose(got, a @ b, rtol=1e-6 if dtype == np.float32 else 1e-13)
    fresh = backend.gemm(a_arg, b_arg, trans_a=trans_a, trans_b=trans_b)
    assert fresh.shape == (7, 5) and fresh.dtype == dtype
    assert isinstance(got, backend.xp.ndarray) and isinstance(fresh, backend.xp.ndarray)


def test_gemm_arguments_reject_mismatched_inner_dimensions():
    with pytest.raises(ValueError, match=r"op\(a\) is \(2, 3\), op\(b\) is \(4, 5\)"):
        cublas.gemm_arguments((2, 3), (4, 5), False, False)


def test_own_cublas_precision_modes(fake_gpu, monkeypatch):
    backend, launches, lib = fake_gpu
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 9)).astype(np.float32)
    b = rng.standard_normal((9, 4)).astype(np.float32)
    a_dev, b_dev = on_device(a), on_device(b)
    seen = []
    real = lib.cublasGemmEx
    monkeypatch.setattr(lib, "cublasGemmEx", lambda *args: seen.append(args[8]) or real(*args))
    np.testing.assert_allclose(backend.gemm(a_dev, b_dev), a @ b, rtol=1e-6)
    fn.set_precision("tf32")
    backend.gemm(a_dev, b_dev)
    fn.set_precision("bf16")
    got = backend.gemm(a_dev, b_dev)
    assert seen == [cublas.R_32F, cublas.R_32F, cublas.R_16BF]
    assert launches.count("f32_to_bf16") == 2
    want = bf16_round(a) @ bf16_round(b)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32 and np.abs(got - a @ b).max() > 1e-4  # really rounded
    # Gradients never take the shortcut: the bias gradient stays exact float32.
    dz = rng.standard_normal((6, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.bias_grad(on_device(dz)), dz.sum(0), rtol=1e-6, atol=1e-6)
    assert seen[-1] == cublas.R_32F


def test_bf16_linear_converts_each_operand_once_per_pass(fake_gpu, monkeypatch):
    """x and the weight once in forward, dz once in backward: 3 conversions for
    the layer's three GEMMs, where converting per GEMM would take 6."""
    backend, launches, _ = fake_gpu
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    dy = rng.standard_normal((8, 5)).astype(np.float32)
    fn.set_precision("bf16")
    with fn.use_backend(backend):
        layer = fn.Linear(6, 5)
        w = backend.to_numpy(layer.weight.data).copy()
        y = layer(backend.asarray(x))
        dx = layer.backward(backend.asarray(dy))
    assert launches.count("f32_to_bf16") == 3
    xr, wr, dyr = bf16_round(x), bf16_round(w), bf16_round(dy)
    np.testing.assert_allclose(y, xr @ wr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad, xr.T @ dyr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.grad, dy.sum(0), rtol=1e-5, atol=1e-6)  # exact
    np.testing.assert_allclose(dx, dyr @ wr.T, rtol=1e-5, atol=1e-6)


def _bf16_mlp_steps(backend, launches=(), steps=3):
    """A 4-layer MLP (relu, tanh, gelu) trained ``steps`` Adam steps under bf16 on
    ``backend``; returns (state dict, the kernel launches of the last step, from
    the fake's ``launches`` list)."""
    from fastnn.nn.module import training_step_mode

    fn.manual_seed(5)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 16)
    x, labels = backend.asarray(x), backend.asarray(labels)  # on the device, as fit puts them
    with fn.use_backend(backend), fn.precision.using("bf16"):
        model = fn.Sequential(fn.Linear(12, 20), fn.ReLU(), fn.Linear(20, 20), fn.Tanh(),
                              fn.Linear(20, 8), fn.GELU(), fn.Linear(8, 3))
        loss_fn, opt = fn.CrossEntropyLoss(), fn.Adam(model.parameters(), lr=1e-2)
        with training_step_mode(model):
            for _ in range(steps):
                before = len(launches)
                opt.zero_grad()
                loss_fn.forward(model.forward(x), labels)
                model.backward(loss_fn.backward())
                opt.step()
    return model.state_dict(), list(launches[before:])


def test_bf16_hidden_layers_write_their_bf16_copies_in_the_activation_pass(fake_gpu, monkeypatch):
    """Under bf16, Linear -> act -> Linear hands the activation's output over with
    its bf16 bits made in the same launch (bias_act_bf16), and a hidden layer's dz
    takes its bits from act_backward_bf16: per step the conversions left are the
    input, each weight and the last layer's dz, and the trained weights are those
    of converting each operand separately, bit for bit."""
    backend, launches, _ = fake_gpu
    fused, step = _bf16_mlp_steps(backend, launches)
    assert step.count("bias_act_bf16") == 3 and step.count("act_backward_bf16") == 3
    assert step.count("f32_to_bf16") == 1 + 4 + 1  # x, the 4 weights, the last dz
    base = Backend  # the generic path (CupyBackend's MRO also holds its mixins)
    monkeypatch.setattr(backend, "bias_act_operand", base.bias_act_operand.__get__(backend))
    monkeypatch.setattr(backend, "act_backward_operand", base.act_backward_operand.__get__(backend))
    separate, step = _bf16_mlp_steps(backend, launches)
    assert "bias_act_bf16" not in step and step.count("f32_to_bf16") == 3 * 4
    for name, value in fused.items():
        np.testing.assert_array_equal(value, separate[name], err_msg=name)


def test_bf16_operand_is_not_reused_after_a_reshape_or_outside_sequential(fake_gpu):
    """The hand-over is between a Sequential's own layers only: a Linear called
    by the user gets and returns plain arrays."""
    backend, launches, _ = fake_gpu
    plain = backend.xp.ndarray  # a device array, not a GemmOperand
    with fn.use_backend(backend), fn.precision.using("bf16"):
        a, b = fn.Linear(4, 6), fn.Linear(6, 2)
        h = a.forward_fused(backend.xp.ones((3, 4), np.float32), "relu", 0.0)
        assert isinstance(h, plain) and b(h).shape == (3, 2)
        model = fn.Sequential(fn.Linear(4, 6), fn.ReLU(), fn.Linear(6, 2))
        # 3-D input: rows reshaped, no hand-over
        out = model(backend.xp.ones((2, 3, 4), np.float32))
        assert isinstance(out, plain) and out.shape == (2, 3, 2)
        assert isinstance(model(backend.xp.ones((3, 4), np.float32)), plain)
    assert "bias_act_bf16" in launches


def test_own_cublas_rebinds_stream_and_workspace_only_on_change(fake_gpu):
    backend, _, lib = fake_gpu
    a = on_device(np.ones((2, 2), np.float32))
    lib.calls.clear()
    backend.gemm(a, a)
    backend.gemm(a, a)
    assert [c[0] for c in lib.calls] == ["gemm", "gemm"]  # bound at start-up, not per call
    cuda = sys.modules["cupy"].cuda
    null = cuda.get_current_stream()
    stream = cuda.Stream(non_blocking=True)
    with stream:
        backend.gemm(a, a)
    assert [c[0] for c in lib.calls[2:]] == ["stream", "workspace", "gemm"]
    # One workspace: each newly bound stream first waits for the one before it.
    assert [e.stream for e in stream.waited] == [null]
    backend.gemm(a, a)
    assert [c[0] for c in lib.calls[5:]] == ["stream", "workspace", "gemm"]
    assert [e.stream for e in null.waited][-1:] == [stream]



def test_the_stand_in_refuses_what_a_real_capture_or_device_refuses(fake_gpu):
    """tests/fake_cupy.py is only as good as its refusals: CuPy's cuBLAS, module
    loads, host -> device copies and events inside a recording; an event's time
    before it completed; GEMM leading dimensions cuBLAS would reject; a kernel
    reaching past an array's end or a label outside the logits (NumPy would
    truncate or wrap: the by-name emulation checks the element ranges, also
    before the kernels' own code runs); and fresh memory is not zeros."""
    cupy = sys.modules["cupy"]
    backend, _, lib = fake_gpu
    a = backend.asarray(np.ones((2, 2), np.float32))
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    end.record()
    with pytest.raises(AssertionError, match="NotReady"):
        cupy.cuda.get_elapsed_time(start, end)
    end.synchronize()
    assert cupy.cuda.get_elapsed_time(start, end) == 0.0
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for refused in (lambda: cupy.matmul(a, a), lambda: cupy.asarray(np.ones(2)),
                        lambda: cupy.RawModule(code="", options=("--fmad=false",)),
                        lambda: cupy.cuda.Event().record()):
            with pytest.raises(AssertionError, match="while a CUDA graph records"):
                refused()
        stream.end_capture()
    assert np.isnan(cupy.empty((3,), np.float32).view(np.ndarray)).all()
    with pytest.raises(AssertionError, match="lda"):
        lib.cublasGemmEx(None, 0, 0, 4, 4, 4, 0, 0, 0, 2, 0, 0, 4, 0, 0, 0, 4, 68, -1)
    short = backend.asarray(np.ones(3, np.float32))
    relu = backend._kernel("act_backward.cu", "act_backward_f32")
    with pytest.raises(AssertionError, match=r"dy\[0:4\) but dy has 3 elements"):
        relu((1,), (32,), (short, a, a, short, np.int64(4), np.int32(1), np.float32(0),
                           np.int32(0)))
    xent = backend._kernel("softmax_xent.cu", "softmax_xent_f32_i64")
    for bad in ([0, -1], [0, 2], [0]):
        labels = backend.asarray(np.array(bad, np.int64))
        row_loss = backend.asarray(np.zeros(2, np.float32))
        launch = lambda: xent((2,), (32,), (a, labels, a, row_loss, np.int64(2),  # noqa: E731
                                            np.int64(2), np.float32(0.5)))
        if len(bad) == 2 and cupy.kernels == "source":
            launch()  # the kernel's own answer to a label outside the logits: NaN
            assert np.isnan(row_loss[1].view(np.ndarray))
            continue
        with pytest.raises(AssertionError, match="softmax_xent: labels"):
            launch()

def test_unusable_own_cublas_falls_back_to_cupy_matmul(monkeypatch):
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    monkeypatch.setattr(cupy_backend, "_modules", {})

    def broken(cupy):
        raise OSError("libcublas.so.13: cannot open shared object file")

    monkeypatch.setattr(cublas, "load_library", broken)
    backend = cupy_backend.CupyBackend()
    assert backend._blas is None
    assert backend.blas_status == ("CuPy's matmul (own cuBLAS handle unusable: OSError: "
                                   "libcublas.so.13: cannot open shared object file)")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(backend.gemm(on_device(a), on_device(a.T)), a @ a.T)
    assert "own cuBLAS" in cuda_graph.ineligible_reason(backend, None, None, None, None, None, 999)



def _backend_on(monkeypatch, lib):
    from fastnn import precision
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cublas, "load_library", lambda cupy: lib)
    monkeypatch.setattr(precision, "apply_to_cupy", lambda: None)
    return cupy_backend.CupyBackend()


class _RefusingCublas(FakeCublas):
    """The fake cuBLAS answering NOT_SUPPORTED (15) for one compute type, or
    EXECUTION_FAILED (13) for every GEMM once ``fail_all`` is set."""

    def __init__(self, refused_compute=None):
        super().__init__()
        self.refused_compute, self.fail_all = refused_compute, False

    def cublasGemmEx(self, *args):
        if self.fail_all:
            return 13
        if args[17] == self.refused_compute:
            return 15
        return super().cublasGemmEx(*args)


def test_a_precision_the_own_handle_refuses_at_start_goes_to_cupy(monkeypatch):
    """A TF32 GEMM cuBLAS will not do (the start-up probe's) leaves TF32 GEMMs
    to CuPy's matmul, with the reason in the status; float32 stays on the handle."""
    lib = _RefusingCublas(refused_compute=cublas.COMPUTE_32F_FAST_TF32)
    backend = _backend_on(monkeypatch, lib)
    assert backend._blas is not None
    assert backend._blas_refused == {"tf32"}
    assert backend.blas_status.endswith(
        "; tf32 GEMMs on CuPy's matmul (CublasError: cublasGemmEx failed with cublasStatus 15)")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = [c[0] for c in lib.calls].count("gemm")
    with fn.precision.using("tf32"):
        np.testing.assert_array_equal(backend.gemm(on_device(a), on_device(a.T)), a @ a.T)
    assert [c[0] for c in lib.calls].count("gemm") == before  # CuPy's matmul did it
    backend.gemm(on_device(a), on_device(a.T))
    assert [c[0] for c in lib.calls].count("gemm") == before + 1  # float32: the own handle


def test_a_gemm_failing_mid_training_falls_back_to_cupy_with_a_warning(monkeypatch):
    """A cuBLAS error outside a recording does not end the fit: the GEMM is
    redone on CuPy's matmul, once with a warning, and that precision stays there."""
    lib = _RefusingCublas()
    backend = _backend_on(monkeypatch, lib)
    assert backend._blas_refused == set()
    lib.fail_all = True
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    failed = "cuBLAS GEMM failed .*cublasStatus 13.*float32 GEMMs"
    with pytest.warns(RuntimeWarning, match=failed) as seen:
        got = backend.gemm(on_device(a), on_device(a.T))
    assert [w.filename for w in seen] == [__file__]  # the caller's line, not fastnn's
    np.testing.assert_array_equal(got, a @ a.T)
    assert backend._blas_refused == {"float32"}
    assert "float32 GEMMs on CuPy's matmul since: CublasError" in backend.blas_status
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later GEMMs go to CuPy without asking cuBLAS
        np.testing.assert_array_equal(backend.gemm(on_device(a), on_device(a.T)), a @ a.T)
    # The bias gradient then is a plain sum (CuPy's matmul would be TF32 under "tf32").
    dz = np.arange(6, dtype=np.float32).reshape(3, 2)
    with monkeypatch.context() as patch, fn.precision.using("tf32"):
        patch.setattr(sys.modules["cupy"], "matmul", None)
        np.testing.assert_array_equal(backend.bias_grad(on_device(dz)), dz.sum(0))
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    with pytest.warns(RuntimeWarning, match="float64 GEMMs"):  # its own entry
        np.testing.assert_array_equal(backend.gemm(on_device(x), on_device(x.T)), x @ x.T)


def test_gemms_on_another_device_than_the_handles_go_to_cupy(fake_gpu, monkeypatch):
    """A cuBLAS handle serves the device it was made on (the backend's)."""
    backend, _, lib = fake_gpu
    monkeypatch.setattr(sys.modules["cupy"].cuda.runtime, "getDevice", lambda: 1)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    lib.calls.clear()
    np.testing.assert_array_equal(backend.gemm(on_device(a), on_device(a.T)), a @ a.T)
    assert lib.calls == []


def test_own_cublas_passes_its_check_when_the_backend_starts_under_tf32(monkeypatch):
    """The start-up check compares with the exact product on the host: under
    set_precision("tf32") CuPy's own matmul is TF32 (off by ~1e-3), and checking
    against it turned fastnn's handle (and every CUDA graph) off for the process."""
    from fastnn import precision
    from fastnn.backends import cupy_backend

    fake = _fake_cupy([])
    fake.matmul = lambda a, b, out=None: np.matmul(a, b) * np.float32(1 + 1e-3)  # CuPy at TF32
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    lib = FakeCublas()
    monkeypatch.setattr(cublas, "load_library", lambda cupy: lib)
    monkeypatch.setattr(precision, "apply_to_cupy", lambda: None)
    with precision.using("tf32"):
        backend = cupy_backend.CupyBackend()
    assert backend._blas is not None, backend.blas_status
    assert backend.blas_status.startswith("own cuBLAS handle")
    assert [c[0] for c in lib.calls].count("gemm") == 10  # 4 transposes x 2 dtypes, tf32, bf16


def test_bf16_without_the_own_handle_still_rounds_the_gemm_inputs(monkeypatch):
    """A GEMM left to cupy.matmul (no own handle, or an operand it cannot take)
    under bf16 gets the bf16 values of its inputs, not exact float32."""
    from fastnn import precision
    from fastnn.backends import cupy_backend

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cublas, "load_library", lambda cupy: (_ for _ in ()).throw(OSError("no")))
    monkeypatch.setattr(precision, "apply_to_cupy", lambda: None)
    backend = cupy_backend.CupyBackend()
    assert backend._blas is None
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (5, 3)))
    a_dev, b_dev = on_device(a), on_device(b)
    with precision.using("bf16"):
        got = backend.to_numpy(backend.gemm(a_dev, b_dev))
        got_t = backend.to_numpy(backend.gemm(on_device(a.T), b_dev, trans_a=True))
    want = bf16_round(a) @ bf16_round(b)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_t, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - a @ b).max() > 1e-4  # the rounding is really there
    np.testing.assert_array_equal(backend.to_numpy(backend.gemm(a_dev, b_dev)), a @ b)  # exact
    with precision.using("bf16"):  # an empty product launches nothing
        assert backend.gemm(on_device(np.zeros((0, 5), np.float32)), b_dev).shape == (0, 3)

# =========================================================== recorded step == op by op
def _data(loss: str, n: int = 50):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n, 6)).astype(np.float32)
    if loss == "xent":
        return X, rng.integers(0, 4, n)
    return X, rng.standard_normal((n, 4)).astype(np.float32)


def _fit(backend, monkeypatch, graph: str, loss="xent", optimizer="adam", shuffle=True,
         epochs=3, batch=8, stop_when=None, dtype=np.float32, precision="float32"):
    from fastnn.precision import using

    monkeypatch.setenv("FASTNN_CUDA_GRAPH", graph)
    X, y = _data(loss)
    with fn.use_backend(backend), using(precision):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(6, 16), fn.Tanh(), fn.Linear(16, 12), fn.ReLU(),
                              fn.Linear(12, 4))
        model.astype(dtype)
        params = model.parameters()
        opt = {
            "adam": lambda: fn.Adam(params, lr=1e-2, weight_decay=1e-3),
            "adamw": lambda: fn.AdamW(params, lr=1e-2),
            "sgd": lambda: fn.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
            "rmsprop": lambda: fn.RMSprop(params, lr=1e-3, momentum=0.5, centered=True),
        }[optimizer]()
        loss_fn = fn.CrossEntropyLoss() if loss == "xent" else fn.MSELoss()
        history = fn.fit(model, loss_fn, opt, X.astype(dtype), y if loss == "xent" else y.astype(dtype),
                         epochs=epochs, batch_size=batch, shuffle=shuffle, seed=3,
                         stop_when=stop_when(opt) if stop_when else None, progress=False)
    return history, model.state_dict(), opt


@pytest.mark.parametrize("loss, optimizer, shuffle, dtype, precision", [
    ("xent", "adam", True, np.float32, "float32"),
    ("xent", "sgd", False, np.float32, "float32"),
    ("mse", "adamw", True, np.float64, "float32"),
    ("mse", "rmsprop", True, np.float32, "float32"),
    ("xent", "adam", True, np.float32, "bf16"),
])
def test_replayed_step_gives_the_bits_of_the_plain_step(fake_gpu, monkeypatch, loss, optimizer,
                                                        shuffle, dtype, precision):
    backend = fake_gpu[0]
    plain, want, opt_plain = _fit(backend, monkeypatch, "0", loss, optimizer, shuffle, dtype=dtype,
                                  precision=precision)
    assert FakeGraph.made == [] and plain.step_path == "per-op (no CUDA graph: FASTNN_CUDA_GRAPH=0)"
    graphed, got, opt_graph = _fit(backend, monkeypatch, "1", loss, optimizer, shuffle, dtype=dtype,
                                   precision=precision)
    assert graphed.step_path.startswith("cuda-graph")
    # 50 samples in batches of 8: 6 full batches and one of 2, 3 epochs; the
    # first full batch runs op by op (it allocates what the graph points at).
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].launches == 3 * 6 - 1
    assert opt_graph.step_count == opt_plain.step_count == 21
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert graphed.loss == plain.loss
    for key, value in opt_plain.state_dict().items():
        np.testing.assert_array_equal(opt_graph.state_dict()[key], value, err_msg=key)


def test_fake_gpu_fit_agrees_with_the_numpy_backend(fake_gpu, monkeypatch):
    """The fake kernels and GEMM are the CUDA contracts, not a copy of NumPy's path."""
    graphed, got, _ = _fit(fake_gpu[0], monkeypatch, "1")
    reference, want, _ = _fit(NumpyBackend(), monkeypatch, "1")
    assert reference.step_path == "per-op"
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(graphed.loss, reference.loss, rtol=1e-4)


def test_changed_hyper_parameters_are_recorded_again(fake_gpu, monkeypatch):
    """A graph fixes the learning rate: an epoch with another one records anew."""
    def halve_lr(opt):
        def stop_when(history):
            opt.lr *= 0.5
            return False
        return stop_when

    backend = fake_gpu[0]
    _, want, _ = _fit(backend, monkeypatch, "0", optimizer="sgd", stop_when=halve_lr)
    _, got, _ = _fit(backend, monkeypatch, "1", optimizer="sgd", stop_when=halve_lr)
    assert len(FakeGraph.made) == 3  # one per epoch
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_changed_layer_settings_are_recorded_again(fake_gpu, monkeypatch):
    """A graph also fixes what a layer passes by value (a LeakyReLU's slope):
    an epoch after a stop_when changed it records anew, as the plain step sees it."""
    backend = fake_gpu[0]
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((48, 6)).astype(np.float32), rng.integers(0, 4, 48)

    def run(graph):
        monkeypatch.setenv("FASTNN_CUDA_GRAPH", graph)
        FakeGraph.made.clear()
        with fn.use_backend(backend):
            fn.manual_seed(0)
            model = fn.Sequential(fn.Linear(6, 16), fn.LeakyReLU(0.5), fn.Linear(16, 4))
            slope = list(model.modules())[2]
            assert isinstance(slope, fn.LeakyReLU)

            def flatten_slope(history):
                slope.alpha *= 0.25
                return False

            fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1), X, y,
                   epochs=3, batch_size=8, seed=3, stop_when=flatten_slope, progress=False)
        return model.state_dict()

    want = run("0")
    got = run("1")
    assert len(FakeGraph.made) == 3  # one per epoch
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)



def test_a_recording_after_new_settings_makes_their_buffers_outside_the_graph(fake_gpu,
                                                                              monkeypatch):
    """bf16 from the second epoch: the graph is recorded again, and the buffers
    the new precision needs (bf16 copies) are made by an ordinary step first,
    not inside the recording, whose private pool must not own memory a layer
    keeps after the graph is gone."""
    from fake_cupy import _recording

    backend = fake_gpu[0]
    made_while_recording = []
    plain_empty = backend.empty

    def empty(shape, dtype):
        array = plain_empty(shape, dtype)
        if _recording():
            made_while_recording.append(id(array))
        return array

    monkeypatch.setattr(backend, "empty", empty)
    monkeypatch.setenv("FASTNN_CUDA_GRAPH", "1")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((48, 6)).astype(np.float32), rng.integers(0, 4, 48)

    def switch(history):
        fn.set_precision("bf16" if len(history.loss) == 1 else "float32")
        return False

    with fn.use_backend(backend):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(6, 16), fn.Tanh(), fn.Linear(16, 4))
        fn.fit(model, fn.CrossEntropyLoss(), fn.Adam(model.parameters(), lr=1e-2), X, y,
               epochs=3, batch_size=8, seed=3, stop_when=switch, progress=False)
    fn.set_precision("float32")
    assert len(FakeGraph.made) == 3  # float32, bf16, float32 again
    kept = [key for m in model.modules() for key, a in m.__dict__.get("_buffers", {}).items()
            if id(a) in made_while_recording]
    assert any(key[0].endswith("_bits") for m in model.modules()
               for key in m.__dict__.get("_buffers", {}))
    assert kept == []


def test_blocks_of_a_recording_keep_its_pool_alive():
    """allocator_keeping: a block allocated while recording holds its pool (CuPy's
    pooled blocks hold it only weakly), so the memory outlives the graph while
    an array still uses it, and goes with the last one."""
    import gc
    import types
    import weakref

    class Pool:  # CuPy's MemoryPool: frees its memory when released
        def malloc(self, size):
            return types.SimpleNamespace(ptr=4096 + size, pool=weakref.ref(self))

    class Unowned:  # cupy.cuda.UnownedMemory(ptr, size, owner, device_id)
        def __init__(self, ptr, size, owner, device_id):
            self.ptr, self.size, self._owner, self.device_id = ptr, size, owner, device_id

    class Pointer:  # cupy.cuda.MemoryPointer(mem, offset)
        def __init__(self, mem, offset):
            self.mem, self.ptr = mem, mem.ptr + offset

    cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=3),
                                 UnownedMemory=Unowned, MemoryPointer=Pointer)
    pool = Pool()
    alive = weakref.ref(pool)
    malloc = cuda_graph.allocator_keeping(pool, types.SimpleNamespace(cuda=cuda))
    block = malloc(256)
    assert block.ptr == 4096 + 256 and block.mem.size == 256 and block.mem.device_id == 3
    del pool, malloc
    gc.collect()
    assert alive() is not None  # the graph is gone, the block still in use
    del block
    gc.collect()
    assert alive() is None

def test_a_failed_recording_falls_back_to_the_plain_step(fake_gpu, monkeypatch):
    backend = fake_gpu[0]
    _, want, _ = _fit(backend, monkeypatch, "0")

    def refuse(self):
        raise fn.errors.CaptureUnsupported("refused for the test")

    monkeypatch.setattr(cuda_graph.GraphedStep, "_step_body", refuse)
    monkeypatch.setattr(cuda_graph, "MIN_STEPS", 1)
    history, got, _ = _fit(backend, monkeypatch, "auto")
    assert history.step_path == "per-op (CUDA graph failed: CaptureUnsupported: refused for the test)"
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert backend._capture is None and sys.modules["cupy"].cuda.get_current_stream().ptr == 0
    with pytest.raises(fn.errors.CaptureUnsupported):  # =1 is for tests: no silent fallback
        _fit(backend, monkeypatch, "1")


def test_values_meant_to_persist_are_not_first_made_while_recording(fake_gpu):
    """While a graph records, a fill is recorded rather than run: bias_grad's
    ones would hold garbage if the recording then failed, and new optimizer
    state would be zeroed again on every replay. Both refuse (fit then stays
    per-op); made outside a recording they are kept and reused."""
    backend = fake_gpu[0]
    rng = np.random.default_rng(0)
    dz = on_device(rng.standard_normal((7, 3)).astype(np.float32))
    with fn.use_backend(backend):
        model = fn.Sequential(fn.Linear(3, 2))
        opt = fn.RMSprop(model.parameters(), lr=0.01)
        model.forward(on_device(rng.standard_normal((4, 3)).astype(np.float32)))
        model.backward(on_device(np.ones((4, 2), np.float32)))
        opt.step()
        opt.momentum = 0.5  # the next step needs a momentum buffer
        backend._capture = object()  # what GraphedStep._record sets
        try:
            assert backend.capturing
            with pytest.raises(fn.errors.CaptureUnsupported, match="bias_grad over 7 rows"):
                backend.bias_grad(dz)
            with pytest.raises(fn.errors.CaptureUnsupported, match="'momentum_buffer'"):
                opt.step()
            assert (7, np.dtype(np.float32)) not in backend._ones
            assert "momentum_buffer" not in opt.groups[0].state
        finally:
            backend._capture = None
        assert not backend.capturing and not NumpyBackend().capturing
        np.testing.assert_allclose(backend.bias_grad(dz), dz.get().sum(0), rtol=1e-6)
        ones = backend._ones[(7, np.dtype(np.float32))]
        opt.step()
        buffer = opt.groups[0].state["momentum_buffer"]
        backend._capture = object()
        try:  # made once, reused while recording
            backend.bias_grad(dz)
            opt.step()
        finally:
            backend._capture = None
        assert backend._ones[(7, np.dtype(np.float32))] is ones
        assert opt.groups[0].state["momentum_buffer"] is buffer


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy standing in for the GPU: inf/nan
@pytest.mark.parametrize("out_act, error", [
    ("sigmoid", None),
    (None, r"BCELoss: predictions must be probabilities in \[0, 1\], got values in \[-"),
])
def test_bce_checks_its_range_without_a_host_read_per_step(fake_gpu, monkeypatch, out_act, error):
    """Inside fit on a GPU, BCELoss keeps the range it saw on the device and
    gives an out-of-range batch a NaN loss; fit then raises BCELoss's own error
    (as the CPU does at once), not a bare TrainingDiverged."""
    backend = fake_gpu[0]
    monkeypatch.setenv("FASTNN_CUDA_GRAPH", "0")
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 3)).astype(np.float32)
    y = (X[:, :1] > 0).astype(np.float32)
    results = {}
    for name, b in (("gpu", backend), ("cpu", NumpyBackend())):
        with fn.use_backend(b):
            fn.manual_seed(0)
            layers = [fn.Linear(3, 8), fn.Tanh(), fn.Linear(8, 1)] + \
                ([fn.Sigmoid()] if out_act else [])
            model = fn.Sequential(*layers)
            opt = fn.SGD(model.parameters(), lr=0.5)
            if error:
                with pytest.raises(fn.errors.InputError, match=error):  # evaluate too
                    fn.train.evaluate(model, fn.BCELoss(), X, y)
                with pytest.raises(fn.errors.InputError, match=error):
                    fn.fit(model, fn.BCELoss(), opt, X, y, epochs=2, batch_size=8, seed=1,
                           progress=False)
                continue
            results[name] = fn.fit(model, fn.BCELoss(), opt, X, y, epochs=3, batch_size=8,
                                   seed=1, progress=False).loss
    if not error:
        np.testing.assert_allclose(results["gpu"], results["cpu"], rtol=1e-5)


def test_steps_the_graph_cannot_hold_stay_per_op(fake_gpu, monkeypatch):
    backend = fake_gpu[0]
    X, y = _data("xent")
    with fn.use_backend(backend):
        model = fn.Sequential(fn.Linear(6, 4))
        opt = fn.SGD(model.parameters(), lr=0.1)

        class Scaled(fn.Module):  # a user module: its forward may read the host
            def forward(self, x):
                return x * 2.0

            def backward(self, dy):
                return dy * 2.0

        reason = cuda_graph.ineligible_reason
        Xd, yd = backend.asarray(X), backend.asarray(y)
        monkeypatch.setenv("FASTNN_CUDA_GRAPH", "auto")
        assert "too few" in reason(backend, model, fn.CrossEntropyLoss(), opt, Xd, yd, 10)
        assert reason(backend, model, fn.CrossEntropyLoss(), opt, Xd, yd, 100) is None
        custom = fn.Sequential(fn.Linear(6, 4), Scaled())
        assert "Scaled is not one of fastnn's own" in reason(
            backend, custom, fn.CrossEntropyLoss(), opt, Xd, yd, 100)
        assert reason(backend, model, fn.BCELoss(), opt, Xd, yd, 100) is None  # no host read
        odd = backend.asarray(np.zeros((50, 3), np.uint8))
        assert "rows of 3 bytes" in reason(backend, model, fn.CrossEntropyLoss(), opt, odd, yd, 100)
        adam = fn.Adam(model.parameters())
        model[0].weight.grad = backend.asarray(np.ones((6, 4), np.float32))
        adam.step()  # the bias had no gradient: it sat this step out (its own Adam count)
        assert "missed steps" in reason(backend, model, fn.CrossEntropyLoss(), adam, Xd, yd, 100)
        wide = backend.asarray(X.astype(np.float64))  # 48-byte rows: copyable, wrong dtype
        assert reason(backend, model, fn.CrossEntropyLoss(), opt, wide, yd, 100) \
            == "X is not in the model's dtype"
        mixed = fn.Sequential(fn.Linear(6, 4), fn.Linear(4, 4).astype(np.float64))
        mixed_opt = fn.SGD(mixed.parameters(), lr=0.1)
        assert reason(backend, mixed, fn.CrossEntropyLoss(), mixed_opt, Xd, yd, 100) \
            == "parameters of several dtypes"
    with fn.use_backend("numpy") as cpu:
        assert reason(cpu, model, fn.CrossEntropyLoss(), opt, X, y, 100) == "not on the CuPy backend"


@pytest.mark.parametrize("precision", ["float32", "tf32", "bf16"])
def test_bench_graph_contender_is_fits_replay_path(fake_gpu, precision):
    """fastnn-cupy-graph: replays past its batches (an epoch wrap) give the
    numbers of the same steps run op by op over the same order, at each GEMM
    precision (the epoch wrap happens outside the recording's precision block:
    the graph must not be dropped there)."""
    from fastnn import benchmarking as bm
    from fastnn.nn.module import training_step_mode

    backend = fake_gpu[0]
    w = bm.Workload("t", (6, 16, 4), 8, optimizer="adam", lr=1e-2, precision=precision)
    batches = bm.steps.graph_batches(w)
    run = bm.make_step(w, "fastnn-cupy-graph")
    last = run(batches + 4)
    assert FakeGraph.made[-1].launches == batches + 4 and len(FakeGraph.made) == 1
    got = run.model.state_dict()

    with fn.use_backend(backend), fn.precision.using(precision):
        model, loss_fn, opt = bm.build_fastnn_model(w)
        parts = [bm.make_batch(w, i) for i in range(batches)]
        X = backend.asarray(np.concatenate([x for x, _ in parts]))
        y = backend.asarray(np.concatenate([t for _, t in parts]))
        order = np.random.default_rng(0).permutation(len(X))
        with training_step_mode(model):
            for step in range(batches + 5):  # the plain first step, then the replays
                b = step % batches  # epoch 2 from step ``batches``
                rows = order[b * 8:(b + 1) * 8]
                opt.zero_grad()
                loss = loss_fn.forward(model.forward(X[rows]), y[rows])
                model.backward(loss_fn.backward())
                opt.step()
    assert last == float(loss)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("graph", ["0", "1"])
@pytest.mark.parametrize("loss", ["xent", "mse", "bce"])
def test_fit_reads_the_device_a_fixed_number_of_times_per_epoch(fake_gpu, monkeypatch, graph, loss):
    """No host round trip per step: fit's reads of device values (each one a sync
    on a GPU) do not grow with the number of batches, op by op or replayed."""
    import fake_cupy

    monkeypatch.setenv(cuda_graph.ENV, graph)
    backend = fake_gpu[0]
    rng = np.random.default_rng(0)

    def reads(n_batches):
        fn.manual_seed(0)
        X = rng.standard_normal((8 * n_batches, 6)).astype(np.float32)
        out = {"xent": 3, "mse": 2, "bce": 1}[loss]
        y = {"xent": rng.integers(0, 3, len(X)), "mse": rng.random((len(X), 2), np.float32),
             "bce": rng.integers(0, 2, (len(X), 1)).astype(np.float32)}[loss]
        with fn.use_backend(backend):
            layers = [fn.Linear(6, 16), fn.ReLU(), fn.Linear(16, out)]
            model = fn.Sequential(*layers, *([fn.Sigmoid()] if loss == "bce" else []))
            loss_fn = {"xent": fn.CrossEntropyLoss, "mse": fn.MSELoss, "bce": fn.BCELoss}[loss]()
            opt = fn.Adam(model.parameters(), lr=1e-2)
            Xd, yd = backend.asarray(X), backend.asarray(y)
            before = fake_cupy.host_reads[0]
            history = fn.fit(model, loss_fn, opt, Xd, yd, epochs=2, batch_size=8, progress=False)
        assert history.step_path.startswith("cuda-graph" if graph == "1" else "per-op"), \
            history.step_path
        return fake_cupy.host_reads[0] - before

    few, many = reads(8), reads(24)
    assert few == many > 0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy standing in for the GPU: overflow
@pytest.mark.parametrize("graph", ["0", "1"])
def test_a_diverged_epoch_on_a_gpu_leaves_the_model_as_it_started(fake_gpu, monkeypatch, graph):
    """On a GPU fit sees the NaN only at the epoch's end, after later steps made the
    weights NaN: it puts back the epoch's start (weights, optimizer state, step
    count) before raising, so a caught TrainingDiverged leaves a usable model."""
    monkeypatch.setenv(cuda_graph.ENV, graph)
    backend = fake_gpu[0]
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 6)).astype(np.float32), rng.integers(0, 3, 64)
    with fn.use_backend(backend):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(6, 16), fn.ReLU(), fn.Linear(16, 3))
        opt = fn.SGD(model.parameters(), lr=0.05, momentum=0.9)
        seen = {}

        def blow_up_after_the_first_epoch(history):
            seen["weights"] = model.state_dict()
            seen["momentum"] = {k: fn.to_numpy(v).copy() for k, v in opt.groups[0].state.items()}
            seen["steps"] = opt.step_count
            opt.lr = 1e30
            return False

        with pytest.raises(fn.TrainingDiverged, match="as it was at the start of epoch 2"):
            fn.fit(model, fn.CrossEntropyLoss(), opt, X, y, epochs=3, batch_size=8,
                   stop_when=blow_up_after_the_first_epoch, progress=False)
    for name, value in model.state_dict().items():
        assert np.isfinite(value).all(), name
        np.testing.assert_array_equal(value, seen["weights"][name], err_msg=name)
    for name, value in opt.groups[0].state.items():
        np.testing.assert_array_equal(fn.to_numpy(value), seen["momentum"][name], err_msg=name)
    assert opt.step_count == seen["steps"] == 8


def test_label_range_of_float_targets_reads_nothing_back(fake_gpu):
    import fake_cupy
    from fastnn.nn.module import label_range_of

    backend = fake_gpu[0]
    before = fake_cupy.host_reads[0]
    assert label_range_of(backend.asarray(np.ones((5, 2), np.float32))) is None
    assert fake_cupy.host_reads[0] == before
    assert label_range_of(backend.asarray(np.array([3, 1, 2]))) == (1, 3)


def test_label_range_of_device_labels_is_one_read(fake_gpu):
    import fake_cupy
    from fastnn.nn.module import label_range_of

    labels = fake_cupy.on_device(np.array([4, 0, 7, 2], np.int64))
    before = fake_cupy.host_reads[0]
    with fn.use_backend(fake_gpu[0]):
        assert label_range_of(labels) == (0, 7)
    assert fake_cupy.host_reads[0] - before == 1


def test_fit_keeps_device_data_on_the_device(fake_gpu, monkeypatch):
    """X and y already on the GPU are validated and cast there: fit never
    copies them to the host (no .get() of the data), and a NaN in them is
    still found, by index."""
    import fake_cupy
    from fastnn import inputs

    backend = fake_gpu[0]
    rng = np.random.default_rng(3)
    X = fake_cupy.on_device(rng.standard_normal((40, 5)))  # float64: cast on the device
    y = fake_cupy.on_device(rng.integers(0, 3, 40))
    copied = []
    original_get = fake_cupy.DeviceArray.get

    def get(self):
        if self.size >= 40:
            copied.append(self.shape)
        return original_get(self)

    monkeypatch.setattr(fake_cupy.DeviceArray, "get", get)
    with fn.use_backend(backend):
        Xd, yd, labels = inputs.prepare(X, y, np.float32, "fit")
        assert Xd.dtype == np.float32 and isinstance(Xd, fake_cupy.DeviceArray)
        assert np.shares_memory(yd, y) and labels == (0, 2)  # int64 labels: no copy
        model = fn.Sequential(fn.Linear(5, 8), fn.Tanh(), fn.Linear(8, 3))
        history = fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1),
                         X, y, epochs=2, batch_size=16, seed=0, progress=False,
                         validation_data=(X, y))
        assert len(history.loss) == 2
        bad = X.copy()
        bad[7, 3] = np.nan
        with pytest.raises(fn.FastnnError, match=r"NaN or inf \(first at index \(7, 3\)\)"):
            fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1),
                   bad, y, epochs=1, progress=False)
    assert copied == []


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_evaluate_reads_the_device_once_whatever_the_batch_count(fake_gpu, loss):
    """evaluate (fit's validation) keeps each batch's loss on the device and
    checks the label range once: one read per call, not three per batch."""
    import fake_cupy

    backend = fake_gpu[0]
    rng = np.random.default_rng(1)

    def reads(n_batches):
        X = rng.standard_normal((8 * n_batches, 6)).astype(np.float32)
        y = rng.integers(0, 3, len(X)) if loss == "xent" else rng.random((len(X), 3), np.float32)
        with fn.use_backend(backend):
            model = fn.Sequential(fn.Linear(6, 16), fn.ReLU(), fn.Linear(16, 3))
            loss_fn = fn.CrossEntropyLoss() if loss == "xent" else fn.MSELoss()
            before = fake_cupy.host_reads[0]
            value = fn.evaluate(model, loss_fn, X, y, batch_size=8)
            count = fake_cupy.host_reads[0] - before
        with fn.use_backend("numpy"):
            model.to("numpy")
            want = fn.evaluate(model, loss_fn, X, y, batch_size=8)
        assert value == pytest.approx(want, rel=1e-6)
        return count

    assert reads(2) == reads(9) == 1


def test_numpy_arrays_given_to_gpu_layers_are_refused_naming_the_layer(fake_gpu):
    backend = fake_gpu[0]
    with fn.use_backend(backend):
        act = fn.Tanh()
        act(backend.asarray(np.ones((2, 3), np.float32)))
        for call, what in ((lambda: act(np.ones((2, 3), np.float32)), "input"),
                           (lambda: act.backward(np.ones((2, 3), np.float32)), "dy")):
            with pytest.raises(TypeError, match=f"Tanh: got {what} as a numpy.ndarray but the "
                                                "current backend is cupy"):
                call()


def test_predict_reads_the_device_once(fake_gpu):
    """predict copies each batch's output on the device (the layers reuse their
    buffers batch to batch) and reads the whole result back once."""
    import fake_cupy

    backend = fake_gpu[0]
    X = np.random.default_rng(2).standard_normal((50, 6)).astype(np.float32)
    with fn.use_backend(backend):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(6, 16), fn.ReLU(), fn.Linear(16, 3))
        before = fake_cupy.host_reads[0]
        got = fn.predict(model, X, batch_size=8)
        assert fake_cupy.host_reads[0] - before == 1
    assert type(got) is np.ndarray and got.shape == (50, 3)
    with fn.use_backend("numpy"):
        model.to("numpy")
        np.testing.assert_allclose(got, fn.predict(model, X, batch_size=8), rtol=1e-6)


def test_small_integer_labels_are_cast_once_and_the_step_still_records(fake_gpu, monkeypatch):
    """uint8 labels (common for images) go to the device as int64 once: no cast
    per step, and rows of 8 bytes the CUDA graph's batch gather takes."""
    monkeypatch.setenv("FASTNN_CUDA_GRAPH", "1")
    backend = fake_gpu[0]
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((48, 6)).astype(np.float32), rng.integers(0, 4, 48).astype(np.uint8)
    casts = []
    plain_astype = backend.xp.ndarray.astype

    def astype(self, dtype, *args, **kwargs):
        casts.append(np.dtype(dtype))
        return plain_astype(self, dtype, *args, **kwargs)

    with fn.use_backend(backend):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(6, 8), fn.Tanh(), fn.Linear(8, 4))
        monkeypatch.setattr(backend.xp.ndarray, "astype", astype)
        history = fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1), X, y,
                         epochs=2, batch_size=8, progress=False)
    assert history.step_path.startswith("cuda-graph"), history.step_path
    assert np.dtype(np.int64) not in casts, casts


@pytest.mark.parametrize("fast_path, why", [
    ("0", "FASTNN_FAST_PATH=0"),
    (None, "numba.cuda: no usable CUDA driver or device"),
])
def test_bench_kernel_contender_says_why_it_cannot_run(fake_gpu, monkeypatch, fast_path, why):
    """fastnn-cupy-kernel needs numba.cuda on a real device (and the fast path on):
    without, it is left out of the table with the reason, never timed as
    something else. (numba.cuda's verdict is fixed here: on a GPU machine it is
    usable, but not with the stand-in for CuPy.)"""
    from fastnn import benchmarking as bm
    from fastnn import gpu_compiled

    monkeypatch.setitem(gpu_compiled._status, "cuda", "numba.cuda: no usable CUDA driver or device")
    if fast_path is None:
        monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)
    with pytest.raises(RuntimeError, match=f"one-launch kernel does not apply here: {why}"):
        bm.make_step(bm.WORKLOADS["x"], "fastnn-cupy-kernel")


def test_a_kernel_that_failed_its_probe_or_raised_is_named_not_hidden(fake_gpu, monkeypatch):
    """On a GPU the one-launch kernel may fail its probe (a wrong answer) or
    plan_for_fit may hit a bug: fit still trains on the ordinary path, but the
    bug is warned once, and the benchmark row says which of the two it was
    (not "not a narrow MLP")."""
    from fastnn import benchmarking as bm
    from fastnn import gpu_compiled

    monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)
    probe = "numba.cuda kernel probe gave loss 0.5, w 0.5, b 0 (want 0.125, 0.55, 0.05)"
    monkeypatch.setattr(gpu_compiled, "_status", {"cuda": None, "float32": probe})
    with pytest.raises(RuntimeError, match=re.escape(probe)):
        bm.make_step(bm.WORKLOADS["x"], "fastnn-cupy-kernel")

    def broken(*args, **kwargs):
        raise IndexError("layout row 3 out of range")

    monkeypatch.setattr(gpu_compiled, "plan_fast_path", broken)
    X, y = _data("xent")
    with fn.use_backend(fake_gpu[0]):
        model = fn.Sequential(fn.Linear(6, 4))
        with pytest.warns(RuntimeWarning, match="one-launch CUDA kernel .* failed, fit runs the "
                          "ordinary path .*IndexError: layout row 3 out of range") as seen:
            history = fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1),
                             X, y, epochs=1, batch_size=8, progress=False)
        assert history.loss and np.isfinite(history.loss[-1])
        assert [w.filename for w in seen] == [__file__]  # names the fit(...) line
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same failure again: no second warning
            fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1), X, y,
                   epochs=1, batch_size=8, progress=False)
    assert gpu_compiled.last_error() == "gpu_compiled: IndexError: layout row 3 out of range"
    with pytest.raises(RuntimeError, match="does not apply here: gpu_compiled: IndexError"):
        bm.make_step(bm.WORKLOADS["x"], "fastnn-cupy-kernel")


# =========================================================== on a GPU
@pytest.fixture(scope="module")
def real_gpu():
    reason = fn.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(reason)
    with fn.use_backend("cupy") as backend:
        pass  # only the instance: the current backend stays as it was
    if backend._blas is None:
        pytest.fail(backend.blas_status)  # on a GPU machine the own handle must work
    return backend


@pytest.fixture(params=[pytest.param("cupy", marks=pytest.mark.gpu), "cuda-on-cpu"])
def gpu(request):
    """The GPU, and the CPU with the kernels' own CUDA code (``source_gpu``):
    what a test checks of fastnn's GPU step (the recorded graph's bits, the
    bf16 hand-over) runs in CI as well, on the kernels the device will run."""
    if request.param == "cupy":
        return request.getfixturevalue("real_gpu")
    return request.getfixturevalue("source_gpu")[0]


@pytest.mark.parametrize("loss, optimizer", [("xent", "adam"), ("xent", "sgd"), ("mse", "adamw")])
def test_gpu_replayed_step_gives_the_bits_of_the_plain_step(gpu, monkeypatch, loss, optimizer):
    monkeypatch.setenv("FASTNN_FAST_PATH", "0")
    plain, want, _ = _fit(gpu, monkeypatch, "0", loss, optimizer, epochs=5)
    graphed, got, _ = _fit(gpu, monkeypatch, "1", loss, optimizer, epochs=5)
    assert graphed.step_path.startswith("cuda-graph"), graphed.step_path
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert graphed.loss == plain.loss


def test_gpu_replayed_step_without_shuffle_agrees_to_rounding(gpu, monkeypatch):
    """shuffle=False: the plain step reads batches of 5 rows of 24 bytes in place
    (8-byte aligned), the replay from its own buffer: cuBLAS may pick another
    kernel for each, so the fits agree to rounding (cuda_graph's docstring)."""
    monkeypatch.setenv("FASTNN_FAST_PATH", "0")
    plain, want, _ = _fit(gpu, monkeypatch, "0", "xent", "sgd", shuffle=False, batch=5)
    graphed, got, _ = _fit(gpu, monkeypatch, "1", "xent", "sgd", shuffle=False, batch=5)
    assert graphed.step_path.startswith("cuda-graph"), graphed.step_path
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(graphed.loss, plain.loss, rtol=1e-5)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gpu_own_cublas_matches_numpy(gpu, trans_a, trans_b):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 100)).astype(np.float32)
    a_arg = np.ascontiguousarray(a.T) if trans_a else a
    b_arg = np.ascontiguousarray(b.T) if trans_b else b
    got = gpu.gemm(gpu.asarray(a_arg), gpu.asarray(b_arg), trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(gpu.to_numpy(got), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_backend_started_under_tf32_keeps_its_own_cublas_handle(real_gpu):
    """A fresh process whose first backend use is under tf32 (fastnn train
    --precision tf32 does that) still records CUDA graphs."""
    import subprocess
    from pathlib import Path

    code = ("import fastnn as fn\n"
            "fn.set_precision('tf32')\n"
            "b = fn.use_backend('cupy')\n"
            "assert b._blas is not None, b.blas_status\n"
            "print('ok')\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_gpu_bf16_gemm_left_to_cupy_rounds_its_inputs(gpu, monkeypatch):
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((64, 48), (48, 32)))
    want = bf16_round(a).astype(np.float64) @ bf16_round(b).astype(np.float64)
    monkeypatch.setattr(gpu, "_blas", None)  # as when the own handle is unusable
    with fn.precision.using("bf16"):
        got = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(b)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 sums of exact products
    assert np.abs(got - a.astype(np.float64) @ b).max() > 1e-3


def test_gpu_bf16_fused_operand_bits_train_like_separate_conversions(gpu, monkeypatch):
    """bias_act_bf16 / act_backward_bf16 round exactly as f32_to_bf16: the fused
    hand-over trains to the same bits as converting each operand on its own."""
    fused, _ = _bf16_mlp_steps(gpu)
    base = Backend  # the generic path (CupyBackend's MRO also holds its mixins)
    monkeypatch.setattr(gpu, "bias_act_operand", base.bias_act_operand.__get__(gpu))
    monkeypatch.setattr(gpu, "act_backward_operand", base.act_backward_operand.__get__(gpu))
    separate, _ = _bf16_mlp_steps(gpu)
    for name, value in fused.items():
        np.testing.assert_array_equal(value, separate[name], err_msg=name)


def test_gpu_bf16_and_tf32_gemms_round_their_inputs(gpu):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((256, 512)).astype(np.float32)
    b = rng.standard_normal((512, 128)).astype(np.float32)
    exact = a.astype(np.float64) @ b
    try:
        fn.set_precision("bf16")
        got = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(b)))
        want = bf16_round(a).astype(np.float64) @ bf16_round(b)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        fn.set_precision("tf32")
        tf32 = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(b)))
        assert 1e-5 < np.abs(tf32 - exact).max() < 0.1
    finally:
        fn.set_precision("float32")
    f32 = gpu.to_numpy(gpu.gemm(gpu.asarray(a), gpu.asarray(b)))
    assert np.abs(f32 - exact).max() < 1e-3


@pytest.mark.parametrize("precision, accuracy", [("float32", 0.95), ("tf32", 0.95), ("bf16", 0.94)])
def test_gpu_fit_on_digits_replays_its_step_and_learns(gpu, monkeypatch, precision, accuracy,
                                                       request):
    """End to end, as a user runs it: fit picks the CUDA graph by itself (auto)
    and reaches the CPU's test accuracy at every GEMM precision."""
    if precision == "tf32" and request.node.callspec.params["gpu"] == "cuda-on-cpu":
        pytest.skip("tf32 on the CPU stand-in runs float32's kernels (its fake cuBLAS "
                    "rounds the inputs): float32's case covers it")
    from fastnn import data
    from fastnn.precision import using

    monkeypatch.setenv("FASTNN_FAST_PATH", "0")  # the one-launch kernel would take this net
    monkeypatch.delenv("FASTNN_CUDA_GRAPH", raising=False)
    X, y = data.load_digits("train")
    Xt, yt = data.load_digits("test")
    mean, scale = X.mean(0), X.std(0) + 0.1
    with fn.use_backend(gpu), using(precision):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(64, 256), fn.ReLU(), fn.Linear(256, 10))
        history = fn.fit(model, fn.CrossEntropyLoss(), fn.Adam(model.parameters()),
                         (X - mean) / scale, y, epochs=30, batch_size=32, seed=0, progress=False)
        predicted = fn.predict(model, (Xt - mean) / scale).argmax(1)
    assert history.step_path.startswith("cuda-graph"), history.step_path
    assert (predicted == yt).mean() >= accuracy


def test_bench_environment_says_where_the_gemms_run(fake_gpu):
    """A bf16 or TF32 row is only that precision's speed when its GEMMs ran on
    fastnn's handle: the benchmark's JSON records the status and what went to CuPy."""
    from fastnn.benchmarking.report import fastnn_gemm_path

    backend = fake_gpu[0]
    assert fastnn_gemm_path() == {"status": backend.blas_status, "left_to_cupy": [],
                                  "own_handle": True}
    backend._blas_refused.add("bf16")
    assert fastnn_gemm_path()["left_to_cupy"] == ["bf16"]


def test_bench_rows_say_where_their_gemms_ran(fake_gpu, monkeypatch):
    """Each fastnn-cupy row records the GEMM route after its block: a cuBLAS
    failure mid-run (the precision left to CuPy) shows on the rows measured after."""
    from fastnn.benchmarking import runner
    from fastnn.benchmarking.report import gemm_route
    from fastnn.benchmarking.workloads import ALL_WORKLOADS

    backend = fake_gpu[0]
    assert gemm_route("tf32") == gemm_route("float32") == "own cuBLAS handle"
    monkeypatch.setattr(runner, "make_step", lambda *a: (lambda k: 0.5))
    row = runner.LocalRunner(ALL_WORKLOADS["d-tf32"], "fastnn-cupy", threads=1)
    row.block(1)
    assert row.info["gemms"] == "own cuBLAS handle"
    backend._blas_refused.add("tf32")
    row.block(1)
    assert row.info["gemms"] == "CuPy's matmul" == gemm_route("tf32")
    assert gemm_route("float32") == "own cuBLAS handle"
    floor = runner.LocalRunner(ALL_WORKLOADS["d-tf32"], "floor-cupy", threads=1)
    floor.block(1)
    assert "gemms" not in floor.info  # cupy.matmul, whatever the backend does
