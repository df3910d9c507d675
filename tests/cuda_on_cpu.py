"""Run the real kernels/*.cu on the CPU: g++ and ``tests/native/cuda_on_cpu.h``.

``compile_module(source)`` builds the source that CupyBackend hands to
``cupy.RawModule`` (fastnn_common.cuh already inlined) into a shared library,
with one launcher per extern "C" kernel, and caches it on disk by the hash of
what went in. ``CpuModule.launch(name, grid, block, args)`` then runs that
kernel's own code over the grid (see the header for what is emulated and
what is refused). tests/fake_cupy.py launches through it when asked for
``kernels="source"``; its by-name NumPy emulation stays the default.

Needs g++ and nm (``available()`` says why not); the suite skips these tests
without them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent / "native" / "cuda_on_cpu.h"
# No FMA contraction (the device compiles with --fmad=false), no fast math,
# and no _FORTIFY_SOURCE checks across the fibers' stacks.
# -fno-gnu-unique: a template's __shared__ static stays this library's own (a
# "unique" symbol binds process-wide: a second module of the same template
# would use, and poison, the first one's copy).
_CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
              "-U_FORTIFY_SOURCE", "-fno-gnu-unique", "-w")
_SCALARS = {"float": ctypes.c_float, "double": ctypes.c_double, "int": ctypes.c_int,
            "long long": ctypes.c_longlong}
_modules: dict[str, "CpuModule"] = {}  # by kernel source: each test's backend loads its own
# One launch at a time in the process: each library's scheduler is a single
# static state (ctypes lets a second Python thread call in meanwhile).
_launch_lock = threading.Lock()


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def available() -> str | None:
    """None when kernels can run on the CPU here, else why not."""
    if os.environ.get("FASTNN_TESTS_CUDA_ON_CPU") == "0":
        return "FASTNN_TESTS_CUDA_ON_CPU=0 (bench/gpu_check.sh: the GPU runs the kernels)"
    if compiler() is None:
        return "no C++ compiler (g++) to run the CUDA kernels on the CPU"
    if shutil.which("nm") is None:
        return "no nm (binutils) to find the kernels' shared memory"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return "the CPU kernel runner sets SSE's MXCSR: x86-64 only"
    return None


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str:
    done = subprocess.run([compiler(), "-dumpfullversion"], capture_output=True, text=True)
    return done.stdout.strip()


def _launchers(source: str) -> tuple[str, dict]:
    """C++ of one ``fncpu_launch_<name>(grid, block, ftz, args)`` per kernel, and
    ``{name: [(C type, name), ...]}``."""
    from fake_cupy import kernel_signatures  # (tests/fake_cupy.py: one parser of the signatures)

    lines, kernels = [], kernel_signatures(source)
    for name, parsed in kernels.items():
        call = ", ".join(f"*({ctype}*)args[{i}]" for i, (ctype, _) in enumerate(parsed))
        lines.append(
            f'extern "C" int fncpu_launch_{name}(const unsigned* grid, const unsigned* threads, '
            f"int ftz, int descending, void** args) {{\n"
            f"    return fncpu::launch(grid, threads, ftz, descending, "
            f"[args]() {{ {name}({call}); }});\n}}")
    lines.append('extern "C" const char* fncpu_error() { return fncpu::error_text; }')
    return "\n".join(lines), kernels


_SHARED = re.compile(r"__shared__\s+[\w\s]*?(\w+)\s*[\[;=]")


def _symbols(library: Path, source: str) -> tuple[list[tuple[str, int, int]], int]:
    """([(name, address in the file, bytes), ...] of the source's __shared__
    variables, fncpu_error's address in the file). The shared ones are statics,
    named ``<function>::<name>`` (or ``<name>`` at file scope) by ``nm -C``;
    every declared name must be found."""
    names = set(_SHARED.findall(source))
    listing = subprocess.run(["nm", "-S", "-C", "--defined-only", str(library)],
                             capture_output=True, text=True, check=True).stdout
    found, seen, error_at = [], set(), None
    for line in listing.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[3] == "fncpu_error":
            error_at = int(parts[0], 16)
        if len(parts) != 4 or parts[2] not in "bBdDuV" or parts[3].startswith("fncpu::"):
            continue  # (the runner's own state is no kernel's shared memory)
        short = parts[3].rsplit("::", 1)[-1]
        if short in names:
            found.append((parts[3], int(parts[0], 16), int(parts[1], 16)))
            seen.add(short)
    assert seen == names, f"__shared__ variables not found in {library.name}: {names - seen}"
    assert error_at is not None, f"no fncpu_error in {library.name}"
    return found, error_at


class CpuModule:
    def __init__(self, library: Path, kernels: dict, source: str):
        self.lib = ctypes.CDLL(str(library))
        self.lib.fncpu_error.restype = ctypes.c_char_p
        self.kernels = kernels
        # Where the library was loaded: fncpu_error's address less its file offset.
        shared, error_in_file = _symbols(library, source)
        bias = ctypes.cast(self.lib.fncpu_error, ctypes.c_void_p).value - error_in_file
        at = (ctypes.c_void_p * max(len(shared), 1))(*(bias + a for _, a, _ in shared))
        size = (ctypes.c_ulonglong * max(len(shared), 1))(*(n for _, _, n in shared))
        assert self.lib.fncpu_set_shared(at, size, len(shared)) == 0, shared
        self.shared = [name for name, _, _ in shared]

    def launch(self, name: str, grid, block, args) -> None:
        """Run kernel ``name`` with numpy arrays (pointers: their data) and
        numpy scalars, in the order of its C parameters: first on copies of the
        arrays with the threads and warps in descending order, then on the
        arrays themselves in ascending order. Results that differ between the
        two orders mean a shared-memory read no barrier orders (a race)."""
        params = self.kernels[name]
        assert len(args) == len(params), (name, len(args), params)
        for value, (ctype, pname) in zip(args, params):
            if ctype.endswith("*"):
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous, (name, pname)
        copies = _copies_keeping_aliases(args)
        if copies is not None:
            self._run(name, grid, block, copies, descending=True)
        self._run(name, grid, block, args, descending=False)
        if copies is not None:
            for value, other, (_, pname) in zip(args, copies, params):
                if isinstance(value, np.ndarray) and not np.array_equal(
                        value.reshape(-1).view(np.uint8), other.reshape(-1).view(np.uint8)):
                    raise AssertionError(
                        f"kernel {name} on the CPU: {pname} differs between thread orders "
                        "(a shared-memory read that no barrier orders?)")

    def _run(self, name, grid, block, args, descending: bool) -> None:
        params = self.kernels[name]
        keep, pointers = [], (ctypes.c_void_p * len(args))()
        for i, (value, (ctype, pname)) in enumerate(zip(args, params)):
            if ctype.endswith("*"):
                cell = ctypes.c_void_p(value.ctypes.data)
            else:
                cell = _SCALARS[ctype](value.item() if hasattr(value, "item") else value)
            keep.append(cell)
            pointers[i] = ctypes.cast(ctypes.pointer(cell), ctypes.c_void_p)
        dims = lambda d: (ctypes.c_uint * 3)(*(tuple(int(v) for v in d) + (1, 1))[:3])  # noqa: E731
        # -ftz=true flushes float32 arithmetic only: a kernel of float parameters
        flush = any(ctype in ("float", "float*") for ctype, _ in params)
        with _launch_lock:
            status = getattr(self.lib, f"fncpu_launch_{name}")(
                dims(grid), dims(block), int(flush), int(descending), pointers)
            error = self.lib.fncpu_error().decode() if status else ""
        if status != 0:
            raise AssertionError(f"kernel {name} on the CPU: {error}")


def _copies_keeping_aliases(args):
    """``args`` with each array replaced by a copy, one copy per distinct buffer
    (an in-place kernel gets the same array twice); None when two arrays
    overlap without being the same memory (no faithful copy then)."""
    def key(a):
        return a.ctypes.data, a.nbytes, a.dtype

    arrays = [a for a in args if isinstance(a, np.ndarray)]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1:]:
            if key(a) != key(b) and np.may_share_memory(a, b):  # exact for contiguous arrays
                return None
    made = {}
    for a in arrays:
        made.setdefault(key(a), np.array(a, copy=True))
    return [made[key(a)] if isinstance(a, np.ndarray) else a for a in args]


def compile_module(source: str) -> CpuModule:
    """The CPU build of one kernel module, compiled once per source (and cached
    on disk across processes and runs)."""
    if source in _modules:
        return _modules[source]
    launchers, kernels = _launchers(source)
    text = f'#include "{HEADER}"\n#line 1 "kernel source"\n{source}\n{launchers}\n'
    key = hashlib.sha256("\0".join((text, HEADER.read_text(), " ".join(_CXX_FLAGS),
                                     compiler(), _compiler_version())).encode())
    digest = key.hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / f"fastnn-cuda-on-cpu-{os.getuid()}"
    cache.mkdir(exist_ok=True)
    library = cache / f"{digest}.so"
    if not library.exists():
        mine = f"{digest}.{os.getpid()}.{threading.get_ident()}"
        cpp = cache / f"{mine}.cpp"
        cpp.write_text(text)
        partial = cache / f"{mine}.so"
        done = subprocess.run([compiler(), *_CXX_FLAGS, "-o", str(partial), str(cpp)],
                              capture_output=True, text=True)
        cpp.unlink()
        if done.returncode != 0:
            raise AssertionError(f"g++ could not build the kernels for the CPU:\n{done.stderr}")
        os.replace(partial, library)  # atomic: a parallel run sees all or nothing
    _modules[source] = module = CpuModule(library, kernels, source)
    return module
