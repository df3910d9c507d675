"""``fastnn bench``: the table and the JSON it writes (a fast smoke run), the
contender sets per device, workload e, and the PyTorch CUDA step builders as far
as they run without CUDA (the ``gpu``-marked tests run them for real)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import fastnn as fn
from fastnn import benchmarking as bm
from fastnn.cli import main

CUPY_REASON = fn.available_backends()["cupy"]
needs_cupy = pytest.mark.skipif(CUPY_REASON is not None, reason=str(CUPY_REASON))
GPU_SET = ["floor-cupy", "fastnn-cupy", "fastnn-cupy-graph", "torch-cuda", "torch-cuda-graph"]


def test_bench_quick_xor_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--workloads", "x", "--rounds", "1", "--samples", "1",
                 "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("workload", "contender", "ms/step", "samples/s", "x floor", "x torch",
                 "floor", "fastnn-numpy"):
        assert word in out
    doc = json.loads(path.read_text())
    for key in ("machine", "versions", "blas", "threads", "date", "command", "method",
                "workloads", "results", "table", "device", "gpu", "complete", "skipped"):
        assert key in doc, key
    assert doc["device"] == "cpu" and doc["gpu"] is None and doc["complete"] is True
    assert "x graph" not in out  # the CPU table keeps its columns
    for key in ("fastnn", "numpy", "numba", "torch"):
        assert key in doc["versions"]
    assert doc["command"].startswith("fastnn bench") and "--workloads x" in doc["command"]
    assert doc["threads"] >= 1
    contenders = {r["contender"] for r in doc["results"]}
    assert {"floor", "numpy", "fastnn-numpy"} <= contenders
    for r in doc["results"]:
        assert r["workload"] == "x"
        assert r["ms_per_step"] > 0 and r["samples_per_s"] > 0
        assert set(r) >= {"quiet_ms_per_step", "x_floor", "x_torch", "x_graph", "blocks_ms"}
        assert r["x_graph"] is None
        if r["contender"] not in ("floor",):
            assert r["x_floor"] is not None and r["x_floor"] > 0


def test_workload_builders_train():
    w = bm.WORKLOADS["c"]
    run = bm.make_step(w, "fastnn-numpy")
    first = run(1)
    assert run(5) < first
    floor = bm.floor_step(w)
    assert floor(1) == floor(1)  # finite, deterministic


# ---------------------------------------------------------------- devices and contenders
def test_workload_e_shapes_and_opt_in():
    w = bm.ALL_WORKLOADS["e"]
    assert w.sizes == (4096, 4096, 4096, 4096, 10) and w.batch == 8192
    assert (w.loss, w.optimizer, w.lr, w.hidden_act, w.kind) == ("xent", "sgd", 0.01, "relu", "step")
    assert not w.default and "e" not in bm.DEFAULT_WORKLOADS
    # GPU-sized: outside WORKLOADS, which the CPU benchmarks in bench/ iterate
    assert "e" in bm.GPU_WORKLOADS and "e" not in bm.WORKLOADS
    assert bm.WORKLOADS["d"].sizes == w.sizes and not bm.WORKLOADS["d"].default
    X, y = bm.make_batch(bm.Workload(**{**w.__dict__, "batch": 16}))  # e's batch, shrunk
    assert X.shape == (16, 4096) and X.dtype == np.float32 and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < 10


def test_precision_variants_of_the_gemm_bound_workloads():
    for base in ("d", "e"):
        for precision in ("tf32", "bf16"):
            w = bm.ALL_WORKLOADS[f"{base}-{precision}"]
            same = {k: v for k, v in w.__dict__.items() if k not in ("name", "precision", "note")}
            assert same == {k: v for k, v in bm.ALL_WORKLOADS[base].__dict__.items()
                            if k not in ("name", "precision", "note")}
            assert w.precision == precision and w.label.endswith(f" {precision}")
            assert f"{base}-{precision}" in bm.GPU_WORKLOADS and not w.default
    assert bm.WORKLOADS["a"].precision == "float32" and bm.WORKLOADS["a"].label.endswith("256")


def test_contenders_per_device():
    c, digits = bm.WORKLOADS["c"], bm.WORKLOADS["digits"]
    cpu = bm.contenders(c, torch_ok=True, device="cpu", cupy_ok=True, torch_cuda_ok=True)
    assert cpu[:2] == ["floor", "numpy"] and cpu[-1] == "torch"
    assert not set(cpu) & set(bm.GPU_CONTENDERS)  # fastnn-cupy only on the GPU set
    assert bm.contenders(c, True, "gpu", torch_cuda_ok=True, cupy_ok=True) == GPU_SET
    assert bm.contenders(c, True, "gpu", torch_cuda_ok=False, cupy_ok=True) == GPU_SET[:3]
    assert bm.contenders(c, False, "gpu", torch_cuda_ok=True, cupy_ok=True) == GPU_SET[:3]
    x = bm.WORKLOADS["x"]  # narrow: fit's one-launch kernel joins
    assert bm.contenders(x, True, "gpu", torch_cuda_ok=True, cupy_ok=True) == \
        GPU_SET[:3] + ["fastnn-cupy-kernel", "fastnn-cupy-kernel-global"] + GPU_SET[3:]
    # bf16 has no GEMM-only floor: CuPy has no bf16 GEMM to build one with
    e_bf16 = bm.ALL_WORKLOADS["e-bf16"]
    assert bm.contenders(e_bf16, True, "gpu", torch_cuda_ok=True, cupy_ok=True) == GPU_SET[1:]
    assert bm.contenders(digits, True, "gpu", torch_cuda_ok=True, cupy_ok=True) == \
        ["fastnn-cupy", "torch-cuda"]
    # no usable CuPy: GPU contenders are never offered, even when named
    assert bm.contenders(c, True, "gpu", torch_cuda_ok=True, cupy_ok=False) == []
    assert bm.contenders(c, True, "cpu", True, wanted={"floor", "torch-cuda"}, cupy_ok=False) == ["floor"]
    # --contenders mixes the sets: CPU ones join a GPU run only when named
    mixed = bm.contenders(c, True, "gpu", True, wanted={"floor", "torch", "floor-cupy", "torch-cuda-graph"},
                          cupy_ok=True)
    assert mixed == ["floor", "torch", "floor-cupy", "torch-cuda-graph"]
    # on this machine's real state
    if CUPY_REASON is not None:
        assert bm.contenders(c, True, "cpu") == bm.cpu_contenders(c, True)
        assert bm.contenders(c, True, "gpu") == []


def test_ratio_partners():
    from fastnn.benchmarking.workloads import floor_of, torch_of

    for name in GPU_SET:
        assert floor_of(name) == "floor-cupy" and torch_of(name) == "torch-cuda"
    for name in ("numpy", "fastnn-numpy", "fastnn-numba", "torch"):
        assert floor_of(name) == "floor" and torch_of(name) == "torch"


def test_resolve_device_and_gpu_error(capsys):
    device, reason = bm.resolve_device("auto")
    assert device == ("gpu" if CUPY_REASON is None else "cpu") and reason == CUPY_REASON
    assert bm.resolve_device("cpu")[0] == "cpu"
    if CUPY_REASON is None:
        return  # the error path needs a machine without a usable CuPy
    assert main(["bench", "--device", "gpu", "--workloads", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "CuPy/CUDA unavailable" in err and "--device gpu" in err


def test_gpu_run_plumbing_without_a_gpu(tmp_path, capsys, monkeypatch):
    """main()'s --device gpu branch (header, probe, gpu section, x graph column,
    incremental JSON) with the device check and the contender set stubbed to a
    CPU floor: checks the wiring only; the one row is the NumPy floor's."""
    monkeypatch.setattr(bm, "resolve_device", lambda requested="auto": ("gpu", None))
    monkeypatch.setattr(bm, "probe_torch_cuda", lambda: (False, {"error": "stub: no CUDA"}))
    monkeypatch.setattr(bm, "contenders", lambda w, *a, **k: ["floor"])
    path = tmp_path / "gpu.json"
    assert main(["bench", "--device", "gpu", "--workloads", "x", "--rounds", "1", "--samples", "1",
                 "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "torch-cuda contenders not offered" in captured.err
    assert "device gpu:" in captured.out
    doc = json.loads(path.read_text())
    assert doc["device"] == "gpu" and doc["complete"] is True
    assert doc["gpu"]["torch"] == {"error": "stub: no CUDA"}
    for key in ("CUPY_TF32", "tf32", "timing"):
        assert key in doc["gpu"]
    assert "--device gpu" in doc["command"]
    assert [r["contender"] for r in doc["results"]] == ["floor"]


def test_gpu_bench_runs_every_fastnn_gpu_contender_on_the_fake_device(fake_gpu, tmp_path, capsys,
                                                                         monkeypatch):
    """``fastnn bench --device gpu`` as gpu-check runs it, on the NumPy stand-in for
    CuPy: every fastnn GPU contender at every precision (the floor, op by op, the
    graph replay over several epochs) is measured, none skipped; the one-launch
    kernel (numba.cuda) and torch-cuda say why they are not there."""
    small = {f"g{tag}": bm.Workload(f"g{tag}", (32, 64, 64, 10), 64, default=False, precision=p)
             for tag, p in (("", "float32"), ("-tf32", "tf32"), ("-bf16", "bf16"))}
    small["gx"] = bm.Workload("gx", (2, 8, 1), 4, loss="mse", optimizer="adam", hidden_act="tanh",
                              out_act="sigmoid", lr=0.05, default=False)
    for name, w in small.items():
        monkeypatch.setitem(bm.GPU_WORKLOADS, name, w)
        monkeypatch.setitem(bm.ALL_WORKLOADS, name, w)
    monkeypatch.setattr(bm, "resolve_device", lambda requested="auto": ("gpu", None))
    monkeypatch.setattr(bm, "probe_torch_cuda", lambda: (False, {"error": "stub: no CUDA"}))
    from fastnn import gpu_compiled  # numba.cuda's verdict fixed: on a GPU machine it works

    monkeypatch.setitem(gpu_compiled._status, "cuda", "numba.cuda: no usable CUDA driver or device")
    monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)
    from fastnn.benchmarking import runner  # the kernels in this process: the stand-in is here

    monkeypatch.setattr(runner, "CHILD_CONTENDERS", runner.TORCH_CONTENDERS)
    path = tmp_path / "gpu.json"
    assert main(["bench", "--device", "gpu", "--workloads", ",".join(small), "--rounds", "1",
                 "--samples", "1", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    ran = {(r["workload"], r["contender"]) for r in doc["results"]}
    for name in ("g", "g-tf32", "g-bf16", "gx"):
        assert {(name, "fastnn-cupy"), (name, "fastnn-cupy-graph")} <= ran, (name, ran)
    assert ("g", "floor-cupy") in ran and ("g-tf32", "floor-cupy") in ran
    assert ("g-bf16", "floor-cupy") not in ran  # CuPy has no bf16 GEMM: no floor offered
    skipped = json.dumps(doc["skipped"])
    assert "fastnn-cupy-kernel" in skipped and "numba.cuda" in skipped
    assert all(math.isfinite(r["ms_per_step"]) for r in doc["results"])


def test_gpu_steps_never_read_the_labels_back(fake_gpu, monkeypatch):
    """As in fit, the bench's and the profiler's GPU steps know the labels' range:
    CrossEntropyLoss would otherwise read it from the device every step (a sync,
    and an error inside a CUDA-graph recording)."""
    from fastnn.benchmarking import gpu_profile
    from fastnn.nn import losses

    seen = []
    real = losses.known_label_range
    monkeypatch.setattr(losses, "known_label_range", lambda: seen.append(real()) or seen[-1])
    w = bm.Workload("t", (6, 16, 4), 8)
    bm.make_step(w, "fastnn-cupy")(3)
    bm.make_step(w, "fastnn-cupy-graph")(3)
    gpu_profile.profile_workload(w, fake_gpu[0], peak_size=8)
    assert len(seen) > 10 and None not in seen, seen


def test_gpu_table_columns():
    rows = [bm.Result("e", "fastnn-cupy", 45.0, 44.0, 8192 / 0.045, x_floor=1.02, x_torch=0.99,
                      x_graph=0.98, info={"loss": 2.3}),
            bm.Result("e", "torch-cuda-graph", 44.0, 43.5, 8192 / 0.044, x_floor=1.0, x_torch=1.01)]
    table = bm.format_table(rows)
    head = table.splitlines()[0]
    assert "x graph" in head and "torch-cuda-graph" in table and "floor-cupy" in table
    assert bm.ALL_WORKLOADS["e"].label in table


def test_gpu_environment_never_raises():
    env = bm.gpu_environment({"torch": "x"})
    assert {"CUPY_TF32", "tf32", "torch", "nvidia_driver"} <= set(env)
    if CUPY_REASON is None:
        assert {"cupy", "cuda_runtime", "cuda_driver", "device"} <= set(env)
        assert env["device"]["name"]
    else:
        assert "error" in env or "cupy" in env



def test_a_contender_failing_mid_run_is_dropped_and_the_others_measured(monkeypatch, capsys):
    """A contender that fails after its warm-up (a CUDA error in round 2, say) is
    recorded in ``skipped`` with the round; the others keep their rounds and ratios."""
    from fastnn.benchmarking import runner

    w = bm.WORKLOADS["x"]
    plain_block = runner.LocalRunner.block
    calls = {"n": 0}

    def block(self, samples):
        if self.name == "numpy":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("device lost\nmore detail")
        return plain_block(self, samples)

    monkeypatch.setattr(runner.LocalRunner, "block", block)
    skipped: dict = {}
    results = bm.measure(w, ["floor", "numpy", "fastnn-numpy"], threads=1, rounds=3, samples=1,
                         skipped=skipped)
    assert [r.contender for r in results] == ["floor", "fastnn-numpy"]
    assert skipped == {"x/numpy": "failed in round 2: RuntimeError: device lost"}
    assert all(len(r.blocks_ms) == 3 for r in results)
    assert results[1].x_floor is not None
    assert "x/numpy: dropped (failed in round 2" in capsys.readouterr().err



def test_every_contender_failing_mid_run_leaves_an_empty_result(monkeypatch):
    from fastnn.benchmarking import runner

    def block(self, samples):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner.LocalRunner, "block", block)
    skipped: dict = {}
    assert bm.measure(bm.WORKLOADS["x"], ["floor", "numpy"], threads=1, rounds=3, samples=1,
                      skipped=skipped) == []
    assert set(skipped) == {"x/floor", "x/numpy"}


def _busy_step(fixed_s: float, step_s: float):
    """A fake ``run(k)`` lasting fixed_s + k * step_s (busy-waits: sleep is too coarse)."""
    import time

    def run(k):
        end = time.perf_counter() + fixed_s + k * step_s
        while time.perf_counter() < end:
            pass
        return 0.0

    return run


def test_calibration_amortises_a_large_fixed_cost_per_call(monkeypatch):
    """The one-launch kernel's run(k) is ~300 us per call plus ~2 us per step: k
    from run(1) alone (7) reported ~45 us/step; autoranging reports ~2."""
    from fastnn.benchmarking import runner

    monkeypatch.setattr(runner, "make_step", lambda w, c, threads, seed: _busy_step(300e-6, 2e-6))
    r = runner.LocalRunner(bm.WORKLOADS["x"], "fake-kernel", threads=1)
    assert r.calibrate() >= 256, r.k
    assert min(r.block(5)) == pytest.approx(2e-6, rel=0.3), r.k  # min: the quiet samples


def test_calibration_of_a_slow_step_keeps_one_step_per_sample():
    r = bm.LocalRunner(bm.WORKLOADS["x"], "floor", threads=1)
    r.run = _busy_step(0.0, 3e-3)
    assert r.calibrate() == 1  # run(1) lasts a sample already, run(2) is no cheaper per step


def _hung_worker(monkeypatch, code: str) -> list:
    """Workers run ``code`` instead of worker_main, with short reply timeouts;
    returns the list their processes are appended to."""
    from fastnn.benchmarking import runner

    monkeypatch.setattr(runner, "WORKER_CODE", code)
    monkeypatch.setattr(runner, "_IDLE_WORKERS", {})  # no real idle child is taken
    for name in ("SETUP_TIMEOUT_S", "CALL_TIMEOUT_S", "RELEASE_TIMEOUT_S"):
        monkeypatch.setattr(runner, name, 0.5)
    spawned = []
    real_spawn = runner._spawn_worker

    def spawn(threads):
        spawned.append(real_spawn(threads))
        return spawned[-1]

    monkeypatch.setattr(runner, "_spawn_worker", spawn)
    return spawned


def test_a_torch_child_that_never_answers_is_killed_after_its_timeout(monkeypatch):
    from fastnn.benchmarking import runner

    spawned = _hung_worker(monkeypatch, "import time; time.sleep(600)")
    with pytest.raises(RuntimeError, match=r"torch worker: no reply to 'setup' in 0\.5 s"):
        runner.ChildWorker(bm.WORKLOADS["x"], "torch", 1)
    (proc,) = spawned
    assert proc.poll() is not None  # killed and reaped, not left hanging
    assert not runner._IDLE_WORKERS


def test_a_torch_child_hanging_mid_run_is_dropped_and_the_others_measured(monkeypatch):
    """A child that answers setup and calibration, then hangs in its first block
    (a stuck CUDA graph, say): measure() records why and goes on without it."""
    from fastnn.benchmarking import runner

    answers_twice = ("import sys, time\n"
                     "sys.stdin.readline(); print('{}', flush=True)\n"
                     "sys.stdin.readline(); print('{\"k\": 1}', flush=True)\n"
                     "time.sleep(600)")
    spawned = _hung_worker(monkeypatch, answers_twice)
    skipped: dict = {}
    results = bm.measure(bm.WORKLOADS["x"], ["floor", "torch"], threads=1, rounds=2, samples=1,
                         skipped=skipped)
    assert [r.contender for r in results] == ["floor"] and len(results[0].blocks_ms) == 2
    assert skipped == {"x/torch": "failed in round 1: RuntimeError: torch worker: no reply to "
                                  "'block' in 0.5 s (child killed)"}
    (proc,) = spawned
    assert proc.poll() is not None and not runner._IDLE_WORKERS


def test_a_failing_workload_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """An error outside the per-contender handling (a broken result, say) skips
    that workload only; the JSON records why and the later workloads."""
    import argparse

    real_measure = bm.measure

    def measure(w, *args, **kwargs):
        if w.name == "x":
            raise ValueError("no samples\ndetail")
        return real_measure(w, *args, **kwargs)

    monkeypatch.setattr(bm, "measure", measure)
    parser = argparse.ArgumentParser()
    bm.add_arguments(parser)
    path = tmp_path / "bench.json"
    args = parser.parse_args(["--workloads", "x,c", "--device", "cpu", "--contenders", "floor",
                              "--rounds", "1", "--samples", "1", "--json", str(path)])
    assert bm.main(args) == 0
    doc = json.loads(path.read_text())
    assert doc["complete"] is True
    assert doc["skipped"] == {"x": "ValueError: no samples"}
    assert [(r["workload"], r["contender"]) for r in doc["results"]] == [("c", "floor")]
    assert "workload x skipped (ValueError: no samples)" in capsys.readouterr().err


def test_torch_worker_processes_are_reused_across_workloads():
    """A ChildWorker's process is kept idle after close() and taken by the next
    workload's same contender (a torch import per workload is seconds on a GPU
    machine); shutdown_workers ends it."""
    pytest.importorskip("torch")
    from fastnn.benchmarking import runner

    first = runner.ChildWorker(bm.WORKLOADS["x"], "torch", 1)
    pid = first.proc.pid
    first.close()
    second = runner.ChildWorker(bm.WORKLOADS["c"], "torch", 1)
    try:
        assert second.proc.pid == pid
        second.calibrate()
        assert len(second.block(1)) == 1  # the new workload's model, in the same process
    finally:
        second.close()
    proc = second.proc
    runner.shutdown_workers()
    assert proc.wait(timeout=30) == 0 and not runner._IDLE_WORKERS

def test_child_contenders_include_the_one_launch_kernels():
    from fastnn.benchmarking import workloads

    assert {"fastnn-cupy", "fastnn-cupy-graph", "fastnn-cupy-kernel",
            "fastnn-cupy-kernel-global"} <= set(workloads.CHILD_CONTENDERS)
    assert set(workloads.TORCH_CONTENDERS) <= set(workloads.CHILD_CONTENDERS)
    assert "floor-cupy" not in workloads.CHILD_CONTENDERS


def test_the_json_takes_the_gemm_path_from_the_child_rows():
    """fastnn's GPU rows report their child's GEMM path at setup; with no CuPy
    backend in the bench's own process the JSON records the latest of them."""
    from fastnn import backends

    assert backends._instances.get("cupy") is None
    first = bm.Result("c", "fastnn-cupy", 1.0, 1.0, 1.0,
                      info={"setup": {"fastnn_gemms": {"status": "own", "left_to_cupy": []}}})
    later = bm.Result("d", "fastnn-cupy", 1.0, 1.0, 1.0,
                      info={"setup": {"fastnn_gemms": {"status": "own", "left_to_cupy": ["tf32"]}}})
    torch_row = bm.Result("d", "torch-cuda", 1.0, 1.0, 1.0, info={"setup": {"torch": "2.11"}})
    assert bm.gemm_path_of([first, later, torch_row])["left_to_cupy"] == ["tf32"]
    assert bm.gemm_path_of([torch_row]) is None


def test_a_fastnn_contender_in_a_child_is_measured_without_torch(monkeypatch):
    """fastnn's one-launch GPU kernels run in a child process (a fault there must
    not end the bench's own CUDA context); the same path on the CPU, with a
    fastnn contender: its child never imports torch, keeps serving after an
    error, and measure() takes its rows from it."""
    from fastnn.benchmarking import runner

    monkeypatch.setattr(runner, "CHILD_CONTENDERS", ("fastnn-numpy",))
    monkeypatch.setattr(runner, "_IDLE_WORKERS", {})
    worker = runner.ChildWorker(bm.WORKLOADS["x"], "fastnn-numpy", 1)
    try:
        assert "torch" not in worker.setup
        with pytest.raises(RuntimeError, match="unknown command 'probe'"):
            worker._call(5, cmd="probe")
        worker.calibrate()
        assert len(worker.block(2)) == 2
    finally:
        worker.close()
    assert list(runner._IDLE_WORKERS) == [("fastnn-numpy", 1)]  # released, kept for reuse
    pid = runner._IDLE_WORKERS[("fastnn-numpy", 1)].pid
    results = bm.measure(bm.WORKLOADS["x"], ["floor", "fastnn-numpy"], threads=1, rounds=2,
                         samples=1)
    assert [r.contender for r in results] == ["floor", "fastnn-numpy"]
    assert results[1].info["loss"] > 0 and results[1].x_floor > 0
    assert runner._IDLE_WORKERS[("fastnn-numpy", 1)].pid == pid  # measured in that child
    runner.shutdown_workers()
    assert not runner._IDLE_WORKERS


# ---------------------------------------------------------------- PyTorch CUDA steps, on the CPU
@pytest.fixture
def torch_flags():
    """Restore PyTorch's TF32 flags (torch_gpu_settings sets them process-wide)."""
    torch = pytest.importorskip("torch")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield torch
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_torch_gpu_settings_follow_the_workload_precision(torch_flags, monkeypatch):
    """TF32 on for the tf32 workloads only, never from CUPY_TF32: fastnn's own
    GEMMs follow fn.set_precision, so both sides always match."""
    monkeypatch.setenv("CUPY_TF32", "1")
    info = bm.torch_gpu_settings(torch_flags)
    assert info["matmul.allow_tf32"] is False and info["cudnn.allow_tf32"] is False
    assert {"torch", "torch_cuda", "cuda_available"} <= set(info)
    info = bm.torch_gpu_settings(torch_flags, "tf32")
    assert info["matmul.allow_tf32"] is True and info["cudnn.allow_tf32"] is True
    info = bm.torch_gpu_settings(torch_flags, "bf16")
    assert info["matmul.allow_tf32"] is False and info["autocast"] == "bfloat16"


def test_torch_cuda_step_bf16_autocast_code_path_on_cpu(torch_flags):
    w = bm.Workload(**{**bm.WORKLOADS["c"].__dict__, "precision": "bf16"})
    run = bm.torch_cuda_step(w, device="cpu")
    first = run(1)
    assert math.isfinite(first) and run(5) < first


@pytest.mark.parametrize("name", ["c", "x"])
def test_torch_cuda_step_code_path_on_cpu(torch_flags, name):
    """The torch-cuda builder with device="cpu": same model, loss and step body;
    it trains. (No GPU figure is produced here.)"""
    w = bm.WORKLOADS[name]
    run = bm.torch_cuda_step(w, device="cpu")
    first = run(1)
    assert math.isfinite(first) and run(5) < first
    assert run.info["matmul.allow_tf32"] is False
    # the same numbers as the CPU torch contender (same seed, same step)
    ref = bm.torch_step(w, threads=1)
    assert ref(1) == pytest.approx(bm.torch_cuda_step(w, device="cpu")(1), rel=1e-6)


def test_torch_cuda_graph_on_cpu_warms_up_then_refuses(torch_flags):
    with pytest.raises(RuntimeError, match="needs a CUDA device.*3 warm-up steps"):
        bm.torch_cuda_step(bm.WORKLOADS["c"], device="cpu", graph=True)


def test_torch_cuda_contender_without_cuda_is_skipped_not_faked(torch_flags):
    if torch_flags.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        bm.make_step(bm.WORKLOADS["c"], "torch-cuda")
    skipped = {}
    assert bm.measure(bm.WORKLOADS["x"], ["torch-cuda-graph"], 1, 1, 1, skipped=skipped) == []
    assert "sees no CUDA device" in skipped["x/torch-cuda-graph"]


def test_torch_fit_on_cpu_unchanged(torch_flags):
    run = bm.fit_run(bm.WORKLOADS["digits"], "torch", threads=1)
    seconds, samples, acc = run(1)
    assert seconds > 0 and samples > 0 and acc > 0.5


# ---------------------------------------------------------------- on a GPU (gpu marker)
@pytest.mark.gpu
@needs_cupy
def test_floor_cupy_matches_numpy_floor():
    w = bm.WORKLOADS["c"]
    assert bm.floor_cupy_step(w)(2) == pytest.approx(bm.floor_step(w)(2), rel=1e-3)
    assert bm.make_step(w, "floor-cupy")(1) == pytest.approx(bm.floor_step(w)(1), rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["c", "x"])
def test_torch_cuda_graph_matches_eager(torch_flags, name):
    if not torch_flags.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    w = bm.WORKLOADS[name]
    eager, graph = bm.torch_cuda_step(w), bm.torch_cuda_step(w, graph=True)
    # graph: 3 warm-up steps happened at build time; bring eager to the same point
    eager(3)
    for _ in range(3):
        a, b = eager(1), graph(1)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert math.isfinite(graph(10))


@pytest.mark.gpu
@needs_cupy
def test_bench_gpu_run_end_to_end(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert main(["bench", "--device", "gpu", "--workloads", "c", "--rounds", "1", "--samples", "1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "x graph" in out
    doc = json.loads(path.read_text())
    assert doc["device"] == "gpu" and doc["complete"]
    for key in ("cupy", "cuda_runtime", "cuda_driver", "device", "CUPY_TF32", "tf32"):
        assert key in doc["gpu"], key
    got = {r["contender"] for r in doc["results"]}
    assert {"floor-cupy", "fastnn-cupy"} <= got
    if doc["gpu"].get("torch", {}).get("cuda_available"):
        assert {"torch-cuda", "torch-cuda-graph"} <= got, doc["skipped"]
        assert doc["gpu"]["torch"]["matmul.allow_tf32"] is False  # probed at float32


@pytest.mark.parametrize("fixed_us", [0, 300])
def test_calibration_finds_the_step_time_under_a_fixed_cost_per_call(fixed_us):
    """A contender that pays a fixed cost per call (the GPU one-launch kernel:
    one launch runs k steps) is timed at its step cost, not at that cost spread
    over a k chosen as if run(k) grew with k from the start."""
    import time

    from fastnn.benchmarking import runner

    step_s, fixed_s = 5e-6, fixed_us * 1e-6

    def run(k):  # a busy wait: sleep's granularity is coarser than a step
        end = time.perf_counter() + fixed_s + k * step_s
        while time.perf_counter() < end:
            pass

    timed = object.__new__(runner.LocalRunner)
    timed.fit, timed.run, timed.k = False, run, 1
    timed.w = bm.WORKLOADS["x"]
    timed.info, timed.name = {}, "fastnn-numpy"
    k = timed.calibrate()
    per_step = min(timed.block(3))
    assert per_step == pytest.approx(step_s, rel=0.25), (k, per_step)
    if fixed_us == 0:  # an ordinary contender keeps the k of its first estimate
        assert k <= 2 * math.ceil(runner.MIN_SAMPLE_S / step_s)
