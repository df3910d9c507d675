"""The command line: fastnn info, fastnn train (with --plot / --save), python -m fastnn."""
import os
import subprocess
import sys

import pytest

import fastnn as fn
from fastnn import cli


def test_info_lists_every_backend_with_a_reason(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"fastnn {fn.__version__}" in out
    for name, reason in fn.available_backends().items():
        assert name in out
        if reason is not None:
            assert reason in out
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():  # each native pool with its thread count
        assert f"{pool['internal_api']}: {pool['num_threads']} threads" in out, out


def test_train_writes_plot_and_checkpoint(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot, ckpt = tmp_path / "loss.png", tmp_path / "run.npz"
    assert cli.main(["train", "--backend", "numpy", "--epochs", "3", "--hidden", "32",
                     "--quiet", "--plot", str(plot), "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "samples/s after the first epoch" in out
    assert "steps: per-op" in out  # History.step_path: how the steps ran
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    state = fn.load(ckpt)
    assert state["epoch"] == 3 and list(state["sizes"]) == [64, 32, 10]
    model = fn.Sequential(fn.Linear(64, 32), fn.ReLU(), fn.Linear(32, 10))
    model.load_state_dict(state["model"])
    assert state["optimizer"]["step"] > 0


def test_train_precision_option_applies_to_the_run_only(capsys):
    assert cli.main(["train", "--backend", "numpy", "--epochs", "1", "--hidden", "16",
                     "--quiet", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 GEMMs" in out
    assert "bf16 GEMMs (GPU only: exact float32 here)" in out  # a CPU run says it stays exact
    assert fn.get_precision() == "float32"


def test_history_plot_with_validation(tmp_path):
    pytest.importorskip("matplotlib")
    history = fn.History(loss=[1.0, 0.5, 0.25], val_loss=[1.1, 0.6, 0.4], epochs_run=3)
    history.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "--epochs: expected a positive int, got '0'"),
    (["--lr", "-1"], "--lr: expected a positive float, got '-1'"),
    (["--hidden", "64", "x"], "--hidden: expected a positive int, got 'x'"),
    (["--backend", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_options_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--quiet"] + args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--save", "--plot"])
def test_train_into_a_missing_folder_fails_before_training(option, tmp_path, monkeypatch):
    monkeypatch.setattr(fn, "fit", lambda *a, **k: pytest.fail("trained first"))
    path = tmp_path / "no" / "such" / "out"
    with pytest.raises(SystemExit, match=f"fastnn train: {option} {path}: the folder"):
        cli.main(["train", "--quiet", "--backend", "numpy", option, str(path)])


def test_python_dash_m_fastnn():
    result = subprocess.run([sys.executable, "-m", "fastnn", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "backends:" in result.stdout, result.stderr


def _run_gpu_check_without_a_gpu(results_dir, **env_vars):
    """bench/gpu_check.sh on this CPU machine with FASTNN_RESULTS_DIR=results_dir
    and env_vars: (the finished process, the text of its one report)."""
    import pathlib
    import shutil

    if fn.available_backends()["cupy"] is None:
        pytest.skip("a usable GPU here: the dry run is for machines without one")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, FASTNN_RESULTS_DIR=str(results_dir), PYTHON=sys.executable, **env_vars)
    proc = subprocess.run([bash, str(repo / "bench" / "gpu_check.sh")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    reports = list(pathlib.Path(results_dir).glob("gpu-check-*.txt"))
    assert len(reports) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, reports[0].read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_without_a_gpu(tmp_path):
    """The whole script on a CPU with one small test file: every section runs and
    reports (a GPU step failing here says so and the script goes on), the report
    lands in FASTNN_RESULTS_DIR, and the exit status is 3: not a GPU check."""
    proc, text = _run_gpu_check_without_a_gpu(tmp_path, FASTNN_GPU_CHECK_TESTS="tests/test_precision.py")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in ("## nvidia-smi", "## fastnn info", "## pytest", "passed",
                    "--precision bf16", "## python -m fastnn.benchmarking.gpu_kernels",
                    "## python -m fastnn.benchmarking.gpu_profile", "## fastnn bench --device gpu",
                    "## python -m fastnn.benchmarking.targets", "no target table",
                    "gpu-check: pytest exit status 0", "NOT A GPU RUN"):
        assert section in text, section
    assert "unbound variable" not in proc.stderr + text
    # The benchmark runs right after pytest: the GPU run is for its numbers.
    assert (text.index("## pytest") < text.index("## fastnn bench --device gpu")
            < text.index("## python -m fastnn.benchmarking.gpu_kernels"))


@pytest.mark.slow
def test_gpu_check_pytest_cut_at_its_guard_exits_4(tmp_path):
    """pytest stopped by its guard: exit status 4, not timeout's 124 (which reads
    as the device tool's own time-out), and with no time left the benchmark is
    skipped with a line saying so while the later sections still report."""
    hung = tmp_path / "hung" / "test_hung.py"
    hung.parent.mkdir()
    hung.write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    proc, text = _run_gpu_check_without_a_gpu(
        tmp_path / "results", FASTNN_GPU_CHECK_TESTS=str(hung),
        FASTNN_GPU_PYTEST_LIMIT_S="3", FASTNN_GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("pytest was cut at its guard", "skipped the benchmark",
                 "## python -m fastnn.benchmarking.gpu_profile", "NOT A GPU RUN"):
        assert line in text, line


def test_gpu_check_script_parses():
    """make gpu-check runs only on a GPU machine: here, a syntax check and the
    sections it must have (results folder, kernel bandwidth, precisions)."""
    import pathlib
    import shutil

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "FASTNN_RESULTS_DIR" in text and "gpu_kernels" in text and "--precision" in text


def test_bench_json_takes_the_commit_from_the_environment_without_git(monkeypatch):
    """A GPU machine runs a copy of the tree without .git: FASTNN_GIT_COMMIT
    then says which commit the figures are of."""
    import subprocess as sp

    from fastnn.benchmarking import report

    monkeypatch.setattr(report.subprocess, "run",
                        lambda *a, **k: sp.CompletedProcess(a, 128, stdout="", stderr="not a repo"))
    monkeypatch.delenv("FASTNN_GIT_COMMIT", raising=False)
    assert report._git() is None
    monkeypatch.setenv("FASTNN_GIT_COMMIT", "544fd8a")
    assert report._git() == {"commit": "544fd8a", "dirty": "unknown (FASTNN_GIT_COMMIT)"}
