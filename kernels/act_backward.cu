// act_backward: out = dy * act'(.) over flat contiguous buffers of n elements.
// act_backward_bf16 also writes out's bf16 bits: dz as the bf16 input of the
// layer's two backward GEMMs, with no conversion pass of its own.
// act_backward_bias: act_backward of a small batch and the bias gradient (the
// column sums of out) in one launch, where act_backward + a ones-GEMM took two.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size;
// act_backward_bias: block (32, FN_BIAS_ROWS), grid ceil(n_cols / 32).
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

// Rows a block of act_backward_bias splits the batch into (its blockDim.y).
#define FN_BIAS_ROWS 32

// dy, y, pre, out: (n_rows, n_cols) row-major; db: (n_cols,). Thread (x, y)
// of block b walks column b * 32 + x over rows y, y + FN_BIAS_ROWS, ... (a
// warp reads 32 consecutive floats), then row 0 of the block adds the
// FN_BIAS_ROWS partial sums in a fixed order: deterministic, unlike atomics.
// Each column is one block's, so a large batch is slow here: the caller keeps
// it to small ones. out may alias dy (same-thread read-then-write).
// Launch with block (32, FN_BIAS_ROWS) exactly: the column map and the final
// row-0 sum assume it (tests/fake_cupy.py refuses any other block).
template <typename T>
__device__ void act_backward_bias_impl(const T* dy, const T* y, const T* pre, T* out, T* db,
                                       long long n_rows, long long n_cols, int act, T alpha,
                                       int use_pre) {
    __shared__ T part[FN_BIAS_ROWS][33];  // +1: no bank conflicts on the column reads
    const long long col = (long long)blockIdx.x * 32 + threadIdx.x;
    T s = T(0);
    if (col < n_cols) {
#pragma unroll 4  // several rows' loads in flight: few blocks, so latency-bound
        for (long long r = threadIdx.y; r < n_rows; r += FN_BIAS_ROWS) {
            const long long i = r * n_cols + col;
            const T x = use_pre ? pre[i] : T(0);
            const T yv = act == FASTNN_ACT_GELU ? T(0) : y[i];
            const T g = fn_act_backward<T>(dy[i], yv, x, act, alpha, use_pre);
            out[i] = g;
            s += g;
        }
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < n_cols) {
        T total = part[0][threadIdx.x];
        for (int k = 1; k < FN_BIAS_ROWS; ++k) total += part[k][threadIdx.x];
        db[col] = total;
    }
}

extern "C" __global__ void __launch_bounds__(32 * FN_BIAS_ROWS) act_backward_bias_f32(const float* dy, const float* y,
                                                 const float* pre, float* out, float* db,
                                                 long long n_rows, long long n_cols, int act,
                                                 float alpha, int use_pre) {
    act_backward_bias_impl<float>(dy, y, pre, out, db, n_rows, n_cols, act, alpha, use_pre);
}

extern "C" __global__ void __launch_bounds__(32 * FN_BIAS_ROWS) act_backward_bias_f64(const double* dy, const double* y,
                                                 const double* pre, double* out, double* db,
                                                 long long n_rows, long long n_cols, int act,
                                                 double alpha, int use_pre) {
    act_backward_bias_impl<double>(dy, y, pre, out, db, n_rows, n_cols, act, alpha, use_pre);
}
