//! The model against itself and against the fused CPU kernels: gradients,
//! the KV cache, input errors, and the fused training step equal to
//! candle's autograd on loss and every gradient.

use std::ops::Range;

use candle_core::{DType, Device, Tensor, Var};

use super::*;
use crate::cpu::{Batch, Workspace};

fn tiny() -> GPT2Config {
    GPT2Config {
        n_embd: 16,
        n_head: 2,
        n_layer: 2,
        n_positions: 32,
        vocab_size: 50,
        ..Default::default()
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let mut m = GPT2LMHeadModel::new(&tiny(), 0, &Device::Cpu).unwrap();
    m.set_training(true);
    let ids = Tensor::new(&[[1u32, 5, 7, 9, 2], [3, 4, 5, 6, 7]], &Device::Cpu).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    let out = m.forward_with_labels(&ids, None, &labels).unwrap();
    let grads = out.loss.unwrap().backward().unwrap();
    for (name, var) in m.named_parameters() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn kv_cache_matches_full_forward() {
    // The fused kernels' cache, and candle's.
    for autograd_path in [false, true] {
        let mut cache = KvCache::new(2);
        cache.autograd_path = autograd_path;
        cached_equals_full(cache);
    }
}

fn cached_equals_full(mut cache: KvCache) {
    let m = GPT2LMHeadModel::new(&tiny(), 1, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 7, 9, 2, 8]], &Device::Cpu).unwrap();
    let full = m.forward(&ids, None, None).unwrap();
    let a = m
        .forward(&ids.narrow(1, 0, 4).unwrap(), None, Some(&mut cache))
        .unwrap();
    let b = m
        .forward(&ids.narrow(1, 4, 2).unwrap(), None, Some(&mut cache))
        .unwrap();
    let inc = Tensor::cat(&[a, b], 1).unwrap();
    let diff: f32 = (full - inc)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn too_long_is_an_error() {
    let m = GPT2LMHeadModel::new(&tiny(), 0, &Device::Cpu).unwrap();
    let ids = Tensor::zeros((1, 33), DType::U32, &Device::Cpu).unwrap();
    let e = m.forward(&ids, None, None).err().unwrap().to_string();
    assert!(e.contains("n_positions"), "{e}");
}

#[test]
fn out_of_vocabulary_ids_are_an_error() {
    let cfg = GPT2Config {
        n_layer: 1,
        n_embd: 8,
        n_head: 2,
        vocab_size: 10,
        n_positions: 8,
        ..Default::default()
    };
    let m = GPT2LMHeadModel::new(&cfg, 0, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 10]], &Device::Cpu).unwrap();
    let e = m.forward(&ids, None, None).unwrap_err().to_string();
    assert!(
        e.contains("token id 10 is outside the vocabulary (vocab_size = 10)"),
        "{e}"
    );
    let ok = Tensor::new(&[[1u32, 9]], &Device::Cpu).unwrap();
    assert!(m.forward(&ok, None, None).is_ok());
}

// ------------------------------------------------ the fused training step

pub(super) fn config(inverse_layer: bool) -> GPT2Config {
    let mut c = GPT2Config::preset("gpt2").unwrap();
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_inner = Some(48);
    c.vocab_size = 97;
    c.n_positions = 16;
    c.scale_attn_by_inverse_layer_idx = inverse_layer;
    c
}

/// A left-padded batch whose pads are labelled -100, one row of which
/// starts with a pad and one row that is not padded.
pub(super) type Rows<T> = Vec<Vec<T>>;

pub(super) fn batch() -> (Rows<u32>, Rows<i64>, Rows<u32>) {
    let ids: Vec<Vec<u32>> = vec![
        vec![0, 0, 0, 5, 17, 33, 2, 90, 11, 4, 8],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 96],
        vec![0, 44, 45, 46, 12, 13, 14, 15, 16, 60, 61],
    ];
    let mask: Vec<Vec<u32>> = vec![
        vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        vec![1; 11],
        vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ];
    let labels = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .map(|(&i, &k)| if k == 1 { i as i64 } else { IGNORE_INDEX })
                .collect()
        })
        .collect();
    (ids, labels, mask)
}

/// The fused step against candle's autograd through the model, with the
/// same dropout masks: the same loss and every gradient.
fn compare(training: bool, inverse_layer: bool, padded: bool) {
    let cfg = config(inverse_layer);
    let mut model = GPT2LMHeadModel::new(&cfg, 3, &Device::Cpu).unwrap();
    model.set_training(training);
    let (ids, labels, mask) = batch();
    let mask = padded.then_some(&mask[..]);
    let n_items = 25.0;
    let scale = 0.75f32;

    model.seed_dropout(11);
    let idt = Tensor::new(ids.clone(), &Device::Cpu).unwrap();
    let lt = Tensor::new(labels.clone(), &Device::Cpu).unwrap();
    let logits = model.forward(&idt, mask, None).unwrap();
    let (sum, _) = causal_lm_loss_sum(&logits, &lt).unwrap();
    let want_loss = sum.to_scalar::<f32>().unwrap() as f64;
    let grads = (sum * (scale as f64 / n_items))
        .unwrap()
        .backward()
        .unwrap();

    model.seed_dropout(11);
    let params = model.named_parameters();
    let mut ranges = vec![];
    let mut at = 0;
    for (_, v) in &params {
        ranges.push(at..at + v.elem_count());
        at += v.elem_count();
    }
    let mut flat = vec![0f32; at];
    let mut ws = Workspace::new();
    let b = Batch {
        ids: &ids,
        labels: &labels,
        mask,
    };
    let loss = step(
        &mut ws,
        &model,
        &b,
        &mut flat,
        &ranges,
        scale / n_items as f32,
    )
    .unwrap();
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss,
        "loss {loss} vs {want_loss}"
    );
    for ((name, var), r) in params.iter().zip(&ranges) {
        let want: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = &flat[r.clone()];
        let norm = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(norm > 0.0, "{name}: no gradient");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * norm,
                "{name}: fused {g} vs autograd {w} (max |grad| {norm})"
            );
        }
    }
    // A second step reuses the buffers and accumulates.
    model.seed_dropout(11);
    let again = step(
        &mut ws,
        &model,
        &b,
        &mut flat,
        &ranges,
        scale / n_items as f32,
    )
    .unwrap();
    assert_eq!(again, loss);
    let (name, var) = &params[0];
    let want: Vec<f32> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (g, w) in flat[ranges[0].clone()].iter().zip(&want) {
        assert!(
            (g - 2.0 * w).abs() <= 2e-4 * w.abs().max(1e-3),
            "{name}: not accumulated"
        );
    }
}

#[test]
fn fused_step_matches_autograd_in_training_with_dropout_and_padding() {
    compare(true, false, true);
}

#[test]
fn fused_step_matches_autograd_without_dropout_and_with_inverse_layer_scaling() {
    compare(false, true, true);
    compare(false, false, false);
}

#[test]
fn bad_batches_are_errors_naming_the_problem() {
    let model = GPT2LMHeadModel::new(&config(false), 0, &Device::Cpu).unwrap();
    let n = model.num_parameters();
    let ranges: Vec<Range<usize>> = {
        let mut at = 0;
        model
            .named_parameters()
            .iter()
            .map(|(_, v)| {
                at += v.elem_count();
                at - v.elem_count()..at
            })
            .collect()
    };
    let mut flat = vec![0f32; n];
    let mut ws = Workspace::new();
    let mut run = |ids: Vec<Vec<u32>>, labels: Vec<Vec<i64>>| {
        let b = Batch {
            ids: &ids,
            labels: &labels,
            mask: None,
        };
        step(&mut ws, &model, &b, &mut flat, &ranges, 1.0)
            .unwrap_err()
            .to_string()
    };
    assert!(run(vec![vec![97, 1]], vec![vec![1, 1]]).contains("outside the vocabulary"));
    assert!(run(vec![vec![1; 17]], vec![vec![1; 17]]).contains("n_positions"));
    assert!(run(vec![vec![1, 2]], vec![vec![1, 500]]).contains("label 500"));
    assert!(run(vec![vec![1, 2]], vec![vec![1]]).contains("labels must have shape"));
}

/// One fused step of `model` as the ZeRO engine runs it.
fn step(
    ws: &mut Workspace,
    model: &GPT2LMHeadModel,
    b: &Batch,
    flat: &mut [f32],
    ranges: &[Range<usize>],
    scale: f32,
) -> Result<f64> {
    model.with_fp32_weights(|w| {
        let dropout = model
            .training_dropout()
            .map(|d| d as &dyn crate::cpu::DropoutMasks);
        Ok(ws.forward_backward(&model.config, w, b, dropout, flat, ranges, scale)?)
    })
}

/// The head over a vocabulary padded for the GEMM (as on CUDA) gives the
/// unpadded logits, loss and gradients, exactly: the padding is cut off.
#[test]
fn the_padded_head_equals_the_unpadded_one() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap()).unwrap();
    let head = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 8), &dev).unwrap()).unwrap();
    let run = |multiple: usize| {
        let logits = super::gpt2::head_logits(x.as_tensor(), head.as_tensor(), multiple).unwrap();
        assert_eq!(logits.dims(), [2, 3, 37]);
        let labels = Tensor::new(&[[1i64, 5, 36], [0, -100, 7]], &dev).unwrap();
        let (loss, n) = causal_lm_loss_sum(&logits, &labels).unwrap();
        assert_eq!(n, 3);
        let grads = loss.backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (gx, gh) = (
            grads.get(x.as_tensor()).unwrap(),
            grads.get(head.as_tensor()).unwrap(),
        );
        (
            flat(&logits),
            loss.to_scalar::<f32>().unwrap(),
            flat(gx),
            flat(gh),
        )
    };
    let (plain, padded) = (run(1), run(64));
    assert!(
        (plain.1 - padded.1).abs() <= 1e-6 * plain.1.abs(),
        "loss {} vs {}",
        plain.1,
        padded.1
    );
    for (what, a, b) in [
        ("logits", &plain.0, &padded.0),
        ("x's gradient", &plain.2, &padded.2),
        ("head's gradient", &plain.3, &padded.3),
    ] {
        assert_eq!(a.len(), b.len(), "{what}");
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-6, "{what}: off by {worst}");
    }
}
