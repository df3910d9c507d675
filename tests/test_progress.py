"""fit's progress bar: shown on a terminal (epoch, loss, samples/s), silent otherwise."""
import io
import sys

import numpy as np

import fastnn as fn


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _fit(monkeypatch, stream, **kwargs):
    monkeypatch.setattr(sys, "stderr", stream)
    fn.manual_seed(0)
    X = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    y = (X.sum(axis=1, keepdims=True) > 0).astype(np.float32)
    model = fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(4, 1))
    return fn.fit(model, fn.MSELoss(), fn.SGD(model.parameters(), lr=0.1), X, y,
                  epochs=3, batch_size=16, **kwargs)


def test_bar_on_a_terminal_ends_on_the_last_epoch(monkeypatch, backend):
    stream = FakeTerminal()
    history = _fit(monkeypatch, stream)
    text = stream.getvalue()
    assert "epoch 3/3" in text and "loss=" in text and "sample/s" in text, text
    last_line = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert f"loss={history.loss[-1]:.4g}" in last_line, last_line  # the epoch's mean loss


def test_quiet_when_not_a_terminal_or_disabled(monkeypatch, backend):
    stream = io.StringIO()
    _fit(monkeypatch, stream)
    assert stream.getvalue() == ""
    stream = FakeTerminal()
    _fit(monkeypatch, stream, progress=False)
    assert stream.getvalue() == ""
