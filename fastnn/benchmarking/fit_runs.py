"""The main job as ``fastnn bench`` measures it: fresh digits fits per contender."""
from __future__ import annotations

import time

import numpy as np

from fastnn.benchmarking.steps import build_fastnn_model
from fastnn.benchmarking.workloads import Workload


def _digits():
    from fastnn import data

    X, y = data.load_digits("train")
    Xt, yt = data.load_digits("test")
    return X, y.astype(np.int64), Xt, yt.astype(np.int64)


def fit_run(w: Workload, contender: str, threads: int | None = None, seed: int = 0):
    """``run(epochs) -> (seconds, samples, test accuracy)``: one fresh fit."""
    X, y, Xt, yt = _digits()
    hidden = w.sizes[1:-1]
    if contender.startswith("fastnn-"):
        import fastnn as fn

        backend = contender.split("-", 1)[1]

        def run(epochs):
            with fn.use_backend(backend):
                model, loss_fn, opt = build_fastnn_model(w, seed)
                t0 = time.perf_counter()
                fn.fit(model, loss_fn, opt, X, y, epochs=epochs, batch_size=w.batch,
                       seed=seed, progress=False)
                dt = time.perf_counter() - t0
                acc = float((fn.predict(model, Xt).argmax(1) == yt).mean())
            return dt, len(X) * epochs, acc
    elif contender == "sklearn":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        def run(epochs):
            clf = MLPClassifier(hidden_layer_sizes=hidden, solver="adam", learning_rate_init=w.lr,
                                batch_size=w.batch, max_iter=epochs, alpha=0.0, tol=0.0,
                                n_iter_no_change=epochs + 1, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                clf.fit(X, y)
                dt = time.perf_counter() - t0
            return dt, len(X) * epochs, float((clf.predict(Xt) == yt).mean())
    elif contender in ("torch", "torch-cuda"):
        import torch

        torch.set_num_threads(threads or 1)
        cuda = contender == "torch-cuda"
        if cuda:
            from fastnn.benchmarking.torch_steps import torch_gpu_settings

            info = torch_gpu_settings(torch)
            if not info["cuda_available"]:
                raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
            dev = torch.device("cuda", torch.cuda.current_device())
        else:
            dev = torch.device("cpu")
        Xd, yd, Xtd = (torch.from_numpy(a).to(dev) for a in (X, y, Xt))

        def run(epochs):
            torch.manual_seed(seed)
            layers, sizes = [], w.sizes
            for i in range(len(sizes) - 1):
                layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
                if i < len(sizes) - 2:
                    layers.append(torch.nn.ReLU())
            model = torch.nn.Sequential(*layers).to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=w.lr)
            loss_fn = torch.nn.CrossEntropyLoss()
            n = len(Xd)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(n, device=dev)
                for lo in range(0, n, w.batch):
                    idx = order[lo:lo + w.batch]
                    opt.zero_grad()
                    loss = loss_fn(model(Xd[idx]), yd[idx])
                    loss.backward()
                    opt.step()
                    if not cuda:  # like fastnn's fit: a loss read per step on the CPU only
                        loss.item()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            with torch.no_grad():
                acc = float((model(Xtd).argmax(1).cpu().numpy() == yt).mean())
            return dt, n * epochs, acc
    else:
        raise ValueError(f"unknown contender {contender!r}")
    return run
