// act_backward: out = dy * act'(.) over flat contiguous buffers of n elements.
// act_backward_bf16 also writes out's bf16 bits: dz as the bf16 input of the
// layer's two backward GEMMs, with no conversion pass of its own.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
#include "fastnn_common.cuh"

// dy, y, pre, out: n elements each. pre is read only when use_pre (the caller
// passes y again otherwise); out may alias dy (same-thread read-then-write).
// bits (WithBits only): n bf16 patterns of out, no overlap with the others.
template <typename T, bool WithBits>
__device__ void act_backward_impl(const T* dy, const T* y, const T* pre, T* out,
                                  unsigned short* bits, long long n, int act, T alpha,
                                  int use_pre) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        const T x = use_pre ? pre[i] : T(0);
        // gelu works from the pre-activation alone: skip that load of y.
        const T yv = act == FASTNN_ACT_GELU ? T(0) : y[i];
        const T g = fn_act_backward<T>(dy[i], yv, x, act, alpha, use_pre);
        out[i] = g;
        if (WithBits) bits[i] = fn_f32_to_bf16_bits((float)g);
    }
}

extern "C" __global__ void act_backward_f32(const float* dy, const float* y,
                                            const float* pre, float* out, long long n,
                                            int act, float alpha, int use_pre) {
    act_backward_impl<float, false>(dy, y, pre, out, nullptr, n, act, alpha, use_pre);
}

extern "C" __global__ void act_backward_f64(const double* dy, const double* y,
                                            const double* pre, double* out, long long n,
                                            int act, double alpha, int use_pre) {
    act_backward_impl<double, false>(dy, y, pre, out, nullptr, n, act, alpha, use_pre);
}

// float32 only: bf16 GEMM inputs come from float32 gradients.
extern "C" __global__ void act_backward_bf16(const float* dy, const float* y,
                                             const float* pre, float* out,
                                             unsigned short* bits, long long n, int act,
                                             float alpha, int use_pre) {
    act_backward_impl<float, true>(dy, y, pre, out, bits, n, act, alpha, use_pre);
}
