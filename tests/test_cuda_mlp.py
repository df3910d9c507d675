"""The fused narrow-MLP CUDA kernel (backends/cuda_mlp.py) against the CPU kernel.

On the CPU: ``train_mlp_cuda`` runs under Numba's CUDA simulator in a
subprocess (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is imported),
with NumPy arrays standing in for device arrays and a 32-thread block, on tiny
problems; its per-batch losses, final parameters, gradients, optimizer state
and step count must equal ``numba_mlp.train_mlp``'s (float64: to ~1e-12, both
sum in the same order; float32: to float32 rounding), including the stop at
the first non-finite loss.

On a GPU (``-m gpu``): the compiled kernel on CuPy arrays through
``gpu_compiled.plan_fast_path`` / ``run_epochs``, and fit's numbers with and
without it; skipped with the reason when CuPy or numba.cuda cannot run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ACT_NAMES = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu")
SGD_HYPER = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=1.0)


def _case_list() -> list[dict]:
    """Each case: layers [(in, out, bias, act)], loss, optimizer, data sizes, dtype."""
    cases = [
        dict(name="xor_mse_adam", layers=[(2, 8, True, "tanh"), (8, 1, True, "sigmoid")],
             loss=0, opt=1, hyper=[0.05, 0.9, 0.999, 1e-8, 0.0, 0.0], n=4, batch=2, epochs=3),
        dict(name="xor_mse_adamw_step0", layers=[(2, 8, True, "relu"), (8, 1, True, "identity")],
             loss=0, opt=1, hyper=[0.05, 0.8, 0.99, 1e-6, 0.1, 1.0], n=4, batch=4, epochs=3,
             step0=7),
        dict(name="xent_adam_coupled_wd", layers=[(6, 16, True, "tanh"), (16, 3, True, "identity")],
             loss=1, opt=1, hyper=[0.01, 0.9, 0.999, 1e-8, 0.01, 0.0], n=10, batch=4, epochs=2),
        dict(name="xent_sgd_nesterov_wd", layers=[(6, 16, True, "relu"), (16, 3, True, "identity")],
             loss=1, opt=0, hyper=list(SGD_HYPER.values()), n=10, batch=4, epochs=3),
        dict(name="xent_sgd_dampening_step0",
             layers=[(6, 8, True, "gelu"), (8, 8, False, "leaky_relu"), (8, 3, True, "identity")],
             loss=1, opt=0, hyper=[0.05, 0.5, 0.25, 0.0, 0.0], n=7, batch=3, epochs=2, step0=3),
        dict(name="mse_sgd_plain", layers=[(3, 5, True, "sigmoid"), (5, 2, False, "tanh")],
             loss=0, opt=0, hyper=[0.2, 0.0, 0.0, 0.0, 0.0], n=5, batch=5, epochs=2),
        dict(name="xent_adam_float32", layers=[(6, 16, True, "gelu"), (16, 3, True, "identity")],
             loss=1, opt=1, hyper=[0.01, 0.9, 0.999, 1e-8, 0.0, 0.0], n=10, batch=4, epochs=2,
             dtype="float32"),
        dict(name="mse_sgd_float32", layers=[(2, 8, True, "tanh"), (8, 1, True, "sigmoid")],
             loss=0, opt=0, hyper=list(SGD_HYPER.values()), n=4, batch=2, epochs=2,
             dtype="float32"),
    ]
    for act in ACT_NAMES:  # every activation, hidden and at the output
        cases.append(dict(name=f"act_{act}", layers=[(3, 4, True, act), (4, 2, True, act)],
                          loss=0, opt=0, hyper=[0.1, 0.9, 0.0, 0.0, 0.0], n=5, batch=3,
                          epochs=2))
    # BCE on logits and on a final sigmoid's probabilities (soft targets in [0, 1]).
    cases += [
        dict(name="bce_logits_adam", layers=[(2, 8, True, "tanh"), (8, 1, True, "identity")],
             loss=2, opt=1, hyper=[0.05, 0.9, 0.999, 1e-8, 0.0, 0.0], n=5, batch=2, epochs=3),
        dict(name="bce_sgd_two_outputs", layers=[(3, 6, True, "relu"), (6, 2, True, "sigmoid")],
             loss=3, opt=0, hyper=list(SGD_HYPER.values()), n=6, batch=4, epochs=3),
        dict(name="bce_logits_sgd_float32", layers=[(2, 8, True, "gelu"), (8, 1, True, "identity")],
             loss=2, opt=0, hyper=[0.2, 0.0, 0.0, 0.0, 0.0], n=4, batch=2, epochs=2,
             dtype="float32"),
        dict(name="bce_adamw_float32", layers=[(2, 8, True, "tanh"), (8, 1, True, "sigmoid")],
             loss=3, opt=1, hyper=[0.05, 0.8, 0.99, 1e-6, 0.1, 1.0], n=4, batch=4, epochs=3,
             dtype="float32"),
        dict(name="nonfinite_stop_bce", layers=[(2, 4, True, "tanh"), (4, 1, True, "sigmoid")],
             loss=3, opt=1, hyper=[0.05, 0.9, 0.999, 1e-8, 0.0, 0.0], n=6, batch=2, epochs=2,
             nan_pos=2),
    ]
    # A NaN in one sample (in epoch 0's second batch): the kernel must stop at
    # that batch, after writing its loss and before its update.
    cases.append(dict(name="nonfinite_stop_mse", layers=[(2, 8, True, "tanh"), (8, 1, True, "identity")],
                      loss=0, opt=1, hyper=[0.05, 0.9, 0.999, 1e-8, 0.0, 0.0], n=6, batch=2,
                      epochs=3, nan_pos=3))
    cases.append(dict(name="nonfinite_stop_xent", layers=[(6, 8, True, "relu"), (8, 3, True, "identity")],
                      loss=1, opt=0, hyper=list(SGD_HYPER.values()), n=7, batch=3, epochs=2,
                      nan_pos=5))
    return cases


CASES = _case_list()


# ---------------------------------------------------------------- run in the child
def _build(case: dict, seed: int = 0) -> dict:
    """Inputs for train_mlp as in compiled.run_epochs, flat buffers with padding."""
    from fastnn.backends.activations import get_activation

    rng = np.random.default_rng(seed)
    dtype = np.dtype(case.get("dtype", "float64"))
    rows, off, align = [], 0, 4
    for fi, fo, bias, _ in case["layers"]:
        wo = off
        off += -(-fi * fo // align) * align
        bo = -1
        if bias:
            bo = off
            off += -(-fo // align) * align
        rows.append((fi, fo, wo, bo))
    size = off
    layout = np.array(rows, dtype=np.int64)
    params = np.zeros(size, dtype)
    for fi, fo, wo, bo in rows:
        params[wo:wo + fi * fo] = rng.uniform(-1, 1, fi * fo) / np.sqrt(fi)
        if bo >= 0:
            params[bo:bo + fo] = rng.uniform(-0.5, 0.5, fo)
    acts = np.array([get_activation(a).code for *_, a in case["layers"]], dtype=np.int64)
    alphas = np.array([0.1 if a == "leaky_relu" else 0.0 for *_, a in case["layers"]], dtype=dtype)
    n, d_in, d_out = case["n"], layout[0, 0], layout[-1, 1]
    X = rng.normal(size=(n, d_in)).astype(dtype)
    if case["loss"] != 1:  # float targets: MSE's in [-1, 1], BCE's probabilities
        Yf = rng.uniform(-1 if case["loss"] == 0 else 0, 1, (n, d_out)).astype(dtype)
        Yi = np.zeros(1, np.int64)
    else:
        Yf = np.zeros((1, 1), dtype)
        Yi = rng.integers(0, d_out, n).astype(np.int64)
    orders = np.stack([rng.permutation(n) for _ in range(case["epochs"])]).astype(np.int64)
    if "nan_pos" in case:
        X[orders[0, case["nan_pos"]], 0] = np.nan
    step0 = case.get("step0", 0)
    state1 = np.zeros(size, dtype)
    state2 = np.zeros(size, dtype)
    if step0:
        state1[:] = rng.normal(size=size) * 0.01
        state2[:] = rng.uniform(0, 1e-3, size)
    n_batches = -(-n // case["batch"])
    grads = np.zeros(size, dtype)
    if case["opt"] == 0 and case["hyper"][1] == 0:
        state1 = grads  # plain SGD: the gradient buffer as its state, as kernel_inputs passes it
    return dict(
        X=X, Yf=Yf, Yi=Yi, orders=orders, batch_size=case["batch"], params=params,
        grads=grads, state1=state1,
        state2=state2 if case["opt"] == 1 else state1,
        layout=layout, acts=acts, alphas=alphas, loss_kind=case["loss"], opt_kind=case["opt"],
        hyper=np.array(case["hyper"], np.float64), step0=step0,
        losses=np.full(case["epochs"] * n_batches, -1.0),
    )


def _shared_buffers(args: dict, copies: dict) -> dict:
    """``copies`` with the aliasing of ``args`` kept: SGD passes one buffer as
    state1 and state2, plain SGD its gradient buffer as both (kernel_inputs)."""
    for key in ("state1", "state2"):
        for same in ("grads", "state1"):
            if key != same and args[key] is args[same]:
                copies[key] = copies[same]
                break
    return copies


def _copy(args: dict) -> dict:
    return _shared_buffers(args, {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                  for k, v in args.items()})


TIERS = (0, 1, 2, 3)  # cuda_mlp.TIER_GLOBAL .. TIER_ALL: what lives in shared memory
# Every case runs with all of it in shared memory (what fit gives these nets); the
# lower tiers on cases that cover both optimizers, both dtypes, each loss family
# and the non-finite stop (the simulator is slow: ~1 s a run).
FEWER_TIERS = {"xor_mse_adam", "xent_sgd_nesterov_wd", "xent_adam_float32", "bce_sgd_two_outputs",
               "nonfinite_stop_xent"}


def _tiers(case: dict) -> tuple[int, ...]:
    return TIERS if case["name"] in FEWER_TIERS else TIERS[-1:]


def _simulate(out_dir: str, threads: int) -> None:
    """Child process: run every case on the CPU kernel and, once per shared-memory
    tier, on the CUDA one given exactly that tier's bytes (a short carve-up
    fails in the simulator); save the results."""
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    from numba import cuda

    from fastnn.backends import cuda_mlp, numba_mlp

    order = ("X", "Yf", "Yi", "orders", "batch_size", "params", "grads", "state1", "state2",
             "layout", "acts", "alphas", "loss_kind", "opt_kind", "hyper", "step0", "losses")
    for case in CASES:
        base = _build(case)
        cpu = _copy(base)
        done_cpu = numba_mlp.train_mlp(*(cpu[k] for k in order))
        need = cuda_mlp.tier_bytes(base["layout"], base["batch_size"], len(base["params"]),
                                   base["params"].dtype, base["opt_kind"])
        for tier in _tiers(case):
            # Fake device arrays, made once per buffer: SGD passes one buffer twice, and
            # the simulator would copy two host arguments back one over the other.
            dev = _shared_buffers(base, {k: (cuda.to_device(v) if isinstance(v, np.ndarray) else v)
                                         for k, v in base.items()})
            done_out = cuda.to_device(np.zeros(1, np.float64))
            work = {k: cuda.to_device(v) for k, v in
                    cuda_mlp.scratch(base["layout"], base["batch_size"], base["params"].dtype).items()}
            cuda_mlp.launch(*(dev[k] for k in order), done_out, work, threads=threads,
                            shared=(tier, need[tier]))
            sim = {k: (v.copy_to_host() if hasattr(v, "copy_to_host") else v) for k, v in dev.items()}
            done_out = done_out.copy_to_host()
            np.savez(
                Path(out_dir) / f"{case['name']}-tier{tier}.npz",
                done_cpu=done_cpu, done_sim=done_out[0],
                **{f"{k}_cpu": cpu[k] for k in ("losses", "params", "grads", "state1", "state2")},
                **{f"{k}_sim": sim[k] for k in ("losses", "params", "grads", "state1", "state2")},
            )


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_mlp_sim")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, "--simulate", str(out), "32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("case, tier", [(c, t) for c in CASES for t in _tiers(c)],
                         ids=[f"{c['name']}-tier{t}" for c in CASES for t in _tiers(c)])
def test_simulated_kernel_matches_cpu_kernel(simulated, case, tier):
    r = np.load(simulated / f"{case['name']}-tier{tier}.npz")
    done = int(r["done_cpu"])
    assert int(r["done_sim"]) == done
    n_steps = case["epochs"] * -(-case["n"] // case["batch"])
    if "nan_pos" in case:
        assert done == case["nan_pos"] // case["batch"] > 0
        assert not np.isfinite(r["losses_cpu"][done]) and not np.isfinite(r["losses_cpu"][done])
        assert not np.isfinite(r["losses_sim"][done])
        # an untouched tail: the kernel wrote no loss after the stop
        np.testing.assert_array_equal(r["losses_sim"][done + 1:], -1.0)
    else:
        assert done == n_steps
    f32 = case.get("dtype") == "float32"
    rtol, atol = (1e-4, 1e-5) if f32 else (1e-12, 1e-14)
    upto = done + 1 if done < n_steps else done
    np.testing.assert_allclose(r["losses_sim"][:upto], r["losses_cpu"][:upto], rtol=rtol, atol=atol)
    for key in ("params", "grads", "state1", "state2"):
        np.testing.assert_allclose(r[f"{key}_sim"], r[f"{key}_cpu"], rtol=rtol, atol=atol,
                                   err_msg=key)
    assert np.isfinite(r["params_sim"]).all()
    if not f32:  # the trajectory really moved (not a vacuous comparison)
        finite = r["losses_cpu"][:done]
        assert len(finite) < 2 or np.ptp(finite) > 0


def _run_child(code: str, **env) -> None:
    """Run ``code`` in a fresh interpreter (env set before numba is imported);
    it must print ok."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **env), timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_gpu_plan_is_none_off_the_gpu_backend():
    """Importing gpu_compiled touches no CUDA; off the cupy backend the plan is None."""
    code = (
        "import sys, numpy as np, fastnn as fn\n"
        "from fastnn import gpu_compiled\n"
        "assert 'numba.cuda' not in sys.modules and 'cupy' not in sys.modules\n"
        "m = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))\n"
        "opt = fn.optim.Adam(m.parameters(), lr=0.01)\n"
        "assert gpu_compiled.plan_fast_path(m, fn.MSELoss(), opt) is None\n"
        "assert 'numba.cuda' not in sys.modules\n"
        "print('ok')\n"
    )
    # numpy: on a GPU machine "auto" would be cupy, where the plan is not None
    _run_child(code, FASTNN_BACKEND="numpy")


def test_cuda_kernel_has_the_cpu_kernels_codes():
    """cuda_mlp defines its own codes (numba.cuda freezes module constants)."""
    code = (
        "from fastnn.backends import cuda_mlp, numba_kernels, numba_mlp\n"
        "for name in ('LOSS_MSE', 'LOSS_XENT', 'LOSS_BCE_LOGITS', 'LOSS_BCE', 'OPT_SGD', 'OPT_ADAM'):\n"
        "    assert getattr(cuda_mlp, name) == getattr(numba_mlp, name), name\n"
        "for name in ('IDENTITY', 'RELU', 'LEAKY_RELU', 'SIGMOID', 'TANH', 'GELU'):\n"
        "    assert getattr(cuda_mlp, name) == getattr(numba_kernels, name), name\n"
        "print('ok')\n"
    )
    _run_child(code, NUMBA_ENABLE_CUDASIM="1")


# The kernel's signature as gpu_compiled.run_epochs launches it (C-contiguous
# device arrays, Python ints as int64), compiled for an H100/H200 (sm_90).
_COMPILE_FOR_SM90 = """
import sys, types
from numba import cuda, types as T
import numba.cuda.dispatcher as dispatcher
# No device here: device functions ask the current device for its compute capability.
dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from fastnn.backends import cuda_mlp

def arr(t, nd):
    return T.Array(t, nd, "C")

out = sys.argv[1]
for name, ft in (("f32", T.float32), ("f64", T.float64)):
    sig = (arr(ft, 2), arr(ft, 2), arr(T.int64, 1), arr(T.int64, 2), T.int64,
           arr(ft, 1), arr(ft, 1), arr(ft, 1), arr(ft, 1), arr(T.int64, 2), arr(T.int64, 1),
           arr(ft, 1), T.int64, T.int64, arr(T.float64, 1), T.int64, arr(T.float64, 1),
           arr(T.float64, 1), arr(ft, 1), arr(ft, 1), arr(ft, 1), arr(ft, 1), arr(T.float64, 1),
           arr(ft, 1), T.int64)
    ptx, _ = cuda.compile_ptx(cuda_mlp.train_mlp_cuda.py_func, sig, cc=(9, 0))
    path = f"{out}/train_mlp_{name}.ptx"
    open(path, "w").write(ptx)
    # PTX -> sm_90 machine code, as the driver does at load: nvJitLink, the
    # version that matches numba-cuda's NVVM (a system ptxas may be older).
    try:
        from cuda.bindings import nvjitlink
    except ImportError:  # numba-cuda without cuda-bindings' nvJitLink: the PTX alone
        continue
    h = nvjitlink.create(2, ["-arch=sm_90", "-verbose"])
    nvjitlink.add_data(h, nvjitlink.InputType.PTX, ptx.encode(), len(ptx.encode()), name)
    nvjitlink.complete(h)
    cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
    nvjitlink.get_linked_cubin(h, cubin)
    log = bytearray(nvjitlink.get_info_log_size(h))
    nvjitlink.get_info_log(h, log)
    nvjitlink.destroy(h)
    assert len(cubin) > 1000, len(cubin)
    print(name, [l.strip() for l in log.decode().splitlines() if "registers" in l])
print("ok")
"""


def test_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """The real CUDA compile of train_mlp_cuda, float32 and float64: numba-cuda
    -> NVVM -> PTX for sm_90 -> machine code (nvJitLink).
    The simulator runs the kernel as Python and cannot see a typing error in
    any branch, which would fail the compile, and with it the one-launch path,
    on every GPU."""
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda not installed (the test extra installs it)")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0 and "libnvvm" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("NVVM not found (the test extra's numba-cuda[cu13] brings it)")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("f32", "f64"):
        assert ".entry" in (tmp_path / f"train_mlp_{name}.ptx").read_text()


def test_shared_memory_tiers_fill_the_limit_in_order():
    """shared_plan: the most reused arrays first, never past the limit; the
    bytes are tier_bytes', which the simulated tiers above run with exactly."""
    code = (
        "import numpy as np\n"
        "from fastnn.backends import cuda_mlp as c\n"
        "xor = np.array([[2, 8, 0, 16], [8, 1, 24, 32]])\n"
        "need = c.tier_bytes(xor, 4, 36, np.float32, c.OPT_ADAM)\n"
        "assert need == (0, 4 * (36 + 16), 4 * (36 + 16 + 2 * 3 * 4 * 8 + 2 * 4 * 8),\n"
        "                4 * (36 + 16 + 2 * 3 * 4 * 8 + 2 * 4 * 8 + 3 * 36)), need\n"
        "assert c.shared_plan(xor, 4, 36, np.float32, c.OPT_ADAM) == (c.TIER_ALL, need[3])\n"
        "assert c.tier_bytes(xor, 4, 36, np.float32, c.OPT_SGD)[3] == need[2] + 4 * 2 * 36\n"
        "assert c.tier_bytes(xor, 4, 36, np.float64, c.OPT_ADAM)[3] == 2 * need[3]\n"
        "for limit in range(0, need[3] + 8, 4):\n"
        "    tier, used = c.shared_plan(xor, 4, 36, np.float32, c.OPT_ADAM, limit=limit)\n"
        "    assert used == need[tier] <= limit and (tier == 3 or need[tier + 1] > limit)\n"
        "wide = np.array([[64, 64, 0, 4096], [64, 64, 4160, 8256]])  # 8320 weights\n"
        "assert c.shared_plan(wide, 256, 8320, np.float32, c.OPT_ADAM)[0] == c.TIER_PARAMS\n"
        "assert c.shared_plan(wide, 256, 8320, np.float64, c.OPT_ADAM) == (c.TIER_GLOBAL, 0)\n"
        "print('ok')\n"
    )
    _run_child(code)


@pytest.mark.parametrize("shared_fails", [False, True])
def test_a_failed_shared_memory_probe_leaves_the_kernel_on_global_memory(fake_gpu, monkeypatch,
                                                                          shared_fails):
    """The probe runs the kernel from global memory, then all in shared memory:
    only the first decides whether fit may use the kernel; a wrong answer from
    the second keeps fit's plans on global memory, with the reason kept."""
    import types

    import fastnn as fn
    from fastnn import backends, gpu_compiled

    layouts = []

    def launch(*args, threads, stream, shared=None):  # the probe's step, done by hand
        layouts.append("global" if shared == (0, 0) else "shared")
        if shared_fails and shared is None:
            return  # the shared layout "computes" nothing
        losses, done, params, grads = args[16], args[17], args[5], args[6]
        losses[0], done[0], params[0], params[1] = 0.125, 1, 0.55, 0.05
        grads[0] = grads[1] = -0.5

    fake = types.SimpleNamespace(TIER_GLOBAL=0, launch=launch,
                                 scratch=lambda layout, batch, dtype: {"A": np.zeros(4, dtype)})
    monkeypatch.setitem(sys.modules, "fastnn.backends.cuda_mlp", fake)
    monkeypatch.setattr(backends, "cuda_mlp", fake, raising=False)
    monkeypatch.setattr(gpu_compiled, "_status", {"cuda": None})
    monkeypatch.setattr(gpu_compiled, "_stream", lambda: 0)
    monkeypatch.delenv("FASTNN_FAST_PATH")
    with fn.use_backend("cupy"):
        m = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))
        plan = gpu_compiled.plan_fast_path(m, fn.MSELoss(), fn.Adam(m.parameters(), lr=0.01))
        assert plan is not None and plan.shared_memory
        assert gpu_compiled.ready(plan)  # the kernel is usable either way
    assert layouts == ["global", "shared"]
    assert plan.shared_memory is not shared_fails
    reason = gpu_compiled.shared_memory_reason(np.float32)
    assert (reason is not None and "shared-memory layout off: numba.cuda kernel probe gave loss 0"
            in reason) if shared_fails else reason is None


def test_the_one_launch_kernel_is_not_planned_off_device_0(fake_gpu, monkeypatch):
    """numba.cuda launches in device 0's context: a CuPy backend on another
    device keeps fit's ordinary path rather than handing the kernel its arrays."""
    import fastnn as fn
    from fastnn import gpu_compiled

    backend = fake_gpu[0]
    monkeypatch.setattr(gpu_compiled, "_status", {"cuda": None})
    monkeypatch.delenv("FASTNN_FAST_PATH", raising=False)
    with fn.use_backend(backend):
        m = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))
        opt = fn.Adam(m.parameters(), lr=0.01)
        assert gpu_compiled.plan_fast_path(m, fn.MSELoss(), opt) is not None
        monkeypatch.setattr(backend, "_device_id", 1)
        assert gpu_compiled.plan_fast_path(m, fn.MSELoss(), opt) is None


def test_run_epochs_makes_the_data_and_buffer_views_once_per_fit(fake_gpu, monkeypatch):
    """A fit that launches once per epoch (stop_when, a progress bar) makes the
    Numba views of its data, buffers and layout once; new data remakes them,
    and the next fit (a new plan) starts afresh, since its caller may have
    changed X or y in place."""
    import types

    import fastnn as fn
    from fastnn import backends, gpu_compiled

    def launch(*args, threads, stream, shared=None):
        losses, done = args[16], args[17]
        losses[:] = 0.5
        done[0] = len(losses)

    fake = types.SimpleNamespace(
        TIER_GLOBAL=0, launch=launch, pick_threads=lambda layout, batch: 32,
        shared_plan=lambda layout, batch, n_params, dtype, opt_kind: (3, 1024),
        scratch=lambda layout, batch, dtype, xp=np: {"A": xp.zeros(4, dtype)})
    monkeypatch.setitem(sys.modules, "fastnn.backends.cuda_mlp", fake)
    monkeypatch.setattr(backends, "cuda_mlp", fake, raising=False)
    monkeypatch.setattr(gpu_compiled, "_status", {"cuda": None, "float32": None})
    monkeypatch.setattr(gpu_compiled, "_stream", lambda: 0)
    views = []
    monkeypatch.setattr(gpu_compiled, "_dev", lambda a: views.append(a) or a)
    monkeypatch.delenv("FASTNN_FAST_PATH")
    with fn.use_backend("cupy"):
        m = fn.Sequential(fn.Linear(2, 8), fn.Tanh(), fn.Linear(8, 1))
        opt = fn.Adam(m.parameters(), lr=0.01)
        X = fn.asarray(np.zeros((8, 2), np.float32))
        y = fn.asarray(np.zeros((8, 1), np.float32))
        order = np.arange(8)[None]

        def views_made(X, y):
            views.clear()
            losses = gpu_compiled.run_epochs(plan, opt, X, y, order, 4)
            assert losses.tolist() == [0.5, 0.5]
            return len(views)

        plan = gpu_compiled.plan_for_fit(m, fn.MSELoss(), opt, X, y, 10**6, 4)
        assert plan is not None
        first = views_made(X, y)
        per_call = 4  # the epoch orders, the hyper-parameters, the losses, the step count
        assert first > per_call and views_made(X, y) == per_call
        assert views_made(fn.asarray(np.ones((8, 2), np.float32)), y) == first
        plan = gpu_compiled.plan_for_fit(m, fn.MSELoss(), opt, X, y, 10**6, 4)
        assert views_made(X, y) == first
        assert opt.step_count == 8


def test_simulator_is_reported_unusable_for_fit():
    """Under the simulator numba.cuda 'works' but must never be used by fit."""
    code = (
        "from fastnn import gpu_compiled\n"
        "r = gpu_compiled.unavailable_reason()\n"
        "assert r is not None and 'simulator' in r, r\n"
        "print('ok')\n"
    )
    _run_child(code, NUMBA_ENABLE_CUDASIM="1")


def test_probe_problem_gives_the_hand_computed_step_under_the_simulator():
    """The start-up probe (gpu_compiled) on the kernel itself, in the simulator:
    a wrong probe turns the one-launch path off on every GPU, silently. The
    same batch twice (sample 0 twice, as an all-zero order gives) must fail it."""
    code = (
        "import numpy as np\n"
        "from numba import cuda\n"
        "from fastnn import gpu_compiled\n"
        "from fastnn.backends import cuda_mlp\n"
        "for dtype in ('float32', 'float64'):\n"
        "    args, losses = gpu_compiled.probe_problem(dtype, cuda.to_device)\n"
        "    cuda_mlp.launch(*args, threads=32)\n"
        "    verdict = gpu_compiled.probe_verdict(losses.copy_to_host(), args[5].copy_to_host(),\n"
        "                                          args[6].copy_to_host())\n"
        "    assert verdict is None, verdict\n"
        "    args, losses = gpu_compiled.probe_problem(dtype, cuda.to_device)\n"
        "    args[3].copy_to_device(np.zeros((1, 2), np.int64))\n"
        "    cuda_mlp.launch(*args, threads=32)\n"
        "    verdict = gpu_compiled.probe_verdict(losses.copy_to_host(), args[5].copy_to_host(),\n"
        "                                          args[6].copy_to_host())\n"
        "    assert verdict is not None and 'loss 0.25' in verdict, verdict\n"
        "print('ok')\n"
    )
    _run_child(code, NUMBA_ENABLE_CUDASIM="1")

# ---------------------------------------------------------------- GPU only
def _cupy_or_skip():
    import fastnn

    reason = fastnn.available_backends().get("cupy")
    if reason is not None:
        pytest.skip(f"needs a CUDA device with CuPy: {reason}")
    from fastnn import gpu_compiled

    why = gpu_compiled.unavailable_reason()
    if why is not None:
        pytest.skip(f"numba.cuda unusable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if "float32" not in c["name"]][:6]
                         + [c for c in CASES if c["loss"] >= 2 and "float32" not in c["name"]],
                         ids=lambda c: c["name"])
def test_gpu_kernel_matches_cpu_kernel(case):
    """The compiled kernel on CuPy arrays: same numbers to rounding (FMA, device libm)."""
    _cupy_or_skip()
    import cupy

    from fastnn.backends import cuda_mlp, numba_mlp

    order = ("X", "Yf", "Yi", "orders", "batch_size", "params", "grads", "state1", "state2",
             "layout", "acts", "alphas", "loss_kind", "opt_kind", "hyper", "step0", "losses")
    base = _build(case)
    cpu = _copy(base)
    done_cpu = numba_mlp.train_mlp(*(cpu[k] for k in order))
    dev = _shared_buffers(base, {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v)
                                 for k, v in base.items()})
    done_out = cupy.zeros(1, cupy.float64)
    work = cuda_mlp.scratch(base["layout"], base["batch_size"], base["params"].dtype, cupy)
    cuda_mlp.launch(*(dev[k] for k in order), done_out, work,
                    threads=cuda_mlp.pick_threads(base["layout"], base["batch_size"]))
    assert int(done_out.get()[0]) == done_cpu
    upto = min(done_cpu + 1, len(base["losses"]))
    np.testing.assert_allclose(dev["losses"].get()[:upto], cpu["losses"][:upto], rtol=1e-9)
    for key in ("params", "grads", "state1", "state2"):
        np.testing.assert_allclose(dev[key].get(), cpu[key], rtol=1e-9, atol=1e-12, err_msg=key)
    # Every array in global memory instead (the layout the benchmark's A/B runs):
    # the same instructions on other addresses, so the same bits.
    shared = {k: v.get() for k, v in dev.items() if hasattr(v, "get")}
    dev = _shared_buffers(base, {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v)
                                 for k, v in base.items()})
    work = cuda_mlp.scratch(base["layout"], base["batch_size"], base["params"].dtype, cupy)
    cuda_mlp.launch(*(dev[k] for k in order), done_out, work,
                    shared=(cuda_mlp.TIER_GLOBAL, 0))
    for key in ("losses", "params", "grads", "state1", "state2"):
        np.testing.assert_array_equal(dev[key].get(), shared[key], err_msg=key)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_shared_memory_layout_passes_its_probe(dtype):
    """fit's layout (every array in shared memory) gives the probe's hand-computed
    step on the device; else fit quietly runs the kernel from global memory."""
    _cupy_or_skip()
    from fastnn import gpu_compiled

    assert gpu_compiled._probe_kernel(np.dtype(dtype)) is None
    assert gpu_compiled.shared_memory_reason(dtype) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_run_epochs_matches_cpu_compiled_path(dtype):
    """gpu_compiled.run_epochs (cupy) vs compiled.run_epochs (numba), same weights and orders."""
    _cupy_or_skip()
    import fastnn as fn
    from fastnn import compiled, gpu_compiled

    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 6)).astype(dtype)
    y = rng.integers(0, 3, 50)
    orders = np.stack([rng.permutation(50) for _ in range(3)])

    def train(backend):
        fn.set_default_dtype(dtype)
        try:
            fn.manual_seed(0)
            with fn.use_backend(backend) as be:
                m = fn.Sequential(fn.Linear(6, 16), fn.GELU(), fn.Linear(16, 3))
                opt = fn.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
                loss_fn = fn.CrossEntropyLoss()
                Xd, yd = be.asarray(X), be.asarray(y)
                if backend == "cupy":
                    plan = gpu_compiled.plan_for_fit(m, loss_fn, opt, Xd, yd, 10**6, 16)
                    assert plan is not None, gpu_compiled.unavailable_reason(dtype)
                    losses = gpu_compiled.run_epochs(plan, opt, Xd, yd, orders, 16)
                else:
                    plan = compiled.plan_fast_path(m, loss_fn, opt)
                    losses = compiled.run_epochs(plan, opt, Xd, yd, orders, 16)
                return losses, [fn.to_numpy(p.data) for p in m.parameters()], opt.step_count
        finally:
            fn.set_default_dtype(np.float32)

    if fn.available_backends()["numba"] is not None:
        pytest.skip("numba backend unusable")
    gl, gp, gs = train("cupy")
    cl, cp, cs = train("numba")
    assert isinstance(gl, np.ndarray) and gl.shape == (12,) and gs == cs == 12
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gl, cl, **tol)
    for a, b in zip(gp, cp):
        np.testing.assert_allclose(a, b, **tol)


@pytest.mark.gpu
def test_gpu_fused_kernel_speed(capsys):
    """Informational: steps/s of the fused kernel on XOR 2-8-1 (Adam, batch 4)."""
    _cupy_or_skip()
    import time

    import cupy

    from fastnn.backends import cuda_mlp

    case = CASES[0]
    base = _build(dict(case, epochs=2000, n=4, batch=4))
    dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in base.items()}
    order = ("X", "Yf", "Yi", "orders", "batch_size", "params", "grads", "state1", "state2",
             "layout", "acts", "alphas", "loss_kind", "opt_kind", "hyper", "step0", "losses")
    done_out = cupy.zeros(1, cupy.float64)
    work = cuda_mlp.scratch(base["layout"], 4, base["params"].dtype, cupy)
    args = [dev[k] for k in order]
    cuda_mlp.launch(*args, done_out, work, threads=32)  # compile
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    cuda_mlp.launch(*args, done_out, work, threads=32)
    cupy.cuda.Device().synchronize()
    dt = time.perf_counter() - t
    with capsys.disabled():
        print(f"\ncuda_mlp XOR 2-8-1 Adam b4: {2000 / dt:.0f} steps/s ({dt / 2000 * 1e6:.2f} us/step)")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--simulate":
    _simulate(sys.argv[2], int(sys.argv[3]))


def test_numbas_grid_of_one_warning_is_silenced_and_others_are_not():
    """The one-block launch would warn on every fit (numba's dispatcher flags
    grids under 128 blocks). numba-cuda and numba's built-in CUDA have separate
    NumbaPerformanceWarning classes, so the filter goes by the message text."""
    import warnings

    import numba.core.errors as core_errors
    from fastnn.backends import cuda_mlp  # noqa: F401 (installs the filter)

    classes = [core_errors.NumbaPerformanceWarning]
    try:
        from numba.cuda.core import errors as cuda_errors  # numba-cuda
        classes.append(cuda_errors.NumbaPerformanceWarning)
    except ImportError:
        pass
    text = "Grid size {} will likely result in GPU under-utilization due to low occupancy."
    with warnings.catch_warnings(record=True) as caught:  # fastnn's filter still in place
        for cls in classes:
            warnings.warn(cls(text.format(1)))
            warnings.warn(cls(text.format(2)))
    assert [str(w.message) for w in caught] == [text.format(2)] * len(classes)
