"""The fused-kernel bandwidth benchmark (fastnn/benchmarking/gpu_kernels.py).

On the CPU the CuPy backend runs on ``tests/fake_cupy.py``: every op must
reach its fused kernel (not the generic fallback) with arguments that give
the NumPy backend's numbers, and the GB/s arithmetic is checked with a timer
whose durations are known. The ``gpu`` test runs the real thing, small.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import types

import numpy as np
import pytest

import fastnn as fn
from fake_cupy import FakeCublas, _fake_cupy, on_device, time_by_host_clock
from fastnn.backends import cublas
from fastnn.backends.numpy_backend import NumpyBackend
from fastnn.benchmarking import gpu_kernels
from fastnn.errors import InputError
from fastnn.precision import bf16_bits

N = 4096  # 4 rows of gpu_kernels.ROW
KERNEL = {  # op -> the one fused kernel it must launch (copy launches none of fastnn's)
    "copy": [],
    "bias_act relu in place": ["bias_act_f32"],
    "bias_act gelu to out": ["bias_act_f32"],
    "act_backward relu": ["act_backward_f32"],
    "act_backward tanh": ["act_backward_f32"],
    "sgd momentum": ["sgd_f32"],
    "adam": ["adam_f32"],
    "f32_to_bf16": ["f32_to_bf16"],
    "bias_act_bf16 relu in place": ["bias_act_bf16"],
    "act_backward_bf16 relu": ["act_backward_bf16"],
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """(CupyBackend on the fake cupy, launched kernel names, the fake cupy module)."""
    from fastnn.backends import cupy_backend

    launches: list[str] = []
    fake = _fake_cupy(launches)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cublas, "load_library", lambda cupy: FakeCublas())
    backend = cupy_backend.CupyBackend()
    launches.clear()  # the start-up probes': a test counts its own
    yield backend, launches, fake
    monkeypatch.undo()  # the real apply_to_cupy again, and no fake cupy to apply it to
    fn.set_precision("float32")


def _ops():
    return {op.name: op for op in gpu_kernels.OPS}


def test_op_table_names_and_bytes():
    assert list(_ops()) == list(KERNEL)
    assert {op.name: op.bytes_per_element for op in gpu_kernels.OPS} == {
        "copy": 8, "bias_act relu in place": 8, "bias_act gelu to out": 12,
        "act_backward relu": 12, "act_backward tanh": 12, "sgd momentum": 20, "adam": 28,
        "f32_to_bf16": 6, "bias_act_bf16 relu in place": 10, "act_backward_bf16 relu": 14,
    }


def test_measure_launches_every_kernel_and_does_the_bandwidth_arithmetic(fake_gpu, monkeypatch):
    backend, launches, _ = fake_gpu
    # Known fake bandwidths (bytes/s): copy the fastest, each later op 5% below it.
    bandwidth = {op.name: 2e12 * (1 - 0.05 * i) for i, op in enumerate(gpu_kernels.OPS)}
    owner: dict = {}  # launch callable -> op name, so the timer knows what it times

    def tagged(op):
        def build(b, n):
            launch = op.build(b, n)
            owner[launch] = op.name
            return launch
        return dataclasses.replace(op, build=build)

    monkeypatch.setattr(gpu_kernels, "OPS", tuple(tagged(op) for op in gpu_kernels.OPS))
    timed = []

    def fake_timer(launch, repeats):
        name = owner[launch]
        before = len(launches)
        launch()
        assert launches[before:] == KERNEL[name], name  # the fused kernel, no fallback
        timed.append((name, repeats))
        return _ops()[name].bytes_per_element * N / bandwidth[name]

    launches.clear()
    results = gpu_kernels.measure(backend, n_elements=N, repeats=2, timer=fake_timer)
    assert [r["op"] for r in results] == list(KERNEL)
    assert timed == [(name, 2) for name in KERNEL for _ in range(gpu_kernels.BATCHES)]
    # 2 warm-up launches + one per timed batch, per op.
    per_op = 2 + gpu_kernels.BATCHES
    assert sorted(launches) == sorted(k for ks in KERNEL.values() for k in ks * per_op)
    for r in results:
        bpe = r["bytes_per_element"]
        assert r["n_elements"] == N
        assert r["seconds"] == pytest.approx(bpe * N / bandwidth[r["op"]])
        assert r["gb_per_s"] == pytest.approx(bpe * N / r["seconds"] / 1e9)
        assert r["gb_per_s"] == pytest.approx(bandwidth[r["op"]] / 1e9)
        assert r["fraction_of_copy"] == pytest.approx(bandwidth[r["op"]] / bandwidth["copy"])
        assert r["meets_target"] == (r["fraction_of_copy"] >= gpu_kernels.TARGET)
    assert results[0]["fraction_of_copy"] == 1.0
    assert [r["meets_target"] for r in results] == [True] * 5 + [False] * 5  # 0.75 and below
    assert not backend._bf16  # the benchmark's bf16 scratch is not left pinned


def test_bias_act_relu_in_place_computes_relu_of_z_plus_bias(fake_gpu):
    backend, launches, _ = fake_gpu
    launch = _ops()["bias_act relu in place"].build(backend, N)
    z, bias, act = launch.args
    assert act == "relu" and launch.keywords["out"] is z
    assert z.shape == (N // gpu_kernels.ROW, gpu_kernels.ROW) and bias.shape == (gpu_kernels.ROW,)
    assert z.dtype == bias.dtype == np.float32
    want = np.maximum(z + bias, np.float32(0))
    assert (want == 0).any() and (want > 0).any()  # both sides of the relu exercised
    launch()
    assert launches == ["bias_act_f32"]
    np.testing.assert_array_equal(z, want)


@pytest.mark.parametrize("name", ["bias_act_bf16 relu in place", "act_backward_bf16 relu"])
def test_bf16_operand_ops_write_the_plain_result_and_its_bits(fake_gpu, name):
    """Timed under bf16 (else the fused launch would not happen) and into one
    reused bits buffer; the float32 result is the plain op's."""
    backend, launches, _ = fake_gpu
    launch = _ops()[name].build(backend, N)
    first, second, act = launch.args
    if name.startswith("bias_act"):
        want = np.maximum(first + second, np.float32(0))
    else:
        want = np.where(second > 0, first, np.float32(0))
    launch()
    launch()
    assert launches == [name.split()[0]] * 2 and fn.get_precision() == "float32"
    if name.startswith("bias_act"):
        np.testing.assert_array_equal(first, np.maximum(want + second, 0))  # in place, twice
    else:
        np.testing.assert_array_equal(first, np.where(second > 0, want, np.float32(0)))


def test_sgd_momentum_step_matches_numpy(fake_gpu):
    backend, launches, _ = fake_gpu
    launch = _ops()["sgd momentum"].build(backend, N)
    param, grad, buf = launch.args
    assert param.shape == grad.shape == buf.shape == (N,) and param.dtype == np.float32
    assert launch.keywords["first_step"] is False and launch.keywords["momentum"] == 0.9
    t = np.float32
    buf_want = buf * t(0.9) + t(1.0) * grad
    param_want = param - t(0.01) * buf_want
    grad_before = grad.copy()
    launch()
    assert launches == ["sgd_f32"]
    np.testing.assert_allclose(buf, buf_want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(param, param_want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(grad, grad_before)


@pytest.mark.parametrize("name", list(KERNEL))
def test_every_op_gives_the_numpy_backends_result(fake_gpu, name):
    backend, _, _ = fake_gpu
    launch = _ops()[name].build(backend, N)
    # deepcopy keeps the aliasing (out=z, out=dy) of the original arguments.
    args, kwargs = copy.deepcopy((launch.args, launch.keywords))
    got = launch()
    if name == "f32_to_bf16":
        np.testing.assert_array_equal(got, bf16_bits(args[0]))
        return
    func = launch.func
    ref = getattr(NumpyBackend(), func.__name__) if getattr(func, "__self__", None) is backend \
        else func
    ref(*args, **kwargs)
    for before, after in zip(args, launch.args):
        if isinstance(after, np.ndarray):
            np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-7, err_msg=name)
    for key, value in kwargs.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(launch.keywords[key], value, rtol=1e-6, atol=1e-7)


@pytest.fixture
def fake_gpu_main(fake_gpu, monkeypatch):
    """fake_gpu, with what main needs: the backend registered, CUDA events (host
    clock stand-ins: exercises the default timer) and version queries."""
    backend, _, fake = fake_gpu
    from fastnn import backends as registry

    monkeypatch.setitem(registry._instances, "cupy", backend)  # available_backends finds it

    time_by_host_clock(monkeypatch, fake)
    return fake_gpu


def test_main_on_the_fake_gpu_prints_the_table_and_writes_json(fake_gpu_main, tmp_path, capsys):
    path = tmp_path / "kernels.json"
    assert gpu_kernels.main(["--elements", str(N), "--repeats", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "% of copy" in out and ">= 80% of the device copy bandwidth" in out
    assert all(name in out for name in KERNEL)
    doc = json.loads(path.read_text())
    assert doc["device"] == "Fake GPU"
    assert doc["versions"]["cupy"] == "0.0-fake"
    assert (doc["versions"]["cuda_runtime"], doc["versions"]["cuda_driver"]) == (12040, 12080)
    assert doc["n_elements"] == N and doc["repeats"] == 2
    assert doc["queued_ahead"] is True and "queued behind a spin" in doc["gpu"]["timing"]
    assert doc["command"].endswith(f"gpu_kernels --elements {N} --repeats 2 --json {path}")
    assert doc["date"].endswith("+00:00")
    assert doc["target"]["fraction_of_copy"] == 0.8
    assert doc["complete"] is True and doc["ops"] == list(KERNEL)
    assert not (tmp_path / "kernels.json.tmp").exists()  # renamed over the file
    assert [r["op"] for r in doc["results"]] == list(KERNEL)
    assert all(r["gb_per_s"] > 0 and r["seconds"] > 0 for r in doc["results"])
    fusion = doc["bias_grad_fusion"]["results"]
    assert [r["shape"] for r in fusion] == [list(s) for s in gpu_kernels.BIAS_GRAD_SHAPES]
    assert all(r["fused_us"] > 0 and r["separate_us"] > 0 and r["speedup"] > 0 for r in fusion)
    assert "act_backward + bias grad" in out


def _failing(name, exc=RuntimeError("out of memory\nmore")):
    """OPS with op ``name`` raising ``exc`` when built."""
    def build(backend, n):
        raise exc

    return tuple(dataclasses.replace(op, build=build) if op.name == name else op
                 for op in gpu_kernels.OPS)


def _host_timer(launch, repeats):  # seconds per launch: 1 ms, whatever the op
    launch()
    return 1e-3


def test_an_op_that_raises_is_recorded_and_the_others_are_measured(fake_gpu, monkeypatch, capsys):
    backend, _, _ = fake_gpu
    monkeypatch.setattr(gpu_kernels, "OPS", _failing("adam"))
    seen = []
    results = gpu_kernels.measure(backend, n_elements=N, repeats=2, timer=_host_timer,
                                  on_result=lambda done: seen.append([r["op"] for r in done]))
    assert [r["op"] for r in results] == list(KERNEL)
    assert seen == [list(KERNEL)[:i + 1] for i in range(len(KERNEL))]  # after every op
    adam = next(r for r in results if r["op"] == "adam")
    assert adam["error"] == "RuntimeError: out of memory"  # first line only
    assert "gb_per_s" not in adam and adam["fraction_of_copy"] is None
    assert adam["meets_target"] is None
    others = [r for r in results if r["op"] != "adam"]
    assert all(r["gb_per_s"] > 0 and r["fraction_of_copy"] is not None for r in others)
    assert not backend._bf16  # freed after a failure too
    assert "adam failed: RuntimeError: out of memory" in capsys.readouterr().err
    table = gpu_kernels.format_table(results)
    assert "failed: RuntimeError: out of memory" in table


def test_without_a_copy_figure_no_fraction_is_given(fake_gpu, monkeypatch):
    backend, _, _ = fake_gpu
    monkeypatch.setattr(gpu_kernels, "OPS", _failing("copy"))
    results = gpu_kernels.measure(backend, n_elements=N, repeats=2, timer=_host_timer)
    assert "error" in results[0] and all(r["gb_per_s"] > 0 for r in results[1:])
    assert all(r["fraction_of_copy"] is None and r["meets_target"] is None for r in results)
    assert "below target" not in gpu_kernels.format_table(results)


def test_main_writes_the_json_after_each_op_and_survives_failures(fake_gpu_main, monkeypatch,
                                                                  tmp_path, capsys):
    path = tmp_path / "kernels.json"
    written = []  # the file as the second op found it: the first op's figures already there
    ops = list(_failing("adam"))

    def second(backend, n, _build=ops[1].build):
        written.append(json.loads(path.read_text()))
        return _build(backend, n)

    ops[1] = dataclasses.replace(ops[1], build=second)
    monkeypatch.setattr(gpu_kernels, "OPS", tuple(ops))

    def broken_fusion(*args, **kwargs):
        raise ValueError("fusion broke")

    monkeypatch.setattr(gpu_kernels, "measure_bias_grad_fusion", broken_fusion)
    assert gpu_kernels.main(["--elements", str(N), "--repeats", "2", "--json", str(path)]) == 1
    (first,) = written
    assert first["complete"] is False and [r["op"] for r in first["results"]] == ["copy"]
    assert first["results"][0]["fraction_of_copy"] == 1.0
    doc = json.loads(path.read_text())
    assert doc["complete"] is True and [r["op"] for r in doc["results"]] == list(KERNEL)
    assert next(r for r in doc["results"] if r["op"] == "adam")["error"].startswith("RuntimeError")
    assert sum("gb_per_s" in r for r in doc["results"]) == len(KERNEL) - 1
    assert doc["bias_grad_fusion"]["error"] == "ValueError: fusion broke"
    captured = capsys.readouterr()
    assert "bias-grad fusion failed: ValueError: fusion broke" in captured.err
    assert "% of copy" in captured.out and "failed: RuntimeError" in captured.out
    from fastnn.benchmarking import targets  # the target table reads such a file

    rows = {e["contender"]: e for e in targets.check({}, doc) if e["workload"] == "kernels"}
    assert list(rows) == list(KERNEL)[1:]
    assert rows["adam"]["met"] is None and rows["adam"]["not_measured"].startswith("RuntimeError")
    assert all(e["measured"] is not None for op, e in rows.items() if op != "adam")


def test_bias_grad_fusion_times_one_launch_against_two(fake_gpu):
    """The fused side is act_backward_bias alone; the other side act_backward
    and the ones-GEMM: a timer counting device launches (kernels and cuBLAS
    GEMMs) per call sees one against two."""
    backend, launches, _ = fake_gpu
    blas_calls = backend._blas._lib.calls  # GEMMs (the stream is bound at start-up)

    def timer(call, repeats):
        start = len(launches) + len(blas_calls)
        for _ in range(repeats):
            call()
        return (len(launches) + len(blas_calls) - start) / repeats * 1e-6  # "1 us per launch"

    rows = gpu_kernels.measure_bias_grad_fusion(backend, repeats=3, timer=timer)
    assert launches.count("act_backward_bias_f32") == len(rows) * (gpu_kernels._WARMUP + 3 * 3)
    assert [(r["fused_us"], r["separate_us"], r["speedup"]) for r in rows] == \
        [(pytest.approx(1.0), pytest.approx(2.0), pytest.approx(2.0))] * len(rows)
    print(gpu_kernels.format_fusion_table(rows))


def test_default_timer_queues_each_batch_behind_a_spin(fake_gpu, monkeypatch):
    """Every timed batch is launched after a spin kernel, so its events bracket
    device work only (no first-launch host delay, no launch-bound gaps); a
    batch queued slower than the longest spin is counted in ``gaps``."""
    from fastnn.benchmarking import gpu_profile

    backend, launches, _ = fake_gpu
    y = on_device(np.ones((4, 8), np.float32))
    launch = functools.partial(backend.bias_act, y, on_device(np.zeros(8, np.float32)), "relu",
                               out=y)
    launch()
    timer = gpu_kernels._queued_timer(backend)
    del launches[:]
    assert timer(launch, 3) >= 0
    assert launches == ["spin_ns", *[launches[1]] * 3] and launches[1] != "spin_ns"
    assert timer.gaps == 0
    monkeypatch.setattr(gpu_profile, "SPIN_MAX_S", gpu_profile.SPIN_FIRST_S)
    slow = [0.0]

    def clock():  # the host's queueing takes longer than any spin
        slow[0] += 1.0
        return slow[0]

    monkeypatch.setattr(gpu_profile, "time", types.SimpleNamespace(perf_counter=clock))
    timer(launch, 3)
    assert timer.gaps == 1


def test_main_without_a_usable_cupy_returns_2(monkeypatch, tmp_path, capsys):
    reason = fn.available_backends()["cupy"]
    if reason is None:  # a GPU machine: pretend it is not
        reason = "cupy: not installed (test)"
        real = fn.available_backends
        monkeypatch.setattr(fn, "available_backends", lambda: {**real(), "cupy": reason})
    path = tmp_path / "x.json"
    assert gpu_kernels.main(["--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert "CuPy backend is unusable" in err and reason in err
    assert not path.exists()


def test_sizes_are_checked(fake_gpu):
    backend, _, _ = fake_gpu
    with pytest.raises(InputError, match="multiple of 1024"):
        gpu_kernels.measure(backend, n_elements=1000)
    with pytest.raises(InputError, match="repeats"):
        gpu_kernels.measure(backend, n_elements=N, repeats=0)
    with pytest.raises(SystemExit) as exc:
        gpu_kernels.main(["--elements", "1000"])
    assert exc.value.code == 2


@pytest.mark.gpu
def test_gpu_kernels_benchmark_runs(tmp_path):
    reason = fn.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(reason)
    path = tmp_path / "kernels.json"
    assert gpu_kernels.main(["--elements", "1048576", "--repeats", "5", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert [r["op"] for r in doc["results"]] == list(KERNEL)
    assert all(r["gb_per_s"] > 0 for r in doc["results"])
    assert doc["results"][0]["fraction_of_copy"] == 1.0
    assert doc["device"] and doc["versions"]["cuda_runtime"]
