"""Bad input gives a clear error whose message names the layer and the shapes/values.

Never a bare NumPy broadcasting error, never a silently wrong result.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import fastnn as fn


def f32(*shape, value=1.0):
    return np.full(shape, value, dtype=np.float32)


# --------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("shape", [(4, 2), (2,), (2, 5, 2), (4, 4), (4, 0)])
def test_linear_wrong_input_width_names_layer_and_shapes(shape, backend):
    layer = fn.Linear(3, 4)
    expected = f"Linear(3 -> 4): expected input (..., 3), got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        layer(backend.asarray(np.ones(shape, np.float32)))
    assert isinstance(info.value, fn.ShapeError) and isinstance(info.value, fn.FastnnError)


def test_linear_example_message_from_the_api(backend):
    with pytest.raises(fn.ShapeError) as info:
        fn.Linear(3, 4)(backend.asarray(f32(4, 2)))
    assert str(info.value) == "Linear(3 -> 4): expected input (..., 3), got (4, 2)"


def test_linear_inside_sequential_names_the_failing_layer(backend):
    model = fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(5, 2))
    with pytest.raises(fn.ShapeError, match=re.escape("Linear(5 -> 2): expected input (..., 5), got (6, 4)")):
        model(backend.asarray(f32(6, 3)))


def test_linear_backward_with_a_wrong_dy_shape(backend):
    layer = fn.Linear(3, 4)
    layer(backend.asarray(f32(6, 3)))
    with pytest.raises(ValueError, match=re.escape("Linear(3 -> 4)") + r".*\(6, 4\).*\(6, 3\)"):
        layer.backward(backend.asarray(f32(6, 3)))


def test_backward_before_forward(backend):
    with pytest.raises(RuntimeError, match=re.escape("Linear(3 -> 4)") + ".*before forward"):
        fn.Linear(3, 4).backward(backend.asarray(f32(2, 4)))
    with pytest.raises(RuntimeError, match="ReLU.*before forward"):
        fn.ReLU().backward(backend.asarray(f32(2, 4)))


def test_activation_backward_with_a_wrong_dy_shape(backend):
    act = fn.Tanh()
    act(backend.asarray(f32(2, 3)))
    with pytest.raises(ValueError, match=r"Tanh.*\(2, 3\).*\(3, 2\)"):
        act.backward(backend.asarray(f32(3, 2)))


@pytest.mark.parametrize("dy_shape", [(4, 1), (3,), (3, 4)])
def test_softmax_backward_with_a_wrong_dy_shape(backend, dy_shape):
    """No broadcasting a (4, 1) or (3,) dy against the saved (4, 3) output."""
    s = fn.Softmax()
    s(backend.asarray(f32(4, 3)))
    with pytest.raises(fn.ShapeError, match=re.escape(f"Softmax: backward expected dy (4, 3), got {dy_shape}")):
        s.backward(backend.asarray(np.ones(dy_shape, np.float32)))


@pytest.mark.parametrize("make", [fn.ReLU, fn.Sigmoid, fn.Softmax])
def test_activation_of_non_numbers_is_a_dtype_error(backend, make):
    with pytest.raises(fn.DTypeError, match=r"input must be real numbers, got an array of"):
        make()(np.array([["a", "b"]]))


def test_linear_takes_numpy_integer_sizes(backend):
    layer = fn.Linear(np.int64(3), np.int32(4))  # e.g. y.max() + 1 classes
    assert (layer.in_features, layer.out_features) == (3, 4)
    assert type(layer.in_features) is int and layer.weight.shape == (3, 4)


def test_save_into_a_missing_folder_names_the_users_path(tmp_path):
    path = tmp_path / "nodir" / "model.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(path)))):
        fn.save(fn.Linear(2, 2), path)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True, None, np.bool_(True), np.float64(3)])
def test_linear_bad_sizes(bad, backend):
    with pytest.raises(ValueError, match=r"Linear: in_features must be a positive int"):
        fn.Linear(bad, 3)
    with pytest.raises(ValueError, match=r"Linear: out_features must be a positive int"):
        fn.Linear(3, bad)


def test_unknown_init(backend):
    with pytest.raises(ValueError, match=re.escape("Linear(3 -> 2): unknown init 'glorot'")) as info:
        fn.Linear(3, 2, init="glorot")
    assert "he" in str(info.value) and "xavier" in str(info.value)


def test_init_callable_returning_the_wrong_shape(backend):
    with pytest.raises(ValueError, match=re.escape("Linear(3 -> 2)") + r".*\(2, 3\).*\(3, 2\)"):
        fn.Linear(3, 2, init=lambda shape, rng: np.zeros((2, 3)))


def test_sequential_of_a_non_module(backend):
    with pytest.raises(TypeError, match="Sequential: item 1 is a str"):
        fn.Sequential(fn.Linear(2, 3), "relu")


def test_linear_given_another_libraries_tensor_says_how_to_convert(backend):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=re.escape("fastnn.asarray")):
        fn.Linear(3, 2)(torch.ones(4, 3))


# --------------------------------------------------------------------------- losses
def test_mse_refuses_to_broadcast_an_N_target_against_N_by_1(backend):
    pred = backend.asarray(f32(5, 1))
    with pytest.raises(ValueError, match=re.escape(
            "MSELoss: target shape (5,) does not match prediction shape (5, 1)")) as info:
        fn.MSELoss()(pred, backend.asarray(f32(5)))
    assert "reshape" in str(info.value)
    with pytest.raises(fn.ShapeError, match=re.escape("(1, 5)")):
        fn.MSELoss()(pred, backend.asarray(f32(1, 5)))
    with pytest.raises(fn.ShapeError, match=re.escape("(5, 2)")):
        fn.MSELoss()(pred, backend.asarray(f32(5, 2)))


@pytest.mark.parametrize("loss_cls", [fn.BCELoss, fn.BCEWithLogitsLoss])
def test_binary_losses_refuse_mismatched_shapes(loss_cls, backend):
    with pytest.raises(fn.ShapeError, match=loss_cls.__name__ + r".*\(4,\).*\(4, 1\)"):
        loss_cls()(backend.asarray(f32(4, 1, value=0.5)), backend.asarray(f32(4)))


def test_cross_entropy_float_labels_are_a_type_error(backend):
    logits = backend.asarray(f32(5, 3))
    with pytest.raises(TypeError, match=r"CrossEntropyLoss: labels must be integer.*float32") as info:
        fn.CrossEntropyLoss()(logits, backend.asarray(np.zeros(5, np.float32)))
    assert isinstance(info.value, fn.DTypeError)
    with pytest.raises(TypeError, match=r"one-hot.*argmax"):
        fn.CrossEntropyLoss()(logits, backend.asarray(np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]))


@pytest.mark.parametrize("labels,lo,hi", [([0, 1, 2, 3, 0], 0, 3), ([0, -1, 2, 1, 0], -1, 2), ([7] * 5, 7, 7)])
def test_cross_entropy_labels_out_of_range(labels, lo, hi, backend):
    with pytest.raises(ValueError, match=re.escape(
            f"CrossEntropyLoss: labels must be in [0, 2] for 3 classes, got values in [{lo}, {hi}]")):
        fn.CrossEntropyLoss()(backend.asarray(f32(5, 3)), backend.asarray(np.array(labels)))


@pytest.mark.parametrize("shape", [(5, 1), (4,), (6,), (1, 5)])
def test_cross_entropy_wrong_label_shape(shape, backend):
    with pytest.raises(ValueError, match=re.escape(
            f"CrossEntropyLoss: expected labels (5,) for logits (5, 3), got {shape}")):
        fn.CrossEntropyLoss()(backend.asarray(f32(5, 3)), backend.asarray(np.zeros(shape, np.int64)))


def test_cross_entropy_wrong_logits_rank(backend):
    with pytest.raises(fn.ShapeError, match=re.escape("CrossEntropyLoss: expected logits (N, C), got (5,)")):
        fn.CrossEntropyLoss()(backend.asarray(f32(5)), backend.asarray(np.zeros(5, np.int64)))


@pytest.mark.parametrize("values,shown", [([0.5, 1.2], "[0.5, 1.2]"), ([-0.1, 0.2], "[-0.1, 0.2]"),
                                          ([np.nan, 0.2], "nan")])
def test_bce_outside_0_1(values, shown, backend):
    pred = backend.asarray(np.array(values, np.float32).reshape(2, 1))
    with pytest.raises(ValueError, match=r"BCELoss: predictions must be probabilities in \[0, 1\]") as info:
        fn.BCELoss()(pred, backend.asarray(f32(2, 1)))
    assert shown in str(info.value)
    assert "BCEWithLogitsLoss" in str(info.value), "points to the logits version"


def test_loss_backward_before_forward(backend):
    with pytest.raises(RuntimeError, match="MSELoss: backward"):
        fn.MSELoss().backward()


def test_loss_on_integer_predictions(backend):
    with pytest.raises(TypeError, match="MSELoss: predictions must be floating point"):
        fn.MSELoss()(backend.asarray(np.ones((2, 1), np.int64)), backend.asarray(f32(2, 1)))


# --------------------------------------------------------------------------- fit / predict
def _setup():
    model = fn.Linear(2, 1)
    return model, fn.MSELoss(), fn.SGD(model.parameters(), lr=0.1)


def test_fit_mismatched_lengths(backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match=re.escape("fit: X has 5 samples but y has shape (4, 1)")):
        fn.fit(m, loss, opt, f32(5, 2), f32(4, 1), progress=False)


def test_fit_empty_data(backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match=re.escape("fit: X is empty (shape (0, 2))")):
        fn.fit(m, loss, opt, f32(0, 2), f32(0, 1), progress=False)
    with pytest.raises(ValueError, match="fit: X is empty"):
        fn.fit(m, loss, opt, [], [], progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_non_finite_x(bad, backend):
    m, loss, opt = _setup()
    X = f32(5, 2)
    X[3, 1] = bad
    with pytest.raises(ValueError, match=re.escape("fit: X contains NaN or inf (first at index (3, 1))")):
        fn.fit(m, loss, opt, X, f32(5, 1), progress=False)
    assert np.isfinite(fn.to_numpy(m.weight.data)).all(), "no step was taken"


def test_fit_non_finite_y(backend):
    m, loss, opt = _setup()
    y = f32(5, 1)
    y[0, 0] = np.nan
    with pytest.raises(ValueError, match="fit: y contains NaN or inf"):
        fn.fit(m, loss, opt, f32(5, 2), y, progress=False)


@pytest.mark.parametrize("bs", [0, -1, 2.5, "32", None, True])
def test_fit_bad_batch_size(bs, backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match=re.escape(f"fit: batch_size must be an int >= 1, got {bs!r}")):
        fn.fit(m, loss, opt, f32(5, 2), f32(5, 1), batch_size=bs, progress=False)


@pytest.mark.parametrize("epochs", [-1, 1.5])
def test_fit_bad_epochs(epochs, backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match="fit: epochs must be an int >= 0"):
        fn.fit(m, loss, opt, f32(5, 2), f32(5, 1), epochs=epochs, progress=False)


def test_fit_wrong_feature_count_names_the_layer(backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match=re.escape("Linear(2 -> 1): expected input (..., 2), got (5, 3)")):
        fn.fit(m, loss, opt, f32(5, 3), f32(5, 1), batch_size=8, progress=False)


def test_fit_N_target_for_N_by_1_output_is_an_error_not_a_broadcast(backend):
    m, loss, opt = _setup()
    with pytest.raises(ValueError, match=re.escape("target shape (5,) does not match prediction shape (5, 1)")):
        fn.fit(m, loss, opt, f32(5, 2), f32(5), batch_size=8, progress=False)


def test_fit_other_bad_arguments(backend):
    m, loss, opt = _setup()
    with pytest.raises(TypeError, match="fit: model must be a fastnn Module"):
        fn.fit(lambda x: x, loss, opt, f32(5, 2), f32(5, 1), progress=False)
    with pytest.raises(TypeError, match="stop_when"):
        fn.fit(m, loss, opt, f32(5, 2), f32(5, 1), stop_when=3, progress=False)
    with pytest.raises(ValueError, match="validation_data"):
        fn.fit(m, loss, opt, f32(5, 2), f32(5, 1), validation_data=(f32(3, 2),), progress=False)
    with pytest.raises(ValueError, match=re.escape("fit(validation_data): X has 3 samples but y has shape (2, 1)")):
        fn.fit(m, loss, opt, f32(5, 2), f32(5, 1), validation_data=(f32(3, 2), f32(2, 1)), progress=False)
    with pytest.raises(TypeError, match="X must be numeric"):
        fn.fit(m, loss, opt, np.array([["a", "b"]] * 5), f32(5, 1), progress=False)


def test_predict_bad_input(backend):
    m, _, _ = _setup()
    with pytest.raises(ValueError, match=re.escape("predict: X is empty")):
        fn.predict(m, f32(0, 2))
    with pytest.raises(ValueError, match=re.escape("predict: batch_size must be an int >= 1, got 0")):
        fn.predict(m, f32(3, 2), batch_size=0)
    with pytest.raises(ValueError, match=re.escape("Linear(2 -> 1): expected input (..., 2), got (3, 5)")):
        fn.predict(m, f32(3, 5))


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", ["tensorflow", "gpu", "numpyy", ""])
def test_unknown_backend_name(name, backend):
    with pytest.raises(ValueError, match=r"unknown backend .*expected one of") as info:
        fn.use_backend(name)
    assert repr(name.lower().strip()) in str(info.value) and "numba" in str(info.value)
    assert not isinstance(info.value, fn.BackendUnavailable)
    assert fn.get_backend() is backend, "a failed switch leaves the backend alone"


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("cls", [fn.SGD, fn.Adam, fn.AdamW, fn.RMSprop])
def test_optimizer_given_non_parameters_or_nothing(cls, backend):
    kw = {"lr": 0.1}
    with pytest.raises(TypeError, match=f"{cls.__name__}: item 0 is a numpy.ndarray, expected a fastnn Parameter"):
        cls([np.zeros(3, np.float32)], **kw)
    model = fn.Linear(2, 2)
    with pytest.raises(TypeError, match=f"{cls.__name__}: item 2 is a str"):
        cls(model.parameters() + ["bias"], **kw)
    with pytest.raises(ValueError, match=f"{cls.__name__}: got an empty parameter list"):
        cls([], **kw)
    with pytest.raises(ValueError, match="empty parameter list"):
        cls(fn.ReLU().parameters(), **kw)
    with pytest.raises(TypeError, match="single Parameter"):
        cls(model.weight, **kw)
    with pytest.raises(TypeError):  # a Module is not an iterable of Parameters
        cls(model, **kw)


@pytest.mark.parametrize("cls,kw,name", [
    (fn.SGD, dict(lr=-0.1), "lr"), (fn.SGD, dict(lr=float("nan")), "lr"),
    (fn.SGD, dict(lr=0.1, momentum=-1), "momentum"), (fn.Adam, dict(eps=-1), "eps"),
    (fn.RMSprop, dict(alpha=-0.5), "alpha"), (fn.AdamW, dict(weight_decay=-1), "weight_decay"),
])
def test_optimizer_bad_hyper_parameters(cls, kw, name, backend):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {name} must be"):
        cls(fn.Linear(2, 2).parameters(), **kw)


def test_optimizer_bad_betas_and_nesterov(backend):
    p = fn.Linear(2, 2).parameters()
    with pytest.raises(ValueError, match=re.escape("Adam: betas must be two numbers in [0, 1), got (0.9, 1.0)")):
        fn.Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        fn.SGD(p, lr=0.1, nesterov=True)


def test_optimizer_load_state_dict_from_another_model_or_optimizer(backend):
    a_model = fn.Linear(2, 3)
    a = fn.Adam(a_model.parameters(), lr=0.5)
    a_model.weight.grad = backend.asarray(np.ones((2, 3), np.float32))
    a.step()
    # same padded flat-buffer length (2x3+3 and 4x3+3 both pad to 32): caught by the shapes
    b = fn.Adam(fn.Linear(4, 3).parameters())
    with pytest.raises(ValueError, match=re.escape(
            "Adam.load_state_dict: the state is for parameters (2, 3) (3,), "
            "this optimizer has (4, 3) (3,) (different model?)")):
        b.load_state_dict(a.state_dict())
    assert b.step_count == 0 and b.lr == 1e-3, "a failed load changes nothing"
    # a different flat-buffer length
    c = fn.Adam(fn.Linear(20, 3).parameters())
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: .*\(2, 3\) \(3,\).*\(20, 3\) \(3,\)"):
        c.load_state_dict(a.state_dict())
    sgd = fn.SGD(fn.Linear(2, 3).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="SGD.load_state_dict: state is from Adam"):
        sgd.load_state_dict(a.state_dict())


# --------------------------------------------------------------------------- load_state_dict
def test_load_state_dict_wrong_shapes_and_keys(backend):
    model = fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(4, 2))
    state = model.state_dict()
    with pytest.raises(ValueError, match=re.escape(
            "Sequential.load_state_dict: '0.weight' expects shape (3, 4), got (4, 3)")) as info:
        model.load_state_dict(dict(state, **{"0.weight": np.zeros((4, 3), np.float32)}))
    assert isinstance(info.value, fn.ShapeError)
    with pytest.raises(ValueError, match=re.escape("'2.bias' expects shape (2,), got (2, 1)")):
        model.load_state_dict(dict(state, **{"2.bias": np.zeros((2, 1), np.float32)}))
    with pytest.raises(KeyError, match=re.escape("missing keys ['2.bias']")) as info:
        model.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    # a ValueError and a FastnnError too, with the message as written (no repr quotes)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fn.FastnnError)
    assert str(info.value).startswith("Sequential.load_state_dict: missing keys")
    with pytest.raises(KeyError, match=re.escape("unexpected keys ['2.gamma']")):
        model.load_state_dict(dict(state, **{"2.gamma": np.zeros(2, np.float32)}))
    # nothing was half-loaded by the failed calls
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


# --------------------------------------------------------------------------- gradcheck
class _Scaled(fn.Module):
    """y = x * w; a user module whose backward is deliberately wrong somewhere."""

    wrong = "nothing"

    def __init__(self):
        self.w = fn.Parameter(fn.asarray(np.array([0.5, -1.0, 2.0])))

    def forward(self, x):
        self.x = x
        return x * self.w.data

    def backward(self, dy):
        g = (dy * self.x).reshape(-1, 3).sum(axis=0)
        if self.wrong == "param":
            g = 2 * g
        self.w.grad = g if self.w.grad is None else self.w.grad + g
        dx = dy * self.w.data
        return 2 * dx if self.wrong == "input" else dx


class DoubledInputGrad(_Scaled):
    wrong = "input"


class TwoWrongGrads(_Scaled):
    """Input gradient 2% off, parameter gradient 3x: the parameter is the worst."""

    def backward(self, dy):
        g = 3 * (dy * self.x).reshape(-1, 3).sum(axis=0)
        self.w.grad = g if self.w.grad is None else self.w.grad + g
        return 1.02 * dy * self.w.data


class DoubledParamGrad(_Scaled):
    wrong = "param"


def test_gradcheck_passes_a_correct_user_module(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    assert fn.gradcheck(_Scaled(), x, raise_on_fail=True).passed


def test_gradcheck_names_a_wrong_input_gradient(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(AssertionError, match=r"gradcheck failed for DoubledInputGrad input \(4, 3\)") as info:
        fn.gradcheck(DoubledInputGrad(), x, raise_on_fail=True)
    assert "analytic" in str(info.value) and "numeric" in str(info.value)
    report = fn.gradcheck(DoubledInputGrad(), x)  # without raise_on_fail: a report
    assert not report.passed and not report
    failing = {e.name for e in report.entries if not e.passed}
    assert failing == {"input"}
    np.testing.assert_allclose(report.worst.analytic, 2 * report.worst.numeric, rtol=1e-6)


def test_gradcheck_names_a_wrong_parameter_gradient(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(AssertionError, match=r"gradcheck failed for DoubledParamGrad w \(3,\)"):
        fn.gradcheck(DoubledParamGrad(), x, raise_on_fail=True)
    # nested: the dotted name of the offending tensor
    model = fn.Sequential(fn.Linear(3, 3), fn.Tanh(), DoubledParamGrad())
    with pytest.raises(AssertionError, match=r"gradcheck failed for Sequential 2\.w \(3,\)"):
        fn.gradcheck(model, x, raise_on_fail=True)
    report = fn.gradcheck(model, x)
    assert {e.name for e in report.entries if not e.passed} == {"2.w"}


def test_gradcheck_raises_with_the_worst_offender(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    report = fn.gradcheck(TwoWrongGrads(), x)
    assert {e.name for e in report.entries if not e.passed} == {"input", "w"}
    assert report.worst.name == "w"
    with pytest.raises(AssertionError, match=r"gradcheck failed for TwoWrongGrads w \(3,\)"):
        fn.gradcheck(TwoWrongGrads(), x, raise_on_fail=True)


class NaNParamGrad(_Scaled):
    """Parameter gradient NaN, input gradient 2% off: the NaN is the worst."""

    def backward(self, dy):
        self.w.grad = self.w.data * np.nan
        return 1.02 * dy * self.w.data


def test_gradcheck_counts_a_nan_gradient_as_the_worst(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((4, 3)))
    assert fn.gradcheck(NaNParamGrad(), x).worst.name == "w"
    with pytest.raises(AssertionError, match=r"gradcheck failed for NaNParamGrad w \(3,\)"):
        fn.gradcheck(NaNParamGrad(), x, raise_on_fail=True)


def test_gradcheck_wrong_dy_shape(backend):
    x = backend.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"gradcheck: dy has shape \(3, 4\), output is \(4, 3\)"):
        fn.gradcheck(_Scaled(), x, dy=np.ones((3, 4)))


def test_set_default_dtype_refuses_integers(backend):
    with pytest.raises(TypeError, match="set_default_dtype: expected float32 or float64, got int32"):
        fn.set_default_dtype(np.int32)
    assert fn.get_default_dtype() == np.float32


def test_friendly_hints_for_common_beginner_mistakes(backend):
    model = fn.Sequential(fn.Linear(3, 2))
    with pytest.raises(ValueError, match=re.escape("for one sample pass X[None, :]")):
        fn.predict(model, np.ones(3, np.float32))
    with pytest.raises(TypeError, match=re.escape("Sequential(*layers)")):
        fn.Sequential([fn.Linear(2, 2)])
    with pytest.raises(TypeError, match=re.escape("labels.astype(int)")):
        fn.CrossEntropyLoss()(backend.asarray(np.zeros((2, 3), np.float32)),
                              backend.asarray(np.array([0.0, 1.0], np.float32)))


def test_out_of_memory_names_the_layer_and_the_size(backend, monkeypatch):
    model = fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(4, 2))
    x = backend.asarray(np.ones((5, 3), np.float32))

    def no_memory(shape, dtype):
        raise MemoryError("simulated: the device is full")

    monkeypatch.setattr(backend, "empty", no_memory)
    with pytest.raises(fn.OutOfMemory, match=re.escape(
            "Linear(3 -> 4): out of memory allocating its 'z' buffer (5, 4) float32 (80 bytes)")):
        model(x)
    monkeypatch.undo()

    def gemm_fails(*args, **kwargs):
        raise MemoryError("cuBLAS workspace")

    monkeypatch.setattr(backend, "gemm", gemm_fails)
    with pytest.raises(MemoryError, match=re.escape("Linear(3 -> 4): out of memory in forward (5, 3) @ weight")):
        model(x)


def test_out_of_memory_in_an_activation_op_names_the_layer(backend, monkeypatch):
    """The fused bias+activation and activation backward may need scratch memory
    (a fallback's temporaries): running out names the layer, as a GEMM does."""
    fused = fn.Sequential(fn.Linear(3, 4), fn.ReLU())
    x = backend.asarray(np.ones((5, 3), np.float32))
    h = backend.asarray(np.ones((5, 4), np.float32))

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated: no scratch memory")

    with monkeypatch.context() as patch:
        patch.setattr(backend, "bias_act", no_memory)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "Linear(3 -> 4): out of memory in forward (bias + relu): simulated")):
            fused(x)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "Tanh: out of memory in forward (5, 4): simulated")):
            fn.Tanh()(h)
    tanh = fn.Tanh()
    tanh(h)
    with monkeypatch.context() as patch:
        patch.setattr(backend, "act_backward", no_memory)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "Tanh: out of memory in backward (5, 4): simulated")):
            tanh.backward(h)


def test_out_of_memory_outside_layers_names_what_was_allocated(backend, monkeypatch):
    """fit's data and batch buffers, the optimizer's flat buffers and a loss's
    gradient: each out-of-memory names who allocated what, and the bytes."""
    model = fn.Sequential(fn.Linear(3, 2))
    X, y = np.ones((10, 3), np.float32), np.zeros(10, np.int64)

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated: the device is full")

    def fit():
        fn.fit(model, fn.CrossEntropyLoss(), fn.SGD(model.parameters(), lr=0.1), X, y,
               epochs=1, batch_size=4, progress=False)

    with monkeypatch.context() as patch:
        patch.setattr(backend, "asarray", no_memory)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "fit: out of memory allocating X (10, 3) float32 and y (10,) int64 (200 bytes) "
                f"on {backend.device}; pass fewer samples at a time")):
            fit()
    with monkeypatch.context() as patch:
        patch.setattr(backend, "empty", no_memory)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "fit: out of memory allocating its batch buffers of 4 rows (80 bytes)")):
            fit()
    with monkeypatch.context() as patch:
        patch.setattr(backend, "zeros", no_memory)
        with pytest.raises(fn.OutOfMemory, match=r"optimizer: out of memory allocating flat "
                           r"parameter, gradient and 2 state buffers of \d+ float32 \(\d+ bytes\)"):
            fn.Adam(model.parameters())
    pred = backend.asarray(np.ones((5, 2), np.float32))
    target = backend.asarray(np.zeros((5, 2), np.float32))
    with monkeypatch.context() as patch:
        patch.setattr(backend, "empty", no_memory)
        with pytest.raises(fn.OutOfMemory, match=re.escape(
                "MSELoss: out of memory allocating its gradient buffer (5, 2) float32 (40 bytes)")):
            fn.MSELoss().forward(pred, target)  # the gradient is computed with the loss


def test_an_init_callable_may_return_a_backend_array(backend):
    """CuPy refuses np.asarray of its arrays: the init result goes through host_array."""
    layer = fn.Linear(2, 3, init=lambda shape, rng: backend.asarray(np.full(shape, 0.5, np.float32)))
    np.testing.assert_array_equal(fn.to_numpy(layer.weight.data), np.full((2, 3), 0.5))


def test_arrays_of_another_library_are_refused_naming_the_layer(backend):
    """Mixing arrays of two libraries (a torch tensor here; NumPy on CuPy alike)
    is a TypeError naming the layer or loss, never a silent copy per call."""
    torch = pytest.importorskip("torch")
    x = backend.asarray(np.ones((4, 3), np.float32))
    layer, act = fn.Linear(3, 2), fn.ReLU()
    layer(x)
    act(x)
    logits = backend.asarray(np.zeros((2, 3), np.float32))
    cases = {
        "Linear(3 -> 2): got input as a torch.Tensor": lambda: layer(torch.ones(4, 3)),
        "Linear(3 -> 2): got dy as a torch.Tensor": lambda: layer.backward(torch.ones(4, 2)),
        "ReLU: got input as a torch.Tensor": lambda: act(torch.ones(4, 3)),
        "ReLU: got dy as a torch.Tensor": lambda: act.backward(torch.ones(4, 3)),
        "relu: got input as a torch.Tensor": lambda: fn.functional.relu(torch.ones(2)),
        "MSELoss: got predictions as a torch.Tensor": lambda: fn.MSELoss()(torch.ones(2, 3), logits),
        "MSELoss: got targets as a torch.Tensor": lambda: fn.MSELoss()(logits, torch.ones(2, 3)),
        "CrossEntropyLoss: got labels as a torch.Tensor":
            lambda: fn.CrossEntropyLoss()(logits, torch.zeros(2, dtype=torch.int64)),
    }
    for message, call in cases.items():
        with pytest.raises(TypeError, match=re.escape(message + " but the current backend is "
                                                      f"{backend.name}; convert it")):
            call()
    assert fn.to_numpy(act.backward([[1.0] * 3] * 4)).shape == (4, 3)  # lists still welcome
    opt = fn.SGD(layer.parameters(), lr=0.1)
    layer.weight.grad = torch.ones(3, 2)
    with pytest.raises(TypeError, match=re.escape("optimizer: got the gradient of parameter "
                                                  "weight (3, 2) as a torch.Tensor")):
        opt.step()


def test_optimizer_and_load_state_dict_refuse_parameters_of_another_backend(backend):
    torch = pytest.importorskip("torch")
    layer = fn.Linear(3, 4)
    state = layer.state_dict()
    layer.weight.data = torch.zeros(3, 4)  # stands in for arrays of another backend
    with pytest.raises(TypeError, match=re.escape(f"model.to({backend.name!r})")) as info:
        fn.SGD(layer.parameters(), lr=0.1)
    assert "weight" in str(info.value) and "(3, 4)" in str(info.value)
    with pytest.raises(TypeError, match=re.escape(f"model.to({backend.name!r})")):
        layer.load_state_dict(state)


def test_optimizer_refuses_a_parameter_whose_dtype_changed_after_it(backend):
    layer = fn.Linear(3, 2)
    opt = fn.SGD(layer.parameters(), lr=0.1)
    layer.astype(np.float64)  # the optimizer's flat float32 slots would cast it back
    layer.zero_grad()
    x = backend.asarray(np.ones((4, 3)))
    layer.backward(layer(x))
    with pytest.raises(TypeError, match="create the optimizer after changing the model's dtype"):
        opt.step()


def test_parameters_of_another_backend_are_a_clear_error(backend):
    torch = pytest.importorskip("torch")
    layer = fn.Linear(3, 4)
    layer.weight.data = torch.zeros(3, 4)  # stands in for arrays of another backend
    with pytest.raises(TypeError, match=re.escape(f"model.to({backend.name!r})")):
        layer(backend.asarray(np.ones((2, 3), np.float32)))


# --------------------------------------------------------------------------- slips a beginner makes
def test_bce_targets_outside_0_1_are_refused_as_torch_does(backend):
    """A 0/255 mask as BCE targets gives a negative loss: refused, by the loss
    itself and by fit (once for the whole y, not per step)."""
    pred = backend.asarray(np.full((4, 1), 0.5, np.float32))
    with pytest.raises(ValueError, match=re.escape("BCELoss: targets must be in [0, 1], "
                                                   "got values in [0, 255]")):
        fn.BCELoss()(pred, backend.asarray(np.array([[0.0], [255.0], [0.0], [255.0]], np.float32)))
    model = fn.Sequential(fn.Linear(2, 1), fn.Sigmoid())
    X = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match=r"BCELoss: targets must be in \[0, 1\]"):
        fn.fit(model, fn.BCELoss(), fn.SGD(model.parameters(), lr=0.1), X,
               np.full((8, 1), 255, np.int64), epochs=1, progress=False)
    assert fn.BCELoss()(pred, backend.asarray(np.ones((4, 1), np.float32))) > 0


@pytest.mark.parametrize("kwargs, error, text", [
    ({"lr": "0.1"}, TypeError, "SGD: lr must be a number, got '0.1' (a str)"),
    ({"lr": [0.1]}, TypeError, "SGD: lr must be a number, got [0.1] (a list)"),
    ({"lr": 0.1, "momentum": "x"}, TypeError, "SGD: momentum must be a number"),
    ({"lr": True}, TypeError, "SGD: lr must be a number, got True"),
    ({"lr": float("nan")}, ValueError, "SGD: lr must be a finite number >= 0"),
])
def test_optimizer_hyper_parameters_of_the_wrong_type_are_named(backend, kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        fn.SGD(fn.Linear(2, 2).parameters(), **kwargs)


def test_adam_betas_must_be_a_pair_of_numbers(backend):
    params = fn.Linear(2, 2).parameters()
    with pytest.raises(ValueError, match=re.escape("Adam: betas must be a pair (beta1, beta2), got 0.9")):
        fn.Adam(params, betas=0.9)
    with pytest.raises(TypeError, match=re.escape("Adam: beta1 must be a number, got 'a'")):
        fn.Adam(params, betas=("a", "b"))
    with pytest.raises(TypeError, match="Adam: weight_decay must be a number"):
        fn.Adam(params, weight_decay="0")


def test_torch_parameters_given_to_an_optimizer_are_named_as_such(backend):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=re.escape(
            "Adam: item 0 is a torch.Parameter, expected a fastnn Parameter")):
        fn.Adam(torch.nn.Linear(2, 2).parameters())


def test_fit_names_a_class_for_an_instance_and_an_optimizer_of_another_model(backend):
    torch = pytest.importorskip("torch")
    model = fn.Sequential(fn.Linear(3, 1))
    X, y = np.ones((6, 3), np.float32), np.zeros((6, 1), np.float32)
    opt = fn.SGD(model.parameters(), lr=0.1)

    def fit(loss_fn, optimizer, **kw):
        fn.fit(model, loss_fn, optimizer, X, y, epochs=1, progress=False, **kw)

    with pytest.raises(TypeError, match=re.escape("fit: optimizer is the class Adam, not an "
                                                  "instance; pass e.g. fn.Adam(model.parameters())")):
        fit(fn.MSELoss(), fn.Adam)
    with pytest.raises(TypeError, match="fit: loss_fn is the class MSELoss, not an instance"):
        fit(fn.MSELoss, opt)
    with pytest.raises(TypeError, match=re.escape("a torch object: use fastnn's own")):
        fit(torch.nn.MSELoss(), opt)
    other = fn.SGD(fn.Sequential(fn.Linear(3, 1)).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the optimizer holds none of the model's 2 parameters"):
        fit(fn.MSELoss(), other)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
        fit(fn.MSELoss(), opt, seed=-1)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got 'a'"):
        fit(fn.MSELoss(), opt, seed="a")
    with pytest.raises(ValueError, match=re.escape("fit: X has shape (6,), expected a batch "
                                                   "(N, features); for one feature per sample "
                                                   "pass X[:, None]")):
        fn.fit(model, fn.MSELoss(), opt, X[:, 0], y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="fit: X cannot be read as an array"):
        fn.fit(model, fn.MSELoss(), opt, [[1, 2, 3], [1, 2]], [0, 0], epochs=1, progress=False)


def test_default_dtype_is_float32_or_float64(backend):
    with pytest.raises(TypeError, match="set_default_dtype: expected float32 or float64, got float16"):
        fn.set_default_dtype("float16")
    with pytest.raises(TypeError, match="set_default_dtype: 'foo' is not a dtype"):
        fn.set_default_dtype("foo")
    assert fn.get_default_dtype() == np.float32


def test_a_weight_assigned_to_data_that_cannot_work_is_named(backend):
    layer = fn.Linear(3, 2)
    x = np.ones((4, 3), np.float32)
    layer.weight.data = backend.asarray(np.ones((2, 3), np.float32))  # transposed
    with pytest.raises(ValueError, match=re.escape(
            "Linear(3 -> 2): weight.data has shape (2, 3), expected (3, 2)")):
        layer(x)
    layer.weight.data = backend.asarray(np.ones((3, 2), np.int64))
    with pytest.raises(TypeError, match=re.escape("Linear(3 -> 2): weight.data must be floating")):
        layer(x)
    layer.weight.data = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(TypeError, match=re.escape("Linear(3 -> 2): weight.data is a list")):
        layer(x)


def test_non_real_inputs_and_bad_layer_arguments_are_named(backend):
    layer = fn.Linear(4, 3)
    with pytest.raises(TypeError, match=re.escape("Linear(4 -> 3): input must be real numbers, got "
                                                  "an array of complex128")):
        layer(np.ones((2, 4), complex))
    with pytest.raises(TypeError, match=re.escape("Linear(4 -> 3): input must be real numbers")):
        layer(np.array([["a"] * 4]))
    with pytest.raises(ValueError, match=re.escape("Softmax(axis=5): input (2, 2) has no axis 5")):
        fn.Softmax(axis=5)(backend.asarray(np.ones((2, 2), np.float32)))
    with pytest.raises(TypeError, match="LeakyReLU: negative_slope must be a number, got 'a'"):
        fn.LeakyReLU("a")
    model = fn.Sequential(fn.Linear(4, 3))
    state = model.state_dict()
    state["0.weight"] = np.array([["a"] * 3] * 4)
    with pytest.raises(TypeError, match=re.escape("'0.weight' must hold real numbers")):
        model.load_state_dict(state)


def test_gradients_assigned_by_hand_are_checked_or_taken(backend):
    layer = fn.Linear(3, 2)
    opt = fn.SGD(layer.parameters(), lr=1.0)
    before = fn.to_numpy(layer.weight.data).copy()
    layer.weight.grad = backend.asarray(np.ones((3, 2)))  # float64 for a float32 parameter
    layer.bias.grad = None
    with pytest.raises(TypeError, match=re.escape(
            "grad is now float64, its slot float32; assign a gradient of the parameter's "
            "dtype (.astype('float32'))")):
        opt.step()
    layer.weight.grad = [[1.0, 1.0]] * 3  # a list: taken as the gradient
    opt.step()
    np.testing.assert_allclose(fn.to_numpy(layer.weight.data), before - 1.0)
    layer.weight.grad = backend.asarray(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=re.escape("grad has shape (2, 3), the parameter (3, 2)")):
        opt.step()


def test_string_targets_and_string_data_for_predict_are_named(backend):
    pred = backend.asarray(np.ones((2, 1), np.float32))
    with pytest.raises(TypeError, match="MSELoss: targets must be real numbers, got an array of <U1"):
        fn.MSELoss()(pred, np.array([["a"], ["b"]]))
    with pytest.raises(TypeError, match="predict: X must be numeric, got dtype <U1"):
        fn.predict(fn.Sequential(fn.Linear(3, 1)), np.array([["a", "b", "c"]]))



def test_warnings_name_the_first_line_outside_fastnn():
    """However deep in fastnn a warning starts, it is attributed to the caller's
    line (a fixed stacklevel would name one of fastnn's own lines)."""
    import linecache

    from fastnn import errors

    inside = errors._PACKAGE_DIR + "deep_inside.py"  # code that claims to be fastnn's
    code = compile("def deep():\n    warn_at_caller('from deep inside')\n"
                   "def middle():\n    deep()\n", inside, "exec")
    scope = {"warn_at_caller": errors.warn_at_caller}
    exec(code, scope)
    with pytest.warns(RuntimeWarning, match="from deep inside") as seen:
        scope["middle"]()
    assert [w.filename for w in seen] == [__file__]
    assert linecache.getline(__file__, seen[0].lineno).strip() == 'scope["middle"]()'
