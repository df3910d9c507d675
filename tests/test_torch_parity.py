"""Same numbers as PyTorch (CPU): losses, optimizers, a two-layer net, a training run.

Tolerances (relative): float64 1e-10 for losses and optimizers (a whole 100-step
trajectory), 1e-7 for the gradients of a two-layer net; float32 1e-5. Every
comparison is with torch computing in the same dtype from identical inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastnn as fn

TOL = {np.float64: dict(rtol=1e-10, atol=1e-14), np.float32: dict(rtol=1e-5, atol=1e-7)}
DTYPES = [pytest.param(np.float64, id="float64"), pytest.param(np.float32, id="float32")]


@pytest.fixture
def default_dtype():
    before = fn.get_default_dtype()
    yield fn.set_default_dtype
    fn.set_default_dtype(before)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _rel_close(actual, expected, rtol, atol=0.0, what=""):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


# =========================================================================== losses
def _check_loss(backend, fn_loss, torch_loss, pred, target, dtype):
    tol = TOL[dtype]
    value = fn_loss(backend.asarray(pred), backend.asarray(target))
    assert isinstance(value, float)
    grad = fn_loss.backward()
    assert backend.is_array(grad)
    grad = fn.to_numpy(grad)
    assert grad.shape == pred.shape
    assert grad.dtype == np.dtype(dtype), "loss gradient keeps the prediction dtype"

    tp = _t(pred).clone().requires_grad_(True)
    tl = torch_loss(tp, _t(target))
    tl.backward()
    _rel_close(value, tl.item(), tol["rtol"], what="loss value")
    # elementwise relative, with an absolute floor far below the gradient scale
    scale = max(float(np.abs(tp.grad.numpy()).max()), 1e-30)
    _rel_close(grad, tp.grad.numpy(), tol["rtol"], atol=tol["atol"] * scale, what="gradient")
    return value, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 1), (6, 3), (2, 3, 4)])
def test_mse_matches_torch(shape, dtype, backend):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    _check_loss(backend, fn.MSELoss(), torch.nn.MSELoss(), pred, target, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_matches_torch(dtype, backend):
    rng = np.random.default_rng(1)
    pred = rng.uniform(0.01, 0.99, size=(10, 3)).astype(dtype)
    target = rng.integers(0, 2, size=(10, 3)).astype(dtype)
    _check_loss(backend, fn.BCELoss(), torch.nn.BCELoss(), pred, target, dtype)
    soft = rng.uniform(0, 1, size=(10, 3)).astype(dtype)  # soft targets
    _check_loss(backend, fn.BCELoss(), torch.nn.BCELoss(), pred, soft, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_probabilities_0_and_1_clamps_the_log_at_minus_100(dtype, backend):
    pred = np.array([[0.0], [1.0], [0.0], [1.0], [0.5], [1e-30 if dtype == np.float64 else 1e-20]],
                    dtype=dtype)
    target = np.array([[0.0], [1.0], [1.0], [0.0], [1.0], [1.0]], dtype=dtype)
    value, grad = _check_loss(backend, fn.BCELoss(), torch.nn.BCELoss(), pred, target, dtype)
    assert np.isfinite(value) and np.isfinite(grad).all()
    # two fully wrong predictions cost exactly 100 each (+ log 2, + the tiny one clamped at 100)
    np.testing.assert_allclose(value, (100 + 100 + np.log(2) + 69.0776 * (dtype == np.float64)
                                       + 46.0517 * (dtype == np.float32)) / 6, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_matches_torch_for_huge_logits(dtype, backend):
    logits = np.array([[-1e4, 1e4], [-1e4, 1e4], [-30.0, 30.0], [-1.5, 0.0], [2.0, 700.0],
                       [-700.0, 88.0]], dtype=dtype)
    target = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.3, 1.0], [0.5, 1.0], [1.0, 0.0]],
                      dtype=dtype)
    value, grad = _check_loss(backend, fn.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(),
                              logits, target, dtype)
    assert np.isfinite(value) and np.isfinite(grad).all()
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((16, 3)) * 5).astype(dtype)
    target = rng.uniform(0, 1, (16, 3)).astype(dtype)
    _check_loss(backend, fn.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(), logits, target, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
def test_cross_entropy_matches_torch(scale, dtype, backend):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((12, 5)) * scale).astype(dtype)
    labels = rng.integers(0, 5, size=12)
    for lab in (labels, labels.astype(np.int32)):
        _check_loss(backend, fn.CrossEntropyLoss(), lambda p, t: torch.nn.functional.cross_entropy(p, t.long()),
                    logits, lab, dtype)


def test_cross_entropy_single_class_and_single_sample(backend):
    logits = np.array([[0.3, -2.0, 1.0]])
    _check_loss(backend, fn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), logits, np.array([2]), np.float64)
    logits = np.random.default_rng(0).standard_normal((4, 1))
    _check_loss(backend, fn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), logits, np.zeros(4, np.int64),
                np.float64)


# =========================================================================== optimizers
OPTIMIZERS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1)),
    ("SGD", dict(lr=0.03, momentum=0.8, weight_decay=0.01, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.6))),  # torch lerp_ weight >= 0.5: its other formula
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.0)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.005, alpha=0.9, eps=1e-6, centered=True, momentum=0.5, weight_decay=0.01)),
]
OPT_IDS = [f"{name}({','.join(f'{k}={v}' for k, v in kw.items())})" for name, kw in OPTIMIZERS]
SHAPES = [(3, 4), (4,), (5, 2), (1,)]  # several tensors: exercises the flat-buffer packing


class Quadratic:
    """A fixed random quadratic ``0.5 (p - c)^T H (p - c)`` per tensor, plus a fixed
    per-step perturbation, so gradients depend on the trajectory and never vanish."""

    def __init__(self, seed=0, steps=100):
        rng = np.random.default_rng(seed)
        self.h, self.c = [], []
        for s in SHAPES:
            n = int(np.prod(s))
            a = rng.standard_normal((n, n))
            self.h.append(a @ a.T / n + 0.1 * np.eye(n))
            self.c.append(rng.standard_normal(n))
        self.noise = [[rng.standard_normal(s) * 0.1 for s in SHAPES] for _ in range(steps)]
        self.start = [rng.standard_normal(s) for s in SHAPES]

    def grads(self, values, step, dtype):
        out = []
        for v, h, c, e in zip(values, self.h, self.c, self.noise[step]):
            v = np.asarray(v, dtype=np.float64).ravel()
            out.append((h @ (v - c)).reshape(e.shape).__add__(e).astype(dtype))
        return out


def _no_grad(t, i):
    """The schedule of test_parameters_without_a_gradient_are_skipped_as_torch_does:
    tensor 1 gets no gradient on the first 3 steps (its first step comes late),
    tensor 2 on steps 5, 6 and 20, tensor 3 on every third step."""
    return (i == 1 and t < 3) or (i == 2 and t in (5, 6, 20)) or (i == 3 and t % 3 == 0)


def _run_fastnn(backend, name, kw, dtype, q, steps, start=None, skip=None, opt=None, params=None,
                first=0):
    if params is None:
        params = [fn.Parameter(backend.asarray(s.astype(dtype))) for s in (start or q.start)]
    opt = opt or getattr(fn, name)(params, **kw)
    traj = []
    for t in range(first, steps):
        opt.zero_grad()
        for i, (p, g) in enumerate(zip(params, q.grads([fn.to_numpy(p.data) for p in params], t,
                                                        dtype))):
            if skip is None or not skip(t, i):
                p.grad = backend.asarray(g)
        opt.step()
        traj.append([fn.to_numpy(p.data).copy() for p in params])
    return traj, params, opt


def _run_torch(name, kw, dtype, q, steps, skip=None):
    params = [torch.nn.Parameter(_t(s.astype(dtype))) for s in q.start]
    opt = getattr(torch.optim, name)(params, **kw)
    traj = []
    for t in range(steps):
        opt.zero_grad()  # grads None: a parameter left without one is skipped
        for i, (p, g) in enumerate(zip(params, q.grads([p.detach().numpy() for p in params], t,
                                                        dtype))):
            if skip is None or not skip(t, i):
                p.grad = _t(g)
        opt.step()
        traj.append([p.detach().numpy().copy() for p in params])
    return traj


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=OPT_IDS)
def test_parameters_without_a_gradient_are_skipped_as_torch_does(name, kw, dtype, backend):
    """torch.optim leaves a parameter whose grad is None untouched (no weight
    decay, no momentum) and counts Adam's bias-correction steps per parameter;
    a frozen layer or an unused branch must follow the same trajectory here.
    Saved and loaded halfway, the optimizer goes on the same way."""
    steps = 40
    q = Quadratic(seed=3, steps=steps)
    theirs = _run_torch(name, kw, dtype, q, steps, skip=_no_grad)
    ours, params, opt = _run_fastnn(backend, name, kw, dtype, q, 25, skip=_no_grad)
    state = opt.state_dict()
    fresh = getattr(fn, name)(params, **kw)
    fresh.load_state_dict(state)
    rest, _, _ = _run_fastnn(backend, name, kw, dtype, q, steps, skip=_no_grad, opt=fresh,
                             params=params, first=25)
    ours += rest
    # float64 pins the semantics; float32 allows centered RMSprop's sqrt(v - a^2)
    # cancellation a few ulps of the tensor's scale on its small elements.
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (1e-5, 1e-6)
    for t in (0, 2, 3, 4, 5, 6, 7, 20, 21, 24, 25, steps - 1):
        for i, (a, b) in enumerate(zip(ours[t], theirs[t])):
            scale = float(np.abs(b).max())
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale,
                                       err_msg=f"{name}{kw}: tensor {i} after step {t + 1}")
    np.testing.assert_array_equal(ours[2][1], q.start[1].astype(dtype))  # untouched while skipped
    if name in ("SGD", "RMSprop"):  # past every first momentum step the history changes nothing
        assert fresh.uniform_steps and fresh.groups[0].skipped == [0, 0, 0, 0]
    else:  # Adam's bias correction keeps each parameter's own count
        assert not fresh.uniform_steps and fresh.groups[0].skipped == [0, 3, 3, 14]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=OPT_IDS)
def test_optimizer_trajectory_matches_torch(name, kw, dtype, backend):
    steps = 100
    q = Quadratic(seed=len(OPT_IDS[0]), steps=steps)
    ours, params, _ = _run_fastnn(backend, name, kw, dtype, q, steps)
    theirs = _run_torch(name, kw, dtype, q, steps)
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    for t in (0, 1, 2, 9, 49, steps - 1):
        for i, (a, b) in enumerate(zip(ours[t], theirs[t])):
            scale = float(np.abs(b).max())
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2 * scale,
                                       err_msg=f"{name}{kw}: tensor {i} after step {t + 1}")
    # the parameters actually moved, and stayed in their dtype
    assert not np.allclose(ours[-1][0], q.start[0].astype(dtype))
    for p in params:
        assert p.data.dtype == np.dtype(dtype) and p.grad.dtype == np.dtype(dtype)


def test_optimizer_defaults_match_torch(backend):
    p = [fn.Parameter(backend.asarray(np.zeros(3)))]
    for name in ("Adam", "AdamW", "RMSprop"):
        ours, theirs = getattr(fn, name)(p), getattr(torch.optim, name)([torch.zeros(3, requires_grad=True)])
        d = theirs.defaults
        assert ours.lr == d["lr"], name
        assert ours.eps == d["eps"], name
        assert ours.weight_decay == d["weight_decay"], name
        if name != "RMSprop":
            assert tuple(ours.betas) == tuple(d["betas"]), name
        else:
            assert ours.alpha == d["alpha"] and ours.momentum == d["momentum"]
            assert ours.centered == d["centered"]
    sgd, tsgd = fn.SGD(p, lr=0.1), torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    for k in ("momentum", "dampening", "weight_decay", "nesterov"):
        assert getattr(sgd, k) == tsgd.defaults[k], k


@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=OPT_IDS)
def test_optimizer_state_dict_round_trip_continues_identically(name, kw, backend, tmp_path):
    dtype, steps, cut = np.float64, 30, 12
    q = Quadratic(seed=5, steps=steps)
    full, _, _ = _run_fastnn(backend, name, kw, dtype, q, steps)

    params = [fn.Parameter(backend.asarray(s.astype(dtype))) for s in q.start]
    opt = getattr(fn, name)(params, **kw)
    for t in range(cut):
        opt.zero_grad()
        for p, g in zip(params, q.grads([fn.to_numpy(p.data) for p in params], t, dtype)):
            p.grad = backend.asarray(g)
        opt.step()
    # save through a file (npz, no pickle) mid-run
    fn.save({"opt": opt.state_dict(), "params": {str(i): p.data for i, p in enumerate(params)}},
            tmp_path / "ckpt.npz")
    del opt, params
    ck = fn.load(tmp_path / "ckpt.npz")
    params = [fn.Parameter(backend.asarray(ck["params"][str(i)])) for i in range(len(SHAPES))]
    # a fresh optimizer, built with a different lr on purpose: load_state_dict restores it
    wrong_kw = dict(kw, lr=123.0)
    opt = getattr(fn, name)(params, **wrong_kw)
    opt.load_state_dict(ck["opt"])
    assert opt.lr == kw.get("lr", opt.lr) and opt.lr != 123.0
    for t in range(cut, steps):
        opt.zero_grad()
        for p, g in zip(params, q.grads([fn.to_numpy(p.data) for p in params], t, dtype)):
            p.grad = backend.asarray(g)
        opt.step()
    for i, p in enumerate(params):
        np.testing.assert_array_equal(fn.to_numpy(p.data), full[-1][i],
                                      err_msg=f"{name}{kw}: resumed run differs (tensor {i})")


# =========================================================================== two-layer nets
def _torch_net(model_fn, act):
    """torch.nn copy of a fastnn Sequential(Linear, act, Linear) (weights transposed)."""
    l1, l2 = model_fn[0], model_fn[2]
    t1 = torch.nn.Linear(l1.in_features, l1.out_features).double()
    t2 = torch.nn.Linear(l2.in_features, l2.out_features).double()
    with torch.no_grad():
        t1.weight.copy_(_t(fn.to_numpy(l1.weight.data).T.astype(np.float64)))
        t1.bias.copy_(_t(fn.to_numpy(l1.bias.data).astype(np.float64)))
        t2.weight.copy_(_t(fn.to_numpy(l2.weight.data).T.astype(np.float64)))
        t2.bias.copy_(_t(fn.to_numpy(l2.bias.data).astype(np.float64)))
    return torch.nn.Sequential(t1, act, t2)


def _grads_as_fastnn_layout(tnet):
    """torch grads in fastnn's names and (in, out) layout."""
    return {
        "0.weight": tnet[0].weight.grad.numpy().T, "0.bias": tnet[0].bias.grad.numpy(),
        "2.weight": tnet[2].weight.grad.numpy().T, "2.bias": tnet[2].bias.grad.numpy(),
    }


def _weights_as_fastnn_layout(tnet):
    return {
        "0.weight": tnet[0].weight.detach().numpy().T, "0.bias": tnet[0].bias.detach().numpy(),
        "2.weight": tnet[2].weight.detach().numpy().T, "2.bias": tnet[2].bias.detach().numpy(),
    }


NETS = [
    pytest.param("tanh-mse", id="Linear-Tanh-Linear+MSE"),
    pytest.param("relu-ce", id="Linear-ReLU-Linear+CrossEntropy"),
]


def _net_problem(kind, n=45, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6))
    if kind == "tanh-mse":
        model = fn.Sequential(fn.Linear(6, 16), fn.Tanh(), fn.Linear(16, 2))
        y = np.stack([np.sin(X[:, 0]) + X[:, 1] * X[:, 2], X[:, 3] - X[:, 4] ** 2], axis=1)
        return model, torch.nn.Tanh(), fn.MSELoss(), torch.nn.MSELoss(), X, y
    model = fn.Sequential(fn.Linear(6, 16), fn.ReLU(), fn.Linear(16, 3))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5).astype(np.int64)
    return model, torch.nn.ReLU(), fn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("kind", NETS)
def test_two_layer_net_loss_and_gradients_match_torch(kind, backend, default_dtype):
    default_dtype(np.float64)
    fn.manual_seed(0)
    model, tact, loss_fn, tloss_fn, X, y = _net_problem(kind)
    tnet = _torch_net(model, tact)
    xd = backend.asarray(X)
    loss = loss_fn(model(xd), backend.asarray(y))
    dx = model.backward(loss_fn.backward())

    tx = _t(X).clone().requires_grad_(True)
    tloss = tloss_fn(tnet(tx), _t(y))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-7)
    np.testing.assert_allclose(fn.to_numpy(dx), tx.grad.numpy(), rtol=1e-7,
                               atol=1e-7 * np.abs(tx.grad.numpy()).max())
    for name, g in _grads_as_fastnn_layout(tnet).items():
        ours = fn.to_numpy(dict(model.named_parameters())[name].grad)
        np.testing.assert_allclose(ours, g, rtol=1e-7, atol=1e-7 * np.abs(g).max(), err_msg=name)


TRAIN_CASES = [
    pytest.param("tanh-mse", "Adam", dict(lr=0.01), id="tanh-mse-Adam"),
    pytest.param("relu-ce", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True), id="relu-ce-SGD-nesterov"),
    pytest.param("relu-ce", "AdamW", dict(lr=0.01, weight_decay=0.05), id="relu-ce-AdamW"),
    pytest.param("tanh-mse", "RMSprop", dict(lr=0.003, momentum=0.5, centered=True), id="tanh-mse-RMSprop"),
]


@pytest.mark.parametrize("kind,opt_name,kw", TRAIN_CASES)
def test_fit_trajectory_matches_torch_over_50_steps(kind, opt_name, kw, backend, default_dtype):
    """45 samples, batch 10 (last batch 5), no shuffling: 5 steps/epoch x 10 epochs."""
    default_dtype(np.float64)
    fn.manual_seed(1)
    model, tact, loss_fn, tloss_fn, X, y = _net_problem(kind)
    tnet = _torch_net(model, tact)
    opt = getattr(fn, opt_name)(model.parameters(), **kw)
    topt = getattr(torch.optim, opt_name)(tnet.parameters(), **kw)
    tX, ty = _t(X), _t(y)
    steps = 0
    for epoch in range(10):
        h = fn.fit(model, loss_fn, opt, X, y, epochs=1, batch_size=10, shuffle=False,
                   progress=False, initial_epoch=epoch)
        total = 0.0
        for lo in range(0, len(X), 10):
            topt.zero_grad()
            tl = tloss_fn(tnet(tX[lo:lo + 10]), ty[lo:lo + 10])
            tl.backward()
            topt.step()
            total += tl.item() * len(tX[lo:lo + 10])
            steps += 1
        np.testing.assert_allclose(h.loss[0], total / len(X), rtol=1e-9, err_msg=f"epoch {epoch + 1} loss")
        ours = model.state_dict()
        for name, w in _weights_as_fastnn_layout(tnet).items():
            np.testing.assert_allclose(ours[name], w, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} after epoch {epoch + 1}")
    assert steps == 50


def test_a_step_without_any_gradient_changes_nothing(backend, tmp_path):
    """torch.optim.step() with every grad None updates nothing and counts no
    step; the skipped counts survive fn.save / fn.load and are checked."""
    params = [fn.Parameter(backend.asarray(np.ones(s, np.float32))) for s in SHAPES]
    opt = fn.Adam(params, lr=0.1, weight_decay=0.1)
    before = [fn.to_numpy(p.data).copy() for p in params]
    opt.zero_grad()
    opt.step()
    assert opt.step_count == 0 and opt.uniform_steps
    for p, b in zip(params, before):
        np.testing.assert_array_equal(fn.to_numpy(p.data), b)
    params[1].grad = backend.asarray(np.ones(SHAPES[1], np.float32))
    opt.step()
    assert opt.step_count == 1 and opt.groups[0].skipped == [1, 0, 1, 1]
    fn.save(opt.state_dict(), tmp_path / "opt.npz")
    loaded = fn.Adam(params, lr=0.1, weight_decay=0.1)
    loaded.load_state_dict(fn.load(tmp_path / "opt.npz"))
    assert loaded.groups[0].skipped == [1, 0, 1, 1] and not loaded.uniform_steps
    bad = dict(opt.state_dict(), **{"skipped.0": np.array([1, 0, 5, 1])})
    with pytest.raises(fn.InputError, match=r"skipped\.0 must count steps in \[0, 1\]"):
        loaded.load_state_dict(bad)
