"""Where the CUDA sources of the fused kernels live, and how to read them.

Two layouts are supported:

* an installed wheel: ``fastnn/_kernels/*.cu`` (pyproject force-includes the
  top-level ``kernels/`` folder there);
* a source checkout: ``<repo>/kernels/*.cu`` beside ``pyproject.toml``.

``FASTNN_KERNEL_DIR`` overrides both (to try an edited kernel without
reinstalling). This module never imports CuPy, so it is testable on any CPU.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../fastnn
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)


def _candidates() -> list[Path]:
    """Folders to try, most specific first."""
    found = []
    override = os.environ.get("FASTNN_KERNEL_DIR")
    if override:
        found.append(Path(override))
    found.append(_PACKAGE_DIR / "_kernels")
    # The checkout's kernels/ only counts beside the project's pyproject.toml, so
    # an unrelated top-level "kernels" folder in site-packages is never picked.
    repo = _PACKAGE_DIR.parent
    if (repo / "pyproject.toml").is_file():
        found.append(repo / "kernels")
    return found


def kernel_dir() -> Path:
    """The folder holding the ``*.cu`` kernel sources; FileNotFoundError if none."""
    tried = _candidates()
    for folder in tried:
        if folder.is_dir() and any(folder.glob("*.cu")):
            return folder
    raise FileNotFoundError(
        "fastnn CUDA kernel sources not found; looked in: "
        + ", ".join(str(p) for p in tried)
    )


def list_kernels() -> list[str]:
    """File names of every ``*.cu`` source, sorted."""
    return sorted(p.name for p in kernel_dir().glob("*.cu"))


def read_kernel(name: str, inline_includes: bool = True) -> str:
    """Source text of kernel file ``name`` (``"bias_act"`` or ``"bias_act.cu"``).

    With ``inline_includes`` (the default), every ``#include "local.cuh"`` is
    replaced by that file's text, once per file (``#pragma once`` semantics).
    Why: NVRTC then needs no include path, and CuPy's on-disk compile cache,
    keyed by the source string, sees header edits too.
    """
    folder = kernel_dir()
    filename = name if name.endswith((".cu", ".cuh")) else f"{name}.cu"
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA kernel source {filename!r} in {folder}")
    if not inline_includes:
        return path.read_text(encoding="utf-8")
    return _inline(path, folder, seen=set())


def _inline(path: Path, folder: Path, seen: set) -> str:
    """``path``'s text with local includes expanded recursively."""
    text = _read(path)

    def expand(match: re.Match) -> str:
        header = (path.parent / match.group(1)).resolve()
        if not header.is_file():
            header = (folder / match.group(1)).resolve()
        if not header.is_file():
            return match.group(0)  # a system header: leave it to the compiler
        if header in seen:
            return f"// (already included: {match.group(1)})"
        seen.add(header)
        body = _PRAGMA_ONCE.sub("", _inline(header, folder, seen))
        return f"// ---- begin {match.group(1)} ----\n{body}\n// ---- end {match.group(1)} ----"

    return _INCLUDE.sub(expand, text)


@lru_cache(maxsize=None)
def _read_cached(path: str, mtime_ns: int) -> str:
    return Path(path).read_text(encoding="utf-8")


def _read(path: Path) -> str:
    # Keyed by mtime so an edited source is re-read in a long-lived process.
    return _read_cached(str(path), path.stat().st_mtime_ns)
