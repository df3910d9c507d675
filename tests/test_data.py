"""fastnn.data: bundled digits, toy generators, train_test_split, IDX reader."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from fastnn import data
from fastnn.errors import FastnnError


# --------------------------------------------------------------------------- digits

def test_digits_shapes_dtypes_ranges():
    X, y = data.load_digits("all")
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    Xr, _ = data.load_digits("all", normalize=False)
    assert Xr.max() == 16.0 and np.array_equal(Xr / 16, X)
    X64, _ = data.load_digits("test", dtype=np.float64)
    assert X64.dtype == np.float64
    Xu, _ = data.load_digits("all", normalize=False, dtype=np.uint8)
    assert Xu.dtype == np.uint8 and Xu.max() == 16


def test_digits_split_sizes_and_balance():
    Xtr, ytr = data.load_digits("train")
    Xte, yte = data.load_digits("test")
    assert Xtr.shape == (1438, 64) and ytr.shape == (1438,)
    assert Xte.shape == (359, 64) and yte.shape == (359,)
    _, yall = data.load_digits("all")
    ratio = np.bincount(yte, minlength=10) / np.bincount(yall, minlength=10)
    assert np.all(np.abs(ratio - 0.2) < 0.01)
    # train and test are disjoint and together are the whole set (as multisets of rows)
    Xall, _ = data.load_digits("all")
    both = np.concatenate([Xtr, Xte])
    key = lambda A: np.sort(A.view(np.dtype((np.void, A.dtype.itemsize * 64))).ravel())
    assert np.array_equal(key(both), key(Xall))


def test_digits_split_is_fixed():
    a = data.load_digits("train")
    data._digits_raw.cache_clear()
    b = data.load_digits("train")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # pin the split itself (rows of the "all" order), so a change is noticed
    _, yte = data.load_digits("test")
    tr, te = data._digits_raw()[2:]
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    assert te[:6].tolist() == [914, 60, 1184, 215, 104, 975] and int(te.sum()) == 324981
    assert tr[:6].tolist() == [324, 1289, 797, 780, 503, 389]
    assert np.bincount(yte).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]


def test_digits_returns_fresh_writable_copies():
    X, y = data.load_digits("all")
    X[:] = -1
    y[:] = -1
    X2, y2 = data.load_digits("all")
    assert X2.min() == 0 and y2.min() == 0


def test_digits_equals_sklearn():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    X, y = data.load_digits("all", normalize=False, dtype=np.float64)
    assert np.array_equal(X, d.data) and np.array_equal(y, d.target)
    with np.load(data.importlib.resources.files("fastnn") / "_data" / "digits.npz",
                 allow_pickle=False) as z:
        assert z["X"].dtype == np.uint8 and z["X"].shape == (1797, 64)
        assert z["y"].dtype == np.uint8 and z["y"].shape == (1797,)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split must be"):
        data.load_digits("validation")
    with pytest.raises(TypeError, match="floating"):
        data.load_digits(dtype=np.int32)
    with pytest.raises(TypeError, match="numeric"):
        data.load_digits(normalize=False, dtype=bool)


# --------------------------------------------------------------------------- generators

def test_xor_table():
    X, y = data.xor()
    assert X.dtype == y.dtype == np.float32
    assert X.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert y.tolist() == [[0], [1], [1], [0]]
    X, y = data.xor(n_repeats=3, seed=1)
    assert X.shape == (12, 2) and y.shape == (12, 1)
    assert np.array_equal(y[:, 0], np.logical_xor(X[:, 0], X[:, 1]))
    assert data.xor(dtype=np.float64)[0].dtype == np.float64


@pytest.mark.parametrize("n_bits", [1, 2, 3, 5, 8])
def test_parity_truth_table(n_bits):
    X, y = data.parity(n_bits)
    assert X.shape == (2 ** n_bits, n_bits) and y.shape == (2 ** n_bits, 1)
    assert X.dtype == y.dtype == np.float32
    assert len({tuple(r) for r in X.tolist()}) == 2 ** n_bits  # every input once
    assert np.array_equal(y[:, 0], X.sum(axis=1) % 2)
    assert set(np.unique(X)) <= {0.0, 1.0}
    Xs, ys = data.parity(n_bits, signed=True)
    assert set(np.unique(Xs)) <= {-1.0, 1.0}
    assert np.array_equal(Xs, 2 * X - 1) and np.array_equal(ys, y)


def test_parity_known_rows_and_shuffle():
    X, y = data.parity(3)
    assert X[5].tolist() == [1, 0, 1] and y[5, 0] == 0
    assert X[7].tolist() == [1, 1, 1] and y[7, 0] == 1
    Xs, ys = data.parity(4, seed=0)
    assert np.array_equal(ys[:, 0], Xs.sum(axis=1) % 2)
    assert np.array_equal(Xs, data.parity(4, seed=0)[0])


def test_spirals():
    X, y = data.spirals(201, n_classes=3, seed=0)
    assert X.shape == (201, 2) and X.dtype == np.float32
    assert y.shape == (201,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [67, 67, 67]
    X2, y2 = data.spirals(200, seed=0)
    assert np.bincount(y2).tolist() == [100, 100]
    assert np.abs(X2).max() < 1.5
    a, b = data.spirals(50, seed=3), data.spirals(50, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], data.spirals(50, seed=4)[0])
    Xn, _ = data.spirals(100, noise=0.0, seed=0)
    r = np.hypot(Xn[:, 0], Xn[:, 1])
    assert r.min() >= 0.049 and r.max() <= 1.0 + 1e-6
    assert data.spirals(10, seed=0, dtype=np.float64)[0].dtype == np.float64


def test_noisy_linear_recovers_weights():
    X, y, w, b = data.noisy_linear(2000, n_features=3, noise=0.05, seed=0)
    assert X.shape == (2000, 3) and y.shape == (2000, 1)
    assert w.shape == (3, 1) and b.shape == (1,)
    assert X.dtype == y.dtype == w.dtype == b.dtype == np.float32
    A = np.hstack([X, np.ones((len(X), 1), np.float32)]).astype(np.float64)
    coef = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(coef[:3], w, atol=0.01)
    np.testing.assert_allclose(coef[3], b, atol=0.01)
    X, y, w, b = data.noisy_linear(10, n_features=2, noise=0.0, weights=[2.0, -1.0],
                                   bias=0.5, seed=1, dtype=np.float64)
    assert w.ravel().tolist() == [2.0, -1.0] and b.tolist() == [0.5]
    np.testing.assert_allclose(y, X @ w + b)


def test_sum_of_squares():
    X, y = data.sum_of_squares(500, n_features=4, seed=0)
    assert X.shape == (500, 4) and y.shape == (500, 1)
    assert X.dtype == y.dtype == np.float32
    assert X.min() >= -1 and X.max() < 1
    np.testing.assert_allclose(y[:, 0], (X.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    assert np.array_equal(X, data.sum_of_squares(500, n_features=4, seed=0)[0])


@pytest.mark.parametrize("call, message", [
    (lambda: data.parity(0), "n_bits must be >= 1"),
    (lambda: data.parity(21), "n_bits must be <= 20"),
    (lambda: data.parity(2.5), "n_bits must be an integer"),
    (lambda: data.xor(0), "n_repeats must be >= 1"),
    (lambda: data.spirals(0), "n_samples must be >= 1"),
    (lambda: data.spirals(10, n_classes=1), "n_classes must be >= 2"),
    (lambda: data.spirals(2, n_classes=3), "must be >= n_classes"),
    (lambda: data.spirals(10, noise=-1), "noise must be finite and >= 0"),
    (lambda: data.noisy_linear(0), "n_samples must be >= 1"),
    (lambda: data.noisy_linear(5, n_features=0), "n_features must be >= 1"),
    (lambda: data.noisy_linear(5, n_features=2, weights=[1.0]), "weights must have"),
    (lambda: data.noisy_linear(5, bias=[1.0, 2.0]), "bias must be a single number"),
    (lambda: data.noisy_linear(5, noise=float("nan")), "noise must be finite"),
    (lambda: data.sum_of_squares(-3), "n_samples must be >= 1"),
    (lambda: data.sum_of_squares(5, low=1, high=0), "low < high"),
])
def test_generator_errors(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert isinstance(info.value, FastnnError)


def test_generator_dtype_errors():
    with pytest.raises(TypeError, match="floating"):
        data.spirals(10, dtype=np.int64)
    with pytest.raises(TypeError, match="not a NumPy dtype"):
        data.xor(dtype="not-a-dtype")


# --------------------------------------------------------------------------- split

def test_train_test_split_stratified():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [50, 30, 20])
    X = rng.standard_normal((100, 4)).astype(np.float32)
    Xtr, Xte, ytr, yte = data.train_test_split(X, y, test_fraction=0.2, seed=5)
    assert Xtr.shape == (80, 4) and Xte.shape == (20, 4) and Xtr.dtype == np.float32
    assert np.bincount(yte).tolist() == [10, 6, 4]
    # rows stay paired with their labels
    lookup = {X[i].tobytes(): y[i] for i in range(100)}
    assert all(lookup[r.tobytes()] == t for r, t in zip(Xte, yte))
    again = data.train_test_split(X, y, test_fraction=0.2, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((Xtr, Xte, ytr, yte), again))
    # column labels (n, 1) stratify too; unstratified keeps the size
    _, _, _, yc = data.train_test_split(X, y[:, None], seed=5)
    assert yc.shape == (20, 1) and np.bincount(yc[:, 0]).tolist() == [10, 6, 4]
    _, Xu, _, _ = data.train_test_split(X, y, test_fraction=0.3, stratify=False)
    assert len(Xu) == 30


@pytest.mark.parametrize("kwargs, X, y, message", [
    ({}, np.zeros((5, 2)), np.zeros(4), "same number of rows"),
    ({"test_fraction": 0.0}, np.zeros((5, 2)), np.zeros(5), r"in \(0, 1\)"),
    ({"test_fraction": 1.5}, np.zeros((5, 2)), np.zeros(5), r"in \(0, 1\)"),
    ({"test_fraction": 0.01}, np.zeros((5, 2)), np.zeros(5), "both need at least 1"),
    ({}, np.zeros((5, 2)), np.zeros((5, 2)), "stratify=True needs labels"),
])
def test_train_test_split_errors(kwargs, X, y, message):
    with pytest.raises(ValueError, match=message):
        data.train_test_split(X, y, **kwargs)


# --------------------------------------------------------------------------- IDX

_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
          np.float32: 0x0D, np.float64: 0x0E}


def _idx_bytes(a: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, _CODES[a.dtype.type], a.ndim)
    head += struct.pack(f">{a.ndim}I", *a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype, shape", [
    (np.uint8, (7, 28, 28)), (np.uint8, (10,)), (np.int8, (3, 4)), (np.int16, (2, 3, 2)),
    (np.int32, (5, 3)), (np.float32, (4, 6)), (np.float64, (2, 2, 2, 2)),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, shape, compressed):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        a = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    raw = _idx_bytes(a)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    b = data.read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape and np.array_equal(a, b)
    assert np.array_equal(data.read_idx(str(path)), a)


def test_read_idx_mnist_like_labels(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + labels.tobytes())
    assert data.read_idx(path).tolist() == list(range(10))


@pytest.mark.parametrize("content, message", [
    (b"\x00\x00", "truncated"),
    (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header announces 3 dimensions"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"\x00" * 5, "needs 6 data bytes, file has 5"),
    (b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + b"\x00" * 9, "1 trailing bytes"),
])
def test_read_idx_errors(tmp_path, content, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.read_idx(path)


def test_read_idx_bad_gzip(tmp_path):
    path = tmp_path / "bad.idx.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((100,), np.uint8)))[:-12])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(path)
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "missing.idx")
