"""The CPU fallback users rely on: the built wheel in a clean venv without Numba or CuPy.

Builds the wheel from this checkout, checks what it ships, installs it into a
fresh ``python -m venv`` (no system site-packages) together with its three
runtime dependencies only (numpy, threadpoolctl, tqdm; pip takes them from the
configured package index), and checks there that ``import fastnn`` works, the
numpy backend is chosen, and numba/cupy are reported as "not installed".
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "FASTNN_BACKEND", "VIRTUAL_ENV", "PYTHONHOME"}}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"`{' '.join(map(str, cmd))}` failed ({proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT]
    if importlib.util.find_spec("hatchling") is not None:
        # Build with the installed hatchling: offline and fast. Without it pip
        # fetches the build backend into an isolated environment.
        cmd.insert(4, "--no-build-isolation")
    _run(cmd, cwd=out)
    wheels = list(out.glob("fastnn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastnn/__init__.py" in names
    assert "fastnn/backends/base.py" in names
    # build leftovers of a checkout must not ship (stale Numba caches, bytecode)
    junk = sorted(n for n in names if n.endswith((".pyc", ".nbi", ".nbc")) or "__pycache__" in n)
    assert not junk, f"wheel ships build leftovers: {junk[:10]}"
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_ships_cuda_kernels(wheel):
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    if not sources:
        pytest.skip("kernels/ has no .cu files yet, nothing to ship")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [s for s in sources if f"fastnn/_kernels/{s}" not in names]
    assert not missing, f"wheel lacks fastnn/_kernels/ for {missing}"
    for header in (ROOT / "kernels").glob("*.cuh"):
        assert f"fastnn/_kernels/{header.name}" in names, header.name


CHECK = textwrap.dedent(
    """
    import importlib.util, json, sys
    import fastnn

    assert "site-packages" in fastnn.__file__, fastnn.__file__  # the wheel, not the checkout
    for mod in ("numba", "cupy", "torch"):
        assert importlib.util.find_spec(mod) is None, mod + " is installed in the clean venv"
    assert fastnn.get_backend().name == "numpy", fastnn.get_backend()
    avail = fastnn.available_backends()
    assert avail["numpy"] is None, avail
    for name in ("numba", "cupy"):
        reason = avail[name]
        assert isinstance(reason, str) and "\\n" not in reason, repr(reason)
        assert "not installed" in reason, reason
    try:
        fastnn.use_backend("cupy")
    except fastnn.BackendUnavailable as exc:
        assert str(exc) == avail["cupy"], exc
    else:
        raise AssertionError("use_backend('cupy') did not raise BackendUnavailable")
    assert fastnn.use_backend("auto").name == "numpy"
    x = fastnn.asarray([[1.0, -2.0]])
    assert x.dtype == "float32"

    # A short fit through the public API on the numpy backend, data from the wheel.
    from fastnn.data import load_digits, xor
    fastnn.manual_seed(0)
    X, y = xor()
    model = fastnn.Sequential(fastnn.Linear(2, 8), fastnn.Tanh(), fastnn.Linear(8, 1))
    hist = fastnn.fit(model, fastnn.MSELoss(), fastnn.Adam(model.parameters(), lr=0.05),
                      X, y, epochs=200, batch_size=4, progress=False)
    assert hist.epochs_run == 200 and hist.loss[-1] < 0.1 * hist.loss[0], hist.loss[::50]
    Xd, yd = load_digits("test")
    assert Xd.shape == (359, 64) and Xd.dtype == "float32"
    print(json.dumps({"ok": True, "backend": fastnn.get_backend().name}))
    """
)


def test_wheel_in_clean_venv_falls_back_to_numpy(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    # The wheel pulls in its runtime dependencies (numpy, threadpoolctl, tqdm) only.
    _run([py, "-m", "pip", "install", "-q", wheel], cwd=tmp_path, timeout=400)
    installed = {
        p["name"].lower()
        for p in json.loads(_run([py, "-m", "pip", "list", "--format=json"], cwd=tmp_path))
    }
    assert {"fastnn", "numpy", "threadpoolctl", "tqdm"} <= installed, installed
    assert not installed & {"numba", "llvmlite", "cupy", "torch"}, installed
    out = _run([py, "-W", "error", "-c", CHECK], cwd=tmp_path)  # cwd: not the checkout
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": True, "backend": "numpy"}
