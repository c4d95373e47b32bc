// Layer norm over the last dimension, forward and backward: the CUDA twins
// of `cpu::layers::{ln_row_stats, ln_row, ln_row_grad_x, ln_row_grad_wb}`
// (layer_norm.rs launches them). One block per row of `c`; fp32 arithmetic
// for f32 and bf16 tensors. The backward recomputes each row's mean and
// reciprocal standard deviation instead of keeping them from the forward.
#include "kernels.cuh"
using namespace companion;

// A row's mean and 1/sqrt(var + eps), on every thread of the block.
template <typename T>
__device__ __forceinline__ float2 row_stats(const T* x, int c, float eps, float* scratch) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += load(x, i);
    const float mean = block_sum(s, scratch) / c;
    float q = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float d = load(x, i) - mean;
        q += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(q, scratch) / c + eps);
    return make_float2(mean, rstd);
}

// y = (x − mean)·rstd·w + b.
template <typename T>
__device__ void layer_norm(const T* x, const T* w, const T* b, T* y, int c, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    x += row * c;
    y += row * c;
    const float2 st = row_stats(x, c, eps, scratch);
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        store(y, i, (load(x, i) - st.x) * st.y * load(w, i) + load(b, i));
}
COMPANION_F32_BF16(layer_norm,
                   (const T* x, const T* w, const T* b, T* y, int c, float eps),
                   (x, w, b, y, c, eps))

// dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)).
template <typename T>
__device__ void layer_norm_grad_x(const T* x, const T* w, const T* g, T* dx, int c, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    x += row * c;
    g += row * c;
    dx += row * c;
    const float2 st = row_stats(x, c, eps, scratch);
    float m1 = 0.0f, m2 = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float gw = load(g, i) * load(w, i);
        m1 += gw;
        m2 += gw * (load(x, i) - st.x) * st.y;
    }
    m1 = block_sum(m1, scratch) / c;
    m2 = block_sum(m2, scratch) / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float xhat = (load(x, i) - st.x) * st.y;
        store(dx, i, st.y * (load(g, i) * load(w, i) - m1 - xhat * m2));
    }
}
COMPANION_F32_BF16(layer_norm_grad_x,
                   (const T* x, const T* w, const T* g, T* dx, int c, float eps),
                   (x, w, g, dx, c, eps))

// The rows one block of `layer_norm_grad_wb_partial` sums.
#define WB_ROWS 32

// Block k's share of [Σ g·x̂; Σ g] over rows [k·WB_ROWS, (k+1)·WB_ROWS),
// into partial[k·2c .. (k+1)·2c] (fp32).
template <typename T>
__device__ void layer_norm_grad_wb_partial(const T* x, const T* g, float* partial, int rows,
                                           int c, float eps) {
    __shared__ float scratch[32];
    __shared__ float2 stats[WB_ROWS];
    const int first = blockIdx.x * WB_ROWS;
    const int n = min(WB_ROWS, rows - first);
    for (int r = 0; r < n; r++) {
        const float2 st = row_stats(x + (size_t)(first + r) * c, c, eps, scratch);
        if (threadIdx.x == 0) stats[r] = st;
    }
    __syncthreads();
    float* out = partial + (size_t)blockIdx.x * 2 * c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        float dw = 0.0f, db = 0.0f;
        for (int r = 0; r < n; r++) {
            const size_t at = (size_t)(first + r) * c + i;
            const float gi = load(g, at);
            dw += gi * (load(x, at) - stats[r].x) * stats[r].y;
            db += gi;
        }
        out[i] = dw;
        out[c + i] = db;
    }
}
COMPANION_F32_BF16(layer_norm_grad_wb_partial,
                   (const T* x, const T* g, float* partial, int rows, int c, float eps),
                   (x, g, partial, rows, c, eps))

// out[j] = Σ_k partial[k·n + j] over `blocks` partial rows of n = 2c, in
// order of k: the weight and bias gradients.
template <typename T>
__device__ void sum_partials(const float* partial, T* out, int blocks, int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float s = 0.0f;
    for (int k = 0; k < blocks; k++) s += partial[(size_t)k * n + j];
    store(out, j, s);
}
COMPANION_F32_BF16(sum_partials, (const float* partial, T* out, int blocks, int n),
                   (partial, out, blocks, n))
