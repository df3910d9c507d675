"""One place controls CPU threads: BLAS (threadpoolctl) and Numba together."""
import subprocess
import sys
import textwrap

import pytest

import fastnn as fn


def _run(code: str, env_threads: str | None = None) -> str:
    import os

    env = dict(os.environ)
    env.pop("FASTNN_NUM_THREADS", None)
    if env_threads is not None:
        env["FASTNN_NUM_THREADS"] = env_threads
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(fn.available_backends()["numba"] is not None, reason="numba unusable")
def test_set_num_threads_limits_blas_and_numba():
    out = _run("""
        import fastnn as fn, numpy as np
        from threadpoolctl import threadpool_info
        fn.use_backend("numba")
        assert fn.set_num_threads(1) == 1 and fn.get_num_threads() == 1
        import numba
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        print(blas, numba.get_num_threads())
    """)
    assert out == "[1] 1"


def test_env_variable_sets_the_default():
    assert _run("import fastnn as fn; print(fn.get_num_threads())", env_threads="1") == "1"


def test_bad_thread_count():
    with pytest.raises(ValueError, match="n >= 1"):
        fn.set_num_threads(0)
