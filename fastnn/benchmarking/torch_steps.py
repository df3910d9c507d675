"""PyTorch contenders of ``fastnn bench``: eager on the CPU or a CUDA device,
and the whole step captured in a CUDA graph. Built only inside the torch child
process (runner.ChildWorker), never in the parent."""
from __future__ import annotations

import contextlib

from fastnn.benchmarking.workloads import Workload, make_batch


def _torch_objects(torch, w: Workload, seed: int, device, optimizer_kwargs=None):
    """(model, loss_fn, optimizer, xb, yb) of ``w`` on ``device``; the same
    initial weights (seeded on the CPU) wherever it runs."""
    torch.manual_seed(seed)
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    layers = []
    for i in range(len(w.sizes) - 1):
        layers.append(torch.nn.Linear(w.sizes[i], w.sizes[i + 1]))
        if i < len(w.sizes) - 2:
            layers.append(acts[w.hidden_act]())
        elif w.out_act:
            layers.append(acts[w.out_act]())
    model = torch.nn.Sequential(*layers).to(device)
    loss_fn = torch.nn.CrossEntropyLoss() if w.loss == "xent" else torch.nn.MSELoss()
    kwargs = dict(optimizer_kwargs or {})
    if w.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=w.lr, **kwargs)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=0.9, **kwargs)
    X, y = make_batch(w, seed)
    return model, loss_fn, opt, torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)


def torch_step(w: Workload, threads: int, seed: int = 0):
    """PyTorch eager step (imported here: only ever called in the child process)."""
    import torch

    torch.set_num_threads(threads)
    model, loss_fn, opt, xb, yb = _torch_objects(torch, w, seed, "cpu")

    def run(k: int) -> float:
        loss = None
        for _ in range(k):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            loss = loss.item()  # fastnn's step reads the loss too
        return loss

    return run


def torch_tf32_wanted(precision: str = "float32") -> bool:
    """TF32 for the GPU contenders: on for the tf32 workloads only, as fastnn's
    ``set_precision`` (which also sets CuPy's compute type), so PyTorch and
    fastnn always run their float32 GEMMs at the same precision."""
    return precision == "tf32"


def torch_gpu_settings(torch, precision: str = "float32") -> dict:
    """Set PyTorch's TF32 flags for ``precision`` (see ``torch_tf32_wanted``) and
    return them with the versions and the device, for the JSON."""
    tf32 = torch_tf32_wanted(precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": bool(torch.cuda.is_available()), "precision": precision,
            "autocast": "bfloat16" if precision == "bf16" else None,
            "matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32)}
    try:
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    except Exception:  # pragma: no cover - older/newer API
        pass
    if info["cuda_available"]:
        try:
            index = torch.cuda.current_device()
            info["device"] = torch.cuda.get_device_name(index)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception as exc:  # pragma: no cover - GPU only
            info["device_error"] = f"{type(exc).__name__}: {exc}"
    return info


def torch_cuda_step(w: Workload, threads: int = 1, seed: int = 0, graph: bool = False,
                    device: str = "cuda", warmup: int = 3):
    """PyTorch on a CUDA device (child process only): ``run(k) -> last loss``.

    ``graph=False`` (torch-cuda): eager steps, the loss left on the device (like
    fastnn's GPU step), ``torch.cuda.synchronize()`` before and after the k steps.
    ``graph=True`` (torch-cuda-graph): the whole step -- forward, loss, backward,
    optimizer.step -- captured once in a CUDA graph, as in PyTorch's "whole network
    capture" example: ``warmup`` eager steps on a side stream, ``zero_grad
    (set_to_none=True)``, capture on that stream over the static input/target
    tensors, then ``g.replay()`` per step. Adam is built ``capturable=True`` there.

    ``device="cpu"`` runs the same code without CUDA (tests): eager works; the
    graph path does its warm-up steps and then raises (capture needs CUDA).
    """
    import torch

    torch.set_num_threads(threads)
    info = torch_gpu_settings(torch, w.precision)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not info["cuda_available"]:
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device "
                           f"(built for CUDA {torch.version.cuda})")
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    kwargs = {"capturable": True} if graph and cuda and w.optimizer == "adam" else {}
    model, loss_fn, opt, xb, yb = _torch_objects(torch, w, seed, dev, kwargs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def forward_loss():
        if w.precision != "bf16":
            return loss_fn(model(xb), yb)
        # bf16 mixed precision, PyTorch's way; no weight-cast cache (graph capture).
        with torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):
            return loss_fn(model(xb), yb)

    def step():  # the captured body: no host sync, no new host values
        loss = forward_loss()
        loss.backward()
        opt.step()
        return loss

    if not graph:
        def run(k: int) -> float:
            sync()
            loss = None
            for _ in range(k):
                opt.zero_grad()  # set_to_none: the default, as in the graph path
                loss = step()
            sync()
            return float(loss.item())

        run.info = info
        return run

    # Warm-up on a side stream (cuBLAS handles, allocator, optimizer state such
    # as SGD's momentum buffers and Adam's moments exist before capture).
    stream = torch.cuda.Stream(device=dev) if cuda else None
    if cuda:
        stream.wait_stream(torch.cuda.current_stream(dev))
    ctx = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            step()
    if cuda:
        torch.cuda.current_stream(dev).wait_stream(stream)
    if not cuda:
        raise RuntimeError("torch-cuda-graph: capturing a CUDA graph needs a CUDA device "
                           f"(got {dev}); ran {warmup} warm-up steps only")
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # grads are allocated inside the graph's pool
    with torch.cuda.graph(g, stream=stream):  # the warm-up stream: its handles are ready
        static_loss = step()

    def run(k: int) -> float:
        sync()
        for _ in range(k):
            g.replay()
        sync()
        return float(static_loss.item())

    run.info = dict(info, graph_warmup_steps=warmup)
    run.graph = g  # keep the graph (and its memory pool) alive with the step
    return run
