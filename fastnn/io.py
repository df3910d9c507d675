"""save / load: ``.npz`` without pickle, written atomically.

A file holds a flat ``{key: array}``; nested dicts (a checkpoint with
``{"model": ..., "optimizer": ..., "epoch": 3}``) are flattened with ``/`` and
rebuilt by ``load``. Python scalars and strings round-trip as themselves.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .backends import host_array

_META = "__fastnn__"


def _flatten(obj, prefix: str, out: dict, scalars: list, empty: list) -> None:
    for key, value in obj.items():
        key = str(key)
        if "/" in key:
            raise ValueError(f"save: key {key!r} may not contain '/'")
        full = prefix + key
        if isinstance(value, dict):
            if not value:
                empty.append(full)  # no array stands for it: named in the metadata
            _flatten(value, full + "/", out, scalars, empty)
        elif isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
            out[full] = np.array(value)
            scalars.append(full)
        else:
            arr = np.asarray(host_array(value))
            if arr.dtype == object:
                raise TypeError(f"save: {full!r} is an object array; only numeric/str arrays are stored")
            if arr.dtype.kind == "U" and isinstance(value, (list, tuple)) and not all(
                    isinstance(v, str) for v in np.array(value, dtype=object).ravel()):
                # NumPy would store the numbers as strings: they would not load back
                raise TypeError(f"save: {full!r} mixes strings and numbers; store them apart")
            out[full] = arr


def save(model_or_state, path) -> None:
    """Write a Module's state dict (or any nested dict of arrays) to ``path``.

    The file is written to a temporary file in the same folder, flushed to
    disk and renamed over ``path``: a crash mid-save never leaves a torn file.
    """
    from .nn.module import Module

    state = model_or_state.state_dict() if isinstance(model_or_state, Module) else model_or_state
    if not isinstance(state, dict):
        raise TypeError(f"save: expected a Module or a dict, got {type(state).__name__}")
    arrays: dict = {}
    scalars: list = []
    empty: list = []
    _flatten(state, "", arrays, scalars, empty)
    arrays[_META] = np.array(json.dumps({"version": 1, "scalars": scalars, "empty": empty}))
    # Through a symbolic link to the file it names (as open() writes), not over the link.
    path = os.path.realpath(os.fspath(path)) if os.path.islink(os.fspath(path)) \
        else os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # else the error would name the temporary file
        raise FileNotFoundError(f"save: the folder of {path!r} does not exist ({folder})")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file owner-only (0600): a new file gets what any
            # new file would (0666 less the umask), a replaced one keeps its mode.
            os.fchmod(f.fileno(), _mode_for(path))
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# Read once, at import: reading it means setting it, and the process-wide
# umask must not change under other threads while they create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~_UMASK


def load(path) -> dict:
    """Read a file written by ``save``; returns the (nested) state dict."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        items = {k: data[k] for k in data.files}
    meta = json.loads(str(items.pop(_META))) if _META in items else {"scalars": []}
    scalars = set(meta.get("scalars", []))
    result: dict = {}
    for key in meta.get("empty", []):  # empty dicts of the saved state
        node = result
        for part in key.split("/"):
            node = node.setdefault(part, {})
    for key, value in items.items():
        if key in scalars:
            value = value.item()
        node = result
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result
