"""CuPy's API, as far as the CPU stand-in (tests/fake_cupy.py) may offer it.

The stand-in falls through to NumPy for the array API, and NumPy has names and
keywords that CuPy lacks (``errstate``, ``where=`` on a ufunc, keyword-only
arguments passed by position, ...): a fastnn op using one would pass every CPU
test and fail on its first GPU run. So cupy_api.json keeps the public names of
CuPy (module, ``cupy.ndarray``, ufuncs and the ``cupy.cuda`` objects the
stand-in imitates) with how each callable may be called, and the stand-in
refuses a name or a call outside them.

cupy_api.json is written where CuPy imports (no GPU needed):
``python tests/cupy_api.py [out.json]``. ``test_fake_cupy.py`` checks, where CuPy
is installed, that the file still describes it.
"""
from __future__ import annotations

import functools
import inspect
import json
import pathlib
import re
import sys
from dataclasses import dataclass

API_FILE = pathlib.Path(__file__).with_name("cupy_api.json")

# The cupy.cuda objects the stand-in imitates (tests/fake_cupy.py), and for a
# class which of its attributes (method or value) are recorded.
CUDA_NAMES = (
    "Stream", "Event", "Graph", "MemoryPool", "Device", "UnownedMemory", "MemoryPointer",
    "get_current_stream", "get_elapsed_time", "using_allocator",
    "runtime.getDeviceCount", "runtime.getDevice", "runtime.getDeviceProperties",
    "runtime.memGetInfo", "runtime.runtimeGetVersion", "runtime.driverGetVersion",
    "memory.OutOfMemoryError", "compiler.CompileException", "driver.CUDADriverError",
)


# ---------------------------------------------------------------- call specs
@dataclass(frozen=True)
class CallSpec:
    """How a callable may be called: at most ``positional`` arguments by
    position (None: any number), and keywords from ``keywords`` (None: any)."""

    positional: int | None
    keywords: frozenset | None

    def refusal(self, n_positional: int, keywords) -> str | None:
        """Why a call with n_positional arguments and these keywords fails, or None."""
        if self.positional is not None and n_positional > self.positional:
            return f"takes at most {self.positional} positional arguments, got {n_positional}"
        if self.keywords is not None:
            unknown = sorted(set(keywords) - self.keywords)
            if unknown:
                return f"has no keyword {', '.join(unknown)} (it takes {sorted(self.keywords)})"
        return None

    def covers(self, other: CallSpec) -> bool:
        """Whether every call ``other`` accepts is one this accepts too."""
        if self.positional is not None and (other.positional is None
                                            or other.positional > self.positional):
            return False
        return self.keywords is None or (other.keywords is not None
                                         and other.keywords <= self.keywords)

    def to_json(self):
        return {"positional": self.positional,
                "keywords": None if self.keywords is None else sorted(self.keywords)}

    @classmethod
    def from_json(cls, d) -> CallSpec | None:
        if d is None:
            return None
        kws = d["keywords"]
        return cls(d["positional"], None if kws is None else frozenset(kws))


def _split_arguments(text: str) -> list[str]:
    """``a, b=(1, 2), *, c='x,y'`` -> its arguments, commas inside brackets and quotes kept."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current).strip())
    return parts


def _unbound(arguments: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The arguments but the instance (or class) a method is called on."""
    return arguments[1:] if arguments and arguments[0][1] in ("self", "cls") else arguments


def spec_of_arguments(arguments: list[tuple[str, str]]) -> CallSpec:
    """A CallSpec from (kind, name) pairs, kind one of inspect.Parameter's kind names."""
    positional, keywords = 0, set()
    for kind, name in arguments:
        if kind == "VAR_POSITIONAL":
            positional = None
        elif kind == "VAR_KEYWORD":
            keywords = None
        if kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD") and positional is not None:
            positional += 1
        if kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and keywords is not None:
            keywords.add(name)
    return CallSpec(positional, None if keywords is None else frozenset(keywords))


def spec_from_docstring(doc: str) -> CallSpec | None:
    """The spec of a Cython callable from the signature its docstring starts with
    (``name(self, str code=None, *, tuple options=()) -> T``), or None."""
    first = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
    match = re.match(r"^[\w.]+\((.*)\)(\s*->.*)?$", first.replace("\\*", "*"))
    if not match:
        return None
    arguments, kind = [], "POSITIONAL_OR_KEYWORD"
    parts = _split_arguments(match.group(1))
    if "/" in parts:  # everything before it is positional-only
        cut = parts.index("/")
        arguments += [("POSITIONAL_ONLY", p) for p in parts[:cut]]
        parts = parts[cut + 1:]
    for part in parts:
        if part == "*":
            kind = "KEYWORD_ONLY"
        elif part.startswith("**"):
            arguments.append(("VAR_KEYWORD", part[2:]))
        elif part.startswith("*"):
            arguments.append(("VAR_POSITIONAL", part[1:]))
            kind = "KEYWORD_ONLY"
        else:
            name = part.split("=")[0].split(":")[0].split()[-1]
            arguments.append((kind, name))
    return spec_of_arguments(_unbound(arguments))


def call_spec(obj) -> CallSpec | None:
    """How obj may be called (None when neither its signature nor its docstring says)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return spec_from_docstring(getattr(obj, "__doc__", None))
    return spec_of_arguments(_unbound([(p.kind.name, p.name) for p in params]))


# ---------------------------------------------------------------- the record
def _public(obj) -> list[str]:
    return sorted(n for n in dir(obj) if not n.startswith("_"))


def _entry(obj):
    spec = call_spec(obj) if callable(obj) else None
    return None if spec is None else spec.to_json()


def _class_entry(cls):
    init = call_spec(cls)
    attrs = {name: _entry(getattr(cls, name)) for name in _public(cls)}
    for dunder in ("__enter__", "__exit__"):
        if hasattr(cls, dunder):
            attrs[dunder] = None
    return {"init": None if init is None else init.to_json(), "attrs": attrs}


def _resolve(root, dotted: str):
    return functools.reduce(getattr, dotted.split("."), root)


def record(cupy) -> dict:
    """The API record of an imported CuPy (what cupy_api.json holds)."""
    module = {}
    for name in _public(cupy):
        obj = getattr(cupy, name)
        module[name] = None if isinstance(obj, type) else _entry(obj)
    ufunc = type(cupy.exp)
    cuda = {}
    for dotted in CUDA_NAMES:
        obj = _resolve(cupy.cuda, dotted)
        cuda[dotted] = _class_entry(obj) if isinstance(obj, type) else _entry(obj)
    return {
        "cupy": cupy.__version__,
        "module": module,
        "ndarray": {name: _entry(getattr(cupy.ndarray, name)) for name in _public(cupy.ndarray)},
        "ufunc_methods": _public(ufunc),
        "cuda": cuda,
    }


# ---------------------------------------------------------------- reading it
@dataclass(frozen=True)
class CupyApi:
    version: str
    module: dict  # name -> CallSpec or None
    ndarray: dict
    ufunc_methods: frozenset
    cuda: dict  # dotted name -> CallSpec, None, or {"init": CallSpec, "attrs": {...}}


def _specs(d: dict) -> dict:
    return {name: CallSpec.from_json(v) for name, v in d.items()}


@functools.lru_cache(maxsize=None)
def load(path: pathlib.Path = API_FILE) -> CupyApi:
    raw = json.loads(path.read_text())
    cuda = {}
    for name, v in raw["cuda"].items():
        is_class = isinstance(v, dict) and "attrs" in v
        cuda[name] = ({"init": CallSpec.from_json(v["init"]), "attrs": _specs(v["attrs"])}
                      if is_class else CallSpec.from_json(v))
    return CupyApi(raw["cupy"], _specs(raw["module"]), _specs(raw["ndarray"]),
                   frozenset(raw["ufunc_methods"]), cuda)


def main(argv=None) -> int:
    import cupy

    out = pathlib.Path((argv or sys.argv[1:] or [str(API_FILE)])[0])
    out.write_text(json.dumps(record(cupy), indent=0, sort_keys=True) + "\n")
    print(f"wrote {out}: CuPy {cupy.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
