// Optimizer updates: one grid-stride pass over flat 1-D buffers of n elements.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
//
// Bit-for-bit parity with Backend.sgd_step / adam_step / rmsprop_step (base.py,
// the torch.optim single-tensor order) needs two things: the same operation
// order, written out below with explicit parentheses where C++'s left-to-right
// rule is not obvious, and no FMA contraction (compile with --fmad=false; the
// CuPy backend does). Host-side constants (1 - beta, step_size, ...) are
// computed in double by the caller and rounded once to T, as the reference does.
#include "fastnn_common.cuh"

// torch.optim.SGD:
//   g = grad (+ weight_decay * param)
//   buf = g (first step) | buf * momentum + (1 - dampening) * g
//   g = g + momentum * buf (nesterov) | buf
//   param = param - lr * g
// buf is read/written only when use_momentum (the caller may pass grad).
template <typename T>
__device__ void sgd_impl(T* param, const T* grad, T* buf, long long n, T lr, T momentum,
                         T dampening_c, T weight_decay, int nesterov, int first_step,
                         int use_momentum, int use_wd) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        T g = grad[i];
        const T p = param[i];
        if (use_wd) g = g + weight_decay * p;
        if (use_momentum) {
            const T b = first_step ? g : (buf[i] * momentum) + (dampening_c * g);
            buf[i] = b;
            g = nesterov ? g + momentum * b : b;
        }
        param[i] = p - lr * g;
    }
}

// torch.optim.Adam / AdamW (bias-corrected; step_size = lr / (1 - beta1^t) and
// bc2_sqrt = sqrt(1 - beta2^t) come from the host):
//   param = param * (1 - lr * wd)          (decoupled, AdamW)
//   g = grad + wd * param                  (coupled, Adam, when use_wd)
//   m = m + (1 - beta1) * (g - m)
//   v = v * beta2 + ((1 - beta2) * g) * g
//   param = param - step_size * (m / (sqrt(v) / bc2_sqrt + eps))
template <typename T>
__device__ void adam_impl(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, long long n,
                          T one_minus_b1, T beta2, T one_minus_b2, T step_size,
                          T bc2_sqrt, T eps, T weight_decay, T decay_factor, int use_wd,
                          int decoupled) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        T p = param[i];
        T g = grad[i];
        if (decoupled) {
            p = p * decay_factor;
        } else if (use_wd) {
            g = g + weight_decay * p;
        }
        const T m0 = exp_avg[i];
        const T m = m0 + one_minus_b1 * (g - m0);
        const T v = (exp_avg_sq[i] * beta2) + ((one_minus_b2 * g) * g);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        const T denom = (fn_sqrt(v) / bc2_sqrt) + eps;
        param[i] = p - step_size * (m / denom);
    }
}

// torch.optim.RMSprop:
//   g = grad (+ weight_decay * param)
//   sq = sq * alpha + ((1 - alpha) * g) * g
//   centered: ga = ga + (1 - alpha) * (g - ga); avg = sqrt(sq - ga * ga) + eps
//   else:     avg = sqrt(sq) + eps
//   momentum: buf = buf * momentum + g / avg; param = param - lr * buf
//   else:     param = param - lr * (g / avg)
// buf / grad_avg are touched only when use_momentum / centered.
template <typename T>
__device__ void rmsprop_impl(T* param, const T* grad, T* square_avg, T* buf, T* grad_avg,
                             long long n, T lr, T alpha, T one_minus_alpha, T eps,
                             T weight_decay, T momentum, int use_wd, int centered,
                             int use_momentum) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        const T p = param[i];
        T g = grad[i];
        if (use_wd) g = g + weight_decay * p;
        const T sq = (square_avg[i] * alpha) + ((one_minus_alpha * g) * g);
        square_avg[i] = sq;
        T avg;
        if (centered) {
            const T ga0 = grad_avg[i];
            const T ga = ga0 + one_minus_alpha * (g - ga0);
            grad_avg[i] = ga;
            avg = fn_sqrt(sq - ga * ga) + eps;
        } else {
            avg = fn_sqrt(sq) + eps;
        }
        if (use_momentum) {
            const T b = (buf[i] * momentum) + (g / avg);
            buf[i] = b;
            param[i] = p - lr * b;
        } else {
            param[i] = p - lr * (g / avg);
        }
    }
}

// Explicit wrappers (no macros): every kernel name is greppable.
extern "C" __global__ void sgd_f32(float* param, const float* grad, float* buf, long long n,
                                   float lr, float momentum, float dampening_c, float weight_decay,
                                   int nesterov, int first_step, int use_momentum,
                                   int use_wd) {
    sgd_impl<float>(param, grad, buf, n, lr, momentum, dampening_c, weight_decay, nesterov,
                  first_step, use_momentum, use_wd);
}

extern "C" __global__ void adam_f32(float* param, const float* grad, float* exp_avg,
                                    float* exp_avg_sq, long long n, float one_minus_b1,
                                    float beta2, float one_minus_b2, float step_size,
                                    float bc2_sqrt, float eps, float weight_decay,
                                    float decay_factor, int use_wd, int decoupled) {
    adam_impl<float>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, beta2, one_minus_b2,
                   step_size, bc2_sqrt, eps, weight_decay, decay_factor, use_wd, decoupled);
}

extern "C" __global__ void rmsprop_f32(float* param, const float* grad, float* square_avg,
                                       float* buf, float* grad_avg, long long n, float lr,
                                       float alpha, float one_minus_alpha, float eps,
                                       float weight_decay, float momentum, int use_wd,
                                       int centered, int use_momentum) {
    rmsprop_impl<float>(param, grad, square_avg, buf, grad_avg, n, lr, alpha, one_minus_alpha,
                      eps, weight_decay, momentum, use_wd, centered, use_momentum);
}

extern "C" __global__ void sgd_f64(double* param, const double* grad, double* buf, long long n,
                                   double lr, double momentum, double dampening_c, double weight_decay,
                                   int nesterov, int first_step, int use_momentum,
                                   int use_wd) {
    sgd_impl<double>(param, grad, buf, n, lr, momentum, dampening_c, weight_decay, nesterov,
                  first_step, use_momentum, use_wd);
}

extern "C" __global__ void adam_f64(double* param, const double* grad, double* exp_avg,
                                    double* exp_avg_sq, long long n, double one_minus_b1,
                                    double beta2, double one_minus_b2, double step_size,
                                    double bc2_sqrt, double eps, double weight_decay,
                                    double decay_factor, int use_wd, int decoupled) {
    adam_impl<double>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, beta2, one_minus_b2,
                   step_size, bc2_sqrt, eps, weight_decay, decay_factor, use_wd, decoupled);
}

extern "C" __global__ void rmsprop_f64(double* param, const double* grad, double* square_avg,
                                       double* buf, double* grad_avg, long long n, double lr,
                                       double alpha, double one_minus_alpha, double eps,
                                       double weight_decay, double momentum, int use_wd,
                                       int centered, int use_momentum) {
    rmsprop_impl<double>(param, grad, square_avg, buf, grad_avg, n, lr, alpha, one_minus_alpha,
                      eps, weight_decay, momentum, use_wd, centered, use_momentum);
}

// Adam inside a recorded CUDA graph: the two step-dependent scalars come from
// device memory (step_scalars = {step_size, bc2_sqrt}, rewritten for every
// step by graph_step.cu's step_begin); the rest are fixed for the graph's life.
extern "C" __global__ void adam_captured_f32(float* param, const float* grad, float* exp_avg,
                                             float* exp_avg_sq, long long n,
                                             float one_minus_b1, float beta2,
                                             float one_minus_b2, const float* step_scalars,
                                             float eps, float weight_decay, float decay_factor,
                                             int use_wd, int decoupled) {
    adam_impl<float>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, beta2, one_minus_b2,
                     step_scalars[0], step_scalars[1], eps, weight_decay, decay_factor, use_wd,
                     decoupled);
}

extern "C" __global__ void adam_captured_f64(double* param, const double* grad,
                                             double* exp_avg, double* exp_avg_sq, long long n,
                                             double one_minus_b1, double beta2,
                                             double one_minus_b2, const double* step_scalars,
                                             double eps, double weight_decay,
                                             double decay_factor, int use_wd, int decoupled) {
    adam_impl<double>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, beta2, one_minus_b2,
                      step_scalars[0], step_scalars[1], eps, weight_decay, decay_factor, use_wd,
                      decoupled);
}
