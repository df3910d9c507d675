"""The issue-6 target check (fastnn/benchmarking/targets.py) on hand-made results,
and on the files gpu-check's producers write on the CPU stand-in for CuPy."""
from __future__ import annotations

import json
import sys

import pytest

from fake_cupy import time_by_host_clock

from fastnn.benchmarking import targets


def _row(workload, contender, ms, x_torch=None, x_graph=None):
    return {"workload": workload, "contender": contender, "ms_per_step": ms,
            "x_torch": x_torch, "x_graph": x_graph}


BENCH = {
    "gpu": {"device": {"name": "NVIDIA H200"}},
    "results": [
        _row("c", "fastnn-cupy-graph", 0.045, x_torch=14.0, x_graph=1.5),
        _row("c", "fastnn-cupy", 0.21, x_torch=3.0, x_graph=0.3),
        _row("a", "fastnn-cupy-graph", 0.17, x_torch=5.0, x_graph=1.05),
        _row("e", "fastnn-cupy", 44.9, x_torch=0.99),
        _row("e", "fastnn-cupy-graph", 44.7, x_torch=1.00),
        _row("e-bf16", "fastnn-cupy", 4.6, x_torch=0.94),
    ],
    "skipped": {"x/fastnn-cupy-kernel": "RuntimeError: numba.cuda: no device"},
}
PROFILE = {"results": [{"workload": "e-bf16", "host_ms": 0.4, "device_ms": 4.55, "bound": "device",
                        "gemm_share": 0.81, "gemm_tflops": 560.0, "graph": {"device_ms": 4.5}}]}
KERNELS = {"results": [{"op": "copy", "fraction_of_copy": 1.0},
                       {"op": "adam", "fraction_of_copy": 0.91},
                       {"op": "f32_to_bf16", "fraction_of_copy": 0.7}]}


def _by_target(entries):
    return {e["target"]: e for e in entries}


def test_each_target_takes_its_row_and_says_met_or_missed():
    got = _by_target(targets.check(BENCH, KERNELS, PROFILE))
    c_ms = got["c through fit <= 0.050 ms/step"]
    assert c_ms["met"] is True and c_ms["measured"] == 0.045 and c_ms["contender"] == "fastnn-cupy-graph"
    assert got["c >= 1.4x PyTorch's CUDA-graph step"]["met"] is True
    assert got["c >= 12x PyTorch eager"]["met"] is True
    assert got["a through fit <= 0.160 ms/step"]["met"] is False
    assert got["a >= 1.1x PyTorch's CUDA-graph step"]["measured"] == 1.05
    # The better of op by op and the replay is judged.
    e = got["e float32 (TF32 off) >= 0.98x PyTorch eager"]
    assert e["met"] is True and e["contender"] == "fastnn-cupy-graph" and e["measured"] == 1.0
    bf16 = got["e bf16 >= 1.0x PyTorch eager bf16 autocast"]
    assert bf16["met"] is False and "device-bound" in bf16["why"] and "GEMMs 81%" in bf16["why"]
    x = got["x >= 2x PyTorch's CUDA-graph steps/s (one-launch kernel)"]
    assert x["met"] is None and "numba.cuda: no device" in x["not_measured"]
    assert got["d tf32 >= 1.0x PyTorch eager TF32"]["not_measured"] == "not in this run"
    kernels = [e for e in got.values() if e["workload"] == "kernels"]
    assert [(k["contender"], k["met"]) for k in kernels] == [("adam", True), ("f32_to_bf16", False)]


@pytest.mark.parametrize("markdown", [False, True])
def test_main_prints_a_row_per_target_and_the_reasons(tmp_path, capsys, markdown):
    paths = {}
    for name, doc in (("bench", BENCH), ("kernels", KERNELS), ("profile", PROFILE)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    argv = [str(paths["bench"]), "--kernels", str(paths["kernels"]), "--profile", str(paths["profile"])]
    assert targets.main(argv + (["--markdown"] if markdown else [])) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "MISSED" in out and "not measured" in out
    assert out.count("\n") >= len(targets.TARGETS) + 2
    assert ("| target |" in out) == markdown
    assert "- e bf16 >= 1.0x PyTorch eager bf16 autocast: op by op: host 0.4 ms" in out


def test_main_reports_a_missing_file(tmp_path, capsys):
    assert targets.main([str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_a_profile_without_timed_gemms_still_gives_its_line():
    line = targets._profile_line({"host_ms": 0.3, "device_ms": 0.2, "bound": "host",
                                  "gemm_share": 0.0, "gemm_tflops": None})
    assert line == "op by op: host 0.3 ms, device 0.2 ms per step (host-bound), GEMMs 0% of device time"


X_TARGET = "x >= 2x PyTorch's CUDA-graph steps/s (one-launch kernel)"


def test_a_skipped_pytorch_partner_is_named_for_ratio_targets():
    bench = {"gpu": {"torch": {"error": "torch probe exited 1: no CUDA"}},
             "results": [_row("c", "fastnn-cupy-graph", 0.045)],  # no torch: ratios None
             "skipped": {"c/torch-cuda-graph": "failed in setup: RuntimeError: capture",
                         "c/torch-cuda": "RuntimeError: boom"}}
    got = _by_target(targets.check(bench))
    graph = got["c >= 1.4x PyTorch's CUDA-graph step"]["not_measured"]
    assert graph == ("torch-cuda-graph: failed in setup: RuntimeError: capture; "
                     "PyTorch CUDA: torch probe exited 1: no CUDA")
    assert got["c >= 12x PyTorch eager"]["not_measured"].startswith("torch-cuda: RuntimeError: boom")
    assert got["c through fit <= 0.050 ms/step"]["met"] is True  # ms needs no partner
    # An ms target gives no PyTorch reason; "not in this run" when nothing says why.
    assert got["a through fit <= 0.160 ms/step"]["not_measured"] == "not in this run"
    assert got["d tf32 >= 1.0x PyTorch eager TF32"]["not_measured"] == \
        "PyTorch CUDA: torch probe exited 1: no CUDA"


def test_x_takes_the_better_of_both_kernel_layouts_and_names_it(capsys):
    bench = {"results": [_row("x", "fastnn-cupy-kernel-global", 0.01, x_graph=3.2)],
             "skipped": {"x/fastnn-cupy-kernel": "RuntimeError: no shared memory layout"}}
    x = _by_target(targets.check(bench))[X_TARGET]
    assert (x["contender"], x["measured"], x["met"]) == ("fastnn-cupy-kernel-global", 3.2, True)
    bench["results"].append(_row("x", "fastnn-cupy-kernel", 0.02, x_graph=2.5))
    assert _by_target(targets.check(bench))[X_TARGET]["contender"] == "fastnn-cupy-kernel-global"
    text = targets.format_rows(targets.check(bench))
    assert " fastnn-cupy-kernel-global " in text  # the whole name, not cut


def test_no_kernels_file_gives_one_not_measured_row():
    rows = [e for e in targets.check(BENCH, None, PROFILE) if e["workload"] == "kernels"]
    assert [(e["target"], e["met"]) for e in rows] == [(targets.KERNEL_TEXT, None)]
    assert "no gpu-kernels file" in rows[0]["not_measured"]
    assert "no gpu-kernels file" in targets.format_rows(rows)


def test_a_kernels_file_with_failures_and_a_cut_reads_as_not_measured():
    ops = ["copy", "adam", "f32_to_bf16", "act_backward relu"]
    kernels = {"complete": False, "ops": ops, "results": [
        {"op": "copy", "gb_per_s": 3000.0, "fraction_of_copy": 1.0, "meets_target": True},
        {"op": "adam", "error": "RuntimeError: out of memory", "fraction_of_copy": None,
         "meets_target": None},
        {"op": "f32_to_bf16", "gb_per_s": 2700.0, "fraction_of_copy": 0.9, "meets_target": True}]}
    rows = {e["contender"]: e for e in targets.check(BENCH, kernels) if e["workload"] == "kernels"}
    assert list(rows) == ["adam", "f32_to_bf16", "act_backward relu"]
    assert rows["adam"]["met"] is None and rows["adam"]["not_measured"] == "RuntimeError: out of memory"
    assert rows["f32_to_bf16"]["met"] is True
    assert "cut short" in rows["act_backward relu"]["not_measured"]
    # The copy failed: every fraction is None, and the rows say why.
    kernels["results"][0] = {"op": "copy", "error": "RuntimeError: copy broke",
                             "fraction_of_copy": None, "meets_target": None}
    kernels["results"][2].update(fraction_of_copy=None, meets_target=None)
    rows = {e["contender"]: e for e in targets.check(BENCH, kernels) if e["workload"] == "kernels"}
    assert rows["f32_to_bf16"]["met"] is None
    assert rows["f32_to_bf16"]["not_measured"] == "the copy was not measured (RuntimeError: copy broke)"
    assert "RuntimeError: copy broke" in targets.format_rows(list(rows.values()))


def test_a_row_whose_gemms_ran_on_cupy_says_so_even_when_met():
    """A tf32 row measured after fastnn's handle refused TF32 (its GEMMs on
    CuPy's matmul) is not the precision's own speed: the table says so."""
    row = dict(_row("d-tf32", "fastnn-cupy", 1.3, x_torch=1.02), info={"gemms": "CuPy's matmul"})
    bench = {"results": [row, dict(_row("d", "fastnn-cupy", 3.3, x_torch=1.0),
                                   info={"gemms": "own cuBLAS handle"})]}
    got = _by_target(targets.check(bench, KERNELS))
    tf32 = got["d tf32 >= 1.0x PyTorch eager TF32"]
    assert tf32["met"] is True and "CuPy's matmul" in tf32["caveat"]
    assert "caveat" not in got["d float32 (TF32 off) >= 0.98x PyTorch eager"]
    text = targets.format_rows(list(got.values()))
    assert "- d tf32 >= 1.0x PyTorch eager TF32: its GEMMs ran on CuPy's matmul" in text
    assert "- d float32" not in text


# Each target workload of gpu-check, kept by name and precision but CPU-sized.
_TINY = {"a": ((24, 32, 32, 10), 32), "c": ((24, 16, 10), 16), "x": (None, None),
         **{f"{base}{tag}": ((24, 32, 32, 32, 10), 32)
            for base in ("d", "e") for tag in ("", "-tf32", "-bf16")}}


@pytest.mark.slow
def test_the_files_gpu_check_writes_give_every_target_a_figure(emulated_gpu, tmp_path, capsys,
                                                              monkeypatch):
    """The producers and this reader agree: ``fastnn bench --device gpu``,
    gpu_kernels and gpu_profile run on the CPU stand-in for CuPy, with PyTorch
    on the CPU standing in for its CUDA rows, and the target table read from
    their files has a figure, a verdict and (where missed) the profile line for
    every target; only x's, whose one-launch kernel needs numba.cuda, is not
    measured, and says so. A renamed key in any of the files fails here, not in
    the first GPU session's only run."""
    pytest.importorskip("torch")
    import dataclasses

    import fastnn as fn
    from fastnn import benchmarking as bm
    from fastnn import gpu_compiled
    from fastnn.benchmarking import gpu_kernels, gpu_profile, runner, torch_steps, workloads
    from fastnn.cli import main as cli_main

    for name, (sizes, batch) in _TINY.items():
        w = workloads.ALL_WORKLOADS[name]
        if sizes is not None:
            w = dataclasses.replace(w, sizes=sizes, batch=batch)
        monkeypatch.setitem(workloads.ALL_WORKLOADS, name, w)
        monkeypatch.setitem(workloads.WORKLOADS if name in workloads.WORKLOADS
                            else workloads.GPU_WORKLOADS, name, w)
    monkeypatch.setattr(bm, "resolve_device", lambda requested="auto": ("gpu", None))
    monkeypatch.setattr(bm, "probe_torch_cuda", lambda: (True, {"torch": "cpu stand-in"}))
    real_torch_step = torch_steps.torch_cuda_step
    monkeypatch.setattr(torch_steps, "torch_cuda_step",  # both torch rows: CPU eager steps
                        lambda w, threads=1, seed=0, graph=False: real_torch_step(
                            w, threads, seed, graph=False, device="cpu"))
    monkeypatch.setattr(runner, "CHILD_CONTENDERS", ())  # in this process, with the stand-ins
    monkeypatch.setitem(gpu_compiled._status, "cuda", "numba.cuda: no usable CUDA driver or device")
    monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)
    monkeypatch.setattr(fn, "available_backends", lambda: {"cupy": None})  # for the two tools
    time_by_host_clock(monkeypatch, sys.modules["cupy"])

    bench, kernels, profile = (tmp_path / f"{n}.json" for n in ("bench", "kernels", "profile"))
    assert cli_main(["bench", "--device", "gpu", "--workloads", ",".join(_TINY), "--rounds", "1",
                     "--samples", "1", "--json", str(bench)]) == 0
    assert gpu_kernels.main(["--elements", "4096", "--repeats", "1", "--json", str(kernels)]) == 0
    assert gpu_profile.main(["--workloads", gpu_profile.DEFAULT_WORKLOADS, "--peak-size", "16",
                             "--json", str(profile)]) == 0
    capsys.readouterr()
    assert targets.main([str(bench), "--kernels", str(kernels), "--profile", str(profile)]) == 0
    table = capsys.readouterr().out

    docs = [json.loads(p.read_text()) for p in (bench, kernels, profile)]
    entries = targets.check(*docs)
    assert len(entries) == len(targets.TARGETS) + len(docs[1]["ops"]) - 1  # one row per op but copy
    for e in entries:
        if e["workload"] == "x":
            assert e["met"] is None and "numba.cuda" in e["not_measured"], e
            continue
        assert e["measured"] is not None and e["met"] in (True, False), e
        if not e["met"] and e["workload"] != "kernels":
            assert e["why"].startswith("op by op: host "), e  # the workload's profile line
    ratios = [e for e in entries if e["metric"] in ("x_torch", "x_graph")]
    assert {e["workload"] for e in ratios} == {t.workload for t in targets.TARGETS
                                                if t.metric != "ms"}
    assert "x >= 2x PyTorch's CUDA-graph steps/s" in table and "not measured" in table
