// Runs every fused CUDA kernel on the CPU through the HIP CPU runtime and
// compares it with the math written out here in double precision: the
// kernels' arithmetic, reductions and launch shapes (the ones the Rust side
// uses: 32 to 512 threads a block, rows narrower and wider than a block,
// vocabulary padding, bf16) without a GPU. See ./run.
#include "cuda_bf16.h"
#include <vector>
#include <random>
#include <cstdio>
#include <algorithm>
#include "layer_norm.cu"
#include "attention_softmax.cu"
#include "gelu.cu"
#include "cross_entropy.cu"
#include "adamw.cu"

static std::mt19937 rng(1);
static std::vector<float> randn(size_t n, float s = 1.0f) { std::normal_distribution<float> d(0, s); std::vector<float> v(n); for (auto& x : v) x = d(rng); return v; }
static int fails = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double worst = 0, scale = 1e-30;
    for (auto w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); i++) worst = std::max(worst, std::fabs(got[i] - want[i]) / scale);
    bool ok = worst <= tol;
    if (!ok) fails++;
    printf("%-44s max rel err %.2e (tol %.0e) %s\n", what, worst, tol, ok ? "ok" : "FAIL");
}
static std::vector<__nv_bfloat16> bf(const std::vector<float>& v) { std::vector<__nv_bfloat16> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __float2bfloat16(v[i]); return o; }
static std::vector<float> fl(const std::vector<__nv_bfloat16>& v) { std::vector<float> o(v.size()); for (size_t i = 0; i < v.size(); i++) o[i] = __bfloat162float(v[i]); return o; }
static std::vector<float> rounded(const std::vector<float>& v) { return fl(bf(v)); }
static unsigned threads_for(int n, int cap) { int t = ((n + 31) / 32) * 32; return std::min(std::max(t, 32), cap); }

static void test_layer_norm(int rows, int c, unsigned block) {
    auto x = randn(rows * c), w = randn(c), b = randn(c), g = randn(rows * c);
    for (auto& v : x) v += 3.0f;
    float eps = 1e-5f;
    std::vector<double> y(rows * c), dx(rows * c), dwb(2 * c, 0.0);
    for (int r = 0; r < rows; r++) {
        double mean = 0, var = 0;
        for (int i = 0; i < c; i++) mean += x[r * c + i];
        mean /= c;
        for (int i = 0; i < c; i++) var += (x[r * c + i] - mean) * (x[r * c + i] - mean);
        var /= c;
        double rstd = 1 / std::sqrt(var + eps), m1 = 0, m2 = 0;
        for (int i = 0; i < c; i++) {
            double xh = (x[r * c + i] - mean) * rstd, gi = g[r * c + i];
            y[r * c + i] = xh * w[i] + b[i];
            m1 += gi * w[i]; m2 += gi * w[i] * xh;
            dwb[i] += gi * xh; dwb[c + i] += gi;
        }
        m1 /= c; m2 /= c;
        for (int i = 0; i < c; i++) { double xh = (x[r * c + i] - mean) * rstd; dx[r * c + i] = rstd * (g[r * c + i] * w[i] - m1 - xh * m2); }
    }
    char name[100];
    std::vector<float> out(rows * c), d(rows * c);
    hipLaunchKernelGGL(layer_norm_f32, dim3(rows), dim3(block), 0, 0, x.data(), w.data(), b.data(), out.data(), c, eps);
    hipLaunchKernelGGL(layer_norm_grad_x_f32, dim3(rows), dim3(block), 0, 0, x.data(), w.data(), g.data(), d.data(), c, eps);
    int blocks = (rows + WB_ROWS - 1) / WB_ROWS;
    std::vector<float> partial(blocks * 2 * c), wb(2 * c);
    hipLaunchKernelGGL(layer_norm_grad_wb_partial_f32, dim3(blocks), dim3(block), 0, 0, x.data(), g.data(), partial.data(), rows, c, eps);
    hipLaunchKernelGGL(sum_partials_f32, dim3((2 * c + 255) / 256), dim3(256), 0, 0, partial.data(), wb.data(), blocks, 2 * c);
    hipDeviceSynchronize();
    snprintf(name, 100, "layer_norm f32 %dx%d block %u", rows, c, block); check(name, out, y, 2e-6);
    snprintf(name, 100, "layer_norm_grad_x f32 %dx%d", rows, c); check(name, d, dx, 2e-5);
    snprintf(name, 100, "layer_norm_grad_wb f32 %dx%d", rows, c); check(name, wb, dwb, 2e-5);
    auto xb = bf(x), wbb = bf(w), bb = bf(b), gb = bf(g);
    std::vector<__nv_bfloat16> ob(rows * c), db(rows * c), wbo(2 * c);
    hipLaunchKernelGGL(layer_norm_bf16, dim3(rows), dim3(block), 0, 0, xb.data(), wbb.data(), bb.data(), ob.data(), c, eps);
    hipLaunchKernelGGL(layer_norm_grad_x_bf16, dim3(rows), dim3(block), 0, 0, xb.data(), wbb.data(), gb.data(), db.data(), c, eps);
    hipLaunchKernelGGL(layer_norm_grad_wb_partial_bf16, dim3(blocks), dim3(block), 0, 0, xb.data(), gb.data(), partial.data(), rows, c, eps);
    hipLaunchKernelGGL(sum_partials_bf16, dim3((2 * c + 255) / 256), dim3(256), 0, 0, partial.data(), wbo.data(), blocks, 2 * c);
    hipDeviceSynchronize();
    snprintf(name, 100, "layer_norm bf16 %dx%d", rows, c); check(name, fl(ob), y, 3e-2);
    snprintf(name, 100, "layer_norm_grad_x bf16 %dx%d", rows, c); check(name, fl(db), dx, 3e-2);
    snprintf(name, 100, "layer_norm_grad_wb bf16 %dx%d", rows, c); check(name, fl(wbo), dwb, 3e-2);
}

static void test_softmax(int B, int H, int T, int S, int past, bool masked, unsigned block) {
    size_t n = (size_t)B * H * T * S;
    auto x = randn(n, 2.0f), g = randn(n);
    std::vector<uint32_t> mask(B * S, 1);
    if (masked) for (int b = 0; b < B; b++) mask[b * S + (b % S)] = 0;
    float scale = 0.125f;
    std::vector<double> y(n), dx(n);
    for (size_t row = 0; row < (size_t)B * H * T; row++) {
        int i = row % T; size_t b = row / ((size_t)T * H);
        double m = -1e300; std::vector<double> s(S);
        for (int j = 0; j < S; j++) { bool ok = j <= past + i && (!masked || mask[b * S + j] == 1); s[j] = ok ? (double)x[row * S + j] * scale : -1e9; m = std::max(m, s[j]); }
        double z = 0; for (int j = 0; j < S; j++) z += std::exp(s[j] - m);
        double dot = 0; for (int j = 0; j < S; j++) { y[row * S + j] = std::exp(s[j] - m) / z; }
        for (int j = 0; j < S; j++) dot += g[row * S + j] * (float)y[row * S + j];
        for (int j = 0; j < S; j++) dx[row * S + j] = (float)y[row * S + j] * (g[row * S + j] - dot) * scale;
    }
    std::vector<float> out(n), d(n);
    hipLaunchKernelGGL(masked_softmax_f32, dim3(B * H * T), dim3(block), 0, 0, x.data(), out.data(), masked ? mask.data() : nullptr, H, T, S, past, scale);
    hipDeviceSynchronize();
    // The backward from the kernel's own probabilities (as autograd passes them).
    std::vector<double> dx2(n);
    for (size_t row = 0; row < (size_t)B * H * T; row++) {
        double dot = 0; for (int j = 0; j < S; j++) dot += (double)g[row * S + j] * out[row * S + j];
        for (int j = 0; j < S; j++) dx2[row * S + j] = out[row * S + j] * (g[row * S + j] - dot) * scale;
    }
    hipLaunchKernelGGL(softmax_grad_f32, dim3(B * H * T), dim3(block), 0, 0, out.data(), g.data(), d.data(), S, scale);
    hipDeviceSynchronize();
    char name[100];
    snprintf(name, 100, "masked_softmax f32 T%d S%d past%d mask%d blk%u", T, S, past, masked, block); check(name, out, y, 2e-6);
    snprintf(name, 100, "softmax_grad f32 S%d", S); check(name, d, dx2, 2e-6);
    auto xb = bf(x);
    std::vector<__nv_bfloat16> ob(n);
    hipLaunchKernelGGL(masked_softmax_bf16, dim3(B * H * T), dim3(block), 0, 0, xb.data(), ob.data(), masked ? mask.data() : nullptr, H, T, S, past, scale);
    hipDeviceSynchronize();
    snprintf(name, 100, "masked_softmax bf16 S%d", S); check(name, fl(ob), y, 2e-2);
}

static void test_gelu(size_t n) {
    auto x = randn(n, 3.0f), g = randn(n);
    std::vector<double> y(n), dx(n);
    const double k = std::sqrt(2.0 / M_PI);
    for (size_t i = 0; i < n; i++) {
        double v = x[i], t = std::tanh(k * (v + 0.044715 * v * v * v));
        y[i] = 0.5 * v * (1 + t);
        dx[i] = g[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * 0.044715 * v * v));
    }
    std::vector<float> out(n), d(n);
    hipLaunchKernelGGL(gelu_tanh_f32, dim3(3), dim3(64), 0, 0, x.data(), out.data(), n);
    hipLaunchKernelGGL(gelu_tanh_grad_f32, dim3(3), dim3(64), 0, 0, x.data(), g.data(), d.data(), n);
    hipDeviceSynchronize();
    check("gelu_tanh f32", out, y, 1e-6);
    check("gelu_tanh_grad f32", d, dx, 1e-6);
    auto xb = bf(x), gb = bf(g);
    std::vector<__nv_bfloat16> ob(n), db(n);
    hipLaunchKernelGGL(gelu_tanh_bf16, dim3(3), dim3(64), 0, 0, xb.data(), ob.data(), n);
    hipLaunchKernelGGL(gelu_tanh_grad_bf16, dim3(3), dim3(64), 0, 0, xb.data(), gb.data(), db.data(), n);
    hipDeviceSynchronize();
    check("gelu_tanh bf16", fl(ob), y, 2e-2);
    check("gelu_tanh_grad bf16", fl(db), dx, 3e-2);
}

static void test_cross_entropy(int N, int V, int v_real, unsigned block) {
    auto x = randn((size_t)N * V, 3.0f);
    std::vector<int64_t> tg(N);
    for (int r = 0; r < N; r++) tg[r] = (r % 3 == 1) ? -100 : (r * 7919) % v_real;
    float gval = 0.37f;
    double total = 0; std::vector<double> d((size_t)N * v_real, 0.0), rows(N);
    for (int r = 0; r < N; r++) {
        if (tg[r] < 0) { rows[r] = 0; continue; }
        double m = -1e300; for (int j = 0; j < v_real; j++) m = std::max(m, (double)x[(size_t)r * V + j]);
        double z = 0; for (int j = 0; j < v_real; j++) z += std::exp(x[(size_t)r * V + j] - m);
        rows[r] = m + std::log(z) - x[(size_t)r * V + tg[r]]; total += rows[r];
        for (int j = 0; j < v_real; j++) d[(size_t)r * v_real + j] = gval * (std::exp(x[(size_t)r * V + j] - m) / z - (j == tg[r]));
    }
    std::vector<float> losses(N), sum(1), dd((size_t)N * v_real, 99.0f);
    hipLaunchKernelGGL(cross_entropy_rows_f32, dim3(N), dim3(block), 0, 0, x.data(), tg.data(), losses.data(), V, v_real);
    hipLaunchKernelGGL(sum_losses, dim3(1), dim3(256), 0, 0, losses.data(), sum.data(), N);
    hipLaunchKernelGGL(cross_entropy_grad_f32, dim3(N), dim3(block), 0, 0, x.data(), tg.data(), &gval, dd.data(), V, v_real);
    hipDeviceSynchronize();
    char name[100];
    snprintf(name, 100, "cross_entropy_rows f32 N%d V%d real%d blk%u", N, V, v_real, block); check(name, losses, rows, 2e-6);
    check("sum_losses", sum, {total}, 2e-6);
    snprintf(name, 100, "cross_entropy_grad f32 V%d", V); check(name, dd, d, 2e-6);
    auto xb = bf(x);
    std::vector<__nv_bfloat16> db((size_t)N * v_real);
    hipLaunchKernelGGL(cross_entropy_rows_bf16, dim3(N), dim3(block), 0, 0, xb.data(), tg.data(), losses.data(), V, v_real);
    hipLaunchKernelGGL(cross_entropy_grad_bf16, dim3(N), dim3(block), 0, 0, xb.data(), tg.data(), &gval, db.data(), V, v_real);
    hipDeviceSynchronize();
    check("cross_entropy_rows bf16", losses, rows, 2e-2);
    check("cross_entropy_grad bf16", fl(db), d, 2e-2);
}

static void test_adamw(size_t n) {
    auto p = randn(n), g = randn(n, 0.1f), m = randn(n, 0.01f), v = randn(n, 0.001f), decay(randn(n));
    for (auto& x : v) x = x * x;
    for (size_t i = 0; i < n; i++) decay[i] = (i % 5) ? 1.0f : 0.0f;
    float gs = 0.5f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, bc2 = 0.3f, step = 1e-3f, lrwd = 1e-5f;
    std::vector<double> want(3 * n), sq{0.0};
    for (size_t i = 0; i < n; i++) {
        double gi = g[i] * gs, m1 = b1 * m[i] + (1 - b1) * gi, v1 = b2 * v[i] + (1 - b2) * gi * gi;
        want[i] = p[i] * (1 - lrwd * decay[i]) - step * m1 / (std::sqrt(v1) / bc2 + eps);
        want[n + i] = m1; want[2 * n + i] = v1; sq[0] += (double)g[i] * g[i];
    }
    std::vector<float> out(3 * n);
    hipLaunchKernelGGL(adamw_f32, dim3(4), dim3(128), 0, 0, p.data(), g.data(), m.data(), v.data(), decay.data(), out.data(), out.data() + n, out.data() + 2 * n, n, gs, b1, b2, eps, bc2, step, lrwd);
    // As adamw_cuda.rs launches it: 256 blocks of 256 threads, then one thread.
    std::vector<double> partial(256), total(1);
    hipLaunchKernelGGL(sum_squares_partial, dim3(256), dim3(256), 0, 0, g.data(), partial.data(), n);
    hipLaunchKernelGGL(sum_partials_f64, dim3(1), dim3(1), 0, 0, partial.data(), total.data(), 256);
    hipDeviceSynchronize();
    // Compare each third on its own scale.
    std::vector<float> a(out.begin(), out.begin() + n), mm(out.begin() + n, out.begin() + 2 * n), vv(out.begin() + 2 * n, out.end());
    check("adamw p'", a, std::vector<double>(want.begin(), want.begin() + n), 1e-6);
    check("adamw m'", mm, std::vector<double>(want.begin() + n, want.begin() + 2 * n), 1e-6);
    check("adamw v'", vv, std::vector<double>(want.begin() + 2 * n, want.end()), 1e-6);
    check("sum_squares", {(float)total[0]}, sq, 1e-6);
}

int main() {
    for (unsigned blk : {32u, 64u, 256u}) test_layer_norm(70, 96, blk);
    test_layer_norm(33, 768, 256);
    test_layer_norm(5, 40, threads_for(40, 256));
    for (unsigned blk : {32u, 128u}) test_softmax(2, 3, 7, 7, 0, false, blk);
    test_softmax(2, 2, 5, 9, 4, true, 64);
    test_softmax(1, 2, 4, 300, 296, true, threads_for(300, 256));
    test_gelu(1000);
    test_cross_entropy(10, 67, 63, 64);
    test_cross_entropy(6, 1000, 1000, 256);
    test_cross_entropy(4, 50304, 50257, 512);
    test_adamw(1234);
    test_adamw(200003);
    printf("%s: %d failed\n", fails ? "FAIL" : "PASS", fails);
    return fails != 0;
}
