// HF's `gelu_new`, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), and its
// derivative times the incoming gradient: the CUDA twins of
// `cpu::layers::{gelu, gelu_backward}` (gelu.rs launches them). One thread
// per element, grid-stride.
#include "kernels.cuh"
using namespace companion;

#define SQRT_2_OVER_PI 0.7978845608f

template <typename T>
__device__ void gelu_tanh(const T* x, T* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        store(y, i, 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v))));
    }
}
COMPANION_F32_BF16(gelu_tanh, (const T* x, T* y, size_t n), (x, y, n))

template <typename T>
__device__ void gelu_tanh_grad(const T* x, const T* g, T* dx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        const float th = tanhf(SQRT_2_OVER_PI * (v + 0.044715f * v * v * v));
        const float du = SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * v * v);
        store(dx, i, load(g, i) * (0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * du));
    }
}
COMPANION_F32_BF16(gelu_tanh_grad, (const T* x, const T* g, T* dx, size_t n), (x, g, dx, n))
