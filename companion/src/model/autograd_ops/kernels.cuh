// Shared by the fused kernels beside `model::autograd_ops` and `optim`:
// loads and stores that compute in fp32 whatever the tensor's dtype (f32 or
// bf16), and sums and maxima over a warp and over a block. Every reduction
// adds in a fixed order for a fixed launch shape, so a kernel gives the same
// bits from run to run.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace companion {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) {
    p[i] = __float2bfloat16(v);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum of `v` over the block, on every thread. `scratch` is 32 values of
// shared memory; blockDim.x is a multiple of 32.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the scratch of an earlier call has been read
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : A(0);
    return warp_sum(v);
}

// The maximum of `v` over the block, on every thread (as `block_sum`).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

}  // namespace companion

// `extern "C"` entry points `name_f32` and `name_bf16` of a template kernel
// body `name<T>(args...)`; `params` may name the element type `T`.
#define COMPANION_F32_BF16(name, params, args)                                  \
    namespace name##_f32_entry {                                                \
    using T = float;                                                            \
    extern "C" __global__ void name##_f32 params { ::name<T> args; }            \
    }                                                                           \
    namespace name##_bf16_entry {                                               \
    using T = __nv_bfloat16;                                                    \
    extern "C" __global__ void name##_bf16 params { ::name<T> args; }           \
    }                                                                           \
    using name##_f32_entry::name##_f32;                                         \
    using name##_bf16_entry::name##_bf16;
