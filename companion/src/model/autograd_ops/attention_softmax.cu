// The attention softmax with its mask computed in the kernel, and its
// backward: the CUDA twins of `cpu::layers::{masked_softmax_row,
// softmax_backward_row}` (attention_softmax.rs launches them). Scores are
// [B, H, T, S], one block per row; query i (at position past + i) sees key
// j when j <= past + i and, with a key mask [B, S], mask[b][j] == 1. A
// masked key gets the score MASKED, as on the CPU, so its probability is 0.
#include "kernels.cuh"
using namespace companion;

#define MASKED (-1e9f)

template <typename T>
__device__ void masked_softmax(const T* x, T* y, const uint32_t* key_mask, int h, int t, int s,
                               int past, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int i = row % t;
    const size_t b = row / ((size_t)t * h);
    x += row * s;
    y += row * s;
    auto score = [&](int j) {
        const bool allowed = j <= past + i && (key_mask == nullptr || key_mask[b * s + j] == 1);
        return allowed ? load(x, j) * scale : MASKED;
    };
    float m = -INFINITY;
    for (int j = threadIdx.x; j < s; j += blockDim.x) m = fmaxf(m, score(j));
    m = block_max(m, scratch);
    float z = 0.0f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) z += expf(score(j) - m);
    const float inv = 1.0f / block_sum(z, scratch);
    for (int j = threadIdx.x; j < s; j += blockDim.x) store(y, j, expf(score(j) - m) * inv);
}
COMPANION_F32_BF16(masked_softmax,
                   (const T* x, T* y, const uint32_t* key_mask, int h, int t, int s, int past,
                    float scale),
                   (x, y, key_mask, h, t, s, past, scale))

// dx = scale·y·(g − Σ g·y), one block per row of s.
template <typename T>
__device__ void softmax_grad(const T* y, const T* g, T* dx, int s, float scale) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    y += row * s;
    g += row * s;
    dx += row * s;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) dot += load(g, j) * load(y, j);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < s; j += blockDim.x)
        store(dx, j, load(y, j) * (load(g, j) - dot) * scale);
}
COMPANION_F32_BF16(softmax_grad, (const T* y, const T* g, T* dx, int s, float scale),
                   (y, g, dx, s, scale))
