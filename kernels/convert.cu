// convert: float32 -> bfloat16 bits, the input side of bf16 mixed-precision GEMMs.
// Contract: kernels/README.md. Launch: 1-D grid-stride, any grid/block size.
#include "fastnn_common.cuh"

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

// x: n float32 values; out: n bf16 bit patterns (numpy uint16). No aliasing.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* out, long long n) {
    for (long long i = fn_thread_index(); i < n; i += fn_grid_stride()) {
        out[i] = fn_f32_to_bf16_bits(x[i]);
    }
}
