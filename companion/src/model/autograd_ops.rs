//! candle custom ops with a backward for the layers whose candle versions
//! have none (fused `layer_norm`, `softmax_last_dim`) or build a temporary
//! per primitive: layer norm, the masked attention softmax, GELU (tanh form)
//! and cross-entropy. On fp32 CPU tensors each forward and backward calls
//! the one implementation of that math in [`crate::cpu::layers`]; other
//! devices and dtypes fall back to differentiable composite ops.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

use crate::cpu::layers::{
    cross_entropy_backward, cross_entropy_loss, gelu, gelu_backward, layer_norm_grad_wb, ln_row,
    ln_row_grad_x, ln_row_stats, masked_softmax_row, softmax_backward_row, MASKED,
};

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{what}: expected f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn fast(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

// ---------------------------------------------------------------- layer norm

/// y = (x − mean) / sqrt(var + eps) · w + b over the last dimension.
struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "companion-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm x")?;
        let w = f32_slice(s2, l2, "layer_norm weight")?;
        let b = f32_slice(s3, l3, "layer_norm bias")?;
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(y, x)| ln_row(y, x, w, b, ln_row_stats(x, self.eps)));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX { eps: self.eps })?;
        let dwdb = x.apply_op2_no_bwd(&g, &LayerNormGradWB { eps: self.eps })?;
        Ok((Some(dx), Some(dwdb.get(0)?), Some(dwdb.get(1)?)))
    }
}

/// dx = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)).
struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "companion-layer-norm-grad-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm grad x")?;
        let w = f32_slice(s2, l2, "layer_norm grad w")?;
        let g = f32_slice(s3, l3, "layer_norm grad g")?;
        let c = w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(dx, (x, g))| ln_row_grad_x(dx, g, x, w, ln_row_stats(x, self.eps)));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// [dw; db] = [Σ g·x̂; Σ g] over rows, as a `[2, C]` tensor.
struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "companion-layer-norm-grad-wb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm grad x")?;
        let g = f32_slice(s2, l2, "layer_norm grad g")?;
        let c = *l1.dims().last().expect("rank ≥ 1");
        let out = layer_norm_grad_wb(g, x, c, |r| ln_row_stats(&x[r * c..(r + 1) * c], self.eps));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// Layer norm over the last dimension of `x` with weight `w` and bias `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fast(x) && fast(w) && fast(b) {
        let x = x.contiguous()?;
        return x.apply_op3(w, b, LayerNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

// ------------------------------------------------------------ softmax grad

/// dx = y · (g − Σ g·y).
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "companion-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax grad y")?;
        let g = f32_slice(s2, l2, "softmax grad g")?;
        let c = *l1.dims().last().expect("rank ≥ 1");
        let mut dx = g.to_vec();
        dx.par_chunks_mut(c)
            .zip(y.par_chunks(c))
            .for_each(|(dx, y)| softmax_backward_row(dx, y, 1.0));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ------------------------------------------------------- attention softmax

/// softmax(scale · scores + mask) over keys, for scores `[B, H, T, S]`:
/// query i (at position past + i) sees key j when j ≤ past + i and the key
/// is not padding (`key_mask[b][j] == 1`). One pass instead of a scale, a
/// broadcast add of a `[B, 1, T, S]` bias and a softmax, each with a backward.
struct MaskedSoftmax {
    scale: f32,
    past: usize,
    key_mask: Option<Arc<Vec<Vec<u32>>>>,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "companion-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "masked softmax")?;
        let dims = l.dims();
        let (h, t, sk) = (dims[1], dims[2], dims[3]);
        let mut y = x.to_vec();
        y.par_chunks_mut(sk).enumerate().for_each(|(row, y)| {
            let (i, b) = (row % t, row / (t * h));
            masked_softmax_row(y, self.scale, |j| {
                j <= self.past + i && self.key_mask.as_ref().is_none_or(|m| m[b][j] == 1)
            });
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?;
        Ok(Some((dx * self.scale as f64)?))
    }
}

/// Causal (and padding-masked) softmax of `scale · scores`, scores `[B, H, T, S]`.
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    past: usize,
    key_mask: Option<&[Vec<u32>]>,
) -> Result<Tensor> {
    let (b, _h, t, s) = scores.dims4()?;
    if let Some(m) = key_mask {
        if m.len() != b || m.iter().any(|r| r.len() != s) {
            candle_core::bail!("masked_softmax: key mask must be {b} rows of {s}");
        }
    }
    if fast(scores) {
        return scores.contiguous()?.apply_op1(MaskedSoftmax {
            scale: scale as f32,
            past,
            key_mask: key_mask.map(|m| Arc::new(m.to_vec())),
        });
    }
    let rows = if key_mask.is_some() { b } else { 1 };
    let mut bias = vec![0f32; rows * t * s];
    for r in 0..rows {
        for i in 0..t {
            for j in 0..s {
                let pad = key_mask.is_some_and(|m| m[r][j] == 0);
                if j > past + i || pad {
                    bias[(r * t + i) * s + j] = MASKED;
                }
            }
        }
    }
    let bias =
        Tensor::from_vec(bias, (rows, 1, t, s), scores.device())?.to_dtype(scores.dtype())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&bias)?, D::Minus1)
}

// ---------------------------------------------------------------------- GELU

/// HF's `gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "companion-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        gelu(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluTanhGrad)?))
    }
}

struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "companion-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu grad x")?;
        let g = f32_slice(s2, l2, "gelu grad g")?;
        let mut dx = g.to_vec();
        gelu_backward(&mut dx, x);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `gelu_new` with a gradient.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fast(x) {
        return x.contiguous()?.apply_op1(GeluTanh);
    }
    x.gelu()
}

// ------------------------------------------------------------- cross-entropy

/// Σ over rows with a target of (logsumexp(row) − row[target]); targets < 0
/// (HF's -100) are skipped.
struct CrossEntropySum {
    targets: Arc<Vec<i64>>,
}

impl CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "companion-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross_entropy")?;
        let v = *l.dims().last().expect("rank 2");
        // Row losses collected, then summed in order: rayon's `sum` would
        // round differently from run to run.
        let rows: Vec<f64> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                if t < 0 {
                    return 0.0;
                }
                cross_entropy_loss(row, t as usize)
            })
            .collect();
        let total: f64 = rows.iter().sum();
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = x.apply_op1_no_bwd(&CrossEntropyGrad {
            targets: self.targets.clone(),
        })?;
        Ok(Some(d.broadcast_mul(g)?))
    }
}

/// softmax(row) − onehot(target), zero for skipped rows.
struct CrossEntropyGrad {
    targets: Arc<Vec<i64>>,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "companion-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "cross_entropy grad")?;
        let v = *l.dims().last().expect("rank 2");
        let mut d = x.to_vec();
        d.par_chunks_mut(v)
            .zip(self.targets.par_iter())
            .for_each(|(d, &t)| {
                if t < 0 {
                    d.fill(0.0);
                } else {
                    cross_entropy_backward(d, t as usize, 1.0);
                }
            });
        Ok((CpuStorage::F32(d), l.shape().clone()))
    }
}

/// Summed cross-entropy of `logits` `[N, V]` against `targets` (−100 skipped).
pub fn cross_entropy_sum(logits: &Tensor, targets: Vec<i64>) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= v as i64) {
        candle_core::bail!("cross_entropy: target {bad} outside the vocabulary of {v}");
    }
    if fast(logits) {
        return logits.contiguous()?.apply_op1(CrossEntropySum {
            targets: Arc::new(targets),
        });
    }
    let keep: Vec<f32> = targets
        .iter()
        .map(|&t| if t < 0 { 0.0 } else { 1.0 })
        .collect();
    let idx: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (n, 1), dev)?;
    let keep = Tensor::from_vec(keep, (n,), dev)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    (logp.gather(&idx, 1)?.squeeze(1)? * keep)?.sum_all()?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Central finite differences of `f(x)·w` against the analytic gradient.
    fn check_grad(shape: (usize, usize), f: impl Fn(&Tensor) -> Result<Tensor>) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, f(x.as_tensor()).unwrap().shape(), &Device::Cpu).unwrap();
        let obj = |t: &Tensor| -> f64 {
            let y = f(t).unwrap();
            (y.to_dtype(DType::F64).unwrap() * w.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let loss = (f(x.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        for i in (0..base.len()).step_by(7) {
            let mut p = base.clone();
            p[i] += h;
            let up = obj(&Tensor::from_vec(p.clone(), shape, &Device::Cpu).unwrap());
            p[i] -= 2.0 * h;
            let down = obj(&Tensor::from_vec(p, shape, &Device::Cpu).unwrap());
            let num = (up - down) / (2.0 * h as f64);
            assert!(
                (num - g[i] as f64).abs() < 2e-2 * (1.0 + num.abs()),
                "element {i}: finite difference {num}, backward {}",
                g[i]
            );
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let w = Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap();
        check_grad((5, 16), |x| layer_norm(x, &w, &b, 1e-5));
        // Weight and bias gradients against the composite version.
        let x = Tensor::randn(0f32, 1.0, (6, 16), &Device::Cpu).unwrap();
        let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
        let g1 = layer_norm(&x, wv.as_tensor(), bv.as_tensor(), 1e-5)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let comp = {
            let x64 = x.clone();
            let mean = x64.mean_keepdim(D::Minus1).unwrap();
            let xc = x64.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(wv.as_tensor())
                .unwrap()
                .broadcast_add(bv.as_tensor())
                .unwrap()
        };
        let g2 = comp.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&wv, &bv] {
            let a: Vec<f32> = g1.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = g2.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-3 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn plain_softmax_and_gelu_backward_match_finite_differences() {
        // With every key visible, the masked softmax is a plain softmax.
        check_grad((4, 9), |x| {
            masked_softmax(&x.reshape((1, 1, 4, 9))?, 1.0, 9, None)?.reshape((4, 9))
        });
        check_grad((4, 9), gelu_tanh);
        let x = Tensor::randn(0f32, 1.0, (3, 7), &Device::Cpu).unwrap();
        let ours: Vec<f32> = gelu_tanh(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> = x.gelu().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn masked_softmax_matches_the_composite_and_its_backward() {
        let mask = vec![vec![0u32, 1, 1, 1, 1]];
        check_grad((4, 5), |x| {
            masked_softmax(&x.reshape((1, 1, 4, 5))?, 0.5, 1, Some(&mask))?.reshape((4, 5))
        });
        let x = Tensor::randn(0f32, 1.0, (2, 2, 3, 3), &Device::Cpu).unwrap();
        let fused = masked_softmax(&x, 0.7, 0, None).unwrap();
        let comp = masked_softmax(&x.to_dtype(DType::F64).unwrap(), 0.7, 0, None).unwrap();
        let d: f64 = (fused.to_dtype(DType::F64).unwrap() - comp)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn cross_entropy_backward_matches_finite_differences() {
        let targets = vec![3i64, -100, 0, 8];
        check_grad((4, 9), |x| cross_entropy_sum(x, targets.clone()));
        let x = Tensor::randn(0f32, 1.0, (4, 9), &Device::Cpu).unwrap();
        let fused: f32 = cross_entropy_sum(&x, targets.clone())
            .unwrap()
            .to_scalar()
            .unwrap();
        let logp = candle_nn::ops::log_softmax(&x, D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want: f32 = -(logp[0][3] + logp[2][0] + logp[3][8]);
        assert!((fused - want).abs() < 1e-5, "{fused} vs {want}");
    }
}
