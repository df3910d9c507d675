"""The GPU step profiler (fastnn/benchmarking/gpu_profile.py) on the CPU.

On ``tests/fake_cupy.py`` an event reads a clock that counts the kernels and
GEMMs run so far, so a profile's "milliseconds" are launch counts: each span
must hold exactly the launches of its op, each phase those of its layer, the
phases together the whole step, and a replay of the recorded step two more
than the step op by op (step_begin, step_end). The ``gpu`` test runs the real
thing on a device.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import fastnn as fn
from fastnn.benchmarking import gpu_profile
from fastnn.benchmarking.workloads import Workload

SMALL = Workload("s", (12, 16, 4), 8)  # Linear + relu, Linear, cross-entropy, SGD


def _ops(result, phase_end):
    phase = next(p for p in result["phases"] if p["phase"].endswith(phase_end))
    return phase, {o["op"]: o for o in phase["ops"]}


def test_profile_counts_each_layers_launches(fake_gpu):
    backend, launches, _ = fake_gpu
    r = gpu_profile.profile_workload(SMALL, backend, peak_size=16)
    assert r["queued_ahead"] and r["bound"] in ("host", "device")
    # Forward of the first layer: one GEMM and the fused bias + relu, one launch each.
    phase, ops = _ops(r, "[0] Linear(12 -> 16) + relu forward")
    assert ops["gemm"]["calls"] == 1 and ops["gemm"]["ms"] == 1.0
    assert ops["gemm"]["flops"] == 2 * 8 * 12 * 16 and ops["gemm"]["tflops"] > 0
    assert ops["bias_act"]["ms"] == 1.0 and phase["ms"] == 2.0 and phase["other_ms"] == 0
    # Its backward: relu's derivative with the bias gradient (one launch), dW,
    # and no dx GEMM (the first layer's input needs no gradient).
    _, ops = _ops(r, "[0] Linear(12 -> 16) + relu backward")
    assert ops["act_backward_bias"]["calls"] == 1 and ops["gemm"]["calls"] == 1
    assert "bias_grad" not in ops and "act_backward" not in ops
    _, ops = _ops(r, "[2] Linear(16 -> 4) backward")
    assert ops["gemm"]["calls"] == 2  # dW and dx
    assert "softmax_xent" in _ops(r, "CrossEntropyLoss forward")[1]
    assert "sgd_step" in _ops(r, "SGD step")[1]
    # The phases cover the step: their launches add up to the whole step's.
    assert sum(p["ms"] for p in r["phases"]) == pytest.approx(r["profiled_device_ms"])
    assert r["device_ms"] == r["profiled_device_ms"]  # events cost no launches
    assert r["gemm_ms"] == sum(o["ms"] for p in r["phases"] for o in p["ops"] if o["op"] == "gemm")
    # The recorded step replays the same launches plus step_begin and step_end.
    assert r["graph"]["device_ms"] == r["device_ms"] + 2, r["graph"]
    assert r["graph"]["queued_ahead"] and r["peak_tflops"] > 0


def test_profile_leaves_model_and_backend_unpatched(fake_gpu):
    backend = fake_gpu[0]
    timeline = gpu_profile.Timeline(backend.xp)
    with fn.use_backend(backend):
        model = fn.Sequential(fn.Linear(3, 2))  # its parameters on the (fake) device
        opt = fn.SGD(model.parameters(), lr=0.1)
        loss_fn = fn.MSELoss()
        with gpu_profile.instrumented(backend, model, loss_fn, opt, timeline):
            assert "gemm" in vars(backend) and "forward_fused" in vars(model[0])
            x, target = backend.xp.ones((4, 3), np.float32), backend.xp.zeros((4, 2), np.float32)
            loss_fn(model(x), target)
        assert "gemm" not in vars(backend) and "forward_fused" not in vars(model[0])
        assert "step" not in vars(opt) and "forward" not in vars(loss_fn)
    phases = {s[0] for s in timeline.spans}
    assert "[0] Linear(3 -> 2) forward" in phases and "MSELoss forward" in phases


def test_profile_under_bf16_counts_the_operand_conversions(fake_gpu):
    """bf16: the first layer converts its input and weight; a hidden layer's
    activation writes the next layer's bf16 input (bias_act_operand) and, in
    backward, its dz's bits (act_backward_operand) in the same launch, so the
    next layer converts only its weight; the last layer converts its dz."""
    backend = fake_gpu[0]
    w = Workload("s16", (12, 16, 4), 8, precision="bf16")
    r = gpu_profile.profile_workload(w, backend, peak_size=16)
    _, ops = _ops(r, "[0] Linear(12 -> 16) + relu forward")
    assert ops["gemm_operand"]["calls"] == 2 and ops["bias_act_operand"]["ms"] == 1.0
    _, ops = _ops(r, "[2] Linear(16 -> 4) forward")
    assert ops["gemm_operand"]["calls"] == 1  # the weight only
    _, ops = _ops(r, "[0] Linear(12 -> 16) + relu backward")
    assert ops["act_backward_operand"]["ms"] == 1.0 and "gemm_operand" not in ops
    _, ops = _ops(r, "[2] Linear(16 -> 4) backward")
    assert ops["gemm_operand"]["calls"] == 1 and ops["gemm"]["calls"] == 2


def test_queued_ahead_doubles_the_spin_until_the_host_fits(fake_gpu, monkeypatch):
    backend = fake_gpu[0]
    clock = iter([0.0, 0.05, 1.0, 1.05, 2.0, 2.001])  # 50 ms, 50 ms, then 1 ms to queue
    monkeypatch.setattr(gpu_profile.time, "perf_counter", lambda: next(clock))
    spins = []
    real = backend._kernel("profile.cu", "spin_ns")
    monkeypatch.setattr(backend, "_kernel", lambda f, n: lambda g, b, a: (spins.append(int(a[0])),
                                                                           real(g, b, a)))
    window = gpu_profile.queued_ahead(backend, lambda: "queued", spin_s=0.02)
    assert spins == [20_000_000, 40_000_000, 80_000_000]
    assert window.queued_ahead and window.result == "queued" and window.host_s == pytest.approx(0.001)


def test_main_writes_json_and_table(fake_gpu, tmp_path, capsys, monkeypatch):
    from fastnn.benchmarking import workloads

    monkeypatch.setitem(workloads.ALL_WORKLOADS, "s", SMALL)
    monkeypatch.setattr(fn, "available_backends", lambda: {"cupy": None})
    monkeypatch.setattr("fastnn.benchmarking.report.gpu_environment", lambda: {"cupy": "fake"})
    out = tmp_path / "profile.json"
    assert gpu_profile.main(["--workloads", "s", "--peak-size", "16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[0] Linear(12 -> 16) + relu forward" in text and "CUDA graph replay" in text
    doc = json.loads(out.read_text())
    assert doc["results"][0]["workload"] == "s" and "spin_ns" in doc["method"]
    assert doc["command"].endswith("--json " + str(out))


def test_main_keeps_the_other_workloads_when_one_fails(fake_gpu, tmp_path, capsys, monkeypatch):
    """A workload whose profile raises is recorded with its error (exit status
    1), the others are profiled and written; a step that cannot be recorded as
    a CUDA graph is reported as such, its op-by-op figures kept."""
    from fastnn.benchmarking import steps, workloads

    monkeypatch.setitem(workloads.ALL_WORKLOADS, "s", SMALL)
    monkeypatch.setitem(workloads.ALL_WORKLOADS, "t", Workload("t", (12, 16, 4), 8))
    monkeypatch.setattr(fn, "available_backends", lambda: {"cupy": None})
    monkeypatch.setattr("fastnn.benchmarking.report.gpu_environment", lambda: {"cupy": "fake"})

    def no_graph(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(steps, "fastnn_graph_step", no_graph)
    profile = gpu_profile.profile_workload

    def failing_t(w, *args, **kwargs):
        if w.name == "t":
            raise MemoryError("out of GPU memory")
        return profile(w, *args, **kwargs)

    monkeypatch.setattr(gpu_profile, "profile_workload", failing_t)
    out = tmp_path / "profile.json"
    assert gpu_profile.main(["--workloads", "t,s", "--peak-size", "16", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "t: failed: MemoryError: out of GPU memory" in text
    assert "CUDA graph: not recorded (RuntimeError: capture refused)" in text
    t, small = json.loads(out.read_text())["results"]
    assert t == {"workload": "t", "error": "MemoryError: out of GPU memory"}
    assert small["workload"] == "s" and small["device_ms"] > 0
    assert small["graph"] == {"error": "RuntimeError: capture refused"}


def test_main_without_a_usable_cupy_says_why(monkeypatch, capsys):
    monkeypatch.setattr(fn, "available_backends", lambda: {"cupy": "cupy: no CUDA device found"})
    assert gpu_profile.main(["--workloads", "c"]) == 2
    assert "the CuPy backend is unusable (cupy: no CUDA device found)" in capsys.readouterr().err


def test_main_rejects_unknown_workloads(capsys):
    with pytest.raises(SystemExit):
        gpu_profile.main(["--workloads", "nope"])
    assert "unknown or non-step workloads: nope" in capsys.readouterr().err


def test_default_workloads_cover_every_target_workload_but_x_cheap_first():
    from fastnn.benchmarking import targets
    from fastnn.benchmarking.workloads import ALL_WORKLOADS

    names = gpu_profile.DEFAULT_WORKLOADS.split(",")
    assert all(ALL_WORKLOADS[n].kind == "step" for n in names)  # main would reject the rest
    # x's target row is the one-launch kernel, which this does not profile.
    assert set(names) == {t.workload for t in targets.TARGETS} - {"x"}
    cost = [ALL_WORKLOADS[n].batch * sum(ALL_WORKLOADS[n].sizes) for n in names]
    assert cost == sorted(cost)


@pytest.mark.gpu
def test_profile_on_the_gpu():
    reason = fn.available_backends()["cupy"]
    if reason is not None:
        pytest.skip(reason)
    with fn.use_backend("cupy") as backend:
        r = gpu_profile.profile_workload(SMALL, backend, peak_size=1024)
    assert r["device_ms"] > 0 and r["host_ms"] > 0 and r["queued_ahead"]
    assert sum(p["ms"] for p in r["phases"]) <= r["profiled_device_ms"] * 1.01
    assert "error" not in r["graph"], r["graph"]
