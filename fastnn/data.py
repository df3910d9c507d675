"""Small data sets for examples and tests: bundled digits, toy generators, an IDX reader.

Pure NumPy: every function returns ``numpy.ndarray`` objects (pass them to ``fn.fit``,
which moves them to the current backend). Features default to ``float32``; class labels
are ``int64``; regression/binary targets have shape ``(n, 1)``.

Generators take ``seed=None`` (fresh randomness) or an int (repeatable results).
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import struct
import zlib

import numpy as np

from .errors import DTypeError, InputError

__all__ = [
    "load_digits", "train_test_split", "read_idx",
    "xor", "parity", "spirals", "noisy_linear", "sum_of_squares",
]

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# IDX type code -> big-endian dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- helpers

def _float_dtype(dtype, where: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise DTypeError(f"{where}: dtype {dtype!r} is not a NumPy dtype") from e
    if dt.kind != "f":
        raise DTypeError(f"{where}: dtype must be a floating type (float32, float64), got {dt}")
    return dt


def _positive_int(value, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{where}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _nonneg_float(value, name: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {name} must be a number, got {value!r}") from e
    if not np.isfinite(v) or v < 0:
        raise InputError(f"{where}: {name} must be finite and >= 0, got {value!r}")
    return v


# --------------------------------------------------------------------------- splitting

def _split_indices(y: np.ndarray, test_fraction: float, seed, stratify: bool):
    """Return (train_idx, test_idx), each a shuffled int64 array of row indices."""
    n = len(y)
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test > n - 1:
        raise InputError(
            f"train_test_split: test_fraction={test_fraction} of {n} samples leaves "
            f"{n_test} test and {n - n_test} train samples; both need at least 1")
    rng = np.random.default_rng(seed)
    if not stratify:
        perm = rng.permutation(n)
        return perm[n_test:], perm[:n_test]
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # Largest-remainder allocation: per-class test counts sum exactly to n_test.
    quota = counts * (n_test / n)
    per_class = np.floor(quota).astype(np.int64)
    short = n_test - int(per_class.sum())
    if short > 0:
        order = np.argsort(-(quota - per_class), kind="stable")
        per_class[order[:short]] += 1
    train, test = [], []
    for k in range(len(classes)):
        idx = np.flatnonzero(inverse == k)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[:per_class[k]])
        train.append(idx[per_class[k]:])
    train_idx = np.concatenate(train)
    test_idx = np.concatenate(test)
    return train_idx[rng.permutation(len(train_idx))], test_idx[rng.permutation(len(test_idx))]


def train_test_split(X, y, test_fraction: float = 0.2, seed=0, stratify: bool = True):
    """Split ``X`` (n, ...) and ``y`` (n, ...) into ``(X_train, X_test, y_train, y_test)``.

    The order matches scikit-learn's ``train_test_split``. ``round(n * test_fraction)``
    rows go to the test part. With ``stratify=True`` each label of ``y`` (``y`` of
    shape (n,) or (n, 1) with discrete values) keeps its share in both parts. Rows
    come out shuffled; the same ``seed`` gives the same split.
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim == 0 or y.ndim == 0 or len(X) != len(y):
        raise InputError(
            f"train_test_split: X and y need the same number of rows, got "
            f"X {X.shape} and y {y.shape}")
    try:
        frac = float(test_fraction)
    except (TypeError, ValueError) as e:
        raise InputError(f"train_test_split: test_fraction must be a number, "
                         f"got {test_fraction!r}") from e
    if not 0.0 < frac < 1.0:
        raise InputError(f"train_test_split: test_fraction must be in (0, 1), got {test_fraction!r}")
    if stratify:
        if y.ndim == 2 and y.shape[1] == 1:
            labels = y[:, 0]
        elif y.ndim == 1:
            labels = y
        else:
            raise InputError(f"train_test_split: stratify=True needs labels y of shape (n,) "
                             f"or (n, 1), got {y.shape}")
    else:
        labels = np.zeros(len(y))
    tr, te = _split_indices(labels, frac, seed, bool(stratify))
    return X[tr], X[te], y[tr], y[te]


# --------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_raw():
    res = importlib.resources.files("fastnn") / "_data" / "digits.npz"
    with res.open("rb") as f, np.load(f, allow_pickle=False) as z:
        X, y = z["X"], z["y"]
    tr, te = _split_indices(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, True)
    for a in (X, y, tr, te):
        a.setflags(write=False)
    return X, y, tr, te


def load_digits(split: str = "train", normalize: bool = True, dtype=np.float32):
    """The bundled 8x8 UCI handwritten digits (1,797 images, 10 classes); see
    ``fastnn/_data/LICENSE-digits.txt`` for the source and licence (CC BY 4.0).

    Returns ``(X, y)``: ``X`` of shape (n, 64) (8x8 images flattened row by row) in
    ``dtype``, scaled to [0, 1] (divided by 16) when ``normalize`` else raw 0..16;
    ``y`` int64 labels 0..9 of shape (n,).

    ``split``: ``"train"`` (1,438 rows), ``"test"`` (359 rows) or ``"all"`` (1,797 rows
    in the original order). The train/test split is fixed (stratified 80/20 with
    ``numpy.random.default_rng(0)``), identical on every machine and call.
    """
    if split not in ("train", "test", "all"):
        raise InputError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    if normalize:
        dt = _float_dtype(dtype, "load_digits")
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise DTypeError(f"load_digits: dtype {dtype!r} is not a NumPy dtype") from e
        if dt.kind not in "uif":
            raise DTypeError(f"load_digits: dtype must be numeric, got {dt}")
    X, y, tr, te = _digits_raw()
    if split == "train":
        X, y = X[tr], y[tr]
    elif split == "test":
        X, y = X[te], y[te]
    Xo = X.astype(dt)  # always a fresh, writable copy
    if normalize:
        Xo /= dt.type(16)
    return Xo, y.astype(np.int64)


# --------------------------------------------------------------------------- generators

def xor(n_repeats: int = 1, seed=None, dtype=np.float32):
    """The XOR truth table. Returns ``X`` (4 * n_repeats, 2) and ``y`` (4 * n_repeats, 1).

    Rows are (0,0)->0, (0,1)->1, (1,0)->1, (1,1)->0, repeated ``n_repeats`` times;
    an int ``seed`` shuffles the rows (``None`` keeps the table order).
    """
    n_repeats = _positive_int(n_repeats, "n_repeats", "xor")
    dt = _float_dtype(dtype, "xor")
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=dt)
    y = np.array([[0], [1], [1], [0]], dtype=dt)
    X, y = np.tile(X, (n_repeats, 1)), np.tile(y, (n_repeats, 1))
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(X))
        X, y = X[perm], y[perm]
    return X, y


def parity(n_bits: int = 3, signed: bool = False, seed=None, dtype=np.float32):
    """All ``2**n_bits`` bit strings with their parity. Returns ``X`` (2**n_bits, n_bits)
    and ``y`` (2**n_bits, 1), ``y = 1`` when the number of ones is odd, else 0.

    Row ``i`` holds the bits of ``i``, most significant first. ``signed=True`` codes the
    inputs as -1/+1 instead of 0/1 (targets stay 0/1). An int ``seed`` shuffles the rows.
    ``n_bits`` is limited to 1..20 (2**20 rows).
    """
    n_bits = _positive_int(n_bits, "n_bits", "parity")
    if n_bits > 20:
        raise InputError(f"parity: n_bits must be <= 20 (2**n_bits rows), got {n_bits}")
    dt = _float_dtype(dtype, "parity")
    i = np.arange(2 ** n_bits, dtype=np.int64)[:, None]
    bits = (i >> np.arange(n_bits - 1, -1, -1, dtype=np.int64)) & 1
    y = (bits.sum(axis=1, keepdims=True) % 2).astype(dt)
    X = (2 * bits - 1).astype(dt) if signed else bits.astype(dt)
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(X))
        X, y = X[perm], y[perm]
    return X, y


def spirals(n_samples: int = 200, n_classes: int = 2, noise: float = 0.05,
            turns: float = 1.5, seed=None, dtype=np.float32):
    """Interleaved spiral arms, one per class. Returns ``X`` (n_samples, 2) in ``dtype``
    (roughly within [-1, 1]) and ``y`` (n_samples,) int64 labels 0..n_classes-1.

    Classes are balanced (sizes differ by at most one); arm ``k`` is rotated by
    ``2*pi*k/n_classes`` and winds ``turns`` times; Gaussian ``noise`` (std) is added.
    Rows are shuffled with ``seed``.
    """
    n_samples = _positive_int(n_samples, "n_samples", "spirals")
    n_classes = _positive_int(n_classes, "n_classes", "spirals", minimum=2)
    if n_samples < n_classes:
        raise InputError(f"spirals: n_samples ({n_samples}) must be >= n_classes ({n_classes})")
    noise = _nonneg_float(noise, "noise", "spirals")
    turns = _nonneg_float(turns, "turns", "spirals")
    dt = _float_dtype(dtype, "spirals")
    rng = np.random.default_rng(seed)
    sizes = np.full(n_classes, n_samples // n_classes)
    sizes[: n_samples % n_classes] += 1
    xs, ys = [], []
    for k, m in enumerate(sizes):
        t = np.linspace(0.05, 1.0, m)
        theta = 2 * np.pi * (turns * t + k / n_classes)
        xs.append(np.stack([t * np.cos(theta), t * np.sin(theta)], axis=1))
        ys.append(np.full(m, k, dtype=np.int64))
    X = np.concatenate(xs) + noise * rng.standard_normal((n_samples, 2))
    y = np.concatenate(ys)
    perm = rng.permutation(n_samples)
    return X[perm].astype(dt), y[perm]


def noisy_linear(n_samples: int = 100, n_features: int = 1, noise: float = 0.1, seed=None,
                 weights=None, bias=None, dtype=np.float32):
    """Linear regression data ``y = X @ true_w + true_b + noise * N(0, 1)``.

    Returns the 4-tuple ``(X, y, true_w, true_b)``: ``X`` (n_samples, n_features) standard
    normal, ``y`` (n_samples, 1), ``true_w`` (n_features, 1) (the layout of a
    ``Linear(n_features, 1)`` weight) and ``true_b`` (1,), all in ``dtype``.
    ``weights`` (n_features values) and ``bias`` (a number) default to standard-normal
    draws from the same ``seed``.
    """
    n_samples = _positive_int(n_samples, "n_samples", "noisy_linear")
    n_features = _positive_int(n_features, "n_features", "noisy_linear")
    noise = _nonneg_float(noise, "noise", "noisy_linear")
    dt = _float_dtype(dtype, "noisy_linear")
    rng = np.random.default_rng(seed)
    if weights is None:
        w = rng.standard_normal((n_features, 1))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.size != n_features or w.ndim > 2 or (w.ndim == 2 and w.shape[1] != 1):
            raise InputError(f"noisy_linear: weights must have n_features={n_features} values "
                             f"(shape ({n_features},) or ({n_features}, 1)), got {w.shape}")
        w = w.reshape(n_features, 1)
    if bias is None:
        b = rng.standard_normal(1)
    else:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.size != 1:
            raise InputError(f"noisy_linear: bias must be a single number, got shape {np.shape(bias)}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise InputError("noisy_linear: weights and bias must be finite")
    X = rng.standard_normal((n_samples, n_features))
    y = X @ w + b + noise * rng.standard_normal((n_samples, 1))
    return X.astype(dt), y.astype(dt), w.astype(dt), b.astype(dt)


def sum_of_squares(n_samples: int = 1000, n_features: int = 8, seed=None,
                   low: float = -1.0, high: float = 1.0, dtype=np.float32):
    """Nonlinear regression data: ``X`` (n_samples, n_features) uniform in [low, high)
    and ``y = sum(X**2, axis=1)`` of shape (n_samples, 1), both in ``dtype``."""
    n_samples = _positive_int(n_samples, "n_samples", "sum_of_squares")
    n_features = _positive_int(n_features, "n_features", "sum_of_squares")
    dt = _float_dtype(dtype, "sum_of_squares")
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InputError(f"sum_of_squares: need finite low < high, got low={low}, high={high}")
    X = np.random.default_rng(seed).uniform(low, high, (n_samples, n_features)).astype(dt)
    y = np.sum(X.astype(np.float64) ** 2, axis=1, keepdims=True).astype(dt)
    return X, y


# --------------------------------------------------------------------------- IDX files

def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed (``.gz``, or any file
    starting with the gzip magic bytes).

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32; the data follow big-endian in C order. Returns an array of that
    shape, e.g. (60000, 28, 28) uint8 for MNIST images, in native byte order.
    Raises ``ValueError`` for a bad magic number, a truncated file or trailing bytes.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # corrupt or truncated gzip stream
        raise InputError(f"read_idx: {path!r}: cannot decompress gzip data ({e})") from e
    if len(raw) < 4:
        raise InputError(f"read_idx: {path!r} is truncated: {len(raw)} bytes, "
                         f"an IDX header needs at least 4")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        raise InputError(
            f"read_idx: {path!r} has a bad magic number 0x{raw[:4].hex()}: expected "
            f"0x0000TTNN with type code TT in {{08, 09, 0b, 0c, 0d, 0e}}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"read_idx: {path!r} is truncated: header announces {ndim} "
                         f"dimensions ({header} bytes), file has {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dt = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    got = len(raw) - header
    if got < expected:
        raise InputError(f"read_idx: {path!r} is truncated: shape {shape} of {dt.newbyteorder('=')} "
                         f"needs {expected} data bytes, file has {got}")
    if got > expected:
        raise InputError(f"read_idx: {path!r} has {got - expected} trailing bytes after "
                         f"shape {shape} of {dt.newbyteorder('=')}")
    arr = np.frombuffer(raw, dtype=dt, count=expected // dt.itemsize, offset=header)
    return arr.reshape(shape).astype(dt.newbyteorder("="))
