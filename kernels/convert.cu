// convert: float32 -> bfloat16 bits, the input side of bf16 mixed-precision GEMMs.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
#include "fastnn_common.cuh"

// The rounding itself (fn_f32_to_bf16_bits) is in fastnn_common.cuh: bias_act_bf16
// and act_backward_bf16 write the same bits in the pass they already make.

// x: n float32 values; out: n bf16 bit patterns (numpy uint16). No aliasing.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* out, long long n) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        out[i] = fn_f32_to_bf16_bits(x[i]);
    }
}
