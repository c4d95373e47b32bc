// Cross-entropy over the vocabulary without the probabilities ever stored
// (the "fused classifier" of llm.c): the CUDA twins of
// `cpu::layers::{cross_entropy_loss, cross_entropy_backward}`
// (cross_entropy.rs launches them). Logits are N rows `v` apart of which
// the first `v_real` columns count (the rest, when v > v_real, is the
// vocabulary padding a view cut off: never read); a target < 0 (HF's -100)
// skips its row.
#include "kernels.cuh"
using namespace companion;

// A row's maximum and Σ exp(x − max) over its first v_real columns.
template <typename T>
__device__ __forceinline__ float2 row_logsumexp_parts(const T* x, int v_real, float* scratch) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v_real; j += blockDim.x) m = fmaxf(m, load(x, j));
    m = block_max(m, scratch);
    float z = 0.0f;
    for (int j = threadIdx.x; j < v_real; j += blockDim.x) z += expf(load(x, j) - m);
    return make_float2(m, block_sum(z, scratch));
}

// losses[r] = logsumexp(row r) − row r[target r], or 0 for a skipped row.
template <typename T>
__device__ void cross_entropy_rows(const T* logits, const int64_t* targets, float* losses, int v,
                                   int v_real) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int64_t tg = targets[row];
    if (tg < 0) {  // the same for the whole block: no thread reaches a barrier
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const T* x = logits + row * v;
    const float2 mz = row_logsumexp_parts(x, v_real, scratch);
    if (threadIdx.x == 0) losses[row] = mz.x + logf(mz.y) - load(x, tg);
}
COMPANION_F32_BF16(cross_entropy_rows,
                   (const T* logits, const int64_t* targets, float* losses, int v, int v_real),
                   (logits, targets, losses, v, v_real))

// d = g·(softmax(row) − onehot(target)), [N, v_real] contiguous (the
// gradient of the view the loss was given), 0 on skipped rows; g is a
// device scalar (the loss's incoming gradient), read here so that it never
// goes to the host.
template <typename T>
__device__ void cross_entropy_grad(const T* logits, const int64_t* targets, const float* g, T* d,
                                   int v, int v_real) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int64_t tg = targets[row];
    const T* x = logits + row * v;
    T* out = d + row * v_real;
    if (tg < 0) {
        for (int j = threadIdx.x; j < v_real; j += blockDim.x) store(out, j, 0.0f);
        return;
    }
    const float2 mz = row_logsumexp_parts(x, v_real, scratch);
    const float scale = *g / mz.y;
    for (int j = threadIdx.x; j < v_real; j += blockDim.x) {
        const float p = expf(load(x, j) - mz.x) * scale;
        store(out, j, j == tg ? p - *g : p);
    }
}
COMPANION_F32_BF16(cross_entropy_grad,
                   (const T* logits, const int64_t* targets, const float* g, T* d, int v,
                    int v_real),
                   (logits, targets, g, d, v, v_real))

// out[0] = Σ losses[r] in double, in a fixed order (one block).
extern "C" __global__ void sum_losses(const float* losses, float* out, int n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) s += losses[r];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = (float)s;
}
