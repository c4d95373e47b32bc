//! Each fused kernel on a device against its CPU twin, for `companion env`
//! (and through it the device script): the same inputs, drawn on the host,
//! go through the public op on the CPU in fp32 and on the device in f32 and
//! bf16, and the outputs and input gradients are compared. On the CPU the
//! two sides are one implementation (a check of this comparison itself);
//! on a CUDA device it is the test of the `.cu` kernels.

use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Serialize;

use crate::model::autograd_ops::{cross_entropy_sum, gelu_tanh, layer_norm, masked_softmax};
use crate::optim::adamw::{adamw_consts, adamw_update, bias_corrections, update_tensors};
use crate::optim::AdamWParams;
use crate::rng::SeededRng;

/// One op in one dtype against the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct TwinCheck {
    pub op: &'static str,
    pub dtype: &'static str,
    /// max over the compared tensors of max|got − want| / max|want|.
    pub max_rel_diff: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// The op's error, when it did not run (a kernel that fails to load or launch).
    pub error: Option<String>,
}

/// The tolerance of a dtype: fp32 rounding, or bf16's 8-bit mantissa.
/// AdamW's is on the weights' change (about 1e-3 of weights near 1, so
/// fp32's rounding of the weights is 1e-4 of it).
fn tolerance(op: &str, dtype: DType) -> f64 {
    match (op, dtype) {
        (_, DType::BF16) => 3e-2,
        ("adamw", _) => 1e-3,
        _ => 1e-5,
    }
}

fn values(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..n).map(|_| rng.normal(std) as f32).collect()
}

/// max|a − b| / max|b| of two tensors, read as f32 on the host.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let scale = b
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    Ok(if worst.is_finite() {
        (worst / scale) as f64
    } else {
        f64::INFINITY
    })
}

/// `op` of `inputs` (host f32 values with shapes) on `device` in `dtype`:
/// its output and the gradients of Σ output·w for every input.
fn run(
    inputs: &[(Vec<f32>, Vec<usize>)],
    device: &Device,
    dtype: DType,
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|(v, shape)| {
            Var::from_tensor(&Tensor::from_slice(v, shape.as_slice(), device)?.to_dtype(dtype)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts)?;
    let w = Tensor::from_vec(values(y.elem_count(), 99, 1.0), y.shape(), device)?
        .to_dtype(y.dtype())?;
    let grads = (&y * &w)?.sum_all()?.backward()?;
    let mut out = vec![y];
    for v in &vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("an input has no gradient".into()))?;
        out.push(g.clone());
    }
    Ok(out)
}

/// Every fused op on `device` against the CPU, in f32, and in bf16 on a
/// CUDA device (the CPU's bf16 takes the composite path: not a twin). An op
/// that fails on the device is a failed check with its error, not an error.
pub fn check_twins(device: &Device) -> Result<Vec<TwinCheck>> {
    type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let key_mask = vec![vec![1u32, 1, 0, 1, 1, 1, 1, 1, 1], vec![1; 9]];
    let targets = vec![3i64, -100, 0, 66, 12, 5];
    let ops: Vec<(&'static str, Vec<Vec<usize>>, Op)> = vec![
        (
            "layer_norm",
            vec![vec![6, 40], vec![40], vec![40]],
            Box::new(|t| layer_norm(&t[0], &t[1], &t[2], 1e-5)),
        ),
        (
            "masked_softmax",
            vec![vec![2, 2, 5, 9]],
            Box::new(move |t| masked_softmax(&t[0], 0.3, 4, Some(&key_mask))),
        ),
        (
            "gelu_tanh",
            vec![vec![7, 33]],
            Box::new(|t| gelu_tanh(&t[0])),
        ),
        (
            "cross_entropy",
            vec![vec![6, 67]],
            Box::new(move |t| cross_entropy_sum(&t[0], targets.clone())),
        ),
    ];
    let dtypes: &[DType] = if device.is_cuda() {
        &[DType::F32, DType::BF16]
    } else {
        &[DType::F32]
    };
    let mut out = Vec::new();
    for (k, (name, shapes, op)) in ops.iter().enumerate() {
        let inputs: Vec<(Vec<f32>, Vec<usize>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    values(s.iter().product(), (k * 10 + i) as u64, 1.5),
                    s.clone(),
                )
            })
            .collect();
        let want = run(&inputs, &Device::Cpu, DType::F32, op.as_ref())?;
        for &dtype in dtypes {
            let worst = run(&inputs, device, dtype, op.as_ref()).and_then(|got| {
                got.iter()
                    .zip(&want)
                    .try_fold(0f64, |m, (g, w)| Ok(m.max(rel_diff(g, w)?)))
            });
            out.push(check(name, dtype, worst));
        }
    }
    out.push(check("adamw", DType::F32, adamw_against_host(device)));
    Ok(out)
}

/// One comparison's verdict; an op that failed to run has not passed.
fn check(op: &'static str, dtype: DType, max_rel_diff: Result<f64>) -> TwinCheck {
    let tolerance = tolerance(op, dtype);
    let (max_rel_diff, error) = match max_rel_diff {
        Ok(d) => (d, None),
        Err(e) => (f64::INFINITY, Some(e.to_string())),
    };
    TwinCheck {
        op,
        dtype: if dtype == DType::BF16 { "bf16" } else { "f32" },
        max_rel_diff,
        tolerance,
        passed: max_rel_diff <= tolerance,
        error,
    }
}

/// One AdamW step over flat buffers on `device` (with clipping and a decay
/// mask) against the host loop; the largest relative difference of the
/// weights' change and of the moments.
fn adamw_against_host(device: &Device) -> Result<f64> {
    let n = 1000;
    let a = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let (t, lr, gscale) = (3u64, 1e-3, 0.5f32);
    let (p, g) = (values(n, 1, 1.0), values(n, 2, 0.1));
    let m = values(n, 3, 0.01);
    let v: Vec<f32> = values(n, 4, 0.01).iter().map(|x| x * x).collect();
    let decay: Vec<f32> = (0..n).map(|i| (i % 5 != 0) as u8 as f32).collect();
    let dev = |x: &[f32]| Tensor::from_slice(x, n, device);
    let (mut md, mut vd) = (dev(&m)?, dev(&v)?);
    let pd = update_tensors(
        a,
        t,
        &mut md,
        &mut vd,
        &dev(&decay)?,
        &dev(&p)?,
        &dev(&g)?,
        lr,
        gscale as f64,
    )?;
    // The host loop, one run per decay setting.
    let (bc2, step) = bias_corrections(a, t, lr);
    let with = adamw_consts(a, lr, bc2, step);
    let (mut ph, mut mh, mut vh) = (p.clone(), m.clone(), v.clone());
    let gs: Vec<f32> = g.iter().map(|x| x * gscale).collect();
    for (i, &d) in decay.iter().enumerate() {
        let r = i..i + 1;
        let (pr, gr, mr) = (&mut ph[r.clone()], &gs[r.clone()], &mut mh[r.clone()]);
        adamw_update(pr, gr, mr, &mut vh[r], with(d == 1.0));
    }
    let host = |x: &[f32]| Tensor::from_slice(x, n, &Device::Cpu);
    let delta =
        |a: &Tensor, p0: &[f32]| -> Result<Tensor> { a.to_device(&Device::Cpu)? - host(p0)? };
    let dp = rel_diff(&delta(&pd, &p)?, &(host(&ph)? - host(&p)?)?)?;
    let dm = rel_diff(&md.to_device(&Device::Cpu)?, &host(&mh)?)?;
    let dv = rel_diff(&vd.to_device(&Device::Cpu)?, &host(&vh)?)?;
    Ok(dp.max(dm).max(dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_twin_check_runs_and_the_cpu_agrees_with_itself() {
        let checks = check_twins(&Device::Cpu).unwrap();
        let names: Vec<_> = checks.iter().map(|c| c.op).collect();
        assert_eq!(
            names,
            [
                "layer_norm",
                "masked_softmax",
                "gelu_tanh",
                "cross_entropy",
                "adamw"
            ]
        );
        for c in &checks {
            // The CPU is both sides of the ops; AdamW's tensor ops against the host loop.
            let bound = if c.op == "adamw" { c.tolerance } else { 0.0 };
            assert!(c.passed && c.max_rel_diff <= bound, "{c:?}");
        }
        let failed = check(
            "gelu_tanh",
            DType::F32,
            Err(candle_core::Error::Msg("no PTX".into())),
        );
        assert!(!failed.passed && failed.error.as_deref() == Some("no PTX"));
        // The comparison sees a wrong result: twice the weights' change.
        let a = Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        assert!((rel_diff(&(&a * 2.0).unwrap(), &a).unwrap() - 1.0).abs() < 1e-6);
    }
}
