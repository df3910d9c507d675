// bias_act: z += bias (in place), out = act(z), one pass over z (N, F).
// bias_act_bf16 also writes out's bf16 bits: the next layer's GEMM input under
// fn.set_precision("bf16"), with no conversion pass of its own.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
#include "fastnn_common.cuh"

// z, out: (n_rows, n_cols) row-major contiguous; bias: (n_cols,), read only
// when has_bias. out may alias z (each element is read, then written, by the
// same thread), so neither pointer is __restrict__. bits (WithBits only):
// n_rows * n_cols bf16 patterns of out, no overlap with the others.
template <typename T, bool WithBits>
__device__ void bias_act_impl(T* z, const T* bias, T* out, unsigned short* bits,
                              long long n_rows, long long n_cols, int has_bias, int act,
                              T alpha) {
    const long long total = n_rows * n_cols;
    for (long long i = fn_thread_index(); i < total; i += fn_grid_stride()) {
        T v = z[i];
        if (has_bias) {
            v = v + bias[i % n_cols];
            z[i] = v;  // z becomes the pre-activation (GELU's backward needs it)
        }
        const T y = fn_act_forward<T>(v, act, alpha);
        out[i] = y;
        if (WithBits) bits[i] = fn_f32_to_bf16_bits((float)y);
    }
}

extern "C" __global__ void bias_act_f32(float* z, const float* bias, float* out,
                                        long long n_rows, long long n_cols,
                                        int has_bias, int act, float alpha) {
    bias_act_impl<float, false>(z, bias, out, nullptr, n_rows, n_cols, has_bias, act, alpha);
}

extern "C" __global__ void bias_act_f64(double* z, const double* bias, double* out,
                                        long long n_rows, long long n_cols,
                                        int has_bias, int act, double alpha) {
    bias_act_impl<double, false>(z, bias, out, nullptr, n_rows, n_cols, has_bias, act, alpha);
}

// float32 only: bf16 GEMM inputs come from float32 activations.
extern "C" __global__ void bias_act_bf16(float* z, const float* bias, float* out,
                                         unsigned short* bits, long long n_rows,
                                         long long n_cols, int has_bias, int act,
                                         float alpha) {
    bias_act_impl<float, true>(z, bias, out, bits, n_rows, n_cols, has_bias, act, alpha);
}
