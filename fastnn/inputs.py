"""Checks of what fit, evaluate and predict are given: clear errors naming the
argument and its shape, then the data put on the device once."""
from __future__ import annotations

import numpy as np

from .backends import get_backend, host_array, value_range
from .backends.base import on_host
from .errors import DTypeError, InputError, ShapeError, naming_out_of_memory
from .nn.module import Module, label_range_of


def model_dtype(model: Module):
    params = model.parameters()
    return params[0].data.dtype if params else np.dtype(np.float32)


def prepare(X, y, dtype, what: str, loss_fn=None):
    """Validate (X, y) where they live and put them on the device once: arrays
    already there (CuPy arrays, torch CUDA tensors on the CuPy backend) are
    checked and cast on the device, not copied to the host and back. Returns
    (X, y, label range): the range of integer labels is read once here (a
    loop reading it per batch would sync the device each time). Integer y are
    labels unless ``loss_fn.value_targets`` (MSE, BCE), then cast once; the loss
    checks the whole y once (``check_targets``: BCE's range)."""
    backend = get_backend()
    X, y = readable(backend, X, "X", what), readable(backend, y, "y", what)
    if X.ndim == 0 or len(X) == 0:
        raise InputError(f"{what}: X is empty (shape {tuple(X.shape)})")
    if X.ndim == 1:
        raise ShapeError(f"{what}: X has shape {tuple(X.shape)}, expected a batch (N, features); "
                         "for one feature per sample pass X[:, None]")
    if y.ndim == 0 or len(y) != len(X):
        raise ShapeError(f"{what}: X has {len(X)} samples but y has shape {tuple(y.shape)}")
    if X.dtype.kind not in "fiub":
        raise DTypeError(f"{what}: X must be numeric, got dtype {X.dtype}")
    if X.dtype.kind == "f" and not all_finite(X):
        xp = array_module(backend, X)
        bad = host_array(xp.argwhere(~xp.isfinite(X))[0])
        raise InputError(f"{what}: X contains NaN or inf "
                         f"(first at index {tuple(int(i) for i in bad)})")
    if y.dtype.kind == "f" and not all_finite(y):
        raise InputError(f"{what}: y contains NaN or inf")
    # Labels as int32 or int64 (what the loss kernels take): others are cast once here,
    # not in every step.
    labels = y.dtype.kind in "iu" and not getattr(loss_fn, "value_targets", False)
    y_dtype = np.dtype(dtype) if not labels else \
        y.dtype if y.dtype in (np.int32, np.int64) else np.dtype(np.int64)
    nbytes = X.size * np.dtype(dtype).itemsize + y.size * y_dtype.itemsize
    with naming_out_of_memory(what, f"X {tuple(X.shape)} {np.dtype(dtype)} and y "
                              f"{tuple(y.shape)} {y_dtype}",
                              nbytes, backend.device, "pass fewer samples at a time"):
        Xd = backend.asarray(array_module(backend, X).ascontiguousarray(X), dtype=dtype)
        yd = backend.asarray(array_module(backend, y).ascontiguousarray(y), dtype=y_dtype)
    check_targets = getattr(loss_fn, "check_targets", None)
    if check_targets is not None:
        check_targets(yd)
    return Xd, yd, label_range_of(y) if labels else None


def all_finite(a) -> bool:
    """Whether a float array holds no NaN or inf: its min and max (a NaN or an
    inf shows in one of them) in one read of the device, and no temporary of
    the array's size (isfinite(X).all() made a bool copy of the whole data)."""
    if a.size == 0:
        return True
    low, high = value_range(a)
    return bool(np.isfinite(low) and np.isfinite(high))


def readable(backend, a, name: str, what: str):
    """``backend.resident(a)``, or an InputError naming ``name`` when ``a`` is no
    array at all (ragged nested lists, say)."""
    try:
        return backend.resident(a)
    except (ValueError, TypeError) as exc:
        lines = str(exc).strip().splitlines()
        raise InputError(f"{what}: {name} cannot be read as an array "
                         f"({lines[0] if lines else type(exc).__name__})") from exc


def check_step_objects(model, loss_fn, optimizer) -> None:
    """Clear errors for the usual slips: a class where an instance belongs
    (``fn.Adam`` for ``fn.Adam(model.parameters())``), another library's loss,
    an optimizer made for another model's parameters."""
    for role, obj, needs, example in (
            ("loss_fn", loss_fn, ("forward", "backward"), "fn.CrossEntropyLoss()"),
            ("optimizer", optimizer, ("step", "zero_grad"), "fn.Adam(model.parameters())")):
        if isinstance(obj, type):
            raise TypeError(f"fit: {role} is the class {obj.__name__}, not an instance; "
                            f"pass e.g. {example}")
        if not all(callable(getattr(obj, n, None)) for n in needs):
            library = type(obj).__module__.split(".")[0]
            hint = f" (a {library} object: use fastnn's own, e.g. {example})" \
                if library != "fastnn" else f", e.g. {example}"
            raise TypeError(f"fit: {role} must have {' and '.join(needs)} methods, got a "
                            f"{type(obj).__name__}{hint}")
    groups = getattr(optimizer, "groups", None)
    params = model.parameters()
    if groups is not None and params:
        held = {id(p) for g in groups for p in g.params}
        if not any(id(p) in held for p in params):
            raise InputError(f"fit: the optimizer holds none of the model's {len(params)} "
                             "parameters (made for another model?); create it with "
                             "model.parameters()")


def array_module(backend, a):
    """The array API ``a`` lives in: the backend's, or NumPy for a host array."""
    return np if on_host(a) else backend.xp


def check_positive_int(name, value, minimum=1, where="fit"):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
