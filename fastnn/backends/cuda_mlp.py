"""One CUDA launch that runs many training steps of a narrow MLP (GPU twin of numba_mlp).

For XOR-size nets a training step is a few hundred multiply-adds, and on a GPU
every op launch (~5-10 us) costs more than its arithmetic. ``train_mlp_cuda``
runs forward, loss, backward and the optimizer update for every batch of one
or more epochs inside ONE block of one launch: the block's threads split each
phase (rows x output features for the matmuls, weights for the gradients,
elements for the update) with ``cuda.syncthreads()`` between phases. The
block keeps the weights in shared memory for the whole launch, and the
activations, gradients and optimizer state too when they fit (``shared_plan``:
an XOR-size net fits whole), so a step's many dependent reads wait on shared
memory, not on L1/L2.

It follows ``numba_mlp.train_mlp`` op for op: the same activation functions, the
same loss scaling, the same ``sgd_1d`` / ``adam_1d`` element update, and every
sum runs over its index in the same order (the forward sums over k, the weight
gradient over rows, the loss over rows then features in one thread). Under
Numba's CUDA simulator float64 results therefore match the CPU kernel to
rounding; on a GPU, NVVM's default FMA contraction and the device's exp/tanh
make them agree to rounding, not bit for bit.

Arguments are ``train_mlp``'s, plus caller-allocated work arrays (see
``scratch``) and ``done_out`` (1 element, float64) in place of the return value:
the number of steps done (it stops at the first non-finite loss, before that
batch's update). Narrow nets only: every layer <= 64x64 weights
(compiled.MAX_LAYER_WEIGHTS), batch <= 256 (MAX_BATCH): beyond that one block is the wrong shape (larger
batches still compute correctly).

Only this module imports numba.cuda; fastnn imports this module lazily (from
gpu_compiled), so importing fastnn never touches CUDA.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from numba import cuda, int32

from . import activations, constants, numba_kernels
from .activations import ACTIVATIONS
from .constants import BCE_EPSILON
from .jit_cache import track_sources
from .numba_kernels import act_grad_value, act_value, bce_grad, bce_logits_term, bce_term

IDENTITY, RELU, LEAKY_RELU, SIGMOID, TANH, GELU = (
    ACTIVATIONS[name].code for name in ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu")
)
LOSS_MSE, LOSS_XENT, LOSS_BCE_LOGITS, LOSS_BCE = 0, 1, 2, 3  # compiled.LOSS_KINDS
OPT_SGD, OPT_ADAM = 0, 1
MAX_BATCH = 256
MAX_THREADS = 256
N_CONST = 16  # slots of the dtype-cast constants array ``cst``
# What a launch keeps in shared memory (shared_plan), each tier adding to the last.
TIER_GLOBAL, TIER_PARAMS, TIER_ACTIVATIONS, TIER_ALL = 0, 1, 2, 3
# Dynamic shared memory every CUDA device gives a block without opting in (48 KiB),
# less room for the kernel's static flag and the 1 KiB sm_80+ devices keep per block.
SHARED_LIMIT_BYTES = 48 * 1024 - 2048

# cst slots (the param dtype): 0 zero; 1 MSE 2/(m*out); 2 MSE 1/(m*out); 3 xent 1/m;
# SGD: 4 lr, 5 momentum, 6 1-dampening, 7 weight_decay;
# Adam: 4 1-beta1, 5 beta2, 6 1-beta2, 7 step_size, 8 sqrt(bias corr. 2), 9 eps,
#       10 weight_decay, 11 1-lr*weight_decay;
# 12 one; 13 BCELoss's log clamp -100; 14 BCE's epsilon.

# The activations and BCE terms are numba_mlp's own element functions, compiled
# for the device: one definition, so the two kernels cannot drift apart.
_act = cuda.jit(device=True)(act_value.py_func)
_act_grad = cuda.jit(device=True)(act_grad_value.py_func)
_bce_logits_term = cuda.jit(device=True)(bce_logits_term.py_func)
_bce_term = cuda.jit(device=True)(bce_term.py_func)
_bce_grad = cuda.jit(device=True)(bce_grad.py_func)


@cuda.jit(cache=True)
def train_mlp_cuda(X, Yf, Yi, orders, batch_size, params_g, grads_g, state1_g, state2_g,
                   layout, acts, alphas, loss_kind, opt_kind, hyper, step0, losses,
                   done_out, A_g, Z_g, dA_g, dZ_g, rowloss, cst_g, tier):
    """Launch with ONE block and ``shared_plan``'s bytes of dynamic shared memory:
    ``train_mlp_cuda[1, threads, stream, shared_bytes](..., tier)``.

    ``tier`` (shared_plan) says which arrays the block keeps in shared memory for
    the whole launch; the ``*_g`` global arrays are read at the start and the
    parameters, gradients and optimizer state written back at the end.
    Every thread runs the same loops (so every barrier is reached by all);
    the non-finite stop goes through a shared flag read after a barrier.
    """
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    flag = cuda.shared.array(1, int32)
    smem = cuda.shared.array(0, dtype=params_g.dtype)  # shared_plan's carve-up, in order
    size = params_g.shape[0]
    params, cst, grads, state1, state2 = params_g, cst_g, grads_g, state1_g, state2_g
    A, Z, dA, dZ = A_g, Z_g, dA_g, dZ_g
    at = 0
    if tier >= TIER_PARAMS:
        params = smem[at:at + size]
        cst = smem[at + size:at + size + N_CONST]
        at += size + N_CONST
    if tier >= TIER_ACTIVATIONS:
        A = smem[at:at + A_g.size]  # no reshape: it needs a helper NVVM cannot link
        at += A_g.size
        Z = smem[at:at + Z_g.size]
        at += Z_g.size
        dA = smem[at:at + dA_g.size]
        at += dA_g.size
        dZ = smem[at:at + dZ_g.size]
        at += dZ_g.size
    if tier >= TIER_ALL:
        grads = smem[at:at + size]
        state1 = smem[at + size:at + 2 * size]
        at += 2 * size
        state2 = state1  # SGD's one buffer (run_epochs passes it twice)
        if opt_kind == OPT_ADAM:
            state2 = smem[at:at + size]
    for i in range(tid, size, nt):  # a no-op copy onto itself below each tier
        params[i] = params_g[i]
        grads[i] = grads_g[i]
        state1[i] = state1_g[i]
        if opt_kind == OPT_ADAM:
            state2[i] = state2_g[i]
    n = X.shape[0]
    n_layers = layout.shape[0]
    in_dim = layout[0, 0]
    out_dim = layout[n_layers - 1, 1]
    # The work arrays are flat (scratch): row r of layer l's activations is
    # A[l * plane + r * width:][:width], of the output gradients dA[r * width:][:width].
    width = 1
    for l in range(n_layers):
        width = max(width, layout[l, 0], layout[l, 1])
    plane = batch_size * width
    top = n_layers * plane
    n_batches = (n + batch_size - 1) // batch_size
    if tid == 0:
        cst[0] = 0.0
        cst[12] = 1.0
        cst[13] = -100.0
        cst[14] = BCE_EPSILON
        flag[0] = 0
    cuda.syncthreads()
    zero = cst[0]  # a zero of the param dtype
    done = 0
    stop = False
    for e in range(orders.shape[0]):
        for b in range(n_batches):
            lo = b * batch_size
            hi = min(lo + batch_size, n)
            m = hi - lo
            step = step0 + done + 1
            if tid == 0:  # this batch's constants, cast to the param dtype by the store
                cst[1] = 2.0 / (m * out_dim)
                cst[2] = 1.0 / (m * out_dim)
                cst[3] = 1.0 / m
                if opt_kind == OPT_SGD:
                    cst[4] = hyper[0]
                    cst[5] = hyper[1]
                    cst[6] = 1.0 - hyper[2]
                    cst[7] = hyper[3]
                else:
                    lr, beta1, beta2, wd = hyper[0], hyper[1], hyper[2], hyper[4]
                    cst[4] = 1.0 - beta1
                    cst[5] = beta2
                    cst[6] = 1.0 - beta2
                    cst[7] = lr / (1.0 - beta1 ** step)
                    cst[8] = (1.0 - beta2 ** step) ** 0.5
                    cst[9] = hyper[3]
                    cst[10] = wd
                    cst[11] = 1.0 - lr * wd
            for idx in range(tid, m * in_dim, nt):
                r = idx // in_dim
                j = idx - r * in_dim
                A[r * width + j] = X[orders[e, lo + r], j]
            cuda.syncthreads()
            # ---------------- forward: one (row, feature) per thread, sum over k in order
            for l in range(n_layers):
                fi, fo, wo, bo = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
                code, alpha = acts[l], alphas[l]
                for idx in range(tid, m * fo, nt):
                    r = idx // fo
                    j = idx - r * fo
                    acc = zero
                    for k in range(fi):
                        acc += A[l * plane + r * width + k] * params[wo + k * fo + j]
                    v = acc
                    if bo >= 0:
                        v += params[bo + j]
                    Z[(l + 1) * plane + r * width + j] = v
                    A[(l + 1) * plane + r * width + j] = _act(v, code, alpha)
                cuda.syncthreads()
            # ---------------- loss (thread 0, in numba_mlp's order) and its gradient (into dA)
            if loss_kind != LOSS_XENT:  # elementwise: MSE, BCE on logits, BCE on probabilities
                scale, inv, one, floor, eps = cst[1], cst[2], cst[12], cst[13], cst[14]
                for idx in range(tid, m * out_dim, nt):
                    r = idx // out_dim
                    j = idx - r * out_dim
                    x = A[top + r * width + j]
                    t = Yf[orders[e, lo + r], j]
                    if loss_kind == LOSS_MSE:
                        dA[r * width + j] = (x - t) * scale
                    elif loss_kind == LOSS_BCE_LOGITS:
                        dA[r * width + j] = (_act(x, SIGMOID, zero) - t) * inv
                    else:
                        dA[r * width + j] = _bce_grad(x, t, one, eps, inv)
                if tid == 0:
                    acc = zero
                    for r in range(m):
                        src = orders[e, lo + r]
                        for j in range(out_dim):
                            x = A[top + r * width + j]
                            t = Yf[src, j]
                            if loss_kind == LOSS_MSE:
                                d = x - t
                                acc += d * d
                            elif loss_kind == LOSS_BCE_LOGITS:
                                acc += _bce_logits_term(x, t, zero)
                            else:
                                acc += _bce_term(x, t, one, floor)
                    total = acc * inv
                    losses[done] = total
                    if not math.isfinite(total):
                        flag[0] = 1
            else:
                inv_n = cst[3]
                for r in range(tid, m, nt):
                    mx = A[top + r * width]
                    for j in range(1, out_dim):
                        v = A[top + r * width + j]
                        if v > mx or v != v:
                            mx = v
                    s = 0.0
                    for j in range(out_dim):
                        ex = math.exp(A[top + r * width + j] - mx)
                        dA[r * width + j] = ex
                        s += float(ex)
                    label = Yi[orders[e, lo + r]]
                    rowloss[r] = math.log(s) - float(A[top + r * width + label] - mx)
                    sc = float(inv_n) / s
                    for j in range(out_dim):
                        dA[r * width + j] = float(dA[r * width + j]) * sc
                    dA[r * width + label] -= inv_n
                cuda.syncthreads()
                if tid == 0:
                    s_total = 0.0
                    for r in range(m):
                        s_total += rowloss[r]
                    total = s_total / m
                    losses[done] = total
                    if not math.isfinite(total):
                        flag[0] = 1
            cuda.syncthreads()
            if flag[0] != 0:  # the same value in every thread: all leave together
                stop = True
                break
            # ---------------- backward
            for li in range(n_layers):
                l = n_layers - 1 - li
                fi, fo, wo, bo = layout[l, 0], layout[l, 1], layout[l, 2], layout[l, 3]
                code, alpha = acts[l], alphas[l]
                for idx in range(tid, m * fo, nt):
                    r = idx // fo
                    j = idx - r * fo
                    pos = (l + 1) * plane + r * width + j
                    dZ[r * width + j] = _act_grad(dA[r * width + j], A[pos], Z[pos], code, alpha)
                cuda.syncthreads()
                nw = fi * fo
                nb = fo if bo >= 0 else 0
                nd = m * fi if l > 0 else 0
                for idx in range(tid, nw + nb + nd, nt):
                    if idx < nw:  # weight gradient: sum over rows in order
                        k = idx // fo
                        j = idx - k * fo
                        acc = zero
                        for r in range(m):
                            acc += A[l * plane + r * width + k] * dZ[r * width + j]
                        grads[wo + idx] = acc
                    elif idx < nw + nb:  # bias gradient
                        j = idx - nw
                        acc = zero
                        for r in range(m):
                            acc += dZ[r * width + j]
                        grads[bo + j] = acc
                    else:  # dA of the layer below: sum over output features in order
                        q = idx - nw - nb
                        r = q // fi
                        k = q - r * fi
                        acc = zero
                        for j in range(fo):
                            acc += dZ[r * width + j] * params[wo + k * fo + j]
                        dA[r * width + k] = acc
                cuda.syncthreads()
            # ---------------- update: sgd_1d / adam_1d, one element per thread
            if opt_kind == OPT_SGD:
                lr_c, momentum, dampening_c, weight_decay = cst[4], cst[5], cst[6], cst[7]
                nesterov = hyper[4] != 0.0
                first_step = step == 1
                use_momentum = hyper[1] != 0.0
                use_wd = hyper[3] != 0.0
                for i in range(tid, size, nt):
                    g = grads[i]
                    if use_wd:
                        g = g + weight_decay * params[i]
                    if use_momentum:
                        if first_step:
                            bv = g
                        else:
                            bv = state1[i] * momentum + dampening_c * g
                        state1[i] = bv
                        if nesterov:
                            g = g + momentum * bv
                        else:
                            g = bv
                    params[i] = params[i] - lr_c * g
            else:
                one_minus_b1, beta2_c, one_minus_b2 = cst[4], cst[5], cst[6]
                step_size, bc2_sqrt, eps, weight_decay, decay_factor = (
                    cst[7], cst[8], cst[9], cst[10], cst[11])
                use_wd = hyper[4] != 0.0
                decoupled = hyper[5] != 0.0
                for i in range(tid, size, nt):
                    p = params[i]
                    g = grads[i]
                    if decoupled:
                        p = p * decay_factor
                    elif use_wd:
                        g = g + weight_decay * p
                    mv = state1[i] + one_minus_b1 * (g - state1[i])
                    vv = state2[i] * beta2_c + one_minus_b2 * g * g
                    state1[i] = mv
                    state2[i] = vv
                    denom = math.sqrt(vv) / bc2_sqrt + eps
                    params[i] = p - step_size * (mv / denom)
            cuda.syncthreads()
            done += 1
        if stop:
            break
    cuda.syncthreads()
    for i in range(tid, size, nt):  # back to the optimizer's buffers (no-op when global)
        params_g[i] = params[i]
        state1_g[i] = state1[i]
        if opt_kind == OPT_ADAM:
            state2_g[i] = state2[i]
        # Last: plain SGD passes the gradient buffer as its state (kernel_inputs),
        # whose shared copy still holds the gradients from before the launch.
        grads_g[i] = grads[i]
    if tid == 0:
        done_out[0] = done


# ---------------------------------------------------------------- host side
def width_of(layout) -> int:
    layout = np.asarray(layout)
    return int(max(layout[:, 0].max(), layout[:, 1].max()))


def scratch(layout, batch_size: int, dtype, xp=np) -> dict:
    """The work arrays one launch needs, allocated with ``xp`` (numpy or cupy)."""
    layout = np.asarray(layout)
    width, n_layers = width_of(layout), len(layout)
    return {  # flat: layer l, row r, feature j of A and Z at (l * batch_size + r) * width + j
        "A": xp.zeros((n_layers + 1) * batch_size * width, dtype=dtype),
        "Z": xp.zeros((n_layers + 1) * batch_size * width, dtype=dtype),
        "dA": xp.zeros(batch_size * width, dtype=dtype),
        "dZ": xp.zeros(batch_size * width, dtype=dtype),
        "rowloss": xp.zeros(batch_size, dtype=np.float64),
        "cst": xp.zeros(N_CONST, dtype=dtype),
    }


# One block on purpose (the whole net between one block's barriers), but numba's
# dispatcher warns about any grid under 128 blocks, on every launch. Matched by
# its text: numba-cuda's NumbaPerformanceWarning is not numba.core.errors' class.
GRID_OF_ONE_WARNING = r"Grid size 1 will likely result in GPU under-utilization"
warnings.filterwarnings("ignore", message=GRID_OF_ONE_WARNING)


def tier_bytes(layout, batch_size: int, size: int, dtype, opt_kind: int) -> tuple[int, ...]:
    """Dynamic shared memory each tier needs (index: the tier), in the kernel's
    carve-up order: parameters and constants; then A, Z, dA, dZ; then the
    gradients and optimizer state (one buffer for SGD, two for Adam)."""
    item = np.dtype(dtype).itemsize
    layout = np.asarray(layout)
    width, n_layers = width_of(layout), len(layout)
    elements = (
        size + N_CONST,
        2 * (n_layers + 1) * batch_size * width + 2 * batch_size * width,
        size * (3 if opt_kind == OPT_ADAM else 2),
    )
    return tuple(item * int(sum(elements[:tier])) for tier in range(TIER_ALL + 1))


def shared_plan(layout, batch_size: int, size: int, dtype, opt_kind: int,
                limit: int = SHARED_LIMIT_BYTES) -> tuple[int, int]:
    """``(tier, bytes)``: the most one launch can keep in shared memory.

    Every step reads each weight once per batch row in the forward and again in
    the backward pass, and each activation once per output feature; the gradients
    and optimizer state are touched once per step. So the tiers go in that order
    (tier_bytes). An XOR-size net fits whole; a stack of 64x64 layers at batch
    256 runs from global memory (L1/L2-cached), as before there were tiers."""
    need = tier_bytes(layout, batch_size, size, dtype, opt_kind)
    tier = max(t for t in range(len(need)) if need[t] <= limit)
    return tier, need[tier]


def pick_threads(layout, batch_size: int) -> int:
    """Enough threads for the widest phase, a multiple of 32, at most MAX_THREADS."""
    work = batch_size * width_of(layout)
    return int(min(MAX_THREADS, max(32, -(-work // 32) * 32)))


def launch(X, Yf, Yi, orders, batch_size, params, grads, state1, state2, layout, acts,
           alphas, loss_kind, opt_kind, hyper, step0, losses, done_out, work,
           threads: int | None = None, stream=0, shared: tuple[int, int] | None = None) -> None:
    """Launch ``train_mlp_cuda`` (asynchronously on a GPU); ``work`` from ``scratch``.

    Any batch size works; MAX_BATCH is where one block stops paying off, a
    policy for the caller. ``threads`` (pick_threads) and ``shared``
    (shared_plan's ``(tier, bytes)``; ``(TIER_GLOBAL, 0)`` keeps every array in
    global memory) default to what the layout asks for, which reads ``layout``
    back to the host when it is a device array: fit passes both."""
    if threads is None or shared is None:
        host_layout = _on_host(layout)
        threads = pick_threads(host_layout, batch_size) if threads is None else threads
        if shared is None:
            shared = shared_plan(host_layout, batch_size, params.shape[0], params.dtype, opt_kind)
    tier, shared_bytes = shared
    train_mlp_cuda[1, threads, stream, shared_bytes](
        X, Yf, Yi, orders, int(batch_size), params, grads, state1, state2, layout, acts,
        alphas, int(loss_kind), int(opt_kind), hyper, int(step0), losses, done_out,
        work["A"], work["Z"], work["dA"], work["dZ"], work["rowloss"], work["cst"], tier,
    )


def _on_host(a) -> np.ndarray:
    """A NumPy copy of a NumPy, Numba device or CuPy array."""
    for copy in ("copy_to_host", "get"):
        if hasattr(a, copy):
            return getattr(a, copy)()
    return np.asarray(a)


# Built from numba_kernels' element functions and the constants of activations.py and constants.py.
track_sources(globals(), numba_kernels, activations, constants)
