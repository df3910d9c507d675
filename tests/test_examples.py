"""Every script in examples/ runs and learns what it says it learns."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

import fastnn as fn

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# What each example must print for its problem to count as learned.
EXPECT = {
    "xor_relu.py": r"learned XOR: True",
    "xor_sigmoid_until.py": r"stopped after \d+ epochs, squared error 0\.[0-2]",
    "parity3_tanh.py": r"all correct: True",
    "softmax_classifier.py": r"test accuracy 0\.(8[5-9]|9)",
    "linear_regression.py": r"final loss 0\.00[23]",
    "sum_of_squares.py": r"test MSE 0\.0[0-1]",
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_example_runs_and_learns(name, backend_name):
    """Each example, unchanged, on every usable backend (FASTNN_BACKEND picks it)."""
    reason = fn.available_backends()[backend_name]
    if reason is not None:
        pytest.skip(reason)
    env = dict(os.environ, FASTNN_BACKEND=backend_name)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert re.search(EXPECT[name], result.stdout), result.stdout


def test_readme_first_network_runs(tmp_path, monkeypatch, capsys):
    """The README's first example is code users paste: it must run as written."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    snippet = re.search(r"## A first network\s+```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves xor.npz in the working directory
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)
    fn, model, X, y = ns["fn"], ns["model"], ns["X"], ns["y"]
    assert (abs(fn.predict(model, X) - y) < 0.05).all()  # what the comment promises
    assert (tmp_path / "xor.npz").exists()
