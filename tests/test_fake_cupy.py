"""The CPU stand-in for CuPy (tests/fake_cupy.py) offers no more than CuPy does.

It falls through to NumPy for the array API, so without these limits a fastnn op
using a NumPy-only name or keyword would pass every CPU test and fail on its
first GPU run. The limits come from tests/cupy_api.json (CuPy 14.2, written by
tests/cupy_api.py); where a real CuPy is installed, the last test checks the
file against it.
"""
import importlib.util
import inspect
import types

import numpy as np
import pytest

import cupy_api
import fake_cupy
from cupy_api import CallSpec

API = cupy_api.load()


def run_as_fastnn(source: str, **names):
    """Run source as code of the fastnn package: the stand-in's arrays check
    only fastnn's own attribute accesses."""
    scope = {"__name__": "fastnn._stand_in_probe", **names}
    exec(compile(source, "<fastnn probe>", "exec"), scope)
    return scope


@pytest.fixture
def cupy():
    return fake_cupy._fake_cupy([])


def test_call_specs_from_cython_docstrings():
    spec = cupy_api.spec_from_docstring(
        "RawModule(str code=None, *, str path=None, tuple options=(), str backend='nvrtc', "
        "name_expressions=None) -> RawModule\n\nA module.")
    assert spec == CallSpec(1, frozenset({"code", "path", "options", "backend", "name_expressions"}))
    assert spec.refusal(2, {}) and "positional" in spec.refusal(2, {})
    ufunc = cupy_api.spec_from_docstring("exp(x, /, out=None, \\*, casting='same_kind', dtype=None)")
    assert ufunc == CallSpec(2, frozenset({"out", "casting", "dtype"}))
    assert "where" in ufunc.refusal(1, {"where"})
    method = cupy_api.spec_from_docstring("_ndarray_base.take(self, indices, axis=None, out=None)")
    assert method == CallSpec(3, frozenset({"indices", "axis", "out"}))
    assert cupy_api.spec_from_docstring("Graph(*args, **kwargs)") == CallSpec(None, None)
    assert cupy_api.spec_from_docstring("Casts the array.") is None
    assert cupy_api._split_arguments("a, b=(1, 2), c='x,y'") == ["a", "b=(1, 2)", "c='x,y'"]


def test_the_record_holds_what_fastnn_uses():
    """A sanity check of cupy_api.json against CuPy's documented API."""
    assert API.version.startswith("14.")
    assert "errstate" not in API.module and "exp" in API.module and "from_dlpack" in API.module
    assert API.module["exp"].keywords == {"out", "casting", "dtype"}
    assert "mode" not in API.ndarray["take"].keywords and "ctypes" not in API.ndarray
    assert {"reduce", "at"} <= API.ufunc_methods and "identity" not in API.ufunc_methods
    assert API.cuda["Event"]["init"].keywords == {"block", "disable_timing", "interprocess"}


def _public_functions(cls):
    return {name: value for name, value in vars(cls).items()
            if not name.startswith("_") and inspect.isfunction(value)}


def _the_stand_ins_cuda(namespace, prefix=""):
    """(dotted name, object) of every cupy.cuda object the stand-in defines."""
    for name, value in vars(namespace).items():
        dotted = prefix + name
        if isinstance(value, types.SimpleNamespace):
            yield from _the_stand_ins_cuda(value, dotted + ".")
        else:
            yield dotted, value


def test_what_the_stand_in_defines_itself_cupy_has_and_calls_alike(cupy):
    """Every name the stand-in defines (rather than takes from NumPy) is CuPy's,
    and takes no argument, by position or keyword, that CuPy's would refuse."""
    own = {name: value for name, value in vars(cupy).items()
           if not name.startswith("_") and name != "kernels"}  # (kernels: how launches run here)
    assert {"asarray", "empty", "RawModule", "from_dlpack", "matmul"} <= set(own)
    wrong = []
    for name, value in own.items():
        if name not in API.module:
            wrong.append(f"cupy.{name}: not in CuPy")
        elif name == "cuda":
            continue
        elif getattr(value, "checks_calls_as_cupy", False):
            continue  # it refuses each call CuPy's would (tested below)
        elif callable(value) and not isinstance(value, type) and API.module[name] is not None:
            if not API.module[name].covers(cupy_api.call_spec(value)):
                wrong.append(f"cupy.{name}{inspect.signature(value)}: not as CuPy's")
    for dotted, value in _the_stand_ins_cuda(cupy.cuda):
        real = API.cuda.get(dotted)
        if dotted not in API.cuda:
            wrong.append(f"cupy.cuda.{dotted}: not recorded (add it to cupy_api.CUDA_NAMES)")
        elif isinstance(value, type) and isinstance(real, dict):
            if (real["init"] is not None and not issubclass(value, BaseException)
                    and not real["init"].covers(cupy_api.call_spec(value))):
                wrong.append(f"cupy.cuda.{dotted}{inspect.signature(value)}: not as CuPy's")
            for method, function in _public_functions(value).items():
                if method not in real["attrs"]:
                    wrong.append(f"cupy.cuda.{dotted}.{method}: not in CuPy")
                elif real["attrs"][method] is not None and not real["attrs"][method].covers(
                        cupy_api.call_spec(function)):
                    wrong.append(f"cupy.cuda.{dotted}.{method}: not as CuPy's")
        elif callable(value) and not isinstance(value, type) and real is not None:
            if not real.covers(cupy_api.call_spec(value)):
                wrong.append(f"cupy.cuda.{dotted}{inspect.signature(value)}: not as CuPy's")
    for method, function in _public_functions(fake_cupy.DeviceArray).items():
        if method not in API.ndarray:
            wrong.append(f"cupy.ndarray.{method}: not in CuPy")
        elif not API.ndarray[method].covers(cupy_api.call_spec(function)):
            wrong.append(f"cupy.ndarray.{method}: not as CuPy's")
    assert not wrong, "\n".join(wrong)


def test_numpy_names_and_keywords_cupy_lacks_are_refused(cupy):
    x = cupy.asarray(np.array([0.5, 2.0], np.float32))
    with pytest.raises(AttributeError, match="'errstate' in CuPy 14"):
        cupy.errstate
    assert getattr(cupy, "errstate", None) is None  # so fastnn's guarded use takes CuPy's path
    with pytest.raises(TypeError, match="cupy.exp has no keyword where"):
        cupy.exp(x, where=x > 1)
    with pytest.raises(TypeError, match="cupy.log has no keyword order"):
        cupy.log(x, order="C")
    with pytest.raises(AttributeError, match="has no attribute 'identity'"):
        cupy.add.identity
    with pytest.raises(TypeError, match="cupy.sum has no keyword where"):
        cupy.sum(x, where=x > 1)
    with pytest.raises(TypeError, match="cupy.arange has no keyword like"):
        cupy.arange(3, like=x)
    with pytest.raises(TypeError, match="positional"):
        cupy.RawModule("extern \"C\" __global__ void k() {}", ("--fmad=false",))
    # What CuPy has passes, and its results are still device arrays.
    out = cupy.empty_like(x)
    assert cupy.exp(x, out=out) is out and isinstance(out, cupy.ndarray)
    assert isinstance(cupy.add.reduce(x), cupy.ndarray)
    assert isinstance(cupy.take(x, cupy.asarray(np.array([1])), axis=0), cupy.ndarray)


def test_fastnn_code_sees_only_cupys_array_attributes(cupy):
    x = cupy.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    ok = run_as_fastnn("total = x.sum(axis=0, keepdims=True); pointer = x.data.ptr\n"
                       "flat = x.reshape(-1); n = x.size", x=x)
    assert isinstance(ok["total"], cupy.ndarray) and ok["pointer"] == x.ctypes.data
    for source, error, match in (
            ("x.ctypes", AttributeError, "no attribute 'ctypes' in CuPy"),
            ("x.resize((3, 2))", AttributeError, "no attribute 'resize'"),
            ("x.take([0], axis=1, mode='clip')", TypeError, "cupy.ndarray.take has no keyword mode"),
            ("x.astype('float64', 'C', 'unsafe', True, False, 1)", TypeError, "positional")):
        with pytest.raises(error, match=match):
            run_as_fastnn(source, x=x)
    # NumPy's own functions, and the tests, may use NumPy's methods on these arrays.
    assert x.ctypes.data and np.take(x, [0], axis=1, mode="clip").shape == (2, 1)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy installed (no GPU)")
def test_the_record_still_describes_the_installed_cupy():
    """On a machine with CuPy (the GPU machine): every name and call the record
    lets the stand-in offer, the installed CuPy offers too."""
    import sys

    if isinstance(sys.modules.get("cupy"), types.ModuleType) and not hasattr(
            sys.modules["cupy"], "__file__"):
        pytest.skip("the stand-in is in sys.modules")
    import cupy

    live = cupy_api.record(cupy)
    narrower = []
    for section in ("module", "ndarray"):
        for name, spec in getattr(API, section).items():
            if name not in live[section]:
                narrower.append(f"{section}.{name}: gone")
            elif spec is not None:
                now = CallSpec.from_json(live[section][name])
                if now is not None and not now.covers(spec):
                    narrower.append(f"{section}.{name}: {spec} -> {now}")
    narrower += [f"ufunc.{m}: gone" for m in API.ufunc_methods - set(live["ufunc_methods"])]
    assert not narrower, (f"CuPy {cupy.__version__} offers less than tests/cupy_api.json "
                          f"(CuPy {API.version}); rewrite it: python tests/cupy_api.py\n"
                          + "\n".join(narrower))
