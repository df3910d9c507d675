// fastnn_common.cuh: shared device helpers of the fused kernels.
//
// Activation codes follow fastnn/backends/activations.py (ACTIVATIONS):
//   0 identity, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh, 5 gelu (tanh approx.)
// tests/test_cuda_kernels.py checks that these numbers match the Python table.
//
// No #include of system headers: NVRTC compiles this without a host toolchain,
// and fastnn.backends.kernel_sources inlines this file into each .cu before it
// reaches NVRTC (so CuPy's compile cache sees every byte of the source).
#pragma once

#define FASTNN_ACT_IDENTITY 0
#define FASTNN_ACT_RELU 1
#define FASTNN_ACT_LEAKY_RELU 2
#define FASTNN_ACT_SIGMOID 3
#define FASTNN_ACT_TANH 4
#define FASTNN_ACT_GELU 5

// GELU tanh approximation constants: sqrt(2/pi) and 0.044715 (as torch).
#define FASTNN_GELU_C 0.7978845608028654
#define FASTNN_GELU_K 0.044715

// Overloads, so one template body calls the float or the double libm routine
// (expf vs exp): float math must stay float, never be promoted to double.
__device__ __forceinline__ float fn_exp(float x) { return expf(x); }
__device__ __forceinline__ double fn_exp(double x) { return exp(x); }
__device__ __forceinline__ float fn_log(float x) { return logf(x); }
__device__ __forceinline__ double fn_log(double x) { return log(x); }
__device__ __forceinline__ float fn_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double fn_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float fn_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double fn_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float fn_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double fn_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float fn_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double fn_abs(double x) { return fabs(x); }
// fmin/fmax: a NaN operand is ignored (as numpy.fmin/fmax), unlike fn_max_nan.
__device__ __forceinline__ float fn_fmin(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double fn_fmin(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float fn_fmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fn_fmax(double a, double b) { return fmax(a, b); }

// First index and stride of a 1-D grid-stride loop, in 64-bit so buffers
// with more than 2^31 elements are walked correctly.
__device__ __forceinline__ long long fn_thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long fn_grid_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// y = act(x). NaN propagates through every activation (relu keeps a NaN
// input, as numpy.maximum does).
template <typename T>
__device__ __forceinline__ T fn_act_forward(T x, int act, T alpha) {
    const T zero = T(0);
    const T one = T(1);
    switch (act) {
    case FASTNN_ACT_RELU:
        return (x > zero || x != x) ? x : zero;
    case FASTNN_ACT_LEAKY_RELU:
        return x > zero ? x : x * alpha;
    case FASTNN_ACT_SIGMOID: {
        // As the NumPy reference (activations.py): never exp of a large positive
        // number, and e/(1+e) keeps the tiny values of x << 0 (1/(1+exp(-x)) is 0).
        const T e = fn_exp(-fn_abs(x));
        return x >= zero ? one / (one + e) : e / (one + e);
    }
    case FASTNN_ACT_TANH:
        return fn_tanh(x);
    case FASTNN_ACT_GELU: {
        const T c = T(FASTNN_GELU_C);
        const T k = T(FASTNN_GELU_K);
        const T inner = c * (x + k * x * x * x);
        return T(0.5) * x * (one + fn_tanh(inner));
    }
    default:  // identity
        return x;
    }
}

// dz = dy * act'(.): from the output y where that is exact (relu, leaky_relu
// with alpha > 0, sigmoid, tanh), from the pre-activation x when use_pre is set
// (always for gelu). Same formulas as the NumPy reference in activations.py.
template <typename T>
__device__ __forceinline__ T fn_act_backward(T g, T y, T x, int act, T alpha, int use_pre) {
    const T zero = T(0);
    const T one = T(1);
    switch (act) {
    case FASTNN_ACT_RELU: {
        const T r = use_pre ? x : y;
        return r > zero ? g : zero;
    }
    case FASTNN_ACT_LEAKY_RELU: {
        const T r = use_pre ? x : y;
        return r > zero ? g : g * alpha;
    }
    case FASTNN_ACT_SIGMOID:
        return g * y * (one - y);
    case FASTNN_ACT_TANH:
        return g * (one - y * y);
    case FASTNN_ACT_GELU: {
        const T c = T(FASTNN_GELU_C);
        const T k = T(FASTNN_GELU_K);
        const T th = fn_tanh(c * (x + k * x * x * x));
        const T d_inner = c * (one + T(3.0 * FASTNN_GELU_K) * x * x);
        return g * (T(0.5) * (one + th) + T(0.5) * x * (one - th * th) * d_inner);
    }
    default:  // identity
        return g;
    }
}

// ---------------------------------------------------------------- reductions
// Shared by softmax_xent.cu and reduce.cu. blockDim.x must be a multiple of 32.

__device__ __forceinline__ float fn_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double fn_nan(double) {
    return __longlong_as_double(0x7ff8000000000000LL);
}
__device__ __forceinline__ float fn_inf(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double fn_inf(double) {
    return __longlong_as_double(0x7ff0000000000000LL);
}

// max that propagates NaN (a NaN logit must give a NaN loss, never be skipped).
template <typename T>
__device__ __forceinline__ T fn_max_nan(T a, T b) {
    return (a > b || a != a) ? a : b;
}

template <typename T, bool IsMax>
__device__ __forceinline__ T warp_reduce(T v) {
    // Fixed butterfly order: the sum is deterministic run to run.
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = IsMax ? fn_max_nan<T>(v, other) : v + other;
    }
    return v;
}

// Reduce v over the block; every thread gets the result. smem: 32 slots.
template <typename T, bool IsMax>
__device__ T block_reduce(T v, T* smem) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
    v = warp_reduce<T, IsMax>(v);
    __syncthreads();  // smem may still be read by the previous reduction
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        // Pad with a neutral value: smem[0] for max (a real partial), 0 for sum.
        T r = lane < n_warps ? smem[lane] : (IsMax ? smem[0] : T(0));
        r = warp_reduce<T, IsMax>(r);
        if (lane == 0) smem[0] = r;
    }
    __syncthreads();
    return smem[0];
}

// ---- bfloat16 (bf16 mixed-precision GEMM inputs)
// bfloat16 is the top half of a float32, so the conversion is integer work on
// the bits (no cuda_bf16.h: NVRTC here gets no system headers). Round to
// nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
// The carry may ripple into the exponent: a value past the largest bf16 then
// becomes inf, as IEEE rounding requires. The NumPy reference,
// fastnn.precision.bf16_bits, takes exactly the same steps.
__device__ __forceinline__ unsigned short fn_f32_to_bf16_bits(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        // NaN: the rounding add could carry a payload into inf (or wrap past
        // the sign); keep the sign and top payload bits and force the quiet bit.
        return (unsigned short)((u >> 16) | 0x0040u);
    }
    const unsigned int lowest_kept = (u >> 16) & 1u;
    return (unsigned short)((u + 0x7fffu + lowest_kept) >> 16);
}
