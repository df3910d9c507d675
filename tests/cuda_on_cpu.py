"""Run the real kernels/*.cu on the CPU: g++ and ``tests/native/cuda_on_cpu.h``.

``compile_module(source)`` builds the source that CupyBackend hands to
``cupy.RawModule`` (fastnn_common.cuh already inlined) into a shared library,
with one launcher per extern "C" kernel, and caches it on disk by the hash of
what went in. ``CpuModule.launch(name, grid, block, args)`` then runs that
kernel's own code over the grid (see the header for what is emulated and
what is refused; an access outside an array argument is one).
tests/fake_cupy.py launches through it when asked for ``kernels="source"``;
its by-name NumPy emulation stays the default.

Needs g++ and nm (``available()`` says why not); the suite skips these tests
without them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import sys
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
# -fsanitize=bounds, trapping (ud2, no runtime library): an index outside a
# fixed-size array (the __shared__ ones, a thread's local arrays) stops the
# launch; no cross-jumping keeps one trap per check, so its line is known (-g1).
_CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
              "-U_FORTIFY_SOURCE", "-fno-gnu-unique", "-w", "-fsanitize=bounds",
              "-fsanitize-undefined-trap-on-error", "-fno-crossjumping", "-g1",
              "-fstack-clash-protection")  # (a frame over a guard page still touches it)
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
    bounds = _launch_bounds(source)
    for name, parsed in kernels.items():
        call = ", ".join(f"*({ctype}*)args[{i}]" for i, (ctype, _) in enumerate(parsed))
        most = bounds.get(name, "0")  # (0: the device's 1024)
        lines.append(
            f'extern "C" int fncpu_launch_{name}(const unsigned* grid, const unsigned* threads, '
            f"int ftz, int descending, void** args) {{\n"
            f"    return fncpu::launch(grid, threads, ftz, descending, (unsigned)({most}), "
            f"[args]() {{ {name}({call}); }});\n}}")
    lines.append('extern "C" const char* fncpu_error() { return fncpu::error_text; }')
    return "\n".join(lines), kernels


def _launch_bounds(source: str) -> dict[str, str]:
    """{kernel: the C expression of its __launch_bounds__' most threads per
    block}: a launch of more fails on the device, so it does here."""
    found = {}
    for match in re.finditer(r"__launch_bounds__\s*\(", source):
        depth, at = 1, match.end()
        while depth:  # to the closing parenthesis: the expression may have its own
            depth += {"(": 1, ")": -1}.get(source[at], 0)
            at += 1
        expression = source[match.end():at - 1]
        name = re.match(r"\s*(\w+)\s*\(", source[at:])
        level, cut = 0, len(expression)
        for i, c in enumerate(expression):  # only the first argument: most threads
            level += {"(": 1, ")": -1}.get(c, 0)
            if c == "," and level == 0:
                cut = i
                break
        if name:
            found[name.group(1)] = expression[:cut].strip()
    return found


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
        self.lib.fncpu_fault.restype = ctypes.POINTER(ctypes.c_longlong)
        self.kernels = kernels
        # Where the library was loaded: fncpu_error's address less its file offset.
        shared, error_in_file = _symbols(library, source)
        self.library, self.source = library, source
        self.bias = bias = ctypes.cast(self.lib.fncpu_error, ctypes.c_void_p).value - error_in_file
        at = (ctypes.c_void_p * max(len(shared), 1))(*(bias + a for _, a, _ in shared))
        size = (ctypes.c_ulonglong * max(len(shared), 1))(*(n for _, _, n in shared))
        assert self.lib.fncpu_set_shared(at, size, len(shared)) == 0, shared
        self.shared = [name for name, _, _ in shared]

    def launch(self, name: str, grid, block, args) -> None:
        """Run kernel ``name`` with numpy arrays (pointers: their data) and
        numpy scalars, in the order of its C parameters: first on copies of the
        arrays with the blocks, warps and threads in descending order, then on
        other copies in ascending order, whose results are copied into the
        arrays. Results that differ between the two orders mean a shared-memory
        read no barrier orders (a race), or blocks that depend on one another.
        Each copy lies between two inaccessible guard regions, its end flush
        against the one after it in the first run, its start against the one
        before it in the second: an access outside an array faults in a guard,
        and the launch fails naming the element."""
        params = self.kernels[name]
        assert len(args) == len(params), (name, len(args), params)
        for value, (ctype, pname) in zip(args, params):
            if ctype.endswith("*"):
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous, (name, pname)
        keys = [_key(a) if isinstance(a, np.ndarray) else None for a in args]
        if _overlap_partly(args, keys):  # no faithful copy: unguarded, one order
            self._run(name, grid, block, args, descending=False)
            return
        with _GuardedCopies(args, keys, flush_end=True) as ending, \
                _GuardedCopies(args, keys, flush_end=False) as starting:
            self._run(name, grid, block, ending.args, descending=True, guards=ending.guards)
            self._run(name, grid, block, starting.args, descending=False,
                      guards=starting.guards)
            _copy_into(args, starting.args, params, name)
            differs = _first_difference(args, ending.args, params)
        if differs is not None:
            raise AssertionError(
                f"kernel {name} on the CPU: {differs} differs between thread orders "
                "(a shared-memory read that no barrier orders, or blocks that depend on "
                "one another's order?)")

    def _run(self, name, grid, block, args, descending: bool, guards=()) -> None:
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
        table = [(ctypes.c_ulonglong * max(len(guards), 1))(*column) for column in
                 list(zip(*guards))[:3]] if guards else [(ctypes.c_ulonglong * 1)()] * 3
        argument = (ctypes.c_int * max(len(guards), 1))(*(g[3] for g in guards))
        # -ftz=true flushes float32 arithmetic only: a kernel of float parameters
        flush = any(ctype in ("float", "float*") for ctype, _ in params)
        with _launch_lock:
            assert self.lib.fncpu_set_guards(*table, argument, len(guards)) == 0, len(guards)
            status = getattr(self.lib, f"fncpu_launch_{name}")(
                dims(grid), dims(block), int(flush), int(descending), pointers)
            error = self.lib.fncpu_error().decode() if status else ""
            at, offset, wrote = self.lib.fncpu_fault()[:3]
        if status != 0:
            if at == -2:  # a bounds trap: its line of the source
                error = error.replace("an index outside a fixed-size array",
                                      self._trapped_at(offset), 1)
            if at >= 0:  # an access in a guard: name the element
                array, pname = args[at], params[at][1]
                what = "write" if wrote else "read"
                error = error.replace(
                    f"out-of-bounds {what}",
                    f"out-of-bounds {what} of {pname}[{offset // array.itemsize}] "
                    f"(an array of {array.size} elements)", 1)
            raise AssertionError(f"kernel {name} on the CPU: {error}")


    def _trapped_at(self, pc: int) -> str:
        """The bounds check that trapped at ``pc``, named by its source line."""
        if shutil.which("addr2line") is None:
            return f"an index outside a fixed-size array (at {hex(pc - self.bias)}; no addr2line)"
        done = subprocess.run(["addr2line", "-e", str(self.library), hex(pc - self.bias)],
                              capture_output=True, text=True)
        where = re.search(r"kernel source:(\d+)", done.stdout)  # (after the build's folder)
        if where is None:
            return f"an index outside a fixed-size array (at {done.stdout.strip() or hex(pc)})"
        line = int(where.group(1))
        text = self.source.splitlines()[line - 1].strip()
        return f"an index outside a fixed-size array at line {line} of the kernel source ({text})"


def _copy_into(arrays, results, params, name) -> None:
    """The results into the caller's arrays (flat: one buffer may come as two
    shapes); a read-only one must have been left as it was."""
    for value, result, (_, pname) in zip(arrays, results, params):
        if not isinstance(value, np.ndarray):
            continue
        if value.flags.writeable:
            value.reshape(-1)[...] = result.reshape(-1)
        elif not _same_bits(value, result):
            raise AssertionError(f"kernel {name} on the CPU: wrote {pname}, a read-only array")


def _first_difference(arrays, others, params) -> str | None:
    """The name of the first array whose bits differ from its other result."""
    for value, other, (_, pname) in zip(arrays, others, params):
        if isinstance(value, np.ndarray) and not _same_bits(value, other):
            return pname
    return None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _key(array: np.ndarray):
    """The buffer an array is (an in-place kernel gets the same one twice)."""
    return array.__array_interface__["data"][0], array.nbytes, array.dtype


def _overlap_partly(args, keys) -> bool:
    """Whether two of the arrays overlap without being the same memory."""
    arrays = [(a, k) for a, k in zip(args, keys) if k is not None]
    return any(k != other and np.may_share_memory(a, b)  # exact for contiguous arrays
               for i, (a, k) in enumerate(arrays) for b, other in arrays[i + 1:])


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_GUARD_BYTES = 64 * 1024  # each side of an array: a reach further out is not seen


class _Region:
    """Anonymous memory: a guard, ``span`` bytes of data pages, a guard. The
    copies are views of ``pages`` (numpy makes every view's base that array),
    so while one lives ``pages`` has more references than the region's own and
    the region is not reused; the map is unmapped only once nothing views it."""

    def __init__(self, span: int):
        self.span = span
        self.map = mmap.mmap(-1, span + 2 * _GUARD_BYTES,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.pages = np.frombuffer(self.map, np.uint8)
        self.base = self.pages.ctypes.data
        for lo in (self.base, self.base + _GUARD_BYTES + span):
            if _libc.mprotect(lo, _GUARD_BYTES, 0) != 0:  # PROT_NONE
                raise OSError(ctypes.get_errno(), "mprotect of a guard region")

    def unused(self) -> bool:
        return sys.getrefcount(self.pages) <= 2  # the region's and the call's own


_pool_lock = threading.Lock()
_free_regions: dict[int, list[_Region]] = {}  # by span: mapping anew is ~50 us an array


class _GuardedCopies:
    """``args`` with each array replaced by a copy (one per distinct buffer)
    in memory of its own, between two inaccessible guard regions, its last
    byte just before the guard after it (``flush_end``) or its first byte just
    after the guard before it. ``guards``: (first, past the last inaccessible
    address, the array's first byte, argument position) per guard, for the
    launch (fncpu_set_guards). On leaving the ``with`` the memory is kept for
    the next launch, unless a copy is still referenced (a failed launch's
    traceback): that region is left to go with its last view."""

    def __init__(self, args, keys, flush_end: bool):
        self._regions, self.guards, made = [], [], {}
        for position, (a, key) in enumerate(zip(args, keys)):
            if key is None or key in made:
                continue
            span = -(-max(a.nbytes, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
            free = _free_regions.setdefault(span, [])
            with _pool_lock:  # (launches may come from several threads)
                region = free.pop() if free else None
            region = region or _Region(span)
            self._regions.append(region)
            start = _GUARD_BYTES + (span - a.nbytes if flush_end else 0)
            # (not a slice: an empty one would point at the region's start)
            copy = np.ndarray(a.size, a.dtype, buffer=region.pages, offset=start)
            copy[...] = a.reshape(-1)
            made[key] = copy  # flat: each argument gets its own shape of it
            data, base = region.base + start, region.base
            self.guards += [(base, base + _GUARD_BYTES, data, position),
                            (base + _GUARD_BYTES + span, base + span + 2 * _GUARD_BYTES,
                             data, position)]
        self.args = [a if key is None else made[key].reshape(a.shape) for a, key in zip(args, keys)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.args = None  # the copies go first
        with _pool_lock:
            for region in self._regions:
                free = _free_regions[region.span]
                if region.unused() and len(free) < 8:
                    free.append(region)
        self._regions = []


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
