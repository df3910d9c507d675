"""A whole training step recorded once as a CUDA graph and replayed by ``fit``.

On a GPU a small net's step is a few dozen launches of a few microseconds of
work each, so Python and launch overhead are most of the time; replaying the
recorded step is one launch. ``fit`` uses it on the CuPy backend when the
step is made only of fastnn's own layers, losses and optimizers (their ops
run on the device with no host read) and the run has enough full batches to
repay the recording (a few milliseconds); anything else, or a recording that
fails, runs op by op as before. ``FASTNN_CUDA_GRAPH=0`` turns it off, ``=1``
records even short runs and raises instead of falling back (for tests).

A replay repeats the recorded launches with the recorded arguments, so:

* every buffer the step touches is allocated before the recording (one
  ordinary step runs first, also after new settings dropped a graph) or during
  it from a private memory pool, and is kept alive with the graph; each block
  of that pool holds the pool, so an array made while recording that outlives
  the graph never points at freed memory (``allocator_keeping``);
* what changes from step to step is read from device memory: the batch is
  gathered by ``step_begin`` (kernels/graph_step.cu) from the epoch's order
  at the step's counter, Adam's bias corrections come from a per-epoch table
  row, and ``step_end`` stores the loss and advances the counter;
* GEMMs run on fastnn's own cuBLAS handle, bound to the recording stream and
  given its workspace before the recording starts (CuPy's matmul refuses to
  be recorded);
* hyper-parameters and the precision policy are fixed into the graph: a new
  epoch whose settings differ from the recording's records the step again.

The numbers are those of the ordinary step: the same kernels on the same
buffers in the same order (tests/test_cuda_graph.py compares them bit for
bit on a GPU, and checks the bookkeeping on the CPU with a recording stand-in).
With ``shuffle=False`` the ordinary step reads each batch in place, at an
address cuBLAS may find less aligned than the graph's batch buffer and so
choose another GEMM kernel: the two then agree to rounding, not to the bit.
"""
from __future__ import annotations

import gc
import os

import numpy as np

from .backends.cublas import pointer
from .errors import CaptureUnsupported

ENV = "FASTNN_CUDA_GRAPH"
MIN_STEPS = 64  # full-batch steps a fit must have before recording pays off
SCALAR_SLOTS = 16  # per-step scalars one step may read (two per Adam group)


def mode() -> str:
    """"auto" (default), "off" (FASTNN_CUDA_GRAPH=0) or "force" (=1)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "force"):
        return "force"
    return "auto"


def _builtin(obj) -> bool:
    return type(obj).__module__.startswith("fastnn.")


def ineligible_reason(backend, model, loss_fn, optimizer, Xd, yd, full_steps: int):
    """Why this fit's step cannot (or should not) be recorded; None if it can."""
    if mode() == "off":
        return f"{ENV}=0"
    if backend.name != "cupy":
        return "not on the CuPy backend"
    if getattr(backend, "_blas", None) is None:
        return getattr(backend, "blas_status", "no cuBLAS handle of fastnn's own")
    forced = mode() == "force"
    if not forced and full_steps < MIN_STEPS:
        return f"{full_steps} full-batch steps: too few to repay the recording"
    # A user-defined module, loss or optimizer may read the host every step
    # (a schedule, a random mask): a replay would freeze it silently. (fastnn's
    # own must stay free of per-step host state; a future Dropout would need a
    # device-side generator or an entry here.)
    for obj in list(model.modules()) + [loss_fn, optimizer]:
        if not _builtin(obj):
            return f"{type(obj).__name__} is not one of fastnn's own (its host logic would be frozen)"
    if len(optimizer.groups) != 1:
        return "parameters of several dtypes"
    if not optimizer.uniform_steps:
        return "some parameters missed steps (no gradient): their updates differ"
    dtype = optimizer.groups[0].dtype
    for name, arr in (("X", Xd), ("y", yd)):
        row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
        if not arr.flags.c_contiguous or row_bytes % 4:
            return f"{name} rows of {row_bytes} bytes (step_begin copies 32-bit words)"
    if Xd.dtype != dtype:
        return "X is not in the model's dtype"
    return None


def _words(arr):
    """A contiguous array as 32-bit words (step_begin copies words)."""
    return arr.reshape(-1).view(np.uint32)


class GraphedStep:
    """fit's training step, recorded as a CUDA graph after one ordinary step.

    ``fit`` calls ``new_epoch`` at each epoch start, ``ready(b)`` before each
    full batch (True: call ``replay()``; False: run the step op by op) and
    ``ran_plain_step()`` after an ordinary full-batch step.
    """

    def __init__(self, backend, model, loss_fn, optimizer, Xd, yd, xb, yb, batch_losses):
        self.backend, self.model, self.loss_fn, self.optimizer = backend, model, loss_fn, optimizer
        self.Xd, self.yd, self.xb, self.yb = Xd, yd, xb, yb
        self.batch_losses = batch_losses
        self.batch = len(xb)
        self.dtype = optimizer.groups[0].dtype
        self.suffix = "f32" if self.dtype == np.float32 else "f64"  # of the dtype's kernels
        self.forced = mode() == "force"
        xp = backend.xp
        n_batches = len(batch_losses)
        # Static buffers, rewritten in place: the graph points at them.
        self.order = xp.zeros((len(Xd),), dtype=np.int64)
        self.counter = xp.zeros((1,), dtype=np.int64)
        self.table = xp.zeros((n_batches, SCALAR_SLOTS), dtype=self.dtype)
        self.scalars = xp.zeros((SCALAR_SLOTS,), dtype=self.dtype)
        self.graph = None
        self.failed = None  # why recording failed (then fit stays op by op)
        self._warm = False
        self._epoch_order = None
        self._slots: list = []  # (first slot, count, values(step) -> floats)
        self._signature = None
        self._keep: list = []
        self._pool = None  # the recording's private memory pool

    # ------------------------------------------------------------ fit's calls
    def new_epoch(self, order_d) -> None:
        """The epoch's sample order (device int64, length n)."""
        self._epoch_order = order_d
        if self.graph is not None:
            if self._settings() != self._signature:
                self._drop()  # recorded again at the next full batch
            else:
                self._load_epoch(0)

    def ran_plain_step(self) -> None:
        self._warm = True  # buffers, kernels and cuBLAS's choices exist now

    def ready(self, b: int) -> bool:
        """True when batch ``b`` (a full one) should be replayed."""
        if self.graph is not None:
            return True
        if self.failed is not None or not self._warm:
            return False
        try:
            self._record()
        except Exception as exc:
            if self.forced:
                raise
            self.failed = f"{type(exc).__name__}: {exc}"
            return False
        self._load_epoch(b)
        return True

    def replay(self) -> None:
        if self.graph is None:  # ready() said False, or new_epoch dropped it for new settings
            raise RuntimeError("GraphedStep.replay: no recorded step (call ready(b) first)")
        self.graph.launch()
        self.optimizer.step_count += 1  # what optimizer.step() does on the host

    # ------------------------------------------------------------ recording
    def step_scalars(self, values, dtype):
        """Device slots for scalars that change every step (the backend's
        optimizer ops ask while recording): ``values(step)`` gives them for a
        step number; returns the device view the recorded kernel reads."""
        if np.dtype(dtype) != self.dtype:
            raise CaptureUnsupported(f"step scalars in {np.dtype(dtype)} for a {self.dtype} table")
        count = len(values(1))
        first = sum(c for _, c, _ in self._slots)
        if first + count > SCALAR_SLOTS:
            raise CaptureUnsupported(f"more than {SCALAR_SLOTS} per-step scalars")
        self._slots.append((first, count, values))
        return self.scalars[first:first + count]

    def _settings(self):
        """What the graph fixes: hyper-parameters, precision, parameter buffers,
        and the modules' and the loss's plain settings (a LeakyReLU's slope, ...),
        which their launches pass by value; a stop_when may change any of them."""
        from .precision import get_precision

        opt = self.optimizer
        hyper = tuple((name, getattr(opt, name)) for name in opt.hyper_names)
        buffers = tuple(pointer(p.data) for p in opt.groups[0].params)
        modules = tuple(_plain_settings(m) for m in [*self.model.modules(), self.loss_fn])
        return type(opt), hyper, get_precision(), buffers, self.model.training, modules

    def _record(self) -> None:
        backend, opt = self.backend, self.optimizer
        cupy = backend.xp
        if opt.step_count < 1:
            raise CaptureUnsupported("no ordinary step has run yet")
        # Modules load before the capture: only kernel launches belong in it.
        backend._kernel("graph_step.cu", "step_begin")
        backend._kernel("graph_step.cu", f"step_end_{self.suffix}")
        backend._kernel("optim.cu", f"adam_captured_{self.suffix}")
        stream = cupy.cuda.Stream(non_blocking=True)
        pool = cupy.cuda.MemoryPool()  # the graph's own memory: never lent to other work
        backend._blas.bind(stream)  # before the capture: cuBLAS cannot be re-bound in it
        signature = self._settings()
        step_count = opt.step_count
        self._slots = []
        loss = None
        backend._capture = self
        # No garbage collection while recording: a finalizer that synchronizes
        # (cublasDestroy of another handle, a freed memory pool) would end it.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with stream, cupy.cuda.using_allocator(allocator_keeping(pool, cupy)):
                stream.begin_capture()
                try:
                    loss = self._step_body()
                except BaseException:
                    _abandon_capture(stream)
                    raise
                graph = stream.end_capture()
        finally:
            if collecting:
                gc.enable()
            backend._capture = None
            opt.step_count = step_count  # recording ran nothing; each replay counts itself
        graph.upload(cupy.cuda.get_current_stream())
        self.graph, self._signature = graph, signature
        # Everything the graph points at stays allocated as long as it lives.
        self._pool = pool
        self._keep = [stream, pool, loss, _arrays_of(self.loss_fn),
                      [_arrays_of(m) for m in self.model.modules()]]

    def _step_body(self):
        """The step as fit runs it, between step_begin and step_end."""
        backend = self.backend
        x_words, y_words = _words(self.Xd), _words(self.yd)
        x_row = x_words.size // len(self.Xd)
        y_row = y_words.size // len(self.yd)
        scalar_words = SCALAR_SLOTS * self.dtype.itemsize // 4
        begin = backend._kernel("graph_step.cu", "step_begin")
        backend._launch_1d(begin, self.batch * (x_row + y_row) + scalar_words, (
            x_words, _words(self.xb), np.int64(x_row), y_words, _words(self.yb), np.int64(y_row),
            self.order, np.int64(self.batch), self.counter, _words(self.table),
            _words(self.scalars), np.int64(scalar_words),
        ))
        self.optimizer.zero_grad()
        loss = self.loss_fn.forward(self.model.forward(self.xb), self.yb)
        if not (backend.is_array(loss) and loss.shape == () and loss.dtype == self.dtype):
            raise CaptureUnsupported(f"the loss is a {type(loss).__name__}, not a 0-d device array")
        self.model.backward(self.loss_fn.backward())
        self.optimizer.step()
        end = backend._kernel("graph_step.cu", f"step_end_{self.suffix}")
        end((1,), (32,), (loss, self.batch_losses, self.counter))
        return loss

    def _load_epoch(self, first_batch: int) -> None:
        """Point the graph at this epoch: order, per-step scalars, counter."""
        self.order[...] = self._epoch_order
        self.counter.fill(first_batch)
        if not self._slots:
            return  # no per-step scalars (SGD, RMSprop): no table, no host -> device copy
        rows = np.zeros((len(self.batch_losses), SCALAR_SLOTS), dtype=self.dtype)
        step = self.optimizer.step_count + 1  # the step batch ``first_batch`` will run
        for b in range(first_batch, len(rows)):
            for first, count, values in self._slots:
                rows[b, first:first + count] = values(step + b - first_batch)
        self.backend.upload(self.table, rows)

    def _drop(self) -> None:
        self.backend.synchronize()  # no replay may still read what is released
        if self._pool is not None:
            self._pool.free_all_blocks()  # its free blocks; those still in use stay
        self.graph, self._keep, self._slots, self._pool = None, [], [], None
        # An ordinary step first before the next recording: buffers the new
        # settings need (bf16 copies, ...) are then made outside the graph's pool.
        self._warm = False


def allocator_keeping(pool, cupy):
    """``pool.malloc`` whose blocks hold the pool (the allocator of a recording).

    An array allocated while recording can outlive the graph: a layer's cached
    buffer first needed in the recorded step, or one made before a recording
    failed. CuPy's pooled block refers to its pool only weakly, and a pool that
    is released frees its memory, so such an array would point at freed memory.
    Wrapped in an UnownedMemory that owns (block, pool), every block keeps the
    pool alive; the pool (and the memory) goes when the graph and the last
    such array have.
    """
    device_id = cupy.cuda.Device().id

    def malloc(size):
        block = pool.malloc(size)
        if size == 0:
            return block
        memory = cupy.cuda.UnownedMemory(block.ptr, size, (block, pool), device_id)
        return cupy.cuda.MemoryPointer(memory, 0)

    return malloc


def _abandon_capture(stream) -> None:
    """End a capture whose body failed (else the stream stays capturing); the
    body's error is the one to report, so one from ending is dropped."""
    try:
        stream.end_capture()
    except Exception:
        pass


def _plain_settings(obj) -> tuple:
    """An object's attributes that are plain values (numbers, flags, names)."""
    return type(obj), tuple(sorted((name, value) for name, value in vars(obj).items()
                                   if type(value) in (bool, int, float, str)))


def _arrays_of(obj) -> list:
    """Arrays an object holds (its attributes, one level into containers)."""
    found = []
    for value in vars(obj).values():
        items = value.values() if isinstance(value, dict) else \
            value if isinstance(value, (list, tuple)) else (value,)
        found.extend(v for v in items if hasattr(v, "__cuda_array_interface__") or
                     isinstance(v, np.ndarray))
    return found
