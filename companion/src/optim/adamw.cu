// AdamW over a rank's flat fp32 buffers in one pass, and the sum of squares
// the global gradient norm is made of: the CUDA twins of
// `optim::adamw::{adamw_update, update_tensors}` and of
// `zero::device_buffers::sum_sq` (adamw_cuda.rs launches them).
#include "../model/autograd_ops/kernels.cuh"
using namespace companion;

// p', m', v' (n each) from p, g·gscale (gscale: the clipping
// coefficient), the moments m, v and decay (1 where weight decay applies):
//   m' = b1·m + (1 − b1)·g,  v' = b2·v + (1 − b2)·g²,
//   p' = p·(1 − lr_wd·decay) − step_size·m' / (√v' / bc2_sqrt + eps).
extern "C" __global__ void adamw_f32(const float* p, const float* g, const float* m,
                                     const float* v, const float* decay, float* p_out,
                                     float* m_out, float* v_out, size_t n, float gscale, float b1,
                                     float b2, float eps, float bc2_sqrt, float step_size,
                                     float lr_wd) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * gscale;
        const float m1 = b1 * m[i] + (1.0f - b1) * gi;
        const float v1 = b2 * v[i] + (1.0f - b2) * gi * gi;
        const float denom = sqrtf(v1) / bc2_sqrt + eps;
        p_out[i] = p[i] * (1.0f - lr_wd * decay[i]) - step_size * m1 / denom;
        m_out[i] = m1;
        v_out[i] = v1;
    }
}

// partial[block] = Σ x[i]² over the block's grid-stride share, in double.
extern "C" __global__ void sum_squares_partial(const float* x, double* partial, size_t n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const double v = x[i];
        s += v * v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = Σ partial[k] over `blocks` values, in order (one thread).
extern "C" __global__ void sum_partials_f64(const double* partial, double* out, int blocks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int k = 0; k < blocks; k++) s += partial[k];
    out[0] = s;
}
