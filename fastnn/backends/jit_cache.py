"""Numba's disk cache, made to notice the other files a kernel is built from.

Numba keeps a cached kernel while its own file's modification time and size
stay the same. A kernel also freezes in what it calls from other files (the
machine code of ``numba_kernels`` functions) and their constants (activation
codes, BCE's epsilon in constants.py), so an edit there alone would leave it stale: a
developer would test old code. ``track_sources`` adds a digest of those files
to the stamp Numba compares, so such an edit recompiles the kernel once.

It works through one internal attribute that numba 0.60-0.68 and numba-cuda
share (``dispatcher._cache._cache_file._source_stamp``, set when the
dispatcher is made, compared when a cached kernel is loaded). Where that is
missing (another Numba, the CUDA simulator, caching off) it does nothing: the
cache then behaves as plain Numba's.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path


def sources_digest(*modules) -> str:
    """A short digest of the modules' source files."""
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def track_sources(namespace: dict, *modules) -> int:
    """Stamp every cached Numba dispatcher defined in ``namespace`` (a module's
    ``globals()``, called at its end, before anything compiles) with the digest
    of ``modules``; returns how many were stamped."""
    digest = sources_digest(*modules)
    stamped = 0
    for obj in list(namespace.values()):
        py_func = getattr(obj, "py_func", None)
        cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)
        if py_func is None or py_func.__module__ != namespace["__name__"]:
            continue  # not a dispatcher, or one imported from elsewhere
        if cache_file is None or not hasattr(cache_file, "_source_stamp"):
            continue
        cache_file._source_stamp = (cache_file._source_stamp, digest)
        stamped += 1
    return stamped


def cached_on_disk(dispatcher) -> bool:
    """Whether Numba's disk cache holds a fresh entry for ``dispatcher``: its
    index exists, is of this Numba and carries the current stamp (a stale one
    would be recompiled). False where Numba keeps these elsewhere."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    try:
        with open(cache_file._index_path, "rb") as f:
            version = pickle.load(f)
            data = f.read()
        if version != cache_file._version:
            return False
        stamp, overloads = pickle.loads(data)
        return stamp == cache_file._source_stamp and bool(overloads)
    except Exception:  # no index yet, another layout, a truncated file
        return False
