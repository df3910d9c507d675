"""Layers, declaratively (in the spirit of Chainer's ``FunctionTestCase``).

Each ``LayerSpec`` says once how to build a module, which input shapes to feed
it and a NumPy reference forward ``(x, params) -> y`` (``params`` is the
module's ``state_dict()``). ``TestLayerSpec`` then runs, for every spec, input
shape and backend:

* forward against the reference, in float32 and float64;
* backward: ``dx`` and every ``.grad`` have the right shapes, and calling
  ``backward`` twice accumulates (doubles) the parameter gradients;
* ``fastnn.gradcheck(..., raise_on_fail=True)`` in float64.

The module-level tests below cover the rest of the Module API.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

import fastnn as fn


# --------------------------------------------------------------------------- references
def ref_linear(x, w, b=None):
    y = x @ w
    return y if b is None else y + b


def ref_relu(x):
    return np.maximum(x, 0.0)


def ref_leaky(slope):
    return lambda x: np.where(x > 0, x, slope * x)


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_tanh(x):
    return np.tanh(x)


def ref_gelu(x):
    """The ground truth is torch's own tanh-approximate GELU."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return torch.nn.GELU(approximate="tanh")(t).numpy()


def ref_softmax(axis):
    def f(x):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    return f


# --------------------------------------------------------------------------- user modules
class Scale(fn.Module):
    """A user-defined layer: ``y = x * scale`` (per feature), own forward/backward."""

    def __init__(self, features: int):
        self.scale = fn.Parameter(fn.asarray(np.linspace(0.5, 1.5, features)))

    def forward(self, x):
        self.x = x
        return x * self.scale.data

    def backward(self, dy):
        g = (dy * self.x).reshape(-1, dy.shape[-1]).sum(axis=0)
        self.scale.grad = g if self.scale.grad is None else self.scale.grad + g
        return dy * self.scale.data


class ClippedReLU(fn.ReLU):
    """A ReLU subclass that changes the math: must *not* be fused into Linear."""

    def forward(self, x):
        self.x = x
        xp = fn.get_backend().xp
        return xp.clip(x, 0.0, 1.0)

    def backward(self, dy):
        return dy * ((self.x > 0) & (self.x < 1))


def ref_scale(x, s):
    return x * s


# --------------------------------------------------------------------------- specs
@dataclass
class LayerSpec:
    id: str
    make: Callable[[], fn.Module]
    reference: Callable[[np.ndarray, dict], np.ndarray]
    shapes: tuple = ((5, 4),)
    # GELU/ReLU kinks etc. never matter for N(0, 1) inputs, but a spec may scale.
    input_scale: float = 1.0
    has_params: bool = True
    extra: dict = field(default_factory=dict)


def _act_specs():
    acts = [
        ("ReLU", fn.ReLU, ref_relu),
        ("LeakyReLU(0.01)", lambda: fn.LeakyReLU(0.01), ref_leaky(0.01)),
        ("LeakyReLU(0.2)", lambda: fn.LeakyReLU(0.2), ref_leaky(0.2)),
        ("LeakyReLU(-0.5)", lambda: fn.LeakyReLU(negative_slope=-0.5), ref_leaky(-0.5)),
        ("LeakyReLU()", fn.LeakyReLU, ref_leaky(0.01)),
        ("Sigmoid", fn.Sigmoid, ref_sigmoid),
        ("Tanh", fn.Tanh, ref_tanh),
        ("GELU", fn.GELU, ref_gelu),
    ]
    specs = []
    for name, make, ref in acts:
        # standalone, on 1-D/2-D/3-D inputs
        specs.append(LayerSpec(
            name, make, (lambda r: lambda x, p: r(x))(ref),
            shapes=((7,), (5, 4), (2, 3, 4)), has_params=False,
        ))
        # the fused path: Linear directly followed by the activation (and a tail Linear)
        specs.append(LayerSpec(
            f"Sequential(Linear-{name}-Linear)",
            (lambda mk: lambda: fn.Sequential(fn.Linear(4, 6), mk(), fn.Linear(6, 3)))(make),
            (lambda r: lambda x, p: ref_linear(r(ref_linear(x, p["0.weight"], p["0.bias"])),
                                               p["2.weight"], p["2.bias"]))(ref),
            shapes=((5, 4), (2, 3, 4)),
        ))
        # fused, activation last, no bias
        specs.append(LayerSpec(
            f"Sequential(Linear(nobias)-{name})",
            (lambda mk: lambda: fn.Sequential(fn.Linear(4, 3, bias=False), mk()))(make),
            (lambda r: lambda x, p: r(ref_linear(x, p["0.weight"])))(ref),
        ))
    return specs


SPECS = [
    LayerSpec("Linear", lambda: fn.Linear(4, 3),
              lambda x, p: ref_linear(x, p["weight"], p["bias"]),
              shapes=((4,), (5, 4), (2, 3, 4))),
    LayerSpec("Linear(bias=False)", lambda: fn.Linear(4, 3, bias=False),
              lambda x, p: ref_linear(x, p["weight"]),
              shapes=((4,), (5, 4), (2, 3, 4))),
    LayerSpec("Linear(1->1)", lambda: fn.Linear(1, 1), lambda x, p: ref_linear(x, p["weight"], p["bias"]),
              shapes=((6, 1),)),
    *_act_specs(),
    LayerSpec("Softmax(axis=-1)", lambda: fn.Softmax(axis=-1), lambda x, p: ref_softmax(-1)(x),
              shapes=((5, 4), (2, 3, 4)), has_params=False),
    LayerSpec("Softmax()", fn.Softmax, lambda x, p: ref_softmax(-1)(x),
              shapes=((5, 4),), has_params=False),
    LayerSpec("Softmax(axis=0)", lambda: fn.Softmax(axis=0), lambda x, p: ref_softmax(0)(x),
              shapes=((5, 4), (2, 3, 4)), has_params=False),
    # Sequential stacks where Linear is *not* followed by a fusable activation
    LayerSpec("Sequential(Linear-Linear)", lambda: fn.Sequential(fn.Linear(4, 5), fn.Linear(5, 3)),
              lambda x, p: ref_linear(ref_linear(x, p["0.weight"], p["0.bias"]), p["1.weight"], p["1.bias"]),
              shapes=((5, 4), (2, 3, 4))),
    LayerSpec("Sequential(Tanh-Linear)", lambda: fn.Sequential(fn.Tanh(), fn.Linear(4, 3)),
              lambda x, p: ref_linear(np.tanh(x), p["1.weight"], p["1.bias"])),
    LayerSpec("Sequential(Linear-Softmax)", lambda: fn.Sequential(fn.Linear(4, 5), fn.Softmax()),
              lambda x, p: ref_softmax(-1)(ref_linear(x, p["0.weight"], p["0.bias"]))),
    LayerSpec("Sequential(Linear-ClippedReLU)",
              lambda: fn.Sequential(fn.Linear(4, 5), ClippedReLU(), fn.Linear(5, 2)),
              lambda x, p: ref_linear(np.clip(ref_linear(x, p["0.weight"], p["0.bias"]), 0, 1),
                                      p["2.weight"], p["2.bias"])),
    LayerSpec("Sequential(Linear-ReLU-Linear-Sigmoid)",
              lambda: fn.Sequential(fn.Linear(4, 6), fn.ReLU(), fn.Linear(6, 2), fn.Sigmoid()),
              lambda x, p: ref_sigmoid(ref_linear(ref_relu(ref_linear(x, p["0.weight"], p["0.bias"])),
                                                  p["2.weight"], p["2.bias"]))),
    LayerSpec("Sequential(nested)",
              lambda: fn.Sequential(fn.Sequential(fn.Linear(4, 5), fn.Tanh()), fn.Linear(5, 2)),
              lambda x, p: ref_linear(np.tanh(ref_linear(x, p["0.0.weight"], p["0.0.bias"])),
                                      p["1.weight"], p["1.bias"])),
    # A user-defined Module composed inside a Sequential
    LayerSpec("Scale", lambda: Scale(4), lambda x, p: ref_scale(x, p["scale"]),
              shapes=((4,), (5, 4), (2, 3, 4))),
    LayerSpec("Sequential(Linear-Scale-Tanh-Linear)",
              lambda: fn.Sequential(fn.Linear(4, 5), Scale(5), fn.Tanh(), fn.Linear(5, 2)),
              lambda x, p: ref_linear(np.tanh(ref_scale(ref_linear(x, p["0.weight"], p["0.bias"]),
                                                        p["1.scale"])),
                                      p["3.weight"], p["3.bias"]),
              shapes=((5, 4), (2, 3, 4))),
    LayerSpec("Sequential(Scale-Linear-GELU)",
              lambda: fn.Sequential(Scale(4), fn.Linear(4, 3), fn.GELU()),
              lambda x, p: ref_gelu(ref_linear(ref_scale(x, p["0.scale"]), p["1.weight"], p["1.bias"]))),
]

CASES = [pytest.param(spec, shape, id=f"{spec.id}-{'x'.join(map(str, shape))}")
         for spec in SPECS for shape in spec.shapes]


@pytest.fixture
def default_dtype():
    """Yields a setter for the default dtype; restores the previous one afterwards."""
    before = fn.get_default_dtype()
    yield fn.set_default_dtype
    fn.set_default_dtype(before)


def _input(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def _build(spec, dtype, default_dtype):
    default_dtype(dtype)
    fn.manual_seed(1234)
    module = spec.make()
    for p in module.parameters():
        assert p.data.dtype == np.dtype(dtype), "parameters take the default dtype"
    return module


# --------------------------------------------------------------------------- the base
@pytest.mark.parametrize("spec,shape", CASES)
class TestLayerSpec:
    """Forward, backward and gradcheck for every spec, input shape and backend."""

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_forward_matches_reference(self, spec, shape, dtype, backend, default_dtype):
        module = _build(spec, dtype, default_dtype)
        x = _input(shape, dtype, scale=spec.input_scale)
        y = module(backend.asarray(x))
        assert backend.is_array(y)
        y_np = fn.to_numpy(y)
        assert y_np.dtype == np.dtype(dtype), "no upcast / downcast in forward"
        params = {k: v.astype(np.float64) for k, v in module.state_dict().items()}
        expected = spec.reference(x.astype(np.float64), params)
        assert y_np.shape == expected.shape
        if dtype == np.float64:
            np.testing.assert_allclose(y_np, expected, rtol=1e-12, atol=1e-14)
        else:
            np.testing.assert_allclose(y_np, expected, rtol=1e-5, atol=1e-6)

    def test_backward_shapes_and_accumulation(self, spec, shape, backend, default_dtype):
        module = _build(spec, np.float64, default_dtype)
        x = backend.asarray(_input(shape, np.float64, scale=spec.input_scale))
        y = module(x)
        dy = backend.asarray(_input(tuple(y.shape), np.float64, seed=1))
        module.zero_grad()
        dx1 = module.backward(dy)
        assert tuple(dx1.shape) == tuple(x.shape)
        assert dx1.dtype == np.float64
        dx1_np = fn.to_numpy(dx1).copy()
        first = {}
        for name, p in module.named_parameters():
            assert p.grad is not None, f"{name}: no gradient after backward"
            assert tuple(p.grad.shape) == p.shape, name
            assert p.grad.dtype == p.data.dtype, name
            first[name] = fn.to_numpy(p.grad).copy()
        assert bool(first) == spec.has_params
        dx2 = module.backward(dy)  # same forward: the gradients accumulate
        np.testing.assert_allclose(fn.to_numpy(dx2), dx1_np, rtol=1e-13)
        np.testing.assert_allclose(fn.to_numpy(dx1), dx1_np, rtol=0, atol=0,
                                   err_msg="a second backward overwrote the first dx")
        for name, p in module.named_parameters():
            np.testing.assert_allclose(fn.to_numpy(p.grad), 2 * first[name], rtol=1e-13,
                                       atol=1e-15, err_msg=f"{name}: backward does not accumulate")
        # zero_grad clears; the next backward starts afresh
        module.zero_grad()
        for p in module.parameters():
            assert p.grad is None or not fn.to_numpy(p.grad).any()
        module(x)
        module.backward(dy)
        for name, p in module.named_parameters():
            np.testing.assert_allclose(fn.to_numpy(p.grad), first[name], rtol=1e-13, atol=1e-15)

    def test_gradcheck_float64(self, spec, shape, backend, default_dtype):
        module = _build(spec, np.float32, default_dtype)  # gradcheck switches to float64 itself
        x = _input(shape, np.float64, seed=2, scale=spec.input_scale)
        report = fn.gradcheck(module, backend.asarray(x), raise_on_fail=True)
        assert report.passed
        names = [e.name for e in report.entries]
        assert names[0] == "input"
        assert names[1:] == [n for n, _ in module.named_parameters()]
        # parameters are restored to their own dtype afterwards
        for p in module.parameters():
            assert p.data.dtype == np.float32


# --------------------------------------------------------------------------- fused == unfused
@pytest.mark.parametrize("act", [fn.ReLU, fn.Sigmoid, fn.Tanh, fn.GELU,
                                 lambda: fn.LeakyReLU(0.2), lambda: fn.LeakyReLU(-0.5)])
def test_fused_and_unfused_give_the_same_numbers(act, backend, default_dtype):
    default_dtype(np.float64)
    fused = fn.Sequential(fn.Linear(4, 6), act())
    lin, a = fn.Linear(4, 6), act()
    lin.load_state_dict({k.split(".", 1)[1]: v for k, v in fused.state_dict().items()})
    x = backend.asarray(_input((5, 4), np.float64))
    dy = backend.asarray(_input((5, 6), np.float64, seed=3))
    y1 = fused(x)
    y2 = a(lin(x))
    np.testing.assert_allclose(fn.to_numpy(y1), fn.to_numpy(y2), rtol=1e-14, atol=1e-15)
    dx1 = fused.backward(dy)
    dx2 = lin.backward(a.backward(dy))
    np.testing.assert_allclose(fn.to_numpy(dx1), fn.to_numpy(dx2), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(fn.to_numpy(fused[0].weight.grad), fn.to_numpy(lin.weight.grad),
                               rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- module API
def _mlp():
    return fn.Sequential(fn.Linear(3, 4), fn.ReLU(), fn.Linear(4, 5), fn.Tanh(), fn.Linear(5, 2))


def test_named_parameters_use_dotted_pytorch_names(backend):
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [p.shape for _, p in model.named_parameters()] == [
        (3, 4), (4,), (4, 5), (5,), (5, 2), (2,)]
    nested = fn.Sequential(fn.Sequential(fn.Linear(2, 3), fn.ReLU()), Scale(3), fn.Linear(3, 1, bias=False))
    assert [n for n, _ in nested.named_parameters()] == ["0.0.weight", "0.0.bias", "1.scale", "2.weight"]
    assert list(nested.state_dict()) == ["0.0.weight", "0.0.bias", "1.scale", "2.weight"]


def test_parameters_order_is_stable_and_shared_parameters_appear_once(backend):
    model = _mlp()
    a, b = model.parameters(), model.parameters()
    assert isinstance(a, list)
    assert [id(p) for p in a] == [id(p) for p in b]
    assert [id(p) for p in a] == [id(p) for _, p in model.named_parameters()]
    shared = fn.Linear(3, 3)
    tied = fn.Sequential(shared, fn.Tanh(), shared)
    assert len(tied.parameters()) == 2
    assert [n for n, _ in tied.named_parameters()] == ["0.weight", "0.bias"]


def test_sequential_is_indexable_iterable_and_sized(backend):
    model = _mlp()
    assert len(model) == 5
    assert isinstance(model[0], fn.Linear) and isinstance(model[-1], fn.Linear)
    assert isinstance(model[1], fn.ReLU)
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear", "Tanh", "Linear"]


def test_zero_grad_clears_every_gradient(backend):
    model = _mlp()
    x = backend.asarray(_input((6, 3), np.float32))
    y = model(x)
    model.backward(backend.asarray(np.ones(tuple(y.shape), np.float32)))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None or not fn.to_numpy(p.grad).any() for p in model.parameters())


def test_train_and_eval_set_the_mode_on_every_submodule(backend):
    model = fn.Sequential(fn.Sequential(fn.Linear(2, 3), fn.ReLU()), Scale(3), fn.Linear(3, 1))
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not any(m.training for m in model.modules())


def test_eval_mode_forward_gives_the_training_mode_numbers(backend):
    model = fn.Sequential(fn.Linear(4, 6), fn.GELU(), fn.Linear(6, 3), fn.LeakyReLU(-0.5))
    x = backend.asarray(_input((5, 4), np.float32))
    y_train = fn.to_numpy(model(x)).copy()
    model.eval()
    np.testing.assert_array_equal(fn.to_numpy(model(x)), y_train)


def test_state_dict_round_trip(backend):
    fn.manual_seed(0)
    a = _mlp()
    fn.manual_seed(1)
    b = _mlp()
    x = backend.asarray(_input((4, 3), np.float32))
    assert not np.allclose(fn.to_numpy(a(x)), fn.to_numpy(b(x)))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert list(state) == [n for n, _ in a.named_parameters()]
    b.load_state_dict(state)
    np.testing.assert_array_equal(fn.to_numpy(a(x)), fn.to_numpy(b(x)))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(fn.to_numpy(pa.data), fn.to_numpy(pb.data))
        assert pa.data is not pb.data
    # state_dict returns copies: mutating them leaves the model alone
    before = fn.to_numpy(a[0].weight.data).copy()
    state["0.weight"][...] = 42.0
    np.testing.assert_array_equal(fn.to_numpy(a[0].weight.data), before)
    # load_state_dict copies too: later changes to the dict do not leak in
    s2 = a.state_dict()
    b.load_state_dict(s2)
    s2["0.bias"][...] = 7.0
    assert not np.any(fn.to_numpy(b[0].bias.data) == 7.0)


def test_load_state_dict_errors_name_the_key_and_shapes(backend):
    model = _mlp()
    state = model.state_dict()
    bad = dict(state, **{"2.weight": np.zeros((5, 4), np.float32)})
    with pytest.raises(ValueError, match=r"'2\.weight'.*\(4, 5\).*\(5, 4\)"):
        model.load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "4.bias"}
    with pytest.raises(KeyError, match=r"4\.bias"):
        model.load_state_dict(missing)
    extra = dict(state, **{"9.weight": np.zeros((1, 1), np.float32)})
    with pytest.raises(KeyError, match=r"9\.weight"):
        model.load_state_dict(extra)


# --------------------------------------------------------------------------- Linear
def test_linear_weight_is_in_by_out_and_computes_x_at_w_plus_b(backend):
    lin = fn.Linear(3, 2)
    assert lin.weight.shape == (3, 2) and lin.bias.shape == (2,)
    assert lin.in_features == 3 and lin.out_features == 2
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([10.0, -10.0], np.float32)
    lin.load_state_dict({"weight": w, "bias": b})
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(fn.to_numpy(lin(backend.asarray(x))), x @ w + b)
    assert not fn.to_numpy(fn.Linear(3, 2).bias.data).any(), "the bias starts at zero"
    assert fn.Linear(3, 2, bias=False).bias is None
    assert [n for n, _ in fn.Linear(3, 2, bias=False).named_parameters()] == ["weight"]


def test_linear_init_he_has_std_sqrt_2_over_fan_in(backend):
    fn.manual_seed(0)
    w = fn.to_numpy(fn.Linear(200, 300).weight.data)
    assert abs(w.mean()) < 0.01
    np.testing.assert_allclose(w.std(), math.sqrt(2 / 200), rtol=0.02)
    w2 = fn.to_numpy(fn.Linear(200, 300, init="he").weight.data)
    np.testing.assert_allclose(w2.std(), math.sqrt(2 / 200), rtol=0.02)


def test_linear_init_xavier_is_glorot_uniform(backend):
    fn.manual_seed(0)
    w = fn.to_numpy(fn.Linear(200, 100, init="xavier").weight.data)
    limit = math.sqrt(6 / (200 + 100))
    assert w.min() >= -limit and w.max() <= limit
    assert w.min() < -0.95 * limit and w.max() > 0.95 * limit
    np.testing.assert_allclose(w.std(), limit / math.sqrt(3), rtol=0.02)


def test_linear_init_constants_and_callable(backend):
    assert not fn.to_numpy(fn.Linear(3, 2, init="zeros").weight.data).any()
    np.testing.assert_array_equal(fn.to_numpy(fn.Linear(3, 2, init="ones").weight.data), np.ones((3, 2)))
    np.testing.assert_array_equal(fn.to_numpy(fn.Linear(3, 2, init=0.25).weight.data), np.full((3, 2), 0.25))
    np.testing.assert_array_equal(fn.to_numpy(fn.Linear(3, 2, init=-2).weight.data), np.full((3, 2), -2.0))
    seen = {}

    def init(shape, rng):
        seen["shape"] = shape
        seen["rng"] = rng
        return np.arange(np.prod(shape), dtype=np.float64).reshape(shape)

    lin = fn.Linear(3, 2, init=init)
    assert tuple(seen["shape"]) == (3, 2)
    assert hasattr(seen["rng"], "standard_normal")
    np.testing.assert_array_equal(fn.to_numpy(lin.weight.data), np.arange(6).reshape(3, 2))
    assert lin.weight.data.dtype == fn.get_default_dtype()
    assert not fn.to_numpy(lin.bias.data).any()


@pytest.mark.parametrize("init", ["glorot", "HE_normal", "", None, [1, 2]])
def test_linear_unknown_init_raises_value_error(init, backend):
    with pytest.raises(ValueError, match="init"):
        fn.Linear(3, 2, init=init)


def test_manual_seed_makes_initialisation_repeat(backend):
    fn.manual_seed(7)
    a = _mlp().state_dict()
    fn.manual_seed(7)
    b = _mlp().state_dict()
    fn.manual_seed(8)
    c = _mlp().state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("weight"))


def test_manual_seed_gives_the_same_weights_on_every_backend(backend):
    fn.manual_seed(3)
    here = _mlp().state_dict()
    with fn.use_backend("numpy"):
        fn.manual_seed(3)
        ref = _mlp().state_dict()
    for k in ref:
        np.testing.assert_array_equal(here[k], ref[k])


def test_calling_the_model_twice_does_not_overwrite_the_first_result(backend):
    for model in (_mlp(), fn.Linear(3, 2), fn.Sequential(fn.Linear(3, 4), fn.GELU()), fn.Tanh(), fn.Softmax()):
        x1 = backend.asarray(_input((4, 3), np.float32, seed=0))
        x2 = backend.asarray(_input((4, 3), np.float32, seed=1))
        a = model(x1)
        a_copy = fn.to_numpy(a).copy()
        b = model(x2)
        np.testing.assert_array_equal(fn.to_numpy(a), a_copy, err_msg=repr(model))
        assert not np.array_equal(fn.to_numpy(b), a_copy)
    # the same for gradients handed back by backward
    model = _mlp()
    model(x1)
    d1 = model.backward(backend.asarray(np.ones((4, 2), np.float32)))
    d1_copy = fn.to_numpy(d1).copy()
    model(x2)
    model.backward(backend.asarray(np.full((4, 2), 3.0, np.float32)))
    np.testing.assert_array_equal(fn.to_numpy(d1), d1_copy)


def test_model_moves_between_backends_with_the_same_numbers():
    usable = [name for name, reason in fn.available_backends().items() if reason is None]
    with fn.use_backend("numpy"):
        fn.manual_seed(0)
        model = fn.Sequential(fn.Linear(3, 5), fn.Tanh(), fn.Linear(5, 2))
        x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
        expected = fn.to_numpy(model(x))
        opt = fn.SGD(model.parameters(), lr=0.1)
    for name in usable:
        with fn.use_backend(name) as b:
            moved = model.to(name)
            assert moved is model and all(b.is_array(p.data) for p in model.parameters())
            assert all(p.grad is None for p in model.parameters())
            np.testing.assert_allclose(fn.to_numpy(model(b.asarray(x))), expected, rtol=1e-5, atol=1e-7)
            # an optimizer made before the move refuses to update stale buffers silently
            if name != "numpy" and type(b.xp) is not type(np):
                with pytest.raises(TypeError, match="create the optimizer after moving"):
                    opt.step()
    with fn.use_backend("numpy"):
        model.to("numpy")
        np.testing.assert_allclose(fn.to_numpy(model(x)), expected, rtol=1e-6)


def test_sequential_sees_a_module_added_after_its_first_call():
    model = fn.Sequential(fn.Linear(2, 3, init=-1.0))
    x = np.ones((4, 2), np.float32)
    assert (fn.to_numpy(model(x)) == -2).all()
    assert model.append(fn.ReLU()) is model
    assert len(model) == 2 and [name for name, _ in model.named_children()] == ["0", "1"]
    assert (fn.to_numpy(model(x)) == 0).all()


def test_append_refuses_non_modules():
    with pytest.raises(TypeError, match="Sequential.append: expected a fastnn Module, got list"):
        fn.Sequential().append([fn.ReLU()])


def test_work_buffers_do_not_grow_with_every_batch_size(backend):
    """predict / evaluate / fit reuse one work buffer per layer and role, as
    large as the largest batch seen: 50 different sizes keep one set."""
    model = fn.Sequential(fn.Linear(8, 16), fn.ReLU(), fn.Linear(16, 4))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 8)).astype(np.float32)
    def owner(a):  # the array that owns a view's memory (a chain of views on a subclass)
        while a.base is not None:
            a = a.base
        return a

    def allocations():  # {id: array} of the arrays that own memory (views share their base's)
        owners = (owner(a) for m in model.modules() for a in m.__dict__.get("_buffers", {}).values())
        return {id(o): o for o in owners}  # held: no id is reused while compared

    fn.predict(model, X)
    owners = allocations()
    for n in range(1, 50):
        got = fn.predict(model, X[:n])
        np.testing.assert_allclose(got, fn.predict(model, X)[:n], rtol=1e-5, atol=1e-6)
    assert allocations().keys() == owners.keys()
    fn.predict(model, np.concatenate([X, X]))  # a larger batch replaces each buffer
    grown = allocations()
    assert len(grown) == len(owners) and grown.keys().isdisjoint(owners.keys())


ACTIVATION_MODULES = [fn.ReLU, lambda: fn.LeakyReLU(0.5), fn.Sigmoid, fn.Tanh, fn.GELU, fn.Softmax]


@pytest.mark.parametrize("make", ACTIVATION_MODULES, ids=["relu", "leaky", "sigmoid", "tanh",
                                                          "gelu", "softmax"])
def test_activations_take_integer_input_in_the_default_dtype(backend, make):
    """Integer (or bool) data becomes the default float dtype, as Linear takes it:
    leaky ReLU of -3 is -1.5, not a truncated -1; exp of ints does not fail."""
    ints = np.array([[1, -3, 0], [2, 5, -1]])
    want = make()(backend.asarray(ints.astype(np.float32)))
    on_backend = backend.asarray(ints)  # still integers (a NumPy array is foreign to CuPy)
    assert on_backend.dtype.kind == "i"
    got = make()(on_backend)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(fn.to_numpy(got), fn.to_numpy(want))
    module = make()
    module(on_backend)
    dx = module.backward(np.ones((2, 3), np.int64).tolist())  # a plain list for dy
    assert dx.dtype == np.float32 and dx.shape == (2, 3)


def test_functional_activations_take_integer_input():
    np.testing.assert_allclose(fn.to_numpy(fn.functional.leaky_relu([1, -3], 0.5)), [1, -1.5])
    for f in (fn.functional.sigmoid, fn.functional.tanh, fn.functional.gelu, fn.functional.softmax,
              fn.functional.log_softmax, fn.functional.relu):
        out = f([[1, 2]])
        assert out.dtype == np.float32
        np.testing.assert_allclose(fn.to_numpy(out), fn.to_numpy(f(np.array([[1.0, 2.0]], np.float32))))
