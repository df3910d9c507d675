"""Numba's disk cache notices edits in the files a kernel is built from
(backends/jit_cache.py), not only in the kernel's own file."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("numba")
REPO = Path(__file__).resolve().parents[1]

KERNEL = textwrap.dedent("""
    from numba import njit

    from fastnn.backends.jit_cache import track_sources

    from . import consts
    from .consts import K


    @njit(cache=True)
    def f(x):
        return x + K


    track_sources(globals(), consts)
""")


def _run(tmp_path) -> tuple[str, bool]:
    """f(1) in a fresh interpreter, and whether it came from the disk cache."""
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}",
               NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_DEBUG_CACHE="1")
    code = ("from fastnn.backends.jit_cache import cached_on_disk\n"
            "from deppkg.kern import f\n"
            "fresh = cached_on_disk(f)\n"
            "print('f(1) =', f(1), 'fresh before the call:', fresh)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    value, fresh = proc.stdout.split("f(1) =")[1].split()[0], "before the call: True" in proc.stdout
    loaded = "data loaded" in proc.stdout
    assert fresh == loaded  # cached_on_disk foretells whether Numba loads or compiles
    return value, loaded


def test_an_edit_in_a_dependency_recompiles_the_cached_kernel(tmp_path):
    pkg = tmp_path / "deppkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "consts.py").write_text("K = 1\n")
    (pkg / "kern.py").write_text(KERNEL)
    assert _run(tmp_path) == ("2", False)  # compiled and saved
    assert _run(tmp_path) == ("2", True)  # the cache works: loaded, not compiled
    (pkg / "consts.py").write_text("K = 5\n")  # kern.py itself is untouched
    assert _run(tmp_path) == ("6", False)
    assert _run(tmp_path) == ("6", True)


def test_fastnn_kernels_are_stamped_with_their_dependencies():
    from fastnn.backends import activations, constants, numba_kernels, numba_mlp
    from fastnn.backends.jit_cache import sources_digest

    cache_file = getattr(getattr(numba_mlp.train_mlp, "_cache", None), "_cache_file", None)
    if cache_file is None or not hasattr(cache_file, "_source_stamp"):
        pytest.skip("this Numba keeps its cache stamp elsewhere: jit_cache does nothing")
    assert cache_file._source_stamp[1] == sources_digest(numba_kernels, activations, constants)
    stamp = numba_kernels.act_value._cache._cache_file._source_stamp
    assert stamp[1] == sources_digest(activations)
