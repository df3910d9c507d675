// Deterministic reductions for the losses: the same bits run to run (fixed
// launch shape, fixed summation order, no atomics), and no cuBLAS call, so a
// loss can be recorded in a CUDA graph.
// Contract: kernels/README.md. Launch: blockDim.x a multiple of 32, <= 1024.
#include "fastnn_common.cuh"

// out[0] = scale * sum(x[0:n]). One block (grid (1,)): n is a batch of row
// losses or mse's per-block partial sums, never large.
template <typename T>
__device__ void sum_scaled_impl(const T* x, T* out, long long n, T scale) {
    __shared__ T smem[32];
    T s = T(0);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_reduce<T, false>(s, smem);
    if (threadIdx.x == 0) out[0] = s * scale;
}

// d = pred - target; grad = d * grad_scale (2/N for the mean);
// partial[blockIdx.x] = partial_scale * (sum of d*d over this block's
// grid-stride elements): 1 when sum_scaled takes the mean of the partials
// after, 1/N when one block is the whole launch (its partial is the loss).
// grad may alias pred (each element is read before it is written).
template <typename T>
__device__ void mse_partial_impl(const T* pred, const T* target, T* grad, T* partial,
                                 long long n, T grad_scale, T partial_scale) {
    __shared__ T smem[32];
    T s = T(0);
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        const T d = pred[i] - target[i];
        s += d * d;
        grad[i] = d * grad_scale;
    }
    s = block_reduce<T, false>(s, smem);
    if (threadIdx.x == 0) partial[blockIdx.x] = s * partial_scale;
}

extern "C" __global__ void sum_scaled_f32(const float* x, float* out, long long n, float scale) {
    sum_scaled_impl<float>(x, out, n, scale);
}

extern "C" __global__ void sum_scaled_f64(const double* x, double* out, long long n,
                                          double scale) {
    sum_scaled_impl<double>(x, out, n, scale);
}

extern "C" __global__ void mse_partial_f32(const float* pred, const float* target, float* grad,
                                           float* partial, long long n, float grad_scale,
                                           float partial_scale) {
    mse_partial_impl<float>(pred, target, grad, partial, n, grad_scale, partial_scale);
}

extern "C" __global__ void mse_partial_f64(const double* pred, const double* target,
                                           double* grad, double* partial, long long n,
                                           double grad_scale, double partial_scale) {
    mse_partial_impl<double>(pred, target, grad, partial, n, grad_scale, partial_scale);
}
