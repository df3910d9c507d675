"""Command line: ``fastnn info | train | bench`` (also ``python -m fastnn``)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def cmd_info(args) -> int:
    import numpy as np

    import fastnn as fn
    from fastnn import threads

    print(f"fastnn {fn.__version__}  (python {platform.python_version()}, numpy {np.__version__})")
    print(f"machine: {platform.machine()}, {threads.default_threads()} usable cores, "
          f"{threads.get_num_threads()} threads")
    print("backends:")
    reasons = fn.available_backends()
    for name, reason in reasons.items():
        if reason is None:
            with fn.use_backend(name) as b:
                print(f"  {name:<6} usable   device: {b.device}")
        else:
            print(f"  {name:<6} unusable {reason}")
    print(f"current backend: {fn.get_backend().name} (FASTNN_BACKEND or auto)")
    if reasons.get("numba") is None:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run: the pool is not started
            layer = f"not started (configured: {numba.config.THREADING_LAYER})"
        print(f"numba {numba.__version__}: threading layer {layer}, "
              f"{numba.get_num_threads()} threads (fastnn's kernels run serial)")
    if reasons.get("cupy") is None:
        import cupy

        with fn.use_backend("cupy") as backend:
            pass  # the instance only: info leaves the current backend as it was
        rt = cupy.cuda.runtime
        free, total = backend.memory_info() if hasattr(backend, "memory_info") else (0, 0)
        print(f"cupy {cupy.__version__}, CUDA runtime {rt.runtimeGetVersion()}, driver "
              f"{rt.driverGetVersion()}, memory {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        print(f"  GEMMs: {backend.blas_status}; GEMM precision {fn.get_precision()}")
    print("native thread pools (threadpoolctl):")
    for pool in threads.thread_info():
        print(f"  {pool.get('internal_api')}: {pool.get('num_threads')} threads, "
              f"{pool.get('version')}, {pool.get('architecture', '')}  {pool.get('filepath')}")
    return 0


def cmd_train(args) -> int:
    from fastnn.precision import using

    import fastnn as fn

    # The backend and the GEMM policy for this run only (main() may be called in-process).
    with using(args.precision), fn.use_backend(args.backend):
        return _train(args)


def _train(args) -> int:
    import numpy as np

    import fastnn as fn
    from fastnn import data

    backend = fn.get_backend()  # cmd_train's use_backend(args.backend)
    for option, path in (("--plot", args.plot), ("--save", args.save)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):  # say so now, not after the training
            raise SystemExit(f"fastnn train: {option} {path}: the folder {folder} does not exist")
    if args.threads:
        fn.set_num_threads(args.threads)
    fn.manual_seed(args.seed)
    if args.dataset == "digits":
        X, y = data.load_digits("train")
        Xt, yt = data.load_digits("test")
    elif args.dataset == "spirals":
        X, y = data.spirals(n_samples=2000, n_classes=3, seed=args.seed)
        X, Xt, y, yt = data.train_test_split(X, y, seed=args.seed)
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown data set {args.dataset}")
    if not args.no_standardize:
        # Standardize with training statistics; the +0.1 floor keeps the
        # nearly constant border pixels of digits from being blown up.
        mean, scale = X.mean(axis=0), X.std(axis=0) + 0.1
        X, Xt = (X - mean) / scale, (Xt - mean) / scale
    classes = int(y.max()) + 1
    sizes = [X.shape[1]] + list(args.hidden) + [classes]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(fn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(fn.ReLU())
    model = fn.Sequential(*layers)
    optimizers = {
        "adam": lambda p: fn.Adam(p, lr=args.lr),
        "adamw": lambda p: fn.AdamW(p, lr=args.lr),
        "sgd": lambda p: fn.SGD(p, lr=args.lr, momentum=0.9),
        "rmsprop": lambda p: fn.RMSprop(p, lr=args.lr),
    }
    opt = optimizers[args.optimizer](model.parameters())
    print(f"fastnn {fn.__version__} on {backend.name} ({backend.device}): "
          f"MLP {'-'.join(map(str, sizes))}, {type(opt).__name__} lr={args.lr}, "
          f"batch {args.batch_size}, {args.epochs} epochs, {len(X)} training samples"
          + ("" if args.precision == "float32" else f", {args.precision} GEMMs"
             + ("" if backend.name == "cupy" else " (GPU only: exact float32 here)")))
    t0 = time.perf_counter()
    history = fn.fit(model, fn.CrossEntropyLoss(), opt, X, y, epochs=args.epochs,
                     batch_size=args.batch_size, seed=args.seed,
                     validation_data=(Xt, yt), progress=not args.quiet)
    wall = time.perf_counter() - t0
    accuracy = float((fn.predict(model, Xt).argmax(axis=1) == yt).mean())
    print(f"final training loss {history.loss[-1]:.4f}, test loss {history.val_loss[-1]:.4f}")
    print(f"test accuracy: {accuracy:.4f} ({len(Xt)} samples)")
    if history.epochs_run > 1:
        first = history.epoch_seconds[0]
        # The first epoch loads (or compiles) the JIT kernels, or warms up the
        # GPU and records its graph: in a short run that hides the later speed.
        print(f"throughput: {history.steady_samples_per_second:,.0f} samples/s after the first "
              f"epoch (which took {first:.2f} s with one-time start-up); "
              f"{history.samples_per_second:,.0f} overall "
              f"({history.seconds:.2f} s training, {wall:.2f} s with validation)")
    else:
        print(f"throughput: {history.samples_per_second:,.0f} samples/s "
              f"({history.seconds:.2f} s training, {wall:.2f} s with validation)")
    print(f"steps: {history.step_path}")
    if args.plot:
        history.plot(args.plot)
        print(f"loss curve written to {args.plot}")
    if args.save:
        fn.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "epoch": history.epochs_run, "sizes": np.array(sizes)}, args.save)
        print(f"checkpoint written to {args.save}")
    return 0


def cmd_bench(args) -> int:
    import faulthandler
    import signal

    from fastnn import benchmarking

    if hasattr(signal, "SIGUSR1"):
        # gpu_check.sh's time guard sends SIGUSR1 first: a hung benchmark then
        # shows where it hangs (stderr) before the guard kills it.
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError, OSError):  # stderr without a file (captured)
            pass

    return benchmarking.main(args)


def _positive(kind):
    """argparse type: a number > 0, with a one-line error otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnn", description="fastnn command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, backends, device, BLAS and threads").set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train an MLP (default: on the bundled digits data)")
    train.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "cupy"])
    train.add_argument("--dataset", default="digits", choices=["digits", "spirals"])
    train.add_argument("--hidden", type=_positive(int), nargs="+", default=[128],
                       help="hidden layer sizes")
    train.add_argument("--epochs", type=_positive(int), default=50)
    train.add_argument("--batch-size", type=_positive(int), default=32)
    train.add_argument("--lr", type=_positive(float), default=1e-3)
    train.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "rmsprop"])
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--precision", default="float32", choices=["float32", "tf32", "bf16"],
                       help="GEMM precision on a GPU (fn.set_precision; no effect on the CPU)")
    train.add_argument("--threads", type=_positive(int), default=None,
                       help="CPU threads (BLAS and Numba)")
    train.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG")
    train.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--no-standardize", action="store_true",
                       help="feed raw features (default: standardize with training statistics)")
    train.set_defaults(func=cmd_train)

    bench = sub.add_parser("bench", help="training-throughput table across backends")
    try:
        from fastnn import benchmarking

        benchmarking.add_arguments(bench)
    except ImportError:
        pass
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a clear one-line message, not a traceback, for user errors
        from fastnn.errors import FastnnError

        if isinstance(exc, FastnnError):
            print(f"fastnn: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
