// cuda_on_cpu.h: just enough of CUDA C++ to run fastnn's kernels/*.cu on the CPU.
//
// tests/cuda_on_cpu.py compiles a kernel module (the very source NVRTC gets,
// fastnn_common.cuh inlined) with g++ after this header, plus one launcher per
// extern "C" kernel. A launch runs the grid's blocks one after another; the
// threads of a block are fibers on one OS thread, switched only at
// __syncthreads() and warp shuffles, so every barrier and shuffle is honoured
// exactly: a block reduction gets the partial sums of its own threads in the
// kernel's own order. Each warp runs ahead to its next barrier before the next
// warp starts, and shared memory is poisoned before each block; cuda_on_cpu.py
// runs every launch twice, blocks, warps and threads in descending order on copies of
// the arguments, then ascending on other copies, and compares: a
// shared-memory read that only a barrier orders meets poison or another warp's
// write, in a different way in each order. What the device would not forgive
// is an error here
// too, reported by the launch instead of hanging or reading garbage:
//   * a thread leaving the kernel while others wait at a barrier (a
//     __syncthreads() that not every thread of the block reaches),
//   * a shuffle that is not a full-warp, full-mask one, or one in a warp with
//     an exited or missing lane,
//   * a launch shape the device refuses: more than 1024 threads in a block,
//     or more than the kernel's __launch_bounds__, blockDim.z over 64,
//     gridDim.y or .z over 65535.
// float32 launches run with FTZ|DAZ set (CuPy compiles with -ftz=true; the
// float64 ones keep subnormals, as the device does). Floating point is
// IEEE with no contraction (g++ -ffp-contract=off, as --fmad=false); expf,
// tanhf, ... are glibc's moved by CUDA's documented maximum ulp error (see
// fncpu_expf below), so results are compared with the GPU tests'
// tolerances, never bit for bit across libms.
// NaN bit patterns are the CPU's (x86 makes 0xffc00000 of inf - inf, and keeps
// an input NaN's payload), not necessarily the device's.
//   * an access outside an array argument: cuda_on_cpu.py runs each launch
//     on copies of the arrays placed between inaccessible guard regions
//     (64 KiB each side), once with each array's end flush against the
//     guard after it (the descending run), once with its start flush
//     against the guard before it (the ascending run); a touch of a guard
//     stops the launch with the argument, the element and read or write
//     (fncpu_fault). A stack overflow of a thread is caught the same way,
//   * an index outside a fixed-size array (a __shared__ one, a thread's
//     local one): g++'s -fsanitize=bounds traps, reported with the line.
// Not emulated: inline PTX (kernels/profile.cu), atomics, dynamic shared
// memory.
#pragma once

#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#include <xmmintrin.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// One block runs at a time: a static is that block's shared memory. Each is
// filled with 0xff bytes (NaN, -1) before each block (cuda_on_cpu.py finds
// them in the library's symbol table: fncpu_set_shared), so a read that the
// kernel's barriers do not order finds poison, not what an earlier block left.
// `used`: a static the kernel reads but never writes is otherwise folded to 0.
#define __shared__ static __attribute__((used))
#define __launch_bounds__(...)

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };

// Set by the scheduler before it resumes a fiber; a fiber only reads them.
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned int __float_as_uint(float f) { unsigned int v; std::memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }

namespace fncpu {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber, the lowest page a guard

// switch_stack(&save, load): push the callee-saved registers and the SSE/x87
// control words on this stack, store its top in *save, continue on `load`'s.
// (glibc's swapcontext also saves the signal mask: a system call per switch,
// and kernels switch a few times per thread per barrier.)
extern "C" void fncpu_switch_stack(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .type fncpu_switch_stack, @function
fncpu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fncpu_switch_stack, .-fncpu_switch_stack
)");

enum Wait : unsigned char { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Block {
    void* scheduler_sp = nullptr;
    void* fiber_sp[kMaxThreads];
    Wait wait[kMaxThreads];
    unsigned long long slot[kMaxThreads];  // a shuffle's value, per thread
    unsigned barrier_arrived = 0, barrier_generation = 0;
    unsigned warp_arrived[kMaxThreads / 32], warp_generation[kMaxThreads / 32];
    unsigned waited_generation[kMaxThreads];
    unsigned n_threads = 0, current = 0;
    char* stacks = nullptr;
    const std::function<void()>* body = nullptr;
};

static Block block;
static char error_text[512];
static bool failed = false;

inline void fail(const char* what) {
    if (!failed) {
        std::snprintf(error_text, sizeof error_text,
                      "%s (block (%u, %u, %u), thread (%u, %u, %u))", what, blockIdx.x,
                      blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
        failed = true;
    }
}

inline void yield() { fncpu_switch_stack(&block.fiber_sp[block.current], block.scheduler_sp); }

// A refusal inside a thread: record it and never resume this thread (it
// must not run on with a made-up value: it could loop forever).
[[noreturn]] inline void fail_and_stop(const char* what) {
    fail(what);
    void* abandoned;
    fncpu_switch_stack(&abandoned, block.scheduler_sp);
    std::abort();
}

// A fiber's first frame: run the kernel, then hand back for good.
extern "C" inline void fncpu_fiber_entry() {
    const unsigned t = block.current;
    (*block.body)();
    block.wait[t] = DONE;
    void* finished;
    fncpu_switch_stack(&finished, block.scheduler_sp);  // never resumed
    std::abort();
}

// A fresh stack whose first switch "returns" into fncpu_fiber_entry.
inline void* new_fiber(unsigned t) {
    auto* top = reinterpret_cast<unsigned long long*>(
        (reinterpret_cast<uintptr_t>(block.stacks + (size_t)(t + 1) * kStackBytes)) & ~uintptr_t(15));
    *--top = 0;                                                 // keeps the entry's rsp 16n + 8
    *--top = reinterpret_cast<unsigned long long>(&fncpu_fiber_entry);  // popped by `ret`
    for (int r = 0; r < 6; ++r) *--top = 0;                     // rbp rbx r12..r15
    unsigned control[2] = {_mm_getcsr(), 0};
    unsigned short x87;
    asm volatile("fnstcw %0" : "=m"(x87));
    control[1] = x87;
    *--top = (unsigned long long)control[0] | ((unsigned long long)control[1] << 32);
    return top;
}

inline void set_thread_index(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Whether fiber t may run on: the barrier or warp step it waits at is passed.
inline bool released(unsigned t) {
    switch (block.wait[t]) {
    case AT_BARRIER: return block.barrier_generation != block.waited_generation[t];
    case AT_WARP: return block.warp_generation[t / 32] != block.waited_generation[t];
    default: return true;
    }
}

constexpr int kMaxShared = 64;
static void* shared_at[kMaxShared];
static size_t shared_bytes[kMaxShared];
static int n_shared = 0;

// Thread and warp order, set per launch (cuda_on_cpu.py runs each launch in
// both orders and compares), so that a read the barriers do not order finds
// poison or another warp's value whichever side it reads from.
static bool descending = false;

inline void run_block() {
    const unsigned n = block.n_threads;
    for (int i = 0; i < n_shared; ++i) std::memset(shared_at[i], 0xff, shared_bytes[i]);
    for (unsigned t = 0; t < n; ++t) {
        block.fiber_sp[t] = new_fiber(t);
        block.wait[t] = RUNNABLE;
    }
    block.barrier_arrived = 0;
    for (unsigned w = 0; w < (n + 31) / 32; ++w) block.warp_arrived[w] = 0;
    unsigned live = n;
    const unsigned n_warps = (n + 31) / 32;
    while (live > 0 && !failed) {
        bool progressed = false;
        // One warp runs as far as it can (through its shuffles, up to a
        // barrier or its end) before the next starts: warps run ahead of one
        // another as they may on the device, so a read of shared memory that
        // only a barrier would keep from being overwritten is exposed.
        for (unsigned wi = 0; wi < n_warps && !failed; ++wi) {
            const unsigned w = descending ? n_warps - 1 - wi : wi;
            const unsigned first = w * 32, last = first + 32 < n ? first + 32 : n;
            bool warp_progressed = true;
            while (warp_progressed && !failed) {
                warp_progressed = false;
                for (unsigned i = first; i < last && !failed; ++i) {
                    const unsigned t = descending ? last - 1 - (i - first) : i;
                    if (block.wait[t] == DONE || !released(t)) continue;
                    block.wait[t] = RUNNABLE;
                    block.current = t;
                    set_thread_index(t);
                    fncpu_switch_stack(&block.scheduler_sp, block.fiber_sp[t]);
                    warp_progressed = progressed = true;
                    if (block.wait[t] == DONE) {
                        --live;
                        if (block.barrier_arrived > 0) {
                            fail("a thread left the kernel while others wait at __syncthreads()");
                        } else if (block.warp_arrived[t / 32] > 0) {
                            fail("a thread left the kernel while its warp waits in a shuffle");
                        }
                    }
                }
            }
        }
        if (!progressed && live > 0) fail("deadlock: every live thread waits");
    }
}

// Guard regions around the array arguments' copies (cuda_on_cpu.py maps
// them; fncpu_set_guards): a fault inside one is an out-of-bounds access of
// that argument, reported relative to the argument's first byte.
struct Guard { uintptr_t lo, hi, data; int argument; };
constexpr int kMaxGuards = 64;
static Guard guards[kMaxGuards];
static int n_guards = 0;
// {argument, byte offset, 1 when a write}, or {-2, the trap's address, 0}
static long long fault_info[3] = {-1, 0, 0};
static sigjmp_buf fault_exit;
static thread_local bool in_launch = false;  // this thread runs a launch: its faults are ours
static struct sigaction previous_segv, previous_sigill;

// A fault that is not the kernel's: the previous handler (pytest's
// faulthandler) gets it when the instruction runs again.
inline void pass_on(int signal) {
    sigaction(signal, signal == SIGILL ? &previous_sigill : &previous_segv, nullptr);
}

inline void on_fault(int signal, siginfo_t* info, void* context) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(info->si_addr);
    if (!in_launch) return pass_on(signal);  // another thread's
    // -fsanitize=bounds' trap: a ud2 (0f 0b) at si_addr, in the launching thread
    if (signal == SIGILL && std::memcmp(info->si_addr, "\x0f\x0b", 2) == 0) {
        fault_info[0] = -2;
        fault_info[1] = (long long)at;
        fault_info[2] = 0;
        fail("an index outside a fixed-size array");
        siglongjmp(fault_exit, 1);
    }
    // x86-64 page-fault error code: bit 1 set for a write
    const long long wrote = (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
    for (int i = 0; i < n_guards; ++i) {
        if (at >= guards[i].lo && at < guards[i].hi) {
            fault_info[0] = guards[i].argument;
            fault_info[1] = (long long)(at - guards[i].data);
            fault_info[2] = wrote;
            fail(wrote ? "out-of-bounds write" : "out-of-bounds read");
            siglongjmp(fault_exit, 1);
        }
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const uintptr_t stacks = reinterpret_cast<uintptr_t>(block.stacks);
    if (stacks != 0 && at >= stacks && at < stacks + kMaxThreads * kStackBytes &&
        (at - stacks) % kStackBytes < page) {
        fail("a thread overflowed its 256 KiB stack");
        siglongjmp(fault_exit, 1);
    }
    pass_on(signal);
}

// The device's limits on a launch's shape (any compute capability since 3.0),
// and the kernel's own __launch_bounds__ (`bound`, 0 when it has none).
inline bool shape_refused(const unsigned* grid, const unsigned* threads, unsigned bound) {
    const unsigned long long n = (unsigned long long)threads[0] * threads[1] * threads[2];
    const char* why = nullptr;
    if (n == 0 || n > kMaxThreads) why = "a block of 1..1024 threads";
    else if (threads[0] > 1024 || threads[1] > 1024 || threads[2] > 64) why = "blockDim of at most (1024, 1024, 64)";
    else if (bound != 0 && n > bound) why = "a block within the kernel's __launch_bounds__";
    else if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu ||
             grid[1] > 65535 || grid[2] > 65535) why = "gridDim of 1..(2^31 - 1, 65535, 65535)";
    if (why == nullptr) return false;
    std::snprintf(error_text, sizeof error_text,
                  "launch of grid (%u, %u, %u), block (%u, %u, %u) (block of %llu threads; "
                  "bound %u): the device takes only %s", grid[0], grid[1], grid[2],
                  threads[0], threads[1], threads[2], n, bound ? bound : kMaxThreads, why);
    return true;
}

inline int launch(const unsigned* grid, const unsigned* threads, int flush_subnormals,
                  int descending_order, unsigned bound, const std::function<void()>& body) {
    descending = descending_order != 0;
    failed = false;
    error_text[0] = '\0';
    fault_info[0] = -1;
    if (shape_refused(grid, threads, bound)) return 1;
    const unsigned long long n = (unsigned long long)threads[0] * threads[1] * threads[2];
    if (block.stacks == nullptr) {
        // Reserved, not committed (MAP_NORESERVE): a fiber touches a few pages.
        void* at = mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (at == MAP_FAILED) {
            std::snprintf(error_text, sizeof error_text, "no memory for the fiber stacks");
            return 1;
        }
        block.stacks = static_cast<char*>(at);
        // A guard page under each stack: an overflow faults at once instead of
        // writing into the neighbouring fiber's frames.
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(block.stacks + t * kStackBytes, page, PROT_NONE);
    }
    block.n_threads = (unsigned)n;
    block.body = &body;
    blockDim = {threads[0], threads[1], threads[2]};
    gridDim = {grid[0], grid[1], grid[2]};
    // The handler runs on a stack of its own: a fiber's may be the one that
    // overflowed. Both are put back as they were after the launch.
    static char handler_stack[64 * 1024];
    stack_t ours{}, previous_stack;
    ours.ss_sp = handler_stack;
    ours.ss_size = sizeof handler_stack;
    sigaltstack(&ours, &previous_stack);
    struct sigaction handler{};
    handler.sa_sigaction = on_fault;
    handler.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&handler.sa_mask);
    sigaction(SIGSEGV, &handler, &previous_segv);
    sigaction(SIGILL, &handler, &previous_sigill);
    const unsigned saved_csr = _mm_getcsr();
    // FTZ (bit 15) and DAZ (bit 6): -ftz=true for float32 kernels.
    if (flush_subnormals) _mm_setcsr(saved_csr | 0x8040u);
    // Blocks in descending order too in that run: the device runs them in any
    // order, so a result that depends on it (two blocks writing one element,
    // a block reading what another wrote) differs between the two runs.
    const auto in_order = [](unsigned i, unsigned n) { return descending ? n - 1 - i : i; };
    in_launch = true;
    if (sigsetjmp(fault_exit, 1) == 0) {  // (a fault in a guard comes back here, failed)
        for (unsigned z = 0; z < grid[2] && !failed; ++z)
            for (unsigned y = 0; y < grid[1] && !failed; ++y)
                for (unsigned x = 0; x < grid[0] && !failed; ++x) {
                    blockIdx = {in_order(x, grid[0]), in_order(y, grid[1]), in_order(z, grid[2])};
                    run_block();
                }
    }
    in_launch = false;
    _mm_setcsr(saved_csr);
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGILL, &previous_sigill, nullptr);
    sigaltstack(&previous_stack, nullptr);
    return failed ? 1 : 0;
}

}  // namespace fncpu

inline void __syncthreads() {
    using fncpu::block;
    const unsigned t = block.current;
    block.waited_generation[t] = block.barrier_generation;
    if (++block.barrier_arrived == block.n_threads) {  // the last one in opens it
        block.barrier_arrived = 0;
        ++block.barrier_generation;
        return;
    }
    block.wait[t] = fncpu::AT_BARRIER;
    fncpu::yield();
}

// All 32 lanes of the warp arrive before any goes on.
inline void fncpu_warp_step() {
    using fncpu::block;
    const unsigned t = block.current, w = t / 32;
    block.waited_generation[t] = block.warp_generation[w];
    if (++block.warp_arrived[w] == 32) {
        block.warp_arrived[w] = 0;
        ++block.warp_generation[w];
        return;
    }
    block.wait[t] = fncpu::AT_WARP;
    fncpu::yield();
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    using fncpu::block;
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
    const unsigned t = block.current;
    if (mask != 0xffffffffu || width != 32 || lane_mask < 0 || lane_mask > 31) {
        fncpu::fail_and_stop("__shfl_xor_sync: only full-mask, width-32 shuffles are emulated");
    }
    if ((t / 32 + 1) * 32 > block.n_threads) {
        fncpu::fail_and_stop("__shfl_xor_sync in a warp of fewer than 32 threads");
    }
    block.slot[t] = 0;
    std::memcpy(&block.slot[t], &v, sizeof(T));
    fncpu_warp_step();  // every lane has written its value
    T other;
    std::memcpy(&other, &block.slot[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)], sizeof(T));
    fncpu_warp_step();  // every lane has read before a next shuffle overwrites
    return other;
}

// CUDA's libm is not glibc's, which is near correctly rounded: the CUDA C++
// Programming Guide's table of maximum ulp errors gives expf 2, tanhf 2,
// logf 1, log1pf 1, and exp, log, log1p, tanh 1 (sqrt and division are IEEE).
// Each result of these is moved by that many ulps, up or down by a hash of
// the argument (fixed per argument, as a libm's error is), so the tests'
// tolerances meet the device's error bound (plus glibc's own, up to 2 ulps
// for tanhf), not glibc's near-exact results. Kept exact: zero,
// inf and NaN results, exp(0) = 1, tanh's +-1.
namespace fncpu {

template <typename T>
inline T at_cuda_error(T result, T argument, int ulps, unsigned salt) {
    if (!std::isfinite(result) || result == T(0)) return result;
    unsigned long long h = 0;
    std::memcpy(&h, &argument, sizeof(T));
    h += 0x9e3779b97f4a7c15ull * (salt + 1);  // splitmix64's finalizer: the sign of the error
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    const T toward = (h & 1) ? T(INFINITY) : T(-INFINITY);
    for (int i = 0; i < ulps; ++i) result = std::nextafter(result, toward);
    return result;
}

}  // namespace fncpu

inline float fncpu_expf(float x) { return x == 0.0f ? 1.0f : fncpu::at_cuda_error(::expf(x), x, 2, 1); }
inline double fncpu_exp(double x) { return x == 0.0 ? 1.0 : fncpu::at_cuda_error(::exp(x), x, 1, 2); }
inline float fncpu_logf(float x) { return fncpu::at_cuda_error(::logf(x), x, 1, 3); }
inline double fncpu_log(double x) { return fncpu::at_cuda_error(::log(x), x, 1, 4); }
inline float fncpu_log1pf(float x) { return fncpu::at_cuda_error(::log1pf(x), x, 1, 5); }
inline double fncpu_log1p(double x) { return fncpu::at_cuda_error(::log1p(x), x, 1, 6); }
// tanh where it rounds to +-1 stays there: CUDA's saturates to copysign(1, x).
inline float fncpu_tanhf(float x) {
    const float t = ::tanhf(x);
    if (!std::isfinite(t) || std::fabs(t) == 1.0f) return t;  // (fmin would eat a NaN)
    return std::fmin(1.0f, std::fmax(-1.0f, fncpu::at_cuda_error(t, x, 2, 7)));
}
inline double fncpu_tanh(double x) {
    const double t = ::tanh(x);
    if (!std::isfinite(t) || std::fabs(t) == 1.0) return t;
    return std::fmin(1.0, std::fmax(-1.0, fncpu::at_cuda_error(t, x, 1, 8)));
}
// (the kernels call them by these plain names, in fastnn_common.cuh)
#define expf fncpu_expf
#define exp fncpu_exp
#define logf fncpu_logf
#define log fncpu_log
#define log1pf fncpu_log1pf
#define log1p fncpu_log1p
#define tanhf fncpu_tanhf
#define tanh fncpu_tanh

// The guard regions of this launch's array arguments: [lo, hi) inaccessible,
// `data` the argument's first byte, `argument` its position.
extern "C" int fncpu_set_guards(const unsigned long long* lo, const unsigned long long* hi,
                                const unsigned long long* data, const int* argument, int n) {
    if (n > fncpu::kMaxGuards) return 1;
    for (int i = 0; i < n; ++i) fncpu::guards[i] = {lo[i], hi[i], data[i], argument[i]};
    fncpu::n_guards = n;
    return 0;
}

// After a failed launch: {argument, byte offset from its start, 1 if a write},
// argument -1 when the failure was no out-of-bounds access.
extern "C" const long long* fncpu_fault() { return fncpu::fault_info; }

// The __shared__ statics of the module (addresses in this process, sizes).
extern "C" int fncpu_set_shared(void** at, const unsigned long long* bytes, int n) {
    if (n > fncpu::kMaxShared) return 1;
    for (int i = 0; i < n; ++i) {
        fncpu::shared_at[i] = at[i];
        fncpu::shared_bytes[i] = (size_t)bytes[i];
    }
    fncpu::n_shared = n;
    return 0;
}
