"""kernels/*.cu through NVRTC, the compiler CuPy's RawModule runs, with the
options CuPy hands it: fastnn's ``_COMPILE_OPTIONS``, then the ``-ftz=true``
CuPy appends to every RawModule (cupy/cuda/compiler.py,
``_compile_with_cache_cuda``). No GPU needed: NVRTC is a host library. CuPy's own
binding is used where CuPy is installed (the GPU machine), else NVIDIA's
``cuda.bindings`` (brought by the test extra's numba-cuda[cu13]).

What this pins beside "it compiles": float32 arithmetic flushes subnormals
(kernels/README.md says so), float64 does not, the bf16 converter does no float
arithmetic at all, and an ``-ftz=false`` of ours could not undo CuPy's flag.
"""
from __future__ import annotations

import re

import pytest

from fake_cupy import kernel_signatures
from fastnn.backends import kernel_sources
from fastnn.backends.cupy_backend import _COMPILE_OPTIONS

CU_FILES = kernel_sources.list_kernels()
CUPY_APPENDS = ("-ftz=true",)
ARCH = "-arch=compute_90"  # H100 / H200
FLOAT_ARITHMETIC = re.compile(r"^[ \t]*(?:add|sub|mul|div|fma|sqrt|rcp|ex2|lg2|min|max|setp)\."
                              r"[\w.]*f(32|64)\b", re.M)


def _cupy_nvrtc():
    from cupy_backends.cuda.libs import nvrtc

    def compile_ptx(source, name, options):
        program = nvrtc.createProgram(source, name, [], [])
        try:
            nvrtc.compileProgram(program, list(options))
        except Exception as exc:
            pytest.fail(f"NVRTC failed on {name}: {exc}\n{nvrtc.getProgramLog(program)}")
        ptx = nvrtc.getPTX(program)
        return ptx.decode() if isinstance(ptx, bytes) else ptx

    return compile_ptx


def _cuda_bindings_nvrtc():
    from cuda.bindings import nvrtc

    def checked(result):
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC: {result[0]}")
        return result[1] if len(result) > 1 else None

    def compile_ptx(source, name, options):
        program = checked(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
        try:
            status = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
            if status[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                log = b" " * checked(nvrtc.nvrtcGetProgramLogSize(program))
                nvrtc.nvrtcGetProgramLog(program, log)
                pytest.fail(f"NVRTC failed on {name}: {status[0]}\n{log.decode(errors='replace')}")
            ptx = b" " * checked(nvrtc.nvrtcGetPTXSize(program))
            checked(nvrtc.nvrtcGetPTX(program, ptx))
            return ptx.rstrip(b"\x00 ").decode()
        finally:
            nvrtc.nvrtcDestroyProgram(program)

    return compile_ptx


@pytest.fixture(scope="module")
def compile_ptx():
    reasons = []
    for make in (_cupy_nvrtc, _cuda_bindings_nvrtc):
        try:
            compile_ptx = make()
            compile_ptx("extern \"C\" __global__ void probe() {}", "probe.cu", [ARCH])
            return compile_ptx
        except Exception as exc:  # binding absent, or its libnvrtc missing
            reasons.append(f"{make.__name__}: {type(exc).__name__}: {exc}")
    pytest.skip("no NVRTC here: " + "; ".join(reasons))


def cupy_ptx(compile_ptx, filename, ours=_COMPILE_OPTIONS):
    """PTX of kernels/filename compiled as CuPy's RawModule compiles it."""
    source = kernel_sources.read_kernel(filename)
    return compile_ptx(source, filename, list(ours) + list(CUPY_APPENDS) + [ARCH])


def entries(ptx: str) -> dict[str, str]:
    """{kernel name: its PTX, from its .entry to the next}."""
    parts = re.split(r"^\.visible\s+\.entry\s+(\w+)\(", ptx, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("filename", CU_FILES)
def test_nvrtc_compiles_what_the_backend_compiles(compile_ptx, filename):
    """Every kernel of every file, from the exact inlined text CupyBackend hands
    RawModule, under CuPy's options."""
    found = entries(cupy_ptx(compile_ptx, filename))
    for kernel in kernel_signatures(kernel_sources.read_kernel(filename)):
        assert kernel in found, f"{kernel} missing in NVRTC's PTX of {filename}"


@pytest.mark.parametrize("filename", CU_FILES)
def test_float32_arithmetic_flushes_subnormals_and_float64_does_not(compile_ptx, filename):
    """Under CuPy's -ftz=true every float32 arithmetic instruction is the .ftz
    form (kernels/README.md: float32 subnormals read and write as 0 on the
    GPU); float64 instructions have no such form and keep subnormals."""
    ptx = cupy_ptx(compile_ptx, filename)
    for match in FLOAT_ARITHMETIC.finditer(ptx):
        line = ptx[match.start():ptx.index("\n", match.start())].strip()
        if match.group(1) == "32":
            assert ".ftz." in line, f"{filename}: float32 op without .ftz: {line}"
        elif "rcp.approx.ftz.f64" not in line:
            # (rcp.approx.ftz.f64, the only PTX form of that op, is the seed of
            # libdevice's float64 division, refined to full precision after.)
            assert ".ftz." not in line, f"{filename}: float64 op with .ftz: {line}"


def test_bf16_converter_does_no_float_arithmetic(compile_ptx):
    """f32_to_bf16 works on the bits alone, so CuPy's flush cannot touch the
    subnormals it rounds (kernels/README.md, tests/test_bf16.py)."""
    body = entries(cupy_ptx(compile_ptx, "convert.cu"))["f32_to_bf16"]
    assert not FLOAT_ARITHMETIC.search(body), FLOAT_ARITHMETIC.search(body).group(0)


def test_our_ftz_false_would_lose_to_cupys_flag(compile_ptx):
    """Why fastnn documents the flush instead of passing -ftz=false: CuPy's flag
    comes after ours, and NVRTC keeps the last."""
    ptx = cupy_ptx(compile_ptx, "optim.cu", ours=_COMPILE_OPTIONS + ("-ftz=false",))
    assert re.search(r"\.ftz\.f32", ptx)
    plain = compile_ptx(kernel_sources.read_kernel("optim.cu"), "optim.cu",
                        list(_COMPILE_OPTIONS) + ["-ftz=false", ARCH])
    assert not re.search(r"\.ftz\.f32", plain), "-ftz=false alone should keep subnormals"


def test_optimizer_kernels_have_no_fused_multiply_add(compile_ptx):
    """--fmad=false survives CuPy's options: parity with the NumPy reference
    (mul, then add) depends on it."""
    assert not re.search(r"^\s*fma\.", cupy_ptx(compile_ptx, "optim.cu"), re.M)
