// The head and tail of a training step recorded in a CUDA graph
// (fastnn/cuda_graph.py). A graph replays its kernels with the arguments of
// the recording, so what changes from step to step is read from device
// memory: `counter` holds the step's batch index within the epoch, advanced
// by step_end; the epoch's sample order and a table of per-step scalars
// (Adam's bias corrections) are rewritten in place once per epoch.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
#include "fastnn_common.cuh"

// Gathers batch `counter[0]`: x_batch row r = x_all row order[counter * batch + r]
// (rows of x_row_words 32-bit words; y likewise), and copies row counter[0]
// of `table` (scalar_words words per row) to `scalars`. Byte-agnostic: the
// caller passes float, int and int64 arrays as 32-bit words.
extern "C" __global__ void step_begin(const unsigned int* x_all, unsigned int* x_batch,
                                      long long x_row_words, const unsigned int* y_all,
                                      unsigned int* y_batch, long long y_row_words,
                                      const long long* order, long long batch,
                                      const long long* counter, const unsigned int* table,
                                      unsigned int* scalars, long long scalar_words) {
    const long long step = counter[0];
    const long long* rows = order + step * batch;
    const long long x_words = batch * x_row_words;
    const long long y_words = batch * y_row_words;
    const long long total = x_words + y_words + scalar_words;
    for (long long i = fn_thread_index(); i < total; i += fn_grid_stride()) {
        if (i < x_words) {
            const long long r = i / x_row_words;
            x_batch[i] = x_all[rows[r] * x_row_words + (i - r * x_row_words)];
        } else if (i < x_words + y_words) {
            const long long j = i - x_words;
            const long long r = j / y_row_words;
            y_batch[j] = y_all[rows[r] * y_row_words + (j - r * y_row_words)];
        } else {
            const long long j = i - x_words - y_words;
            scalars[j] = table[step * scalar_words + j];
        }
    }
}

// losses[counter[0]] = loss[0]; counter[0] += 1. Launch one thread.
template <typename T>
__device__ void step_end_impl(const T* loss, T* losses, long long* counter) {
    if (fn_thread_index() == 0) {
        const long long step = counter[0];
        losses[step] = loss[0];
        counter[0] = step + 1;
    }
}

extern "C" __global__ void step_end_f32(const float* loss, float* losses, long long* counter) {
    step_end_impl<float>(loss, losses, counter);
}

extern "C" __global__ void step_end_f64(const double* loss, double* losses,
                                        long long* counter) {
    step_end_impl<double>(loss, losses, counter);
}
