"""bf16 rounding: fastnn.precision.bf16_bits / bf16_round and kernels/convert.cu.

The NumPy reference is checked against ``ml_dtypes.bfloat16`` (Google's numpy
bfloat16 dtype, round to nearest even) on drawn, bulk and hand-picked inputs;
on a GPU the f32_to_bf16 kernel must reproduce the reference bit for bit.

NaN is the one deliberate difference: ml_dtypes returns the canonical quiet NaN
(0x7fc0 / 0xffc0), fastnn keeps the top payload bits and sets the quiet bit, so
NaN lanes are compared by NaN-ness, quietness and sign only.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastnn
from fastnn.backends import kernel_sources
from fastnn.precision import bf16_bits, bf16_round

QUIET_BIT = 0x0040
SIGN_BIT = 0x8000


def from_bits(*patterns: int) -> np.ndarray:
    return np.array(patterns, dtype=np.uint32).view(np.float32)


def ml_dtypes_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on casting NaN
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def is_bf16_nan(bits: np.ndarray) -> np.ndarray:
    return (bits & 0x7FFF) > 0x7F80


def assert_matches_ml_dtypes(x: np.ndarray) -> None:
    ours, theirs = bf16_bits(x), ml_dtypes_bits(x)
    assert ours.dtype == np.uint16 and ours.shape == x.shape
    nan = np.isnan(x)
    np.testing.assert_array_equal(is_bf16_nan(ours), nan)
    np.testing.assert_array_equal(is_bf16_nan(theirs), nan)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    # NaN lanes: quiet, and the input's sign kept.
    assert np.all(ours[nan] & QUIET_BIT)
    np.testing.assert_array_equal(ours[nan] & SIGN_BIT, (x[nan].view(np.uint32) >> 16) & SIGN_BIT)


# ------------------------------------------------------------- drawn inputs
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=16)


@settings(max_examples=60)
@given(hnp.arrays(np.float32, _SHAPES, elements=st.floats(width=32)))
def test_bits_match_ml_dtypes_on_drawn_floats(x):
    assert_matches_ml_dtypes(x)


@settings(max_examples=60)
@given(hnp.arrays(np.uint32, _SHAPES))
def test_bits_match_ml_dtypes_on_drawn_bit_patterns(u):
    """Every float32 bit pattern, NaN payloads and subnormals included."""
    assert_matches_ml_dtypes(u.view(np.float32))


@settings(max_examples=60)
@given(hnp.arrays(np.float32, _SHAPES, elements=st.floats(width=32)))
def test_round_is_the_float32_value_of_the_bits(x):
    rounded = bf16_round(x)
    assert rounded.dtype == np.float32 and rounded.shape == x.shape
    np.testing.assert_array_equal(rounded.view(np.uint32), bf16_bits(x).astype(np.uint32) << 16)
    with np.errstate(invalid="ignore"):
        expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(rounded, expected)  # NaN == NaN here


# -------------------------------------------------------------- bulk inputs
def test_bits_match_ml_dtypes_on_random_and_every_low_half():
    """2^20 random patterns, plus all 2^16 low halves under high halves where
    rounding is delicate: around 1, zero/subnormals, the largest bf16, inf/NaN."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2**32, size=2**20, dtype=np.uint64).astype(np.uint32)
    highs = np.array([0x3F80, 0x3F81, 0x3FFF, 0x0000, 0x007F, 0x7F7F, 0x7F80, 0xFF7F, 0xFFC0],
                     dtype=np.uint32)
    every_low = (highs[:, None] << 16 | np.arange(2**16, dtype=np.uint32)).ravel()
    for patterns in (random, every_low):
        assert_matches_ml_dtypes(patterns.view(np.float32))


# ------------------------------------------------------- hand-picked values
EDGES = [  # (float32 bits, bf16 bits, why)
    (0x00000000, 0x0000, "+0"),
    (0x80000000, 0x8000, "-0 keeps its sign"),
    (0x7F800000, 0x7F80, "+inf"),
    (0xFF800000, 0xFF80, "-inf"),
    (0x00000001, 0x0000, "smallest subnormal rounds to +0"),
    (0x80000001, 0x8000, "... and to -0"),
    (0x00008000, 0x0000, "subnormal tie, even kept bit: down to +0"),
    (0x00018000, 0x0002, "subnormal tie, odd kept bit: up"),
    (0x007FFFFF, 0x0080, "largest subnormal rounds up to the smallest normal"),
    (0x7F7FFFFF, 0x7F80, "largest finite float32 rounds to inf"),
    (0xFF7FFFFF, 0xFF80, "... and to -inf"),
    (0x7F7F7FFF, 0x7F7F, "just below the halfway point past the largest bf16"),
    (0x7F7F8000, 0x7F80, "tie past the largest bf16 (odd): inf"),
    (0x3F808000, 0x3F80, "tie, even kept bit (1.0 + 2^-8): down to 1.0"),
    (0x3F818000, 0x3F82, "tie, odd kept bit: up"),
    (0xBF808000, 0xBF80, "negative tie, even: down in magnitude"),
    (0xBF818000, 0xBF82, "negative tie, odd: up in magnitude"),
    (0x3F807FFF, 0x3F80, "just below halfway: down"),
    (0x3F808001, 0x3F81, "just above halfway: up"),
    (0x3FFF8000, 0x4000, "tie whose carry ripples into the exponent: 2.0"),
]
NANS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@pytest.mark.parametrize("bits,expected,why", EDGES, ids=[e[2] for e in EDGES])
def test_edge_values(bits, expected, why):
    x = from_bits(bits)
    assert bf16_bits(x)[0] == expected, why
    assert ml_dtypes_bits(x)[0] == expected, f"ml_dtypes disagrees with the table: {why}"
    assert bf16_round(x).view(np.uint32)[0] == expected << 16


@pytest.mark.parametrize("bits", NANS, ids=[hex(b) for b in NANS])
def test_nan_stays_a_quiet_nan_with_its_sign(bits):
    """0x7f800001 matters most: truncating or rounding its bits gives inf."""
    out = bf16_bits(from_bits(bits))[0]
    assert is_bf16_nan(out) and out & QUIET_BIT
    assert out & SIGN_BIT == (bits >> 16) & SIGN_BIT
    assert out == (bits >> 16) | QUIET_BIT  # the kernel's exact rule
    assert np.isnan(bf16_round(from_bits(bits))[0])


def test_scalars_and_views_keep_their_shape():
    assert bf16_bits(1.0).shape == () and bf16_bits(1.0) == 0x3F80
    assert bf16_round(np.float32(1.0)).shape == ()
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(bf16_round(strided), strided)  # small ints are exact


# ------------------------------------------------------------ rounding error
def test_round_keeps_float32_and_is_within_half_an_ulp():
    """bf16 keeps 8 significant bits (7 stored), so round to nearest is off by
    at most half an ulp, 2^-8 relative. 1 + 2^-8 (a tie rounded to 1) reaches
    that bound, so 2^-9 would be too tight."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(2**16) * np.exp2(rng.integers(-120, 120, 2**16))).astype(np.float32)
    x = x[np.abs(x) >= np.finfo(np.float32).tiny]  # normal values only
    rounded = bf16_round(x)
    assert rounded.dtype == np.float32
    rel = np.abs(rounded.astype(np.float64) - x) / np.abs(x.astype(np.float64))
    assert rel.max() <= 2.0**-8
    tie = np.float32(1 + 2**-8)
    assert bf16_round(tie) == 1 and (tie - 1) / tie > 2.0**-9


# ----------------------------------------------------------------- the kernel
def _kernel_inputs():
    rng = np.random.default_rng(2)
    random = rng.integers(0, 2**32, size=300_007, dtype=np.uint64).astype(np.uint32)
    edges = np.array([e[0] for e in EDGES] + NANS, dtype=np.uint32)
    # More than 1024 blocks of 256 elements: the grid-stride loop takes a second lap.
    return np.concatenate([edges, random]).view(np.float32)


def _launch_shape(n):
    return (min((n + 255) // 256, 1024),), (256,)


@pytest.mark.gpu
def test_kernel_matches_reference_bit_for_bit():
    if fastnn.available_backends()["cupy"] is not None:
        pytest.skip(fastnn.available_backends()["cupy"])
    import cupy

    x = _kernel_inputs()
    module = cupy.RawModule(code=kernel_sources.read_kernel("convert.cu"), options=("--fmad=false",))
    kernel = module.get_function("f32_to_bf16")
    x_gpu = cupy.asarray(x)
    out_gpu = cupy.zeros(x.size, dtype=cupy.uint16)
    kernel(*_launch_shape(x.size), (x_gpu, out_gpu, np.int64(x.size)))
    np.testing.assert_array_equal(cupy.asnumpy(out_gpu), bf16_bits(x))


def test_kernel_source_on_the_cpu_matches_reference_bit_for_bit():
    """The same check in CI: convert.cu's own code, built for the CPU by
    tests/cuda_on_cpu.py (float32 launches there flush subnormals, as -ftz=true)."""
    import cuda_on_cpu

    if cuda_on_cpu.available() is not None:
        pytest.skip(cuda_on_cpu.available())
    x = _kernel_inputs()
    out = np.zeros(x.size, dtype=np.uint16)
    module = cuda_on_cpu.compile_module(kernel_sources.read_kernel("convert.cu"))
    module.launch("f32_to_bf16", *_launch_shape(x.size), (x, out, np.int64(x.size)))
    np.testing.assert_array_equal(out, bf16_bits(x))
