"""fit's compiled fast path for narrow nets against the ordinary per-op path.

XOR 2-8-1 (tanh hidden, Adam, batch 4) inside ``fit`` on the Numba backend,
once per loss the kernel takes (MSE, BCE on logits, BCE after a Sigmoid), with
``FASTNN_FAST_PATH=1`` (whole epochs in one compiled call) and ``=0`` (op by
op). ``make bench`` records the time of a 500-epoch fit (500 steps of one
batch: divide by 500 for a step); ``extra_info`` holds the step path. Under ``make test``
(``--benchmark-disable``) each body runs once and checks the path taken and that
the loss fell.
"""
from __future__ import annotations

import math

import pytest

import fastnn as fn
from fastnn.data import xor

pytestmark = pytest.mark.skipif(fn.available_backends()["numba"] is not None,
                                reason="numba backend unusable")

LOSSES = {
    "mse": (fn.MSELoss, []),
    "bce-logits": (fn.BCEWithLogitsLoss, []),
    "bce-sigmoid": (fn.BCELoss, [fn.Sigmoid]),
}
EPOCHS = 500  # 4 samples in one batch: 500 steps per fit


@pytest.mark.parametrize("path", ["compiled", "per-op"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_xor_fit(benchmark, monkeypatch, loss, path):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1" if path == "compiled" else "0")
    loss_cls, tail = LOSSES[loss]
    X, y = xor(n_repeats=1)

    def fit_once():
        fn.manual_seed(0)
        with fn.use_backend("numba"):
            model = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1), *(t() for t in tail))
            opt = fn.Adam(model.parameters(), lr=0.05)
            return fn.fit(model, loss_cls(), opt, X, y, epochs=EPOCHS, batch_size=4,
                          progress=False)

    fit_once()  # warm-up: compile or load the kernel
    benchmark.group = f"XOR 2-8-1 fit, {loss}, {EPOCHS} steps"
    history = benchmark(fit_once)
    benchmark.extra_info.update(loss=loss, steps=EPOCHS, step_path=history.step_path)
    assert history.step_path.startswith(path), history.step_path
    assert math.isfinite(history.loss[-1]) and history.loss[-1] < history.loss[0]
