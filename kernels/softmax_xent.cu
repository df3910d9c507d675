// softmax_xent: fused, stable softmax + cross-entropy over logits (N, C).
// Contract: kernels/README.md. Launch: one block per row (grid-stride over
// rows), blockDim.x a multiple of 32 and at most 1024. softmax_xent_small:
// one block, one thread per row, the mean loss included (small batches).
#include "fastnn_common.cuh"

// logits, grad: (n_rows, n_cols) row-major contiguous; grad may alias logits.
// labels: (n_rows,) integers. row_loss: (n_rows,).
// grad = (softmax(logits) - onehot(labels)) * inv_n (inv_n = 1/N of the mean);
// row_loss[i] = log(sum_j exp(x_ij - max_i)) - (x_i,label - max_i).
// A label outside [0, n_cols) gives a NaN row loss and no one-hot term (no
// out-of-bounds read): the loss layer validates labels, this keeps memory safe.
template <typename T, typename L>
__device__ void softmax_xent_impl(const T* logits, const L* labels, T* grad,
                                  T* row_loss, long long n_rows, long long n_cols,
                                  T inv_n) {
    __shared__ T smem[32];
    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = logits + row * n_cols;
        T* g = grad + row * n_cols;
        const long long label = (long long)labels[row];
        const bool valid = label >= 0 && label < n_cols;
        // Read before the first barrier: after it, grad (maybe == logits) is written.
        const T picked = valid ? x[label] : T(0);

        T m = x[0];
        for (long long j = threadIdx.x; j < n_cols; j += blockDim.x) m = fn_max_nan<T>(m, x[j]);
        m = block_reduce<T, true>(m, smem);

        T s = T(0);
        for (long long j = threadIdx.x; j < n_cols; j += blockDim.x) {
            const T e = fn_exp(x[j] - m);
            g[j] = e;  // kept for the next pass: saves a second exp
            s += e;
        }
        s = block_reduce<T, false>(s, smem);

        // Same order as the NumPy reference: e / s, minus one-hot, times 1/N.
        for (long long j = threadIdx.x; j < n_cols; j += blockDim.x) {
            T p = g[j] / s;
            if (j == label) p = p - T(1);
            g[j] = p * inv_n;
        }
        if (threadIdx.x == 0) row_loss[row] = valid ? fn_log(s) - (picked - m) : fn_nan(s);
    }
}

// The same per-row math for a small batch of narrow rows, in ONE block with
// one thread per row, which also reduces the mean loss: one launch instead of
// softmax_xent + sum_scaled (a training step of a small net is launch-bound).
// loss[0] = inv_n * (fixed-order sum of the row losses): deterministic.
// grad may alias logits (each row is read and rewritten by one thread).
template <typename T, typename L>
__device__ void softmax_xent_small_impl(const T* logits, const L* labels, T* grad, T* loss,
                                        long long n_rows, long long n_cols, T inv_n) {
    __shared__ T smem[32];
    T total = T(0);
    for (long long row = threadIdx.x; row < n_rows; row += blockDim.x) {
        const T* x = logits + row * n_cols;
        T* g = grad + row * n_cols;
        const long long label = (long long)labels[row];
        const bool valid = label >= 0 && label < n_cols;
        const T picked = valid ? x[label] : T(0);  // before g (maybe == x) is written

        T m = x[0];
        for (long long j = 1; j < n_cols; ++j) m = fn_max_nan<T>(m, x[j]);
        T s = T(0);
        for (long long j = 0; j < n_cols; ++j) {
            const T e = fn_exp(x[j] - m);
            g[j] = e;
            s += e;
        }
        for (long long j = 0; j < n_cols; ++j) {
            T p = g[j] / s;
            if (j == label) p = p - T(1);
            g[j] = p * inv_n;
        }
        total += valid ? fn_log(s) - (picked - m) : fn_nan(s);
    }
    total = block_reduce<T, false>(total, smem);
    if (threadIdx.x == 0) loss[0] = total * inv_n;
}

// Explicit wrappers (no macros): every kernel name is greppable.
extern "C" __global__ void softmax_xent_f32_i32(const float* logits, const int* labels,
                                                float* grad, float* row_loss, long long n_rows,
                                                long long n_cols, float inv_n) {
    softmax_xent_impl<float, int>(logits, labels, grad, row_loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_f32_i64(const float* logits, const long long* labels,
                                                float* grad, float* row_loss, long long n_rows,
                                                long long n_cols, float inv_n) {
    softmax_xent_impl<float, long long>(logits, labels, grad, row_loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_f64_i32(const double* logits, const int* labels,
                                                double* grad, double* row_loss, long long n_rows,
                                                long long n_cols, double inv_n) {
    softmax_xent_impl<double, int>(logits, labels, grad, row_loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_f64_i64(const double* logits, const long long* labels,
                                                double* grad, double* row_loss, long long n_rows,
                                                long long n_cols, double inv_n) {
    softmax_xent_impl<double, long long>(logits, labels, grad, row_loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_small_f32_i32(const float* logits,
                                                      const int* labels, float* grad,
                                                      float* loss, long long n_rows,
                                                      long long n_cols, float inv_n) {
    softmax_xent_small_impl<float, int>(logits, labels, grad, loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_small_f32_i64(const float* logits,
                                                      const long long* labels, float* grad,
                                                      float* loss, long long n_rows,
                                                      long long n_cols, float inv_n) {
    softmax_xent_small_impl<float, long long>(logits, labels, grad, loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_small_f64_i32(const double* logits,
                                                      const int* labels, double* grad,
                                                      double* loss, long long n_rows,
                                                      long long n_cols, double inv_n) {
    softmax_xent_small_impl<double, int>(logits, labels, grad, loss, n_rows, n_cols, inv_n);
}

extern "C" __global__ void softmax_xent_small_f64_i64(const double* logits,
                                                      const long long* labels, double* grad,
                                                      double* loss, long long n_rows,
                                                      long long n_cols, double inv_n) {
    softmax_xent_small_impl<double, long long>(logits, labels, grad, loss, n_rows, n_cols, inv_n);
}
