"""fit's compiled fast path (Numba) gives the ordinary path's numbers."""
import numpy as np
import pytest

import fastnn as fn
from fastnn.compiled import plan_fast_path
from fastnn.data import load_digits, xor

pytestmark = pytest.mark.skipif(
    fn.available_backends()["numba"] is not None, reason="numba backend unusable"
)


@pytest.fixture(autouse=True)
def numba_backend():
    with fn.use_backend("numba"):
        yield


BINARY_LOSSES = {"mse": fn.MSELoss, "bce-logits": fn.BCEWithLogitsLoss, "bce": fn.BCELoss}


def _problem(kind, act, dtype):
    if kind in BINARY_LOSSES:
        X, y = xor(n_repeats=3)
        model = fn.Sequential(fn.Linear(2, 8), act(), fn.Linear(8, 1),
                              *([fn.Sigmoid()] if kind == "bce" else []))
        return X.astype(dtype), y.astype(dtype), model, BINARY_LOSSES[kind]()
    X, y = load_digits("train")
    X, y = X[:150].astype(dtype), y[:150]
    model = fn.Sequential(fn.Linear(64, 24), act(), fn.Linear(24, 16), act(), fn.Linear(16, 10))
    return X, y, model, fn.CrossEntropyLoss()


OPTIMIZERS = {
    "sgd": lambda p: fn.SGD(p, lr=0.05),
    "sgd-nesterov-wd": lambda p: fn.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": lambda p: fn.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
    "adam": lambda p: fn.Adam(p, lr=0.01),
    "adam-wd": lambda p: fn.Adam(p, lr=0.01, weight_decay=1e-2),
    "adamw": lambda p: fn.AdamW(p, lr=0.01),
}
ACTIVATIONS = {
    "relu": fn.ReLU, "tanh": fn.Tanh, "sigmoid": fn.Sigmoid, "gelu": fn.GELU,
    "leaky": lambda: fn.LeakyReLU(0.1), "leaky-negative": lambda: fn.LeakyReLU(-0.5),
}


def _train(fast, monkeypatch, kind, act, opt, dtype, epochs=4, **fit_kwargs):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1" if fast else "0")
    fn.set_default_dtype(dtype)
    try:
        fn.manual_seed(3)
        X, y, model, loss = _problem(kind, ACTIVATIONS[act], dtype)
        optimizer = OPTIMIZERS[opt](model.parameters())
        assert (plan_fast_path(model, loss, optimizer) is not None) == fast
        history = fn.fit(model, loss, optimizer, X, y, epochs=epochs, batch_size=16, seed=7,
                         progress=False, **fit_kwargs)
        assert history.step_path.startswith("compiled") == fast, history.step_path
    finally:
        fn.set_default_dtype(np.float32)
    return history, model.state_dict(), optimizer


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", ["mse", "xent"])
def test_same_numbers_as_ordinary_path_float64(monkeypatch, kind, act, opt):
    h_slow, w_slow, o_slow = _train(False, monkeypatch, kind, act, opt, np.float64)
    h_fast, w_fast, o_fast = _train(True, monkeypatch, kind, act, opt, np.float64)
    np.testing.assert_allclose(h_fast.loss, h_slow.loss, rtol=1e-11)
    assert {type(v) for v in h_fast.loss + h_slow.loss} == {float}  # plain floats on both paths
    for name in w_slow:
        np.testing.assert_allclose(w_fast[name], w_slow[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert o_fast.step_count == o_slow.step_count
    for key, value in o_slow.state_dict().items():
        if value.dtype.kind == "f" and value.ndim:
            np.testing.assert_allclose(o_fast.state_dict()[key], value, rtol=1e-8, atol=1e-12)


# BCE: every optimizer with one activation, every activation with one optimizer.
@pytest.mark.parametrize("act,opt", [("tanh", o) for o in sorted(OPTIMIZERS)]
                         + [(a, "adam") for a in sorted(ACTIVATIONS) if a != "tanh"])
@pytest.mark.parametrize("kind", ["bce-logits", "bce"])
def test_bce_same_numbers_as_ordinary_path_float64(monkeypatch, kind, act, opt):
    test_same_numbers_as_ordinary_path_float64(monkeypatch, kind, act, opt)


@pytest.mark.parametrize("kind,act,opt", [("mse", "relu", "adam"), ("xent", "tanh", "sgd-nesterov-wd"),
                                          ("bce-logits", "relu", "sgd"), ("bce", "tanh", "adamw")])
def test_same_numbers_as_ordinary_path_float32(monkeypatch, kind, act, opt):
    h_slow, w_slow, _ = _train(False, monkeypatch, kind, act, opt, np.float32)
    h_fast, w_fast, _ = _train(True, monkeypatch, kind, act, opt, np.float32)
    np.testing.assert_allclose(h_fast.loss, h_slow.loss, rtol=1e-4)
    for name in w_slow:
        assert w_fast[name].dtype == np.float32
        np.testing.assert_allclose(w_fast[name], w_slow[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_stop_when_and_validation_still_per_epoch(monkeypatch):
    seen = []
    history, _, _ = _train(True, monkeypatch, "mse", "tanh", "adam", np.float32, epochs=50,
                           stop_when=lambda h: seen.append(len(h.loss)) or len(h.loss) == 5)
    assert history.epochs_run == 5 and seen == [1, 2, 3, 4, 5]


# lr=1e30 overflows on purpose; the GEMMs run without errstate (it costs more than the op)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_divergence_names_epoch_and_batch(monkeypatch):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")
    X, y = xor(n_repeats=8)  # 32 samples: 2 batches of 16
    model = fn.Sequential(fn.Linear(2, 8), fn.ReLU(), fn.Linear(8, 1))
    opt = fn.SGD(model.parameters(), lr=1e30)
    with pytest.raises(fn.TrainingDiverged, match=r"epoch \d+, batch \d+ of 2"):
        fn.fit(model, fn.MSELoss(), opt, X, y * 1e10, epochs=50, batch_size=16, progress=False)


def test_resume_matches_one_run(monkeypatch):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")

    def fresh():
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))
        return model, fn.Adam(model.parameters(), lr=0.01)

    X, y = xor(n_repeats=4)
    model, opt = fresh()
    fn.fit(model, fn.MSELoss(), opt, X, y, epochs=6, batch_size=5, seed=1, progress=False)
    model2, opt2 = fresh()
    fn.fit(model2, fn.MSELoss(), opt2, X, y, epochs=2, batch_size=5, seed=1, progress=False)
    state = {"model": model2.state_dict(), "optimizer": opt2.state_dict()}
    model3, opt3 = fresh()
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["optimizer"])
    fn.fit(model3, fn.MSELoss(), opt3, X, y, epochs=4, batch_size=5, seed=1, progress=False,
           initial_epoch=2)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(model3.state_dict()[name], value)


def test_not_used_where_it_does_not_apply(monkeypatch):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")
    big = fn.Sequential(fn.Linear(256, 256), fn.ReLU(), fn.Linear(256, 1))
    assert plan_fast_path(big, fn.MSELoss(), fn.Adam(big.parameters())) is None
    small = fn.Sequential(fn.Linear(2, 4), fn.ReLU(), fn.Linear(4, 1))
    assert plan_fast_path(small, fn.BCEWithLogitsLoss(), fn.Adam(small.parameters())) is not None
    # BCELoss only after a final sigmoid: other outputs need the ordinary path's range check.
    assert plan_fast_path(small, fn.BCELoss(), fn.Adam(small.parameters())) is None
    squashed = fn.Sequential(fn.Linear(2, 4), fn.ReLU(), fn.Linear(4, 1), fn.Sigmoid())
    assert plan_fast_path(squashed, fn.BCELoss(), fn.Adam(squashed.parameters())) is not None
    assert plan_fast_path(small, fn.MSELoss(), fn.RMSprop(small.parameters())) is None
    extra = fn.Parameter(np.zeros(3, np.float32))
    assert plan_fast_path(small, fn.MSELoss(), fn.Adam(small.parameters() + [extra])) is None
    # a parameter that sat out a step (no gradient) has its own Adam step count
    opt = fn.Adam(small.parameters())
    small[0].weight.grad = np.ones((2, 4), np.float32)
    opt.step()
    assert not opt.uniform_steps and plan_fast_path(small, fn.MSELoss(), opt) is None
    with fn.use_backend("numpy"):
        m = fn.Sequential(fn.Linear(2, 4), fn.ReLU(), fn.Linear(4, 1))
        assert plan_fast_path(m, fn.MSELoss(), fn.Adam(m.parameters())) is None


def test_bad_input_still_gets_the_ordinary_error(monkeypatch):
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")
    model = fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(4, 1))
    opt = fn.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"Linear\(3 -> 4\): expected input \(\.\.\., 3\), got"):
        fn.fit(model, fn.MSELoss(), opt, np.zeros((4, 2)), np.zeros((4, 1)), progress=False)
    with pytest.raises(ValueError, match="reshape the target"):
        fn.fit(model, fn.MSELoss(), opt, np.zeros((4, 3)), np.zeros(4), progress=False)


def test_auto_mode_compiles_only_when_it_pays(monkeypatch):
    from fastnn import compiled
    from fastnn.backends import numba_mlp

    monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)

    class ColdKernel:  # neither compiled in this process nor cached on disk
        signatures = []

    monkeypatch.setattr(numba_mlp, "train_mlp", ColdKernel())
    monkeypatch.setattr(compiled, "_on_disk", lambda kernel: False)
    assert not compiled.worth_compiling(steps=1000)  # 40 ms of ordinary steps: not worth 3 s
    assert compiled.worth_compiling(steps=1_000_000)
    monkeypatch.setattr(compiled, "_on_disk", lambda kernel: True)
    assert compiled.worth_compiling(steps=1)
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")
    monkeypatch.setattr(compiled, "_on_disk", lambda kernel: False)
    assert compiled.worth_compiling(steps=1)


@pytest.mark.parametrize("fast", [False, True])
def test_stopped_batch_gets_the_ordinary_paths_error(monkeypatch, fast):
    """Where the kernel stops at a non-finite loss, fit raises what the ordinary
    path raises for that batch: BCELoss on NaN predictions is an InputError,
    BCEWithLogitsLoss on NaN logits a divergence (named by epoch and batch)."""
    monkeypatch.setenv("FASTNN_FAST_PATH", "1" if fast else "0")
    X, y = xor(n_repeats=8)  # 32 samples: 2 batches of 16
    for loss, error, message in [
        (fn.BCELoss(), fn.InputError, r"BCELoss: predictions must be probabilities .* got nan"),
        (fn.BCEWithLogitsLoss(), fn.TrainingDiverged, r"loss became nan at epoch 1, batch 1 of 2"),
    ]:
        model = fn.Sequential(fn.Linear(2, 4), fn.Tanh(), fn.Linear(4, 1),
                              *([fn.Sigmoid()] if type(loss) is fn.BCELoss else []))
        model[2].weight.data[0, 0] = np.nan  # as a diverged step leaves it
        opt = fn.SGD(model.parameters(), lr=0.1)
        assert (plan_fast_path(model, loss, opt) is not None) == fast
        with pytest.raises(error, match=message):
            fn.fit(model, loss, opt, X, y, epochs=1, batch_size=16, progress=False)
        assert opt.step_count == 0 and np.isfinite(model[0].weight.data).all()


def test_kernels_share_the_loss_codes():
    from fastnn import compiled
    from fastnn.backends import numba_mlp

    want = {fn.MSELoss: numba_mlp.LOSS_MSE, fn.CrossEntropyLoss: numba_mlp.LOSS_XENT,
            fn.BCEWithLogitsLoss: numba_mlp.LOSS_BCE_LOGITS, fn.BCELoss: numba_mlp.LOSS_BCE}
    assert compiled.LOSS_KINDS == want  # cuda_mlp's: tests/test_cuda_mlp.py


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_on_saturated_sigmoid_is_clamped_like_the_ordinary_path(monkeypatch, dtype):
    """Probabilities of exactly 0 and 1 (log = -inf, clamped at -100; the
    gradient's denominator at its epsilon) give the ordinary path's numbers."""
    X, y = xor(n_repeats=2)
    runs = []
    for fast in (False, True):
        monkeypatch.setenv("FASTNN_FAST_PATH", "1" if fast else "0")
        fn.set_default_dtype(dtype)
        try:
            fn.manual_seed(1)
            model = fn.Sequential(fn.Linear(2, 4), fn.ReLU(), fn.Linear(4, 1), fn.Sigmoid())
            model[2].weight.data[...] = np.array([[800.0], [-800.0], [800.0], [-800.0]], dtype)
            model[2].bias.data[...] = -400.0
            opt = fn.SGD(model.parameters(), lr=0.1)
            h = fn.fit(model, fn.BCELoss(), opt, X.astype(dtype), 1 - y.astype(dtype), epochs=3,
                       batch_size=4, shuffle=False, progress=False)
        finally:
            fn.set_default_dtype(np.float32)
        assert h.step_path.startswith("compiled") == fast
        runs.append((np.array(h.loss), model.state_dict()))
    (slow, w_slow), (quick, w_quick) = runs
    assert slow.max() > 20  # really saturated: clamped terms of 100
    np.testing.assert_allclose(quick, slow, rtol=1e-6)
    for name in w_slow:
        np.testing.assert_allclose(w_quick[name], w_slow[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_first_epoch_is_its_own_compiled_call(monkeypatch):
    """Without a progress bar or validation the compiled path runs many epochs
    per call; the first runs alone, so its one-time start-up (loading the
    kernel) stays out of History.steady_samples_per_second."""
    monkeypatch.setenv("FASTNN_FAST_PATH", "1")
    X, y = xor(n_repeats=8)
    model = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))
    h = fn.fit(model, fn.MSELoss(), fn.Adam(model.parameters()), X, y, epochs=6, batch_size=8,
               progress=False)
    assert h.step_path.startswith("compiled") and len(h.epoch_seconds) == 6
    later = h.epoch_seconds[1:]
    assert len(set(later)) == 1 and h.epoch_seconds[0] != later[0]  # one call, then the rest
    assert h.steady_samples_per_second == pytest.approx(len(X) * 5 / sum(later))
