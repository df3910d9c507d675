"""fit, evaluate and predict: the training loop and its fast paths.

Input checks live in inputs.py, History and the progress bar in history.py.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .backends import get_backend, host_array
from .compiled import run_epochs
from .errors import DTypeError, InputError, ShapeError, TrainingDiverged, naming_out_of_memory
from .history import History, Progress
from .inputs import check_positive_int, check_step_objects, model_dtype, prepare, readable
from .nn.module import Module, training_step_mode
from .random import generator

__all__ = ["History", "evaluate", "fit", "predict"]


def fit(model: Module, loss_fn, optimizer, X, y, epochs: int = 10, batch_size: int = 32,
        shuffle: bool = True, seed=None, validation_data=None, stop_when=None,
        progress: bool = True, initial_epoch: int = 0) -> History:
    """Train ``model`` on (X, y) with minibatches of the first axis.

    X, y: arrays (NumPy, lists, torch tensors, or the backend's: those stay on
    the device, with no copy to the host), the same length; integer y
    are class labels (for CrossEntropyLoss; MSE and BCE take them as values),
    float y are targets cast to the model's dtype. Each epoch
    is shuffled (``shuffle``) with ``seed`` (else the ``manual_seed`` state);
    the last partial batch is used. ``validation_data=(X_val, y_val)`` adds
    ``history.val_loss``; ``stop_when(history) -> bool`` is checked after every
    epoch and ends training at the first epoch where it is true. A NaN or inf
    loss raises ``TrainingDiverged`` naming the epoch and batch.

    ``initial_epoch`` resumes a run: the batch order of epoch ``e`` depends
    only on (seed, e), so training 2 epochs, saving, and fitting again with the
    same ``seed`` and ``initial_epoch=2`` gives the same result as 4 epochs in
    one go. Returns a ``History``.
    """
    if not isinstance(model, Module):
        raise TypeError(f"fit: model must be a fastnn Module, got {type(model).__name__}")
    check_positive_int("epochs", epochs, 0)
    check_positive_int("batch_size", batch_size)
    check_positive_int("initial_epoch", initial_epoch, 0)
    if stop_when is not None and not callable(stop_when):
        raise TypeError("fit: stop_when must be a callable history -> bool")
    if seed is not None:
        check_positive_int("seed", seed, 0)
    check_step_objects(model, loss_fn, optimizer)
    backend = get_backend()
    dtype = model_dtype(model)
    Xd, yd, label_range = prepare(X, y, dtype, "fit", loss_fn)
    val = None
    if validation_data is not None:
        if len(validation_data) != 2:
            raise InputError("fit: validation_data must be a pair (X_val, y_val)")
        *val, val_labels = prepare(*validation_data, dtype, "fit(validation_data)", loss_fn)
    if seed is None:
        seed = int(generator().integers(2**63))
    n = len(Xd)
    batch_size = min(int(batch_size), n)
    n_batches = -(-n // batch_size)
    with naming_out_of_memory("fit", f"its batch buffers of {batch_size} rows",
                              batch_size * (Xd[:1].nbytes + yd[:1].nbytes), backend.device):
        xb = backend.empty((batch_size,) + tuple(Xd.shape[1:]), Xd.dtype)
        yb = backend.empty((batch_size,) + tuple(yd.shape[1:]), yd.dtype)
    on_cpu = backend.device.startswith("cpu")
    xp = backend.xp

    history = History(samples_per_epoch=n)
    bar = Progress(progress, n * epochs, initial_epoch + epochs)
    # Epoch e's batch order is the e-th permutation drawn from (seed): a
    # resumed run (initial_epoch > 0) skips the ones already used.
    shuffler = np.random.default_rng(seed)
    for _ in range(initial_epoch if shuffle else 0):
        shuffler.permutation(n)
    batch_losses = None if on_cpu else backend.zeros((n_batches,), dtype)
    sizes = np.full(n_batches, batch_size, dtype=np.float64)
    sizes[-1] = n - batch_size * (n_batches - 1)

    def diverged(value, epoch, b, restored=False):
        return TrainingDiverged(
            f"fit: loss became {value} at epoch {epoch + 1}, batch {b + 1} of {n_batches}"
            + (f"; the model is as it was at the start of epoch {epoch + 1} (on a GPU fit "
               "reads the losses once per epoch)" if restored else "")
        )

    def step_per_op(epoch: int, b: int, lo: int, hi: int, order_d) -> float:
        """Batch b as ordinary backend ops; returns its summed loss on the CPU
        (on a GPU the loss stays on the device, in batch_losses, and 0.0 is returned)."""
        m = hi - lo
        if shuffle:
            idx = order_d[lo:hi]
            xs, ys = (xb, yb) if m == batch_size else (xb[:m], yb[:m])
            xp.take(Xd, idx, axis=0, out=xs)
            xp.take(yd, idx, axis=0, out=ys)
        else:
            xs, ys = Xd[lo:hi], yd[lo:hi]
        optimizer.zero_grad()
        loss = loss_fn.forward(model.forward(xs), ys)
        value = 0.0
        if on_cpu:
            value = float(loss)
            if not math.isfinite(value):
                raise diverged(value, epoch, b)
        else:
            batch_losses[b] = loss  # stays on the device: no sync per step
        model.backward(loss_fn.backward())
        optimizer.step()
        return value * m

    def run_epoch(epoch: int) -> float:
        """One epoch, op by op or replaying the step recorded as a CUDA graph
        (``graphed``, CuPy only); returns the mean loss."""
        order_d = backend.asarray(shuffler.permutation(n)) if shuffle else None
        if graphed is not None:
            graphed.new_epoch(order_d if shuffle else graphed_order)
        if epoch_start is not None:
            epoch_start.take()
        loss_sum = 0.0
        with training_step_mode(model, label_range):
            for b in range(n_batches):
                lo, hi = b * batch_size, min((b + 1) * batch_size, n)
                m = hi - lo
                if graphed is not None and m == batch_size and graphed.ready(b):
                    graphed.replay()  # gathers batch b, stores its loss in batch_losses[b]
                else:
                    loss_sum += step_per_op(epoch, b, lo, hi, order_d)
                    if graphed is not None and m == batch_size:
                        graphed.ran_plain_step()
                if bar.bar is not None:
                    bar.update(epoch, m, (lambda: loss_sum / hi) if on_cpu
                               else (lambda: float(batch_losses[:b + 1].mean())))
        if not on_cpu:
            losses = host_array(batch_losses)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                epoch_start.restore()  # the steps after the bad batch made the weights NaN
                _raise_deferred_input_error(loss_fn)  # e.g. BCELoss on values outside [0, 1]
                raise diverged(losses[bad[0]], epoch, int(bad[0]), restored=True)
            loss_sum = float(np.dot(losses.astype(np.float64), sizes))
        return loss_sum / n

    def run_compiled(epoch: int, count: int) -> list:
        """``count`` epochs in one compiled call; returns their mean losses."""
        orders = np.tile(np.arange(n), (count, 1))
        if shuffle:  # row by row, the same draws as ``count`` permutation(n) calls
            orders = shuffler.permuted(orders, axis=1)
        losses = runner(plan, optimizer, Xd, yd, orders, batch_size)
        if len(losses) < count * n_batches or not np.isfinite(losses[-1]):
            k = len(losses) - 1
            b = k % n_batches
            # The kernel stopped before this batch's update: the batch again, op
            # by op, raises what the ordinary path raises there (BCELoss: NaN
            # predictions are an InputError), else the loss diverged.
            rows = backend.asarray(orders[k // n_batches, b * batch_size:(b + 1) * batch_size])
            loss_fn.forward(model.forward(xp.take(Xd, rows, axis=0)), xp.take(yd, rows, axis=0))
            raise diverged(losses[k], epoch + k // n_batches, b)
        return [float(v) for v in losses.reshape(count, n_batches) @ sizes / n]

    plan, runner = _compiled_plan(model, loss_fn, optimizer, Xd, yd, epochs * n_batches, batch_size,
                                  label_range)
    graphed, history.step_path = _step_path(plan, model, loss_fn, optimizer, Xd, yd, xb, yb,
                                            batch_losses, epochs * (n // batch_size))
    graphed_order = backend.asarray(np.arange(n)) if graphed is not None and not shuffle else None
    epoch_start = _EpochStart(optimizer) if plan is None and not on_cpu else None
    # Return to Python after every epoch only when something must run there.
    per_epoch = stop_when is not None or val is not None or bar.bar is not None
    train_seconds = 0.0
    model.train()
    try:
        epoch, end = initial_epoch, initial_epoch + epochs
        while epoch < end:
            start = time.perf_counter()
            if plan is None:
                epoch_losses = [run_epoch(epoch)]
            else:
                # The first call alone: its one-time start-up (kernel load) stays
                # out of the later epochs' seconds (steady_samples_per_second).
                count = 1 if per_epoch or epoch == initial_epoch \
                    else max(1, min(end - epoch, 1_000_000 // n))
                epoch_losses = run_compiled(epoch, count)
                if bar.bar is not None:
                    bar.update(epoch, n * count, lambda: epoch_losses[-1])
            seconds = time.perf_counter() - start  # validation is not counted
            train_seconds += seconds
            history.epoch_seconds.extend([seconds / len(epoch_losses)] * len(epoch_losses))
            epoch += len(epoch_losses)
            history.loss.extend(epoch_losses)
            history.epochs_run += len(epoch_losses)
            history.seconds = train_seconds
            history.samples_per_second = n * history.epochs_run / train_seconds if train_seconds > 0 else 0.0
            if val is not None:
                history.val_loss.append(_evaluate(model, loss_fn, *val, max(batch_size, 1024),
                                                  val_labels))
                model.train()
            if stop_when is not None and stop_when(history):
                break
    finally:
        bar.close()
        model.train()
    if graphed is not None and graphed.failed is not None:
        history.step_path = f"per-op (CUDA graph failed: {graphed.failed})"
    return history


class _EpochStart:
    """The optimizer's weights and state as an epoch starts, kept on the device.

    On a GPU fit reads the batch losses once per epoch, so the steps after a
    NaN loss have already run when it is seen, and made the weights NaN too;
    ``restore`` puts back the epoch's start (the CPU path raises before the
    bad batch's update instead). One device copy per buffer and epoch, into
    copies made once per fit; in place, so a recorded CUDA graph stays valid.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.copies: dict = {}  # id(buffer) -> (buffer, its copy), made once per fit
        self.taken: list = []  # the (buffer, copy) pairs of this epoch's start
        self.step_count = 0
        self.skipped: list = []  # each group's skipped steps at the epoch start

    def _buffers(self):
        for group in self.optimizer.groups:
            yield group.data
            yield from group.state.values()

    def take(self) -> None:
        self.step_count = self.optimizer.step_count
        self.skipped = [list(g.skipped) for g in self.optimizer.groups]
        self.taken = []
        for buf in self._buffers():
            kept = self.copies.get(id(buf))
            if kept is None:
                kept = self.copies[id(buf)] = (buf, buf.copy())
            else:
                kept[1][...] = buf
            self.taken.append(kept)

    def restore(self) -> None:
        taken = {id(buf) for buf, _ in self.taken}
        for buf, copy in self.taken:
            buf[...] = copy
        for buf in self._buffers():
            if id(buf) not in taken:  # a state buffer the epoch made: as new again
                buf.fill(0)
        self.optimizer.step_count = self.step_count
        for g, skipped in zip(self.optimizer.groups, self.skipped):
            g.skipped = list(skipped)


def _step_path(plan, model, loss_fn, optimizer, Xd, yd, xb, yb, batch_losses, full_steps):
    """(the CUDA-graph step or None, how fit's steps run, for ``History.step_path``)."""
    backend = get_backend()
    if plan is not None:
        return None, "compiled (whole epochs in one call)" if backend.name != "cupy" \
            else "cuda-kernel (whole epochs in one launch)"
    if backend.name != "cupy":
        return None, "per-op"
    from . import cuda_graph

    reason = cuda_graph.ineligible_reason(backend, model, loss_fn, optimizer, Xd, yd, full_steps)
    if reason is not None:
        return None, f"per-op (no CUDA graph: {reason})"
    graphed = cuda_graph.GraphedStep(backend, model, loss_fn, optimizer, Xd, yd, xb, yb,
                                     batch_losses)
    return graphed, "cuda-graph (one recorded step replayed per batch)"


def _compiled_plan(model, loss_fn, optimizer, Xd, yd, steps: int, batch_size: int, label_range):
    """(plan, its run_epochs) when a compiled fast path applies to this exact
    data: Numba on the CPU, the one-launch numba.cuda kernel on CuPy; else
    (None, None)."""
    if get_backend().name == "cupy":
        from . import gpu_compiled

        plan = gpu_compiled.plan_for_fit(model, loss_fn, optimizer, Xd, yd, steps, batch_size,
                                         label_range)
        return (plan, gpu_compiled.run_epochs) if plan is not None else (None, None)
    from .compiled import fits_data, plan_fast_path, worth_compiling

    plan = plan_fast_path(model, loss_fn, optimizer)
    if plan is None or not worth_compiling(steps) or not fits_data(plan, Xd, yd, label_range):
        return None, None
    return plan, run_epochs


def evaluate(model: Module, loss_fn, X, y, batch_size: int = 1024) -> float:
    """Mean loss over (X, y) in eval mode (weighted by samples)."""
    check_positive_int("batch_size", batch_size, where="evaluate")
    # Device arrays are checked and cast where they are (no copy when already right).
    Xd, yd, label_range = prepare(X, y, model_dtype(model), "evaluate", loss_fn)
    return _evaluate(model, loss_fn, Xd, yd, batch_size, label_range)


def _evaluate(model: Module, loss_fn, Xd, yd, batch_size: int, label_range) -> float:
    backend = get_backend()
    was_training = model.training
    model.eval()
    n = len(Xd)
    on_cpu = backend.device.startswith("cpu")
    losses, sizes = [], []
    try:
        with training_step_mode(model, label_range):
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                loss = loss_fn.forward(model.forward(Xd[lo:hi]), yd[lo:hi])
                if on_cpu:
                    losses.append(float(loss))
                else:  # a GPU's stay on the device (a user loss may give a Python float)
                    losses.append(loss if backend.is_array(loss)
                                  else backend.asarray(np.asarray(float(loss))))
                sizes.append(hi - lo)
    finally:
        model.train(was_training)
    if not on_cpu:  # one read for the whole set
        losses = host_array(backend.xp.stack(losses)).astype(np.float64)
    total = float(np.dot(np.asarray(losses, dtype=np.float64), np.asarray(sizes, dtype=np.float64)))
    if not math.isfinite(total):
        _raise_deferred_input_error(loss_fn)
    return total / n


def _raise_deferred_input_error(loss_fn) -> None:
    """Raise the input error a loss kept on the device (BCELoss on a GPU), if any."""
    cause = getattr(loss_fn, "deferred_input_error", lambda: None)()
    if cause is not None:
        raise cause


def predict(model: Module, X, batch_size: int = 1024) -> np.ndarray:
    """Run ``model`` in eval mode over X in batches; returns a NumPy array."""
    check_positive_int("batch_size", batch_size, where="predict")
    backend = get_backend()
    X = readable(backend, X, "X", "predict")
    if X.ndim == 0 or len(X) == 0:
        raise InputError(f"predict: X is empty (shape {tuple(X.shape)})")
    if X.dtype.kind not in "fiub":
        raise DTypeError(f"predict: X must be numeric, got dtype {X.dtype}")
    if X.ndim == 1:
        raise ShapeError(
            f"predict: expected a batch (N, ...), got shape {tuple(X.shape)}; "
            "for one sample pass X[None, :]"
        )
    Xd = backend.asarray(X, dtype=model_dtype(model))  # no copy when already the model's
    was_training = model.training
    model.eval()
    out = None
    try:
        with training_step_mode(model):
            for lo in range(0, len(Xd), batch_size):
                hi = min(lo + batch_size, len(Xd))
                yb = model.forward(Xd[lo:hi])  # in a layer's buffer, reused by the next batch
                if out is None:
                    out = backend.empty((len(Xd),) + tuple(yb.shape[1:]), yb.dtype)
                out[lo:hi] = yb  # a copy on the device: one read back at the end
    finally:
        model.train(was_training)
    return host_array(out)
