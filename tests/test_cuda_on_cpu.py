"""tests/cuda_on_cpu.py, the CPU runner of the CUDA kernels, checked on kernels
written for the purpose: it is only worth the GPU tests it stands in for if
barriers, shuffles and the thread numbering behave as on the device, and if
what the device would not forgive is an error here too."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import cuda_on_cpu

pytestmark = pytest.mark.skipif(cuda_on_cpu.available() is not None,
                                reason=str(cuda_on_cpu.available()))

SOURCE = r"""
extern "C" __global__ void thread_ids(int* out) {
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int n = blockDim.x * blockDim.y * blockDim.z;
    out[b * n + t] = b * 1000 + t;
}

// Each thread writes its id, then reads its right neighbour's.
extern "C" __global__ void neighbour(int* out, int with_barrier) {
    __shared__ int s[64];
    s[threadIdx.x] = (int)threadIdx.x + 1;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Butterfly sum over a warp, then over the warps through shared memory.
extern "C" __global__ void warp_sums(const double* x, double* out) {
    __shared__ double part[32];
    double v = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) total += part[w];
        out[0] = total;
    }
}

// Every thread reads slot 0, then lane 0 of each warp reuses its slot: the
// read must be over first (block_reduce's leading barrier).
extern "C" __global__ void reuse(float* out, int with_barrier) {
    __shared__ float s[32];
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = 1.0f;
    __syncthreads();
    const float first = s[0];
    if (with_barrier) __syncthreads();
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = 2.0f;
    __syncthreads();
    out[threadIdx.x] = first;
}

extern "C" __global__ void early_exit(int* out) {
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void half_mask(float* x) {
    x[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, x[threadIdx.x], 1);
}

extern "C" __global__ void shuffle(float* x) {
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}

// A loop whose end depends on a refused shuffle's value: the thread must stop.
extern "C" __global__ void refused_in_a_loop(float* x) {
    float v = 0;
    while (v < 1) v = __shfl_xor_sync(0x0000ffffu, v, 1);
    x[threadIdx.x] = v;
}

__shared__ float file_scope[4];

extern "C" __global__ void scalar_and_file_scope(float* out) {
    __shared__ float total;
    out[0] = total;  // read before any write: the poison
    out[1] = file_scope[threadIdx.x];
}

extern "C" __global__ void add_f32(const float* a, const float* b, float* out) {
    out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}

// The tail check forgotten when `checked` is 0: the last block's threads
// past n read x and write y outside them.
extern "C" __global__ void doubled(const float* x, float* y, int n, int checked) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (checked && i >= n) return;
    y[i] = 2.0f * x[i];
}

extern "C" __global__ void filled(float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = (float)n;
}

extern "C" __global__ void shifted(const float* x, float* y) {
    y[threadIdx.x] = x[(int)threadIdx.x - 1];
}

extern "C" __global__ void wild_write(int* out) {
    out[0] = 1;
    *(volatile int*)(16) = 1;  // no array's guard: the process's own fault handler
}

__device__ float recursed(int depth) {
    volatile float frame[1024];
    frame[depth % 1024] = (float)depth;
    return depth == 0 ? 0.0f : recursed(depth - 1) + frame[depth % 1024];
}

extern "C" __global__ void deep(float* out, int depth) {
    out[threadIdx.x] = recursed(depth);
}

// Every block writes one element: the last block to run wins.
extern "C" __global__ void last_block_wins(int* out) {
    if (threadIdx.x == 0) out[0] = (int)blockIdx.x;
}

// Block b reads what block b - 1 wrote: no order between blocks promises that.
extern "C" __global__ void chained(int* out) {
    if (threadIdx.x == 0) out[blockIdx.x + 1] = out[blockIdx.x] + 1;
}

#define TWO_WARPS (2 * 32)
extern "C" __global__ void __launch_bounds__((TWO_WARPS), 4) bounded(float* x) {
    x[threadIdx.x] = 1.0f;
}

// One slot too far in shared memory (the warp count rounded up, not down).
extern "C" __global__ void shared_overrun(float* out, int n_warps) {
    __shared__ float per_warp[2];
    if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x >> 5] = 1.0f;
    __syncthreads();
    float total = 0;
    for (int w = 0; w < n_warps; ++w) total += per_warp[w];
    out[threadIdx.x] = total;
}

extern "C" __global__ void libm_f32(const float* x, float* e, float* t, float* l, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        e[i] = expf(x[i]);
        t[i] = tanhf(x[i]);
        l[i] = log1pf(x[i]);
    }
}

extern "C" __global__ void add_f64(const double* a, const double* b, double* out) {
    out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}
"""


@pytest.fixture(scope="module")
def module():
    return cuda_on_cpu.compile_module(SOURCE)


def test_every_thread_of_every_block_runs_once_with_its_own_indices(module):
    grid, block = (3, 2, 1), (4, 2, 2)
    out = np.full(6 * 16, -1, np.int32)
    module.launch("thread_ids", grid, block, (out,))
    want = [b * 1000 + t for b in range(6) for t in range(16)]
    np.testing.assert_array_equal(out, want)


def test_a_barrier_orders_shared_memory_and_a_missing_one_shows(module):
    out = np.zeros(64, np.int32)
    module.launch("neighbour", (1,), (64,), (out, np.int32(1)))
    np.testing.assert_array_equal(out, (np.arange(64) + 1) % 64 + 1)
    # Without it, the threads run one after another between barriers, in
    # descending order on copies of the arguments, then ascending on them, on
    # shared memory poisoned with 0xff bytes before each block: the unordered
    # read gives other numbers in each order.
    stale = np.zeros(64, np.int32)
    with pytest.raises(AssertionError, match="out differs between thread orders"):
        module.launch("neighbour", (1,), (64,), (stale, np.int32(0)))
    assert (stale == -1).sum() == 63  # the ascending run: all but the last read poison


def test_warps_run_ahead_so_a_slot_reused_before_a_barrier_shows(module):
    """A warp runs through its shuffles up to the next barrier before the next
    warp starts, as warps may on the device: one that rewrites shared memory
    which another warp has yet to read is caught (a missing leading barrier in
    block_reduce was, in the softmax and BCE parity tests)."""
    ordered = np.zeros(128, np.float32)
    module.launch("reuse", (1,), (128,), (ordered, np.int32(1)))
    np.testing.assert_array_equal(ordered, 1.0)
    raced = np.zeros(128, np.float32)
    with pytest.raises(AssertionError, match="out differs between thread orders"):
        module.launch("reuse", (1,), (128,), (raced, np.int32(0)))
    assert (raced == 2.0).any()  # ascending: warp 0 rewrote slot 0 before the others read it


@pytest.mark.parametrize("kernel", ["last_block_wins", "chained"])
def test_a_result_that_depends_on_the_order_of_blocks_shows(module, kernel):
    """Blocks run in descending order in the first run and ascending in the
    second, as the device promises no order at all."""
    out = np.zeros(9, np.int32)
    with pytest.raises(AssertionError, match=f"kernel {kernel} on the CPU: out differs between thread orders .*blocks that depend"):
        module.launch(kernel, (8,), (32,), (out,))


def test_shuffles_give_the_butterfly_sum_of_each_warp(module):
    x = np.arange(256, dtype=np.float64) ** 2
    out = np.zeros(1)
    module.launch("warp_sums", (1,), (256,), (x, out))
    assert out[0] == x.sum()  # exact: integers well inside float64's mantissa
    y = np.arange(64, dtype=np.float32)
    module.launch("shuffle", (1,), (64,), (y,))
    np.testing.assert_array_equal(y, np.arange(64) ^ 1)


@pytest.mark.parametrize("kernel, block, message", [
    ("early_exit", (32,), "a thread left the kernel while others wait at __syncthreads()"),
    ("half_mask", (32,), "only full-mask, width-32 shuffles"),
    ("shuffle", (48,), "__shfl_xor_sync in a warp of fewer than 32 threads"),
    ("shuffle", (1025,), "block of 1025 threads"),
    ("shuffle", (1, 1, 65), "blockDim of at most (1024, 1024, 64)"),
    ("bounded", (96,), "block within the kernel's __launch_bounds__"),
    ("refused_in_a_loop", (32,), "only full-mask, width-32 shuffles"),
])
def test_what_the_device_would_not_forgive_is_an_error(module, kernel, block, message):
    arg = np.zeros(2048, np.int32 if kernel == "early_exit" else np.float32)
    with pytest.raises(AssertionError, match=f"kernel {kernel} on the CPU: .*{re.escape(message[:30])}"):
        module.launch(kernel, (1,), block, (arg,))


def test_float32_launches_flush_subnormals_float64_ones_keep_them(module):
    """CuPy compiles every RawModule with -ftz=true: float32 only."""
    a32 = np.array([1e-40, -1e-40, 2e-38], np.float32)
    out32 = np.empty_like(a32)
    module.launch("add_f32", (1,), (3,), (a32, np.zeros(3, np.float32), out32))
    np.testing.assert_array_equal(out32, [0.0, 0.0, np.float32(2e-38)])
    a64 = np.array([1e-310, -1e-310, 1.0])
    out64 = np.empty_like(a64)
    module.launch("add_f64", (1,), (3,), (a64, np.zeros(3), out64))
    np.testing.assert_array_equal(out64, a64)
    # the caller's own floating-point mode is left as it was
    assert np.float32(1e-40) * np.float32(1) != 0


def test_every_shared_array_of_the_kernels_is_poisoned_before_each_block():
    """The poison reaches template kernels' shared arrays too (the real
    kernels' block reductions): each is found in the library."""
    from fastnn.backends import kernel_sources

    for name in ("reduce.cu", "softmax_xent.cu", "bce.cu", "act_backward.cu"):
        source = kernel_sources.read_kernel(name)
        found = cuda_on_cpu.compile_module(source).shared
        declared = cuda_on_cpu._SHARED.findall(source)
        assert declared and {f.rsplit("::", 1)[1] for f in found} == set(declared), (name, found)
        assert all("<float>" in f or "<double>" in f or "<float," in f or "<double," in f
                   for f in found), found


def test_scalar_and_file_scope_shared_variables_are_poisoned_too(module):
    out = np.zeros(2, np.float32)
    module.launch("scalar_and_file_scope", (1,), (1,), (out,))
    assert np.isnan(out).all()
    assert {name.rsplit("::", 1)[-1] for name in module.shared} >= {"total", "file_scope", "s"}


def test_two_modules_of_one_template_each_poison_their_own_shared_memory():
    """A template's __shared__ static is a "unique" symbol by default, which
    the loader binds process-wide: the second module would then run on the
    first one's copy and poison an unused one (-fno-gnu-unique keeps each
    library's own)."""
    template = r"""
    template <typename T> __device__ void reads_unwritten(T* out) {
        __shared__ T s[2];
        out[threadIdx.x] = s[threadIdx.x];
    }
    extern "C" __global__ void first_f32(float* out) { reads_unwritten<float>(out); }
    """
    for variant in ("", "extern \"C\" __global__ void other_f32(float* out) { out[0] = 1; }"):
        mod = cuda_on_cpu.compile_module(template + variant)
        out = np.zeros(2, np.float32)
        mod.launch("first_f32", (1,), (1,), (out,))  # thread 0 of 1: no race, s is poison
        assert np.isnan(out[0])


@pytest.mark.parametrize("kernel, args, message", [
    # the end of each copy is flush against a guard in the descending run
    ("doubled", lambda: (np.ones(100, np.float32), np.zeros(100, np.float32), np.int32(100),
                         np.int32(0)),
     r"out-of-bounds read of x\[127\] \(an array of 100 elements\) "
     r"\(block \(1, 0, 0\), thread \(63, 0, 0\)\)"),
    ("filled", lambda: (np.zeros(100, np.float32), np.int32(100)),
     r"out-of-bounds write of y\[127\] \(an array of 100 elements\)"),
    # and its start flush against one in the ascending run
    ("shifted", lambda: (np.ones(64, np.float32), np.zeros(64, np.float32)),
     r"out-of-bounds read of x\[-1\] \(an array of 64 elements\) "
     r"\(block \(0, 0, 0\), thread \(0, 0, 0\)\)"),
    ("deep", lambda: (np.zeros(64, np.float32), np.int32(1000)),
     "a thread overflowed its 256 KiB stack"),
])
def test_an_access_outside_an_array_is_an_error_naming_the_element(module, kernel, args,
                                                                   message):
    """What the device answers with an illegal-address error, or with
    another array's memory: each array runs between inaccessible guards."""
    grid = (1,) if kernel in ("shifted", "deep") else (2,)
    with pytest.raises(AssertionError, match=f"kernel {kernel} on the CPU: {message}"):
        module.launch(kernel, grid, (64,), args())
    # and the next launch runs as before, the fault handler put back
    x, y = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    module.launch("doubled", (2,), (64,), (x, y, np.int32(100), np.int32(1)))
    np.testing.assert_array_equal(y, 2 * x)


def test_an_array_of_nothing_is_all_guard(module):
    with pytest.raises(AssertionError, match=r"out-of-bounds read of x\[0\] \(an array of 0"):
        module.launch("doubled", (1,), (1,), (np.ones(0, np.float32), np.zeros(1, np.float32),
                                              np.int32(1), np.int32(1)))


def test_a_fault_outside_the_guards_still_reaches_the_process_handler(tmp_path):
    """The runner's SIGSEGV handler takes the guards' faults only: any other
    (a wild pointer) goes on to the handler it replaced, here faulthandler's,
    instead of being swallowed or looping."""
    import subprocess
    import sys

    script = tmp_path / "wild.py"
    script.write_text(
        "import faulthandler, sys\n"
        "import numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import cuda_on_cpu, test_cuda_on_cpu\n"
        "faulthandler.enable()\n"
        "module = cuda_on_cpu.compile_module(test_cuda_on_cpu.SOURCE)\n"
        "module.launch('wild_write', (1,), (1,), (np.zeros(1, np.int32),))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -11, (done.returncode, done.stderr[-2000:])
    assert "Segmentation fault" in done.stderr


def test_launch_bounds_are_read_from_the_source_and_a_grid_past_the_limits_is_refused(module):
    assert cuda_on_cpu._launch_bounds(SOURCE) == {"bounded": "(TWO_WARPS)"}
    from fastnn.backends import kernel_sources

    bounds = cuda_on_cpu._launch_bounds(kernel_sources.read_kernel("act_backward.cu"))
    assert bounds == {"act_backward_bias_f32": "32 * FN_BIAS_ROWS",
                      "act_backward_bias_f64": "32 * FN_BIAS_ROWS"}
    x = np.zeros(64, np.float32)
    module.launch("bounded", (1,), (64,), (x,))  # at the bound: runs
    assert (x == 1).all()
    with pytest.raises(AssertionError, match=r"gridDim of 1..\(2\^31 - 1, 65535, 65535\)"):
        module.launch("bounded", (1, 65536), (32,), (x,))


def test_an_index_outside_a_shared_array_stops_at_its_line(module):
    """Neighbouring shared arrays are statics side by side: without the check
    a read one slot too far would find another array's poison or values."""
    out = np.zeros(64, np.float32)
    module.launch("shared_overrun", (1,), (64,), (out, np.int32(2)))
    assert (out == 2).all()
    line = next(i for i, text in enumerate(SOURCE.splitlines(), 1)
                if "total += per_warp[w]" in text)
    with pytest.raises(AssertionError, match=(
            f"an index outside a fixed-size array at line {line} of the kernel source "
            r"\(for \(int w = 0; w < n_warps; \+\+w\) total \+= per_warp\[w\];\) "
            r"\(block \(0, 0, 0\), thread ")):
        module.launch("shared_overrun", (1,), (64,), (out, np.int32(3)))


def test_libm_results_carry_cudas_documented_error():
    """expf and tanhf 2 ulps off, log1pf 1 (the CUDA C++ Programming Guide's
    maximum), up or down by the argument; the exact cases stay exact."""
    module = cuda_on_cpu.compile_module(SOURCE)
    x = np.concatenate([np.linspace(-6, 6, 997, dtype=np.float32),
                        np.array([0.0, 20.0, -20.0, np.nan, np.inf], np.float32)])
    e, t, lp = (np.zeros_like(x) for _ in range(3))
    module.launch("libm_f32", (1,), (64,), (x, e, t, lp, np.int32(x.size)))
    x64 = x.astype(np.float64)

    def ulps(got, exact):  # from the correctly rounded result, in its own ulps
        rounded = exact.astype(np.float32)
        return np.abs(got.astype(np.float64) - rounded) / np.spacing(np.abs(rounded))

    finite = slice(0, 997)
    with np.errstate(invalid="ignore", divide="ignore"):
        moved = {"expf": ulps(e, np.exp(x64))[finite], "tanhf": ulps(t, np.tanh(x64))[finite],
                 "log1pf": ulps(lp, np.log1p(x64))[finite][x[finite] > -1]}
    for name, most in (("expf", 2), ("tanhf", 2), ("log1pf", 1)):
        off = moved[name][np.isfinite(moved[name])]
        assert off.max() <= most + 2, (name, off.max())  # (+ glibc's own: tanhf's is 2)
        assert np.median(off) >= most - 0.5, (name, np.median(off))  # moved, not glibc's
    assert e[997] == 1 and t[997] == 0 and lp[997] == 0
    assert t[998] == 1 and t[999] == -1 and e[999] > 0
    assert np.isnan([e[1000], t[1000], lp[1000]]).all() and e[1001] == np.inf and t[1001] == 1


def test_one_buffer_as_two_shapes_and_a_read_only_input(module):
    """Legal on the device: the copies keep one buffer per memory, each
    argument its own shape of it; an input the caller made read-only is not
    written back (and a kernel that writes one is an error)."""
    d = np.arange(64, dtype=np.float32).reshape(8, 8)
    module.launch("add_f32", (1,), (64,), (d, d.reshape(-1), d))
    np.testing.assert_array_equal(d.reshape(-1), 2 * np.arange(64))
    a = np.ones(64, np.float32)
    a.flags.writeable = False
    out = np.zeros(64, np.float32)
    module.launch("add_f32", (1,), (64,), (a, a, out))
    assert (out == 2).all()
    with pytest.raises(AssertionError, match="wrote b, a read-only array"):
        module.launch("add_f32", (1,), (64,), (np.ones(64, np.float32), a, a))
