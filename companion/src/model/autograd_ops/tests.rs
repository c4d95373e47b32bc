//! Each op's backward against finite differences and its composite.

use super::*;
use candle_core::{DType, Device, Result, Tensor, Var, D};

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
