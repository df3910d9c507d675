"""A ``cupy`` stand-in built on NumPy, for checking the CuPy backend on the CPU.

``_fake_cupy()`` is enough of CuPy for CupyBackend: arrays are NumPy arrays,
``RawModule`` parses the kernel signatures from the source it is given, and
each launch is checked against the C types of its parameters, then emulated
by name in NumPy (``_emulate``), so a swapped argument or a wrong host
constant changes the numbers. An emulated kernel refuses what NumPy would
quietly forgive and the device would not: an element count past an array's
end (NumPy truncates the slice), a label outside the logits (NumPy wraps a
negative one), a batch row outside the data. ``FakeCublas`` does the same for fastnn's cuBLAS
calls: a column-major GEMM on the raw memory the pointers name.

Streams can record: while a fake stream captures, kernel launches and GEMMs
are kept (with the very arrays they were given) instead of run, and the
graph's ``launch`` runs them again. That is what a CUDA graph does with the
device pointers it recorded, so the bookkeeping of fastnn/cuda_graph.py
(static buffers, step counter, per-step scalars) is checked on the CPU.
Events read a clock that counts the launches run (``_clock``), so a timing
taken between two events says how many kernels and GEMMs ran in between.
Anything else done while recording (a NumPy op standing in for a CuPy one)
runs once, at once: a step that leans on one does not replay correctly here.

The stand-in offers no more than CuPy (14.2, tests/cupy_api.json): a NumPy name
CuPy lacks (``cupy.errstate``), a keyword its function or ufunc lacks
(``where=``), an argument passed by position that CuPy takes by keyword only,
or, from fastnn's own code, an ``ndarray`` attribute CuPy's arrays lack
(``.ctypes``) is refused here as it would be on a GPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
import types

import sys

import numpy as np
import pytest

import cupy_api  # (tests/cupy_api.py) CuPy's names and calls, all the stand-in offers
import fastnn as fn
from fastnn.backends import cublas
from fastnn.backends.activations import ACTIVATIONS
from fastnn.precision import bf16_bits as _bf16_bits

CUPY_API = cupy_api.load()

_SIGNATURE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s+)?(\w+)\s*\(([^)]*)\)')
_C_TYPES = {  # C parameter type -> (is_pointer, numpy dtype)
    "float*": (True, np.float32), "double*": (True, np.float64),
    "int*": (True, np.int32), "long long*": (True, np.int64),
    "unsigned short*": (True, np.uint16), "unsigned int*": (True, np.uint32),
    "float": (False, np.float32), "double": (False, np.float64),
    "int": (False, np.int32), "long long": (False, np.int64),
}


def kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """``{kernel name: [(C type, parameter name), ...]}`` of every extern "C" kernel."""
    found = {}
    for name, params in _SIGNATURE.findall(source):
        parsed = []
        for param in params.split(","):
            words = param.replace("*", " * ").replace("const", " ").split()
            ctype = " ".join(words[:-1]).replace(" *", "*")
            parsed.append((ctype, words[-1]))
        found[name] = parsed
    return found



def bias_grad_in_kernel_order(dz):
    """act_backward_bias's column sums in the kernel's own order (kernels/README.md):
    thread row k adds rows k, k + 32, ... one by one, then the 32 partials in
    turn (row by row here: NumPy's own sum is pairwise along a lone axis, as a
    one-column dz would give it)."""
    parts = np.zeros((32, dz.shape[1]), dz.dtype)
    for r in range(dz.shape[0]):
        parts[r % 32] += dz[r]
    total = parts[0].copy()
    for k in range(1, 32):
        total += parts[k]
    return total


def _head(flat: dict, name: str, n) -> np.ndarray:
    """``flat[name][:n]``, refusing a range past the array's end: NumPy would
    silently give fewer elements where the kernel reads or writes out of bounds."""
    array, n = flat[name], int(n)
    if not 0 <= n <= array.size:
        raise AssertionError(f"kernel touches {name}[0:{n}) but {name} has {array.size} elements")
    return array[:n]


def _act_by_code(code):
    return next(a for a in ACTIVATIONS.values() if a.code == code)


class BeyondEmulation(AssertionError):
    """A launch the by-name emulation refuses because it would not give the
    kernel's answer (the kernel itself copes: its own code on the CPU runs it)."""


def _emulate(kernel: str, a: dict) -> None:
    """Run kernel ``kernel`` in NumPy, reading arguments by their C names."""
    a = {name: _plain(value) for name, value in a.items()}
    stem = re.sub(r"_f(32|64)(_i(32|64))?$", "", kernel)
    flat = {k: v.reshape(-1) for k, v in a.items() if isinstance(v, np.ndarray)}
    if stem in ("bias_act", "bias_act_bf16"):
        z = a["z"].reshape(int(a["n_rows"]), int(a["n_cols"]))
        if a["has_bias"]:
            z += a["bias"]
        spec = _act_by_code(int(a["act"]))
        a["out"].reshape(z.shape)[...] = spec.forward(np, z, a["alpha"])
        if stem == "bias_act_bf16":
            _head(flat, "bits", z.size)[...] = _bf16_bits(_head(flat, "out", z.size))
    elif stem in ("act_backward", "act_backward_bf16"):
        n, spec = int(a["n"]), _act_by_code(int(a["act"]))
        pre = _head(flat, "pre", n) if a["use_pre"] else None
        y = None if spec.name == "gelu" else _head(flat, "y", n)
        _head(flat, "out", n)[...] = spec.backward(np, _head(flat, "dy", n), y, pre, a["alpha"])
        if stem == "act_backward_bf16":
            _head(flat, "bits", n)[...] = _bf16_bits(_head(flat, "out", n))
    elif stem == "act_backward_bias":
        shape = (int(a["n_rows"]), int(a["n_cols"]))
        size, spec = shape[0] * shape[1], _act_by_code(int(a["act"]))
        pre = _head(flat, "pre", size).reshape(shape) if a["use_pre"] else None
        y = None if spec.name == "gelu" else _head(flat, "y", size).reshape(shape)
        g = spec.backward(np, _head(flat, "dy", size).reshape(shape), y, pre, a["alpha"])
        _head(flat, "out", size)[...] = g.reshape(-1)
        _head(flat, "db", shape[1])[...] = bias_grad_in_kernel_order(g)
    elif stem in ("softmax_xent", "softmax_xent_small"):
        x = a["logits"].reshape(int(a["n_rows"]), int(a["n_cols"]))
        rows = np.arange(x.shape[0])
        labels = np.asarray(a["labels"])
        if labels.shape != rows.shape:  # the kernel would read past the labels
            raise AssertionError(f"softmax_xent: labels {labels.shape}: not one per row of "
                                 f"{x.shape}")
        if labels.size and not (0 <= labels.min() and labels.max() < x.shape[1]):
            # NumPy would wrap a negative label; the kernel gives that row a NaN
            # loss, which this emulation does not mimic
            raise BeyondEmulation(f"softmax_xent: labels outside [0, {x.shape[1]})")
        m = x.max(axis=1, keepdims=True)
        e = np.exp(x - m)
        s = e.sum(axis=1, keepdims=True)
        row_loss = np.log(s[:, 0]) - (x[rows, a["labels"]] - m[:, 0])
        g = e / s
        g[rows, a["labels"]] -= 1
        a["grad"].reshape(x.shape)[...] = g * a["inv_n"]
        if stem == "softmax_xent":
            a["row_loss"][...] = row_loss
        else:  # one block: the mean loss too
            flat["loss"][0] = row_loss.sum(dtype=row_loss.dtype) * a["inv_n"]
    elif stem == "sgd":
        p, g, buf = flat["param"], flat["grad"].copy(), flat["buf"]
        if a["use_wd"]:
            g = g + a["weight_decay"] * p
        if a["use_momentum"]:
            buf[...] = g if a["first_step"] else buf * a["momentum"] + a["dampening_c"] * g
            g = g + a["momentum"] * buf if a["nesterov"] else buf
        p -= a["lr"] * g
    elif stem in ("adam", "adam_captured"):
        p, g, m, v = flat["param"], flat["grad"], flat["exp_avg"], flat["exp_avg_sq"]
        # adam_captured reads the two step-dependent scalars from memory
        step_size, bc2_sqrt = _head(flat, "step_scalars", 2) if stem == "adam_captured" \
            else (a["step_size"], a["bc2_sqrt"])
        if a["decoupled"]:
            p *= a["decay_factor"]
        elif a["use_wd"]:
            g = g + a["weight_decay"] * p
        m += a["one_minus_b1"] * (g - m)
        v[...] = v * a["beta2"] + a["one_minus_b2"] * g * g
        p -= step_size * (m / (np.sqrt(v) / bc2_sqrt + a["eps"]))
    elif stem == "rmsprop":
        p, g, sq = flat["param"], flat["grad"], flat["square_avg"]
        if a["use_wd"]:
            g = g + a["weight_decay"] * p
        sq[...] = sq * a["alpha"] + a["one_minus_alpha"] * g * g
        if a["centered"]:
            ga = flat["grad_avg"]
            ga += a["one_minus_alpha"] * (g - ga)
            avg = np.sqrt(sq - ga * ga) + a["eps"]
        else:
            avg = np.sqrt(sq) + a["eps"]
        if a["use_momentum"]:
            flat["buf"][...] = flat["buf"] * a["momentum"] + g / avg
            p -= a["lr"] * flat["buf"]
        else:
            p -= a["lr"] * (g / avg)
    elif stem == "sum_scaled":
        n = int(a["n"])
        flat["out"][0] = _head(flat, "x", n).sum(dtype=flat["x"].dtype) * a["scale"]
    elif stem == "bce":
        n = int(a["n"])
        p, t = _head(flat, "pred", n), _head(flat, "target", n)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log1p(-p), -100)
            _head(flat, "grad", n)[...] = (p - t) / np.maximum((1 - p) * p, a["eps"]) * a["inv_n"]
        lo, hi = p.min(), p.max()  # NaN-propagating, as the kernel's reductions
        in_range = lo >= 0 and hi <= 1
        flat["loss"][0] = -(terms.sum(dtype=p.dtype) * a["inv_n"]) if in_range else np.nan
        if a["has_seen"]:
            seen = flat["seen"]
            seen[0], seen[1] = np.fmin(seen[0], lo), np.fmax(seen[1], hi)
            seen[2] += np.isnan(lo)
    elif stem == "bce_logits":
        n = int(a["n"])
        x, t = _head(flat, "logits", n), _head(flat, "target", n)
        terms = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        _head(flat, "grad", n)[...] = (ACTIVATIONS["sigmoid"].forward(np, x, 0) - t) * a["inv_n"]
        flat["loss"][0] = terms.sum(dtype=x.dtype) * a["inv_n"]
    elif stem == "mse_partial":
        n = int(a["n"])
        d = _head(flat, "pred", n) - _head(flat, "target", n)
        _head(flat, "grad", n)[...] = d * a["grad_scale"]
        flat["partial"][...] = 0
        # the block split is the GPU's business
        flat["partial"][0] = (d * d).sum(dtype=d.dtype) * a["partial_scale"]
    elif stem == "step_begin":
        step, batch = int(flat["counter"][0]), int(a["batch"])
        rows = flat["order"][step * batch:(step + 1) * batch]
        n_all = flat["x_all"].size // int(a["x_row_words"])
        if rows.size != batch or rows.size and not (0 <= rows.min() and rows.max() < n_all):
            raise AssertionError(f"step_begin: batch {step} reads order rows outside [0, {n_all})")
        for name, width in (("x", int(a["x_row_words"])), ("y", int(a["y_row_words"]))):
            src = flat[f"{name}_all"].reshape(-1, width)
            flat[f"{name}_batch"][:batch * width] = src[rows].reshape(-1)
        k = int(a["scalar_words"])
        _head(flat, "scalars", k)[...] = flat["table"][step * k:(step + 1) * k]
    elif stem == "step_end":
        step = int(flat["counter"][0])
        flat["losses"][step] = flat["loss"][0]
        flat["counter"][0] = step + 1
    elif stem == "f32_to_bf16":
        n = int(a["n"])
        _head(flat, "out", n)[...] = _bf16_bits(_head(flat, "x", n))
    elif stem == "spin_ns":
        pass  # holds the stream for a while: the fake's clock counts launches only
    else:
        raise AssertionError(f"no emulation for kernel {kernel}")


# ---------------------------------------------------------------- device arrays
class DeviceArray(np.ndarray):
    """What the fake cupy's functions return: a NumPy array that refuses to be
    read by the host (``int()``, ``float()``, ``bool()``, ``.item()``,
    ``.tolist()``, ``.get()``) while a stream records. On a GPU such a read
    synchronizes the device and breaks the capture; here it fails the test.
    Reductions give 0-d arrays, not NumPy scalars, as CuPy's do. Its module
    says "cupy", so fastnn's host_array reads it with ``.get()``, as a real one."""

    __module__ = "cupy"

    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        # Only fastnn's own accesses: NumPy's functions, called on these arrays,
        # use NumPy's methods (np.take passes mode=), as do the tests.
        if name[0] != "_" and sys._getframe(1).f_globals.get("__name__", "").startswith("fastnn"):
            return _as_cupy_attribute(name, value)
        return value

    @property
    def data(self):
        """cupy.ndarray.data: a MemoryPointer, whose ``ptr`` is the first element's address."""
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return super().__array_wrap__(array, context, False)

    def __setitem__(self, key, value):
        # A device-to-device copy in CuPy (NumPy would read a 0-d value as a float).
        super().__setitem__(key, _plain(value))

    def _host_read(self, what: str):
        if _recording():
            raise AssertionError(f"{what} of a device array while a CUDA graph records")
        host_reads[0] += 1
        return self.view(np.ndarray)

    def __int__(self):
        return int(self._host_read("int()"))

    def __float__(self):
        return float(self._host_read("float()"))

    def __bool__(self):
        return bool(self._host_read("bool()"))

    def __index__(self):
        return self._host_read("an index").__index__()

    def item(self):
        return self._host_read(".item()").item()

    def tolist(self):
        return self._host_read(".tolist()").tolist()

    def get(self):
        """cupy.ndarray.get: the host copy."""
        return np.array(self._host_read(".get()"))

    def set(self, arr, stream=None):
        """cupy.ndarray.set: a host -> device copy in place, with CuPy's checks
        (and none while a stream records: a capture refuses a host copy)."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, DeviceArray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self.flags.c_contiguous or self.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        assert not _recording(), "ndarray.set (a host -> device copy) while a CUDA graph records"
        self.view(np.ndarray)[...] = arr


host_reads = [0]  # device -> host reads so far (each a device sync on a GPU)
launch_shapes: list = []  # (kernel, grid, block) of every launch so far


def on_device(x, dtype=None):
    """A host value as a fresh, C-contiguous fake device array: a copy, as
    ``cupy.asarray`` of a NumPy array is (what a test hands the backend where a
    user would hand it a CuPy array)."""
    return np.array(x, dtype=dtype, order="C").view(DeviceArray)


class _SeenAsHost:
    """A device array of another library (a DLPack producer on "CUDA", or one
    with ``__cuda_array_interface__``) as NumPy may read it here, where device
    memory is host memory."""

    def __init__(self, x):
        self._x = x
        cai = getattr(x, "__cuda_array_interface__", None)
        if cai is not None:
            self.__array_interface__ = {k: cai[k] for k in ("shape", "typestr", "data", "strides")
                                        if k in cai} | {"version": 3}

    def __dlpack__(self, **kwargs):
        return self._x.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _plain(x):
    """A DeviceArray as the NumPy array it is (kernels "run on the device")."""
    return x.view(np.ndarray) if isinstance(x, DeviceArray) else x


def _refuse_call(what: str, spec, args, kwargs) -> None:
    why = None if spec is None else spec.refusal(len(args), kwargs)
    if why is not None:
        raise TypeError(f"{what} {why} in CuPy {CUPY_API.version}: the stand-in "
                        "takes what a GPU's CuPy takes, no more")


class _CupyUfunc:
    """A NumPy ufunc as CuPy's: CuPy's keywords (out, dtype, casting; no where=,
    order=, subok=) and CuPy's methods (reduce, at, ...; no identity) only, and
    no floating-point warnings."""

    def __init__(self, name, ufunc):
        self._name, self._ufunc, self._spec = name, ufunc, CUPY_API.module[name]

    def __call__(self, *args, **kwargs):
        _refuse_call(f"cupy.{self._name}", self._spec, args, kwargs)
        with np.errstate(all="ignore"):  # CuPy's kernels never warn (log(0) is just -inf)
            return self._ufunc(*args, **kwargs)

    def __getattr__(self, attr):
        if attr not in CUPY_API.ufunc_methods:
            raise AttributeError(f"cupy.{self._name} (a ufunc) has no attribute {attr!r} "
                                 f"in CuPy {CUPY_API.version}")
        return getattr(self._ufunc, attr)


def _checked(what: str, spec, function):
    if spec is None:
        return function

    def cupy_function(*args, **kwargs):
        _refuse_call(what, spec, args, kwargs)
        return function(*args, **kwargs)

    cupy_function.checks_calls_as_cupy = True
    return cupy_function


def _as_cupy(name: str, obj):
    """NumPy's ``obj`` as ``cupy.<name>``: refused if CuPy has no such name,
    called only as CuPy's may be, and returning DeviceArrays."""
    if name not in CUPY_API.module:
        raise AttributeError(f"module 'cupy' has no attribute {name!r} in CuPy "
                             f"{CUPY_API.version} (NumPy's would pass here and fail on a GPU)")
    if isinstance(obj, np.ufunc):
        return _CupyUfunc(name, obj)
    function = _on_device(obj)
    return obj if function is obj else _checked(f"cupy.{name}", CUPY_API.module[name], function)


def _as_cupy_attribute(name: str, value):
    """A DeviceArray's attribute as fastnn may use it on a cupy.ndarray."""
    if name not in CUPY_API.ndarray:
        raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} in CuPy "
                             f"{CUPY_API.version} (NumPy's arrays have it)")
    return _checked(f"cupy.ndarray.{name}", CUPY_API.ndarray[name], value) if callable(value) else value


def _on_device(obj):
    """A NumPy function as a fake cupy one: the arrays it returns are
    DeviceArrays (dtypes, classes and ufuncs pass through unchanged)."""
    if not callable(obj) or isinstance(obj, (type, np.ufunc)):
        return obj

    def device_function(*args, **kwargs):
        result = obj(*args, **kwargs)
        return result.view(DeviceArray) if type(result) is np.ndarray else result

    return device_function


# ---------------------------------------------------------------- streams and graphs
class FakeGraph:
    """What a capture recorded; ``launch`` runs it again on the same arrays."""

    def __init__(self, calls):
        self.calls = calls
        self.launches = 0

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        assert not _recording(), "a graph launched inside a capture"
        self.launches += 1
        for call in self.calls:
            _clock[0] += 1
            call()


class FakeStream:
    _next_ptr = 1

    def __init__(self, null=False, non_blocking=False):
        self.ptr = 0 if null else FakeStream._next_ptr
        FakeStream._next_ptr += 0 if null else 1
        self.recorded = None  # a list while capturing
        self.waited: list = []  # events wait_event was given

    def __enter__(self):
        _streams.append(self)
        return self

    def __exit__(self, *exc):
        _streams.remove(self)
        return False

    def begin_capture(self, mode=None):
        assert self.ptr != 0, "CUDA cannot capture the legacy default stream"
        assert self.recorded is None, "capture begun twice"
        self.recorded = []

    def end_capture(self):
        assert self.recorded is not None, "end_capture without begin_capture"
        calls, self.recorded = self.recorded, None
        return FakeGraph(calls)

    def is_capturing(self):
        return self.recorded is not None

    def wait_event(self, event):
        assert event.time is not None, "a stream waits on an event never recorded"
        self.waited.append(event)


class FakeMemoryPool:
    def malloc(self, size):
        raise AssertionError("the fake allocates with NumPy")

    def free_all_blocks(self):
        pass


_streams = [FakeStream(null=True)]


def _recording():
    return _streams[-1].recorded is not None


def _run_or_record(call) -> None:
    """Run a kernel or GEMM now, or keep it in the capturing stream's graph."""
    if _recording():
        _streams[-1].recorded.append(call)
    else:
        _clock[0] += 1
        call()


# The fake device's clock: launches run so far (kernels and GEMMs, replayed
# ones included), one "millisecond" each, so event timings count launches.
_clock = [0]


class FakeEvent:
    """A CUDA event: its time is read only once it is known to have completed
    (its own synchronize, or the device's); a real one gives cudaErrorNotReady."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time = None
        self.done = False

    def record(self, stream=None):
        assert not _recording(), "an event recorded while a CUDA graph records"
        self.stream = stream if stream is not None else _streams[-1]
        self.time = _clock[0]
        self.done = False
        _recorded_events.append(self)

    def synchronize(self):
        assert self.time is not None, "synchronize on an event never recorded"
        for event in _recorded_events:  # one stream: everything recorded before is done
            if event.time is not None and event.time <= self.time:
                event.done = True


_recorded_events: list = []


def _device_synchronized() -> None:
    for event in _recorded_events:
        event.done = True
    _recorded_events.clear()


def get_elapsed_time(start_event, end_event) -> float:
    start, end = start_event, end_event
    assert start.time is not None and end.time is not None, "elapsed time of an unrecorded event"
    assert end.done, "elapsed time before the end event completed (cudaErrorNotReady on a GPU)"
    return float(end.time - start.time)


def time_by_host_clock(monkeypatch, fake) -> None:
    """CUDA events of the ``fake`` cupy read the host clock instead of the launch
    count (a timing of a plain device copy, which launches nothing, is then not
    zero), and the version queries answer: enough for the GPU benchmarks' mains."""
    import time

    class HostClockEvent(FakeEvent):
        def record(self, stream=None):
            super().record(stream)
            self.t = time.perf_counter()

    monkeypatch.setattr(fake.cuda, "Event", HostClockEvent, raising=False)
    monkeypatch.setattr(fake.cuda, "get_elapsed_time",
                        lambda start_event, end_event: (end_event.t - start_event.t) * 1e3,
                        raising=False)
    monkeypatch.setattr(fake.cuda.runtime, "runtimeGetVersion", lambda: 12040, raising=False)
    monkeypatch.setattr(fake.cuda.runtime, "driverGetVersion", lambda: 12080, raising=False)
    monkeypatch.setattr(fake, "__version__", "0.0-fake", raising=False)


class FakeCublas:
    """libcublas's calls fastnn makes, on host memory: a column-major GEMM
    reading the operands at the addresses it is given (cuBLAS's own contract)."""

    _TYPES = {0: np.float32, 1: np.float64, 14: np.uint16}

    def __init__(self):
        self.calls: list = []
        self.stream = None

    def cublasCreate_v2(self, handle_address):
        ctypes.c_void_p.from_address(handle_address).value = 1234
        return 0

    def cublasDestroy_v2(self, handle):
        return 0

    def cublasSetMathMode(self, handle, mode):
        assert mode == 0
        return 0

    def cublasSetStream_v2(self, handle, stream):
        assert not _recording(), "cuBLAS re-bound to a stream inside a capture"
        self.stream = stream
        self.calls.append(("stream", stream))
        return 0

    def cublasSetWorkspace_v2(self, handle, workspace, size):
        assert self.calls and self.calls[-1][0] == "stream", "workspace must follow setStream"
        assert size >= 4 << 20
        self.calls.append(("workspace", size))
        return 0

    def cublasGemmEx(self, handle, op_a, op_b, m, n, k, alpha, a, a_type, lda, b, b_type, ldb,
                     beta, c, c_type, ldc, compute, algo):
        assert self.stream == _streams[-1].ptr, "cuBLAS bound to another stream than the current"
        assert a_type == b_type and compute in (68, 70, 77)
        # cuBLAS's own checks (CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED otherwise)
        assert min(m, n, k) >= 1, ("empty GEMM", m, n, k)
        assert lda >= max(1, m if op_a == 0 else k), ("lda", lda, m, k, op_a)
        assert ldb >= max(1, k if op_b == 0 else n), ("ldb", ldb, k, n, op_b)
        assert ldc >= max(1, m), ("ldc", ldc, m)
        assert (a_type, c_type, compute) in {(0, 0, 68), (0, 0, 77), (1, 1, 70), (14, 0, 68)}, \
            ("GemmEx type combination", a_type, c_type, compute)
        scalar = ctypes.c_double if compute == 70 else ctypes.c_float
        alpha_v, beta_v = scalar.from_address(alpha).value, scalar.from_address(beta).value
        out_dtype = self._TYPES[c_type]

        def run():
            first = self._matrix(a, a_type, op_a, m, k, lda)
            second = self._matrix(b, b_type, op_b, k, n, ldb)
            result = np.lib.stride_tricks.as_strided(
                self._memory(c, out_dtype, ldc * n), (m, n),
                (np.dtype(out_dtype).itemsize, ldc * np.dtype(out_dtype).itemsize))
            product = np.matmul(first.astype(out_dtype), second.astype(out_dtype))
            result[...] = alpha_v * product + (beta_v * result if beta_v else 0)

        self.calls.append(("gemm", (m, n, k)))
        _run_or_record(run)
        return 0

    @staticmethod
    def _memory(address, dtype, count):
        ctype = {np.float32: ctypes.c_float, np.float64: ctypes.c_double,
                 np.uint16: ctypes.c_uint16}[dtype]
        return np.ctypeslib.as_array((ctype * int(count)).from_address(address))

    def _matrix(self, address, dtype_code, op, rows, cols, ld):
        """op(X) as (rows, cols), X column-major with leading dimension ld."""
        dtype = self._TYPES[dtype_code]
        stored = (cols, rows) if op == 1 else (rows, cols)
        size = np.dtype(dtype).itemsize
        mem = self._memory(address, dtype, ld * stored[1])
        x = np.lib.stride_tricks.as_strided(mem, stored, (size, ld * size))
        if dtype is np.uint16:  # bf16 bits -> float32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        return x.T if op == 1 else x


class _FakeFunction:
    def __init__(self, name, params, launches, cpu_module=None):
        self.name, self.params, self.launches = name, params, launches
        self.cpu_module = cpu_module  # cuda_on_cpu.CpuModule: run the kernel's own code

    def __call__(self, grid, block, args):
        assert len(grid) >= 1 and all(int(g) >= 1 for g in grid), (self.name, grid)
        assert all(int(b) >= 1 for b in block) and int(np.prod(block)) <= 1024, \
            f"{self.name}: block {block}: at most 1024 threads in all"
        if self.name.startswith(("softmax_xent_small", "bce")):
            assert tuple(grid) == (1,), f"{self.name} reduces in one block"
        if self.name.startswith(("softmax_xent", "bce", "sum_scaled", "mse_partial")):
            assert block[0] % 32 == 0, "block reductions need whole warps"
        assert len(args) == len(self.params), f"{self.name}: {len(args)} args for {self.params}"
        named = {}
        for value, (ctype, pname) in zip(args, self.params):
            is_ptr, dtype = _C_TYPES[ctype]
            if is_ptr:
                if not isinstance(value, DeviceArray):
                    # What CuPy does with a NumPy array (or anything but its own
                    # ndarray) as a pointer argument: there is no device address.
                    raise TypeError(f"{self.name}.{pname}: unsupported type {type(value).__name__} "
                                    "for a pointer argument (not a device array)")
                assert value.dtype == dtype and value.flags.c_contiguous, (self.name, pname, value.dtype)
            else:
                assert type(value) is dtype, f"{self.name}.{pname}: {type(value)} for C {ctype}"
            named[pname] = value
        if re.sub(r"_f(32|64)(_i(32|64))?$", "", self.name) in _BLOCK_REDUCE_KERNELS:
            # block_reduce's warp shuffles use full masks (kernels/fastnn_common.cuh)
            assert len(block) == 1 and block[0] % 32 == 0, (self.name, block)
        if self.name.startswith("act_backward_bias"):  # one block of (32, 32) per 32 columns
            assert tuple(block) == (32, 32), (self.name, block)
            assert tuple(grid) == (-(-int(named["n_cols"]) // 32),), (self.name, grid)
        self.launches.append(self.name)
        launch_shapes.append((self.name, tuple(grid), tuple(block)))
        if self.cpu_module is not None:
            def run_source():
                # The by-name emulation on copies first, for its refusals only:
                # they name the host's side of the contract (an element count
                # past an array's end, a batch row outside the data), which
                # the runner's guards see only within 64 KiB of an array.
                try:
                    _emulate(self.name, {k: v.copy() if isinstance(v, np.ndarray) else v
                                         for k, v in named.items()})
                except BeyondEmulation:
                    pass
                self.cpu_module.launch(self.name, grid, block, args)

            _run_or_record(run_source)
        else:
            _run_or_record(lambda: _emulate(self.name, named))


# Kernels that call block_reduce: their blockDim.x must be whole warps.
_BLOCK_REDUCE_KERNELS = {"softmax_xent", "softmax_xent_small", "sum_scaled", "mse_partial",
                         "bce", "bce_logits"}


def _fake_cupy(launches, device_count=1, count_error=None, probe_error=None, kernels="emulated"):
    """A ``cupy`` stand-in built on NumPy, enough for CupyBackend. ``kernels``:
    "emulated" runs each launch by name in NumPy (``_emulate``); "source" runs
    the kernel's own CUDA code, built for the CPU (tests/cuda_on_cpu.py), but
    for a module of inline PTX (the profiling aid), which stays emulated."""
    assert kernels in ("emulated", "source"), kernels
    fake = types.ModuleType("cupy")
    fake.__getattr__ = lambda name: _as_cupy(name, getattr(np, name))  # the array API is NumPy's

    def arange(*args, **kwargs):
        if probe_error is not None:
            raise probe_error
        return _as_cupy("arange", np.arange)(*args, **kwargs)

    arange.checks_calls_as_cupy = True

    def get_device_count():
        if count_error is not None:
            raise count_error
        return device_count

    class Device:
        def __init__(self, device=None):
            self.id = 0 if device is None else int(device)

        def synchronize(self):
            _device_synchronized()

    class RawModule:
        def __init__(self, code=None, *, options=()):
            assert not _recording(), "a module compiled while a CUDA graph records"
            assert "--fmad=false" in options
            self.sigs = kernel_signatures(code)
            self.cpu_module = None
            if kernels == "source" and not re.search(r"\basm\s*(volatile\s*)?\(", code):
                import cuda_on_cpu  # (tests/cuda_on_cpu.py)

                self.cpu_module = cuda_on_cpu.compile_module(code)

        def get_function(self, name):
            assert not _recording(), "a module loaded while a CUDA graph records"
            return _FakeFunction(name, self.sigs[name], launches, self.cpu_module)

    def refused_in_capture(name, why):
        function = _as_cupy(name, getattr(np, name))

        def checked(*args, **kwargs):
            if _recording() and (name != "asarray" or not isinstance(args[0], DeviceArray)):
                raise AssertionError(f"cupy.{name} while a CUDA graph records: {why}")
            return function(*args, **kwargs)

        checked.checks_calls_as_cupy = True  # (function does)
        return checked

    for name in ("matmul", "dot", "tensordot", "inner", "vdot", "einsum"):
        setattr(fake, name, refused_in_capture(name, "CuPy's cuBLAS refuses (cupy#6290)"))
    copy_in = refused_in_capture("asarray", "a host -> device copy from pageable memory")

    def asarray(a, dtype=None, order=None):
        # A device array as it is (a view at most); anything else is copied to
        # the device, so writing to the result never changes the host value.
        if isinstance(a, DeviceArray):
            return copy_in(a, dtype=dtype, order=order)
        if hasattr(a, "__cuda_array_interface__"):  # another library's device array: a view
            view = np.asarray(_SeenAsHost(a)).view(DeviceArray)
            return view if dtype is None else view.astype(dtype, copy=False)
        return copy_in(np.array(a, dtype=dtype, order=order or "K"))

    fake.asarray = asarray

    def from_dlpack(array):
        # cupy.from_dlpack of a producer in device memory: a view, no copy. The
        # stand-in's "device" is the host, so NumPy reads the capsule.
        kind = int(array.__dlpack_device__()[0])
        assert kind in (2, 13), f"cupy.from_dlpack of a producer on DLPack device {kind}, not CUDA"
        return np.from_dlpack(_SeenAsHost(array)).view(DeviceArray)

    fake.from_dlpack = from_dlpack

    def empty(shape, dtype=float, order="C"):
        # Not zeros: a GPU's fresh memory holds whatever was there, so a read
        # before the first write must show (NaN, or a large integer).
        out = np.empty(shape, dtype, order).view(DeviceArray)
        if out.dtype.kind == "f":
            out.view(np.ndarray).fill(np.nan)
        elif out.dtype.kind in "iu":
            out.view(np.ndarray).fill(np.iinfo(out.dtype).max // 3)
        return out

    fake.empty = empty
    fake.empty_like = lambda prototype, dtype=None: empty(np.shape(prototype),
                                                          dtype or prototype.dtype)
    fake.arange = arange
    fake.RawModule = RawModule
    fake.kernels = kernels  # (not CuPy's) how launches run here
    fake.ndarray = DeviceArray  # isinstance(numpy_array, cupy.ndarray) is False, as in CuPy
    fake.cuda = types.SimpleNamespace(
        Stream=FakeStream, get_current_stream=lambda: _streams[-1], Graph=FakeGraph,
        Event=FakeEvent, get_elapsed_time=get_elapsed_time,
        MemoryPool=FakeMemoryPool, using_allocator=lambda allocator=None: contextlib.nullcontext(),
        runtime=types.SimpleNamespace(
            getDeviceCount=get_device_count, getDevice=lambda: 0,
            getDeviceProperties=lambda device: {
                "name": b"Fake GPU", "totalGlobalMem": 80 * 2**30, "multiProcessorCount": 4,
            },
            memGetInfo=lambda: (2**30, 80 * 2**30),
        ),
        Device=Device,
        memory=types.SimpleNamespace(OutOfMemoryError=type("OutOfMemoryError", (MemoryError,), {})),
        compiler=types.SimpleNamespace(CompileException=type("CompileException", (Exception,), {})),
        driver=types.SimpleNamespace(CUDADriverError=type("CUDADriverError", (RuntimeError,), {})),
    )
    return fake


# ---------------------------------------------------------------- the fixture
@pytest.fixture(params=["emulated", "source"])
def fake_gpu(monkeypatch, request):
    """(CupyBackend on the fake cupy with the fake cuBLAS, launched kernel names, the fake lib).

    Each test runs twice: with every launch emulated by name in NumPy (which
    also refuses element ranges past an array's end), and with every launch
    running the kernel's own CUDA code built for the CPU (``source_gpu``)."""
    if request.param == "source":
        _skip_without_cpu_kernels()
    yield from _fake_gpu(monkeypatch, kernels=request.param)


@pytest.fixture
def emulated_gpu(monkeypatch):
    """``fake_gpu`` with the by-name NumPy emulation only (for tests of its own checks)."""
    yield from _fake_gpu(monkeypatch, kernels="emulated")


@pytest.fixture
def source_gpu(monkeypatch):
    """``fake_gpu`` with every launch running the kernel's own CUDA code on the
    CPU (tests/cuda_on_cpu.py); skipped where that cannot be built."""
    _skip_without_cpu_kernels()
    yield from _fake_gpu(monkeypatch, kernels="source")


def _skip_without_cpu_kernels():
    import cuda_on_cpu  # (tests/cuda_on_cpu.py)

    reason = cuda_on_cpu.available()
    if reason is not None:
        pytest.skip(reason)


def _fake_gpu(monkeypatch, kernels):
    from fastnn.backends import cupy_backend

    launches: list[str] = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(launches, kernels=kernels))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    lib = FakeCublas()
    monkeypatch.setattr(cublas, "load_library", lambda cupy: lib)
    monkeypatch.setenv("FASTNN_FAST_PATH", "0")  # the one-launch tiny-MLP kernel is another test's
    backend = cupy_backend.CupyBackend()
    assert backend._blas is not None, backend.blas_status
    launches.clear()  # the start-up probes': a test counts its own
    from fastnn import backends as registry
    from fastnn import precision

    monkeypatch.setitem(registry._instances, "cupy", backend)  # use_backend("cupy") finds it
    # A first get_backend() inside the test would resolve "auto" to the fake: undone below.
    current = registry._current.get()
    monkeypatch.setattr(registry, "_initial", registry._initial)
    monkeypatch.setattr(precision, "apply_to_cupy", lambda: None)  # CuPy's own switch: not faked
    monkeypatch.setattr(FakeGraph, "__init__", _counting_init(FakeGraph.__init__))
    FakeGraph.made = []
    yield backend, launches, lib
    registry._current.set(current)
    monkeypatch.undo()  # the real apply_to_cupy again, and no fake cupy to apply it to
    fn.set_precision("float32")


def _counting_init(init):
    def counted(self, calls):
        init(self, calls)
        FakeGraph.made.append(self)
    return counted
