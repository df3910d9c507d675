// bce: binary cross-entropy (probabilities, and raw logits), loss and gradient
// in one launch of one block. A binary classifier's batch is small, and its
// loss as separate CuPy expressions is ~20 launches per training step.
// Contract: kernels/README.md. Launch: grid (1,), blockDim.x a multiple of 32,
// at most 1024 (threads stride over the n elements).
#include "fastnn_common.cuh"

// Probabilities p against targets t (n elements each), as torch's BCELoss:
//   loss[0] = -inv_n * sum(t * max(log p, -100) + (1 - t) * max(log1p(-p), -100))
//   grad    = (p - t) / max((1 - p) p, eps) * inv_n
// and the range check fit needs without a host read: when some p is NaN or
// outside [0, 1], loss[0] = NaN; with has_seen, seen = [min, max, NaN batches]
// so far is updated (fmin/fmax: a NaN batch does not hide the range seen).
// grad may alias pred (each element is read before it is written).
template <typename T>
__device__ void bce_impl(const T* pred, const T* target, T* grad, T* loss, T* seen,
                         int has_seen, long long n, T inv_n, T eps) {
    __shared__ T smem[32];
    const T one = T(1);
    const T floor = T(-100);
    T sum = T(0);
    T hi = -fn_inf(sum);
    T neg_lo = -fn_inf(sum);  // max of -p: the min, NaN kept, through block_reduce's max
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const T p = pred[i];
        const T t = target[i];
        hi = fn_max_nan<T>(hi, p);
        neg_lo = fn_max_nan<T>(neg_lo, -p);
        const T log_p = fn_max_nan<T>(fn_log(p), floor);
        const T log_1mp = fn_max_nan<T>(fn_log1p(-p), floor);
        sum += t * log_p + (one - t) * log_1mp;
        const T denom = fn_max_nan<T>((one - p) * p, eps);
        grad[i] = (p - t) / denom * inv_n;
    }
    sum = block_reduce<T, false>(sum, smem);
    hi = block_reduce<T, true>(hi, smem);
    const T lo = -block_reduce<T, true>(neg_lo, smem);
    if (threadIdx.x == 0) {
        const bool in_range = lo >= T(0) && hi <= one;  // false when NaN
        loss[0] = in_range ? -(sum * inv_n) : fn_nan(sum);
        if (has_seen) {
            seen[0] = fn_fmin(seen[0], lo);
            seen[1] = fn_fmax(seen[1], hi);
            if (lo != lo) seen[2] = seen[2] + one;
        }
    }
}

// Raw logits x against targets t, stable for any x (torch's BCEWithLogitsLoss):
//   loss[0] = inv_n * sum(max(x, 0) - x t + log1p(exp(-|x|)))
//   grad    = (sigmoid(x) - t) * inv_n, sigmoid as bias_act's.
// grad may alias logits.
template <typename T>
__device__ void bce_logits_impl(const T* logits, const T* target, T* grad, T* loss,
                                long long n, T inv_n) {
    __shared__ T smem[32];
    T sum = T(0);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const T x = logits[i];
        const T t = target[i];
        sum += fn_max_nan<T>(x, T(0)) - x * t + fn_log1p(fn_exp(-fn_abs(x)));
        grad[i] = (fn_act_forward<T>(x, FASTNN_ACT_SIGMOID, T(0)) - t) * inv_n;
    }
    sum = block_reduce<T, false>(sum, smem);
    if (threadIdx.x == 0) loss[0] = sum * inv_n;
}

extern "C" __global__ void bce_f32(const float* pred, const float* target, float* grad,
                                   float* loss, float* seen, int has_seen, long long n,
                                   float inv_n, float eps) {
    bce_impl<float>(pred, target, grad, loss, seen, has_seen, n, inv_n, eps);
}

extern "C" __global__ void bce_f64(const double* pred, const double* target, double* grad,
                                   double* loss, double* seen, int has_seen, long long n,
                                   double inv_n, double eps) {
    bce_impl<double>(pred, target, grad, loss, seen, has_seen, n, inv_n, eps);
}

extern "C" __global__ void bce_logits_f32(const float* logits, const float* target,
                                          float* grad, float* loss, long long n, float inv_n) {
    bce_logits_impl<float>(logits, target, grad, loss, n, inv_n);
}

extern "C" __global__ void bce_logits_f64(const double* logits, const double* target,
                                          double* grad, double* loss, long long n,
                                          double inv_n) {
    bce_logits_impl<double>(logits, target, grad, loss, n, inv_n);
}
