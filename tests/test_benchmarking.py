"""``fastnn bench``: the table and the JSON it writes (a fast smoke run)."""
from __future__ import annotations

import json

from fastnn import benchmarking as bm
from fastnn.cli import main


def test_bench_quick_xor_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--workloads", "x", "--rounds", "1", "--samples", "1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for word in ("workload", "contender", "ms/step", "samples/s", "x floor", "x torch",
                 "floor", "fastnn-numpy"):
        assert word in out
    doc = json.loads(path.read_text())
    for key in ("machine", "versions", "blas", "threads", "date", "command", "method",
                "workloads", "results", "table"):
        assert key in doc, key
    for key in ("fastnn", "numpy", "numba", "torch"):
        assert key in doc["versions"]
    assert doc["command"].startswith("fastnn bench") and "--workloads x" in doc["command"]
    assert doc["threads"] >= 1
    contenders = {r["contender"] for r in doc["results"]}
    assert {"floor", "numpy", "fastnn-numpy"} <= contenders
    for r in doc["results"]:
        assert r["workload"] == "x"
        assert r["ms_per_step"] > 0 and r["samples_per_s"] > 0
        assert set(r) >= {"quiet_ms_per_step", "x_floor", "x_torch", "blocks_ms"}
        if r["contender"] not in ("floor",):
            assert r["x_floor"] is not None and r["x_floor"] > 0


def test_workload_builders_train():
    w = bm.WORKLOADS["c"]
    run = bm.make_step(w, "fastnn-numpy")
    first = run(1)
    assert run(5) < first
    floor = bm.floor_step(w)
    assert floor(1) == floor(1)  # finite, deterministic
