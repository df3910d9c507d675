"""The backend registry and array-conversion rules of API.md ("Backends")."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch

import fastnn
from fastnn.backends import BACKEND_NAMES


def _usable() -> list[str]:
    return [n for n, r in fastnn.available_backends().items() if r is None]


def _expected_auto() -> str:
    usable = _usable()
    return next(n for n in ("cupy", "numba", "numpy") if n in usable)


def _run_python(code: str, env_extra: dict | None = None, pythonpath: str | None = None):
    """Run ``code`` in a fresh interpreter; return its stdout (fails on a non-zero exit)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTNN_BACKEND"}
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    # fastnn's own warnings are errors; a third-party import warning (CuPy on a
    # new CUDA, say) must not make the backend under test look unusable.
    strict = "import warnings\nwarnings.filterwarnings('error', module=r'fastnn')\n"
    proc = subprocess.run(
        [sys.executable, "-c", strict + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


@pytest.fixture
def restore_default_dtype():
    before = fastnn.get_default_dtype()
    yield
    fastnn.set_default_dtype(before)


# ------------------------------------------------------------------ registry
def test_available_backends_lists_every_name_with_none_or_a_one_line_reason():
    avail = fastnn.available_backends()
    assert list(avail) == ["numpy", "numba", "cupy"] == list(BACKEND_NAMES)
    assert avail["numpy"] is None
    for name, reason in avail.items():
        if reason is not None:
            assert isinstance(reason, str) and reason.strip()
            assert "\n" not in reason, reason
            assert reason.startswith(f"{name}:"), reason


def test_use_backend_returns_the_backend(backend, backend_name):
    assert isinstance(backend, fastnn.Backend)
    assert backend.name == backend_name
    assert fastnn.get_backend() is backend
    assert hasattr(backend.xp, "asarray") and hasattr(backend.xp, "ndarray")
    assert isinstance(backend.device, str) and backend.device
    assert fastnn.use_backend(backend_name) is backend  # one instance per name
    assert fastnn.use_backend(backend_name.upper()) is backend


def test_context_manager_restores_previous_backend_nested():
    names = _usable()
    outer_name, inner_name = names[0], names[-1]
    start = fastnn.get_backend()
    with fastnn.use_backend(outer_name) as outer:
        assert fastnn.get_backend() is outer
        with fastnn.use_backend(inner_name) as inner:
            assert fastnn.get_backend() is inner
            with fastnn.use_backend(outer_name):
                assert fastnn.get_backend() is outer
            assert fastnn.get_backend() is inner
        assert fastnn.get_backend() is outer
        fastnn.use_backend(inner_name)  # plain call inside a block ...
        assert fastnn.get_backend().name == inner_name
    assert fastnn.get_backend() is start  # ... is undone by the block's exit


def test_context_manager_restores_on_exception():
    start = fastnn.get_backend()
    with pytest.raises(KeyError):
        with fastnn.use_backend("numpy"):
            raise KeyError("boom")
    assert fastnn.get_backend() is start


def test_backend_choice_is_isolated_between_threads():
    names = _usable()
    if len(names) < 2:
        pytest.skip("needs two usable backends")
    mine, theirs = names[0], names[1]
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def worker():
        fastnn.use_backend(theirs)  # no `with`: stays set for this thread only
        barrier.wait()  # main thread checks its own backend
        barrier.wait()  # main thread switched again
        seen["thread"] = fastnn.get_backend().name

    with fastnn.use_backend(mine):
        t = threading.Thread(target=worker)
        t.start()
        barrier.wait()
        assert fastnn.get_backend().name == mine
        with fastnn.use_backend(mine):
            barrier.wait()
            t.join()
        assert fastnn.get_backend().name == mine
    assert seen["thread"] == theirs


@pytest.mark.parametrize("value", ["numpy", "NumPy", "numba", "auto", None])
def test_fastnn_backend_env_var_picks_the_initial_backend(value):
    expected = {"numpy": "numpy", "NumPy": "numpy", "numba": "numba"}.get(value, _expected_auto())
    if fastnn.available_backends().get(expected, "") is not None:
        pytest.skip(f"{expected} is not usable here")
    env = {} if value is None else {"FASTNN_BACKEND": value}
    out = _run_python("import fastnn; print(fastnn.get_backend().name)", env)
    assert out == expected


def test_unknown_name_raises_value_error():
    start = fastnn.get_backend()
    with pytest.raises(ValueError, match="tensorflow"):
        fastnn.use_backend("tensorflow")
    assert fastnn.get_backend() is start


def test_unusable_backend_raises_backend_unavailable_with_reason():
    unusable = {n: r for n, r in fastnn.available_backends().items() if r is not None}
    if not unusable:
        pytest.skip("every backend is usable here (the subprocess tests cover the path)")
    start = fastnn.get_backend()
    for name, reason in unusable.items():
        with pytest.raises(fastnn.BackendUnavailable) as info:
            fastnn.use_backend(name)
        assert str(info.value) == reason
        assert isinstance(info.value, fastnn.FastnnError)
        assert fastnn.get_backend() is start


def test_auto_picks_the_best_usable_backend_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fastnn.use_backend("auto") as b:
            assert b.name == _expected_auto()


def test_missing_numba_and_cupy_become_reasons_and_auto_falls_back():
    # `sys.modules[name] = None` makes the module unimportable, as if not installed.
    out = _run_python(
        """
        import sys
        sys.modules["numba"] = None
        sys.modules["cupy"] = None
        import fastnn
        avail = fastnn.available_backends()
        assert avail["numpy"] is None, avail
        for name in ("numba", "cupy"):
            reason = avail[name]
            assert isinstance(reason, str) and "\\n" not in reason, reason
            assert "not installed" in reason, reason
            try:
                fastnn.use_backend(name)
            except fastnn.BackendUnavailable as exc:
                assert str(exc) == reason
            else:
                raise AssertionError(name + " did not raise")
        assert fastnn.use_backend("auto").name == "numpy"
        assert fastnn.get_backend().name == "numpy"
        print("ok")
        """
    )
    assert out == "ok"


def test_broken_numba_install_is_a_reason_not_a_crash(tmp_path):
    fake = tmp_path / "numba"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise RuntimeError("numba is broken here\\nsecond line of the error")\n'
    )
    out = _run_python(
        """
        import fastnn
        reason = fastnn.available_backends()["numba"]
        assert reason.startswith("numba:") and "\\n" not in reason, repr(reason)
        assert "numba is broken here" in reason, reason
        try:
            fastnn.use_backend("numba")
        except fastnn.BackendUnavailable as exc:
            assert str(exc) == reason
        else:
            raise AssertionError("no BackendUnavailable")
        print(fastnn.get_backend().name)
        """,
        env_extra={"FASTNN_BACKEND": "auto"},
        pythonpath=str(tmp_path),
    )
    assert out in {"numpy", "cupy"}


def test_import_fastnn_does_not_import_numba_cupy_or_torch():
    out = _run_python(
        """
        import sys
        import fastnn
        heavy = ("numba", "llvmlite", "cupy", "torch")
        print(sorted(m for m in heavy if m in sys.modules))
        fastnn.use_backend("numpy")
        fastnn.asarray([1.0, 2.0])
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    assert out.splitlines() == ["[]", "[]"]


# ------------------------------------------------------------------ asarray / to_numpy
@pytest.mark.parametrize(
    "data, expected",
    [
        (1.5, np.float32),
        ([[1.0, 2.0], [3.0, 4.5]], np.float32),
        ([1, 2.5], np.float32),
        (np.arange(6, dtype=np.float64).reshape(2, 3), np.float32),
        (np.ones(3, np.float16), np.float32),
        (np.ones(3, np.float32), np.float32),
        (np.float64(2.0), np.float32),
        ([1, 2, 3], np.int64),
        (7, np.int64),
        (np.arange(4, dtype=np.int32), np.int32),
        (np.arange(4, dtype=np.uint8), np.uint8),
    ],
    ids=["pyfloat", "nested-list", "mixed-list", "np-f64", "np-f16", "np-f32",
         "np-f64-scalar", "int-list", "pyint", "np-int32", "np-uint8"],
)
def test_asarray_dtype_rules(backend, xp_to_numpy, data, expected):
    a = fastnn.asarray(data)
    assert backend.is_array(a)
    assert a.dtype == expected
    np.testing.assert_array_equal(xp_to_numpy(a), np.asarray(data).astype(expected))


def test_asarray_explicit_dtype_is_honoured(backend, xp_to_numpy):
    assert fastnn.asarray([1.0, 2.0], dtype=np.float64).dtype == np.float64
    assert fastnn.asarray(np.ones(3, np.float32), dtype="float64").dtype == np.float64
    assert fastnn.asarray([1.7, 2.2], dtype=np.int32).dtype == np.int32
    a = fastnn.asarray(np.arange(3), dtype=np.float32)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(xp_to_numpy(a), [0, 1, 2])


def test_asarray_follows_default_dtype(backend, restore_default_dtype):
    fastnn.set_default_dtype(np.float64)
    assert fastnn.asarray(1.5).dtype == np.float64
    assert fastnn.asarray(np.ones(2, np.float32)).dtype == np.float64
    assert fastnn.asarray([1, 2]).dtype == np.int64


def test_asarray_of_a_backend_array(backend, xp_to_numpy):
    a32 = backend.asarray(np.arange(4, dtype=np.float32))
    assert fastnn.asarray(a32).dtype == np.float32
    a64 = backend.asarray(np.arange(4, dtype=np.float64))
    b = fastnn.asarray(a64)
    assert b.dtype == np.float32 and backend.is_array(b)
    np.testing.assert_array_equal(xp_to_numpy(b), np.arange(4))


@pytest.mark.parametrize(
    "tensor, expected",
    [
        (torch.arange(6, dtype=torch.float32).reshape(2, 3), np.float32),
        (torch.arange(6, dtype=torch.float64).reshape(2, 3), np.float32),
        (torch.arange(6, dtype=torch.float64).reshape(2, 3).T, np.float32),  # not contiguous
        (torch.arange(6, dtype=torch.int64), np.int64),
        (torch.ones(3, requires_grad=True) * 2, np.float32),
    ],
    ids=["f32", "f64", "f64-transposed", "int64", "requires-grad"],
)
def test_asarray_of_torch_cpu_tensors(backend, xp_to_numpy, tensor, expected):
    a = fastnn.asarray(tensor)
    assert backend.is_array(a) and a.dtype == expected
    np.testing.assert_array_equal(xp_to_numpy(a), tensor.detach().numpy())


class _DLPackOnly:
    """A DLPack producer that is neither NumPy nor torch."""

    def __init__(self, array):
        self._a = array

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_asarray_of_a_generic_dlpack_producer(backend, xp_to_numpy):
    src = np.arange(6, dtype=np.float64).reshape(3, 2)
    a = fastnn.asarray(_DLPackOnly(src))
    assert a.dtype == np.float32
    np.testing.assert_array_equal(xp_to_numpy(a), src)
    b = fastnn.asarray(_DLPackOnly(np.arange(3, dtype=np.int32)))
    assert b.dtype == np.int32


def test_to_numpy(backend):
    x = backend.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    h = fastnn.to_numpy(x)
    assert type(h) is np.ndarray and h.dtype == np.float32
    np.testing.assert_array_equal(h, np.arange(6).reshape(2, 3))
    assert type(fastnn.to_numpy([1.0, 2.0])) is np.ndarray
    t = fastnn.to_numpy(torch.ones(2, 2, requires_grad=True))
    assert type(t) is np.ndarray and t.dtype == np.float32
    host = np.ones(3)
    assert fastnn.to_numpy(host) is host


# ------------------------------------------------------------------ default dtype
def test_default_dtype_is_float32_and_settable(restore_default_dtype):
    assert fastnn.get_default_dtype() == np.float32
    fastnn.set_default_dtype(np.float64)
    assert fastnn.get_default_dtype() == np.float64
    assert isinstance(fastnn.get_default_dtype(), np.dtype)
    fastnn.set_default_dtype("float32")
    assert fastnn.get_default_dtype() == np.float32


@pytest.mark.parametrize("bad", [np.int64, "int32", bool, np.complex64, np.uint8])
def test_set_default_dtype_rejects_non_floats(bad, restore_default_dtype):
    before = fastnn.get_default_dtype()
    with pytest.raises(TypeError):
        fastnn.set_default_dtype(bad)
    assert fastnn.get_default_dtype() == before
