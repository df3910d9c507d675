"""Backend registry: which array backend runs fastnn's math right now.

``import fastnn`` never imports Numba or CuPy: each is probed lazily, the
first time a backend is resolved or listed, and any failure becomes a one-line
reason instead of an exception.
"""
from __future__ import annotations

import contextvars
import importlib.util
import os
import threading

import numpy as np

from ..errors import BackendUnavailable
from .base import Backend, host_array

BACKEND_NAMES = ("numpy", "numba", "cupy")

_lock = threading.Lock()
_instances: dict[str, Backend] = {}
_reasons: dict[str, str | None] = {}
_current: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "fastnn_backend", default=None
)
# Backends to restore when a ``with use_backend(...)`` block exits (LIFO).
_restore: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "fastnn_backend_restore", default=()
)
_default_dtype = np.dtype(np.float32)


def _create(name: str) -> Backend:
    if name == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "numba":
        if importlib.util.find_spec("numba") is None:
            raise BackendUnavailable("numba: not installed (pip install 'fastnn[numba]')")
        from .numba_backend import NumbaBackend

        return NumbaBackend()
    if name == "cupy":
        if importlib.util.find_spec("cupy") is None:
            raise BackendUnavailable(
                "cupy: not installed (pip install 'fastnn[cuda12]' or 'fastnn[cuda13]')"
            )
        from .cupy_backend import CupyBackend

        return CupyBackend()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES + ('auto',)}")


def _instance(name: str) -> Backend:
    """The cached backend, or BackendUnavailable with the cached reason."""
    with _lock:
        if name in _instances:
            return _instances[name]
        if _reasons.get(name):
            raise BackendUnavailable(_reasons[name])
        try:
            backend = _create(name)
        except BackendUnavailable as exc:
            _reasons[name] = str(exc)
            raise
        except ValueError:
            raise
        except Exception as exc:  # a broken install must never escape as a crash
            reason = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _reasons[name] = reason.rstrip(": ")
            raise BackendUnavailable(_reasons[name]) from exc
        _instances[name] = backend
        _reasons[name] = None
        return backend


def available_backends() -> dict[str, str | None]:
    """``{name: None}`` for usable backends, ``{name: reason}`` for the others."""
    result = {}
    for name in BACKEND_NAMES:
        try:
            _instance(name)
            result[name] = None
        except BackendUnavailable as exc:
            result[name] = str(exc)
    return result


def _resolve(name: str) -> Backend:
    name = str(name).lower().strip()
    if name != "auto":
        return _instance(name)
    for candidate in ("cupy", "numba"):
        try:
            return _instance(candidate)
        except BackendUnavailable:
            pass
    return _instance("numpy")


def use_backend(name: str = "auto") -> Backend:
    """Make ``name`` the current backend (for this thread/context) and return it.

    Also a context manager: ``with fn.use_backend("numpy"): ...`` restores the
    previous backend on exit.
    """
    if isinstance(name, Backend):
        backend = name
    else:
        backend = _resolve(name)
    previous = _current.get()
    _current.set(backend)
    _restore.set(_restore.get() + ((backend, previous),))
    return backend


def _exit_backend(backend: Backend) -> None:
    stack = _restore.get()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] is backend:
            _current.set(stack[i][1])
            _restore.set(stack[:i])
            return


def get_backend() -> Backend:
    """The current backend (resolving ``FASTNN_BACKEND``, default auto, on first use)."""
    backend = _current.get()
    if backend is None:
        backend = _initial_backend()
        _current.set(backend)
    return backend


_initial: Backend | None = None


def _initial_backend() -> Backend:
    global _initial
    if _initial is None:
        _initial = _resolve(os.environ.get("FASTNN_BACKEND", "auto") or "auto")
    return _initial


def set_default_dtype(dtype) -> None:
    global _default_dtype
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"set_default_dtype: {dtype!r} is not a dtype; use float32 or "
                        "float64") from exc
    if dt not in (np.float32, np.float64):
        # float16 has no kernels here, and Adam's eps (1e-8) is 0 in it
        raise TypeError(f"set_default_dtype: expected float32 or float64, got {dt}")
    _default_dtype = dt


def get_default_dtype() -> np.dtype:
    return _default_dtype


def asarray(x, dtype=None):
    """``x`` as an array of the current backend; floats -> default dtype, ints kept.

    Device arrays (and DLPack producers such as torch tensors) go straight to
    the backend, never through the host.
    """
    backend = get_backend()
    if dtype is not None:
        return backend.asarray(x, dtype=dtype)
    arr = x if backend.is_array(x) else backend.asarray(x)
    if arr.dtype.kind == "f" and arr.dtype != _default_dtype:
        arr = arr.astype(_default_dtype)
    return arr


def refuse_foreign(x, backend, who: str, what: str = "input") -> None:
    """TypeError when ``x`` is another array library's array (NumPy on CuPy,
    CuPy on NumPy, a torch tensor): converting it would hide a host/device
    copy per call. Lists, scalars and the backend's own arrays pass. An array
    of strings, objects or complex numbers is named for its dtype first: no
    conversion would make it usable."""
    if backend.is_array(x) or type(x).__name__ not in ("ndarray", "Tensor"):
        return
    if type(x).__module__.split(".")[0] in ("numpy", "cupy", "torch"):
        dtype = getattr(x, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype.kind not in "biuf":
            refuse_non_real(dtype, who, what)
        raise TypeError(f"{who}: got {what} as a {type(x).__module__}.{type(x).__name__} but "
                        f"the current backend is {backend.name}; convert it with fastnn.asarray(x)")


def float_array(x, who: str = "input", what: str = "input"):
    """``x`` as a float array of the current backend (``asarray``), integer or
    bool data in the default dtype: an activation of ints would round its
    result (leaky ReLU) or fail inside NumPy (exp). ``who`` names the caller
    in the error for anything else (complex, strings, objects; another
    library's array: ``refuse_foreign``). A float array of the backend is kept
    as it is (float64 stays float64)."""
    backend = get_backend()
    if not backend.is_array(x):
        refuse_foreign(x, backend, who, what)
    arr = x if backend.is_array(x) else asarray(x)
    kind = arr.dtype.kind
    if kind in "iub":
        return arr.astype(_default_dtype)
    if kind != "f":
        refuse_non_real(arr.dtype, who, what)
    return arr


def refuse_non_real(dtype, who: str, what: str = "input"):
    """DTypeError for an array that does not hold real numbers (strings, objects, complex)."""
    from ..errors import DTypeError

    raise DTypeError(f"{who}: {what} must be real numbers, got an array of {dtype}")


def to_numpy(x) -> np.ndarray:
    return host_array(x)


def value_range(x):
    """(min, max) of an array of the current backend (or a NumPy one) as NumPy
    scalars: on a device both come back in one read (one sync), not two."""
    from .base import on_host

    backend = get_backend()
    if not on_host(x) and backend.is_array(x):
        low, high = host_array(backend.xp.stack((x.min(), x.max())))
        return low, high
    return x.min(), x.max()


__all__ = [
    "Backend",
    "BACKEND_NAMES",
    "available_backends",
    "use_backend",
    "get_backend",
    "asarray",
    "float_array",
    "refuse_foreign",
    "refuse_non_real",
    "to_numpy",
    "set_default_dtype",
    "get_default_dtype",
]
