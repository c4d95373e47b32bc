//! The three gradient paths on the same micro-batch: the same loss and
//! every parameter's gradient (fp32), with dropout and padding, tied and
//! untied heads.

use candle_core::{DType, Device, Tensor};

use super::{GradientPath, LocalStore, MicroBatch};
use crate::config::GPT2Config;
use crate::model::GPT2LMHeadModel;

fn config(tied: bool) -> GPT2Config {
    let mut c = crate::model::tests::config(true);
    c.tie_word_embeddings = tied;
    c
}

/// Loss and gradients of one path on the model tests' left-padded batch
/// (pads labelled -100), dropout drawn from the same seed.
fn run(path: &mut GradientPath, model: &GPT2LMHeadModel) -> (f64, LocalStore) {
    let (ids, labels, mask) = crate::model::tests::batch();
    let (ids, labels) = (
        Tensor::new(ids, &Device::Cpu).unwrap(),
        Tensor::new(labels, &Device::Cpu).unwrap(),
    );
    let batch = MicroBatch {
        input_ids: &ids,
        labels: &labels,
        attention_mask: Some(&mask),
        n_items: 29.0,
        loss_scale: 0.5,
    };
    let mut store = LocalStore::new(model);
    model.seed_dropout(7);
    let loss = path.forward_backward(model, &batch, &mut store).unwrap();
    (loss, store)
}

#[test]
fn the_three_gradient_paths_give_the_same_gradients() {
    for tied in [true, false] {
        let cfg = config(tied);
        let mut model = GPT2LMHeadModel::new(&cfg, 5, &Device::Cpu).unwrap();
        model.set_training(true);
        let fused = GradientPath::choose(&cfg, &Device::Cpu, DType::F32, false);
        assert_eq!(fused.name(), "fused", "fp32 on the CPU runs the kernels");
        let (want_loss, want) = run(&mut GradientPath::Autograd, &model);
        for mut path in [fused, GradientPath::Blockwise] {
            let (loss, got) = run(&mut path, &model);
            let name = path.name();
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss,
                "{name}: loss {loss} vs autograd {want_loss}"
            );
            for (i, spec) in model.params.specs.iter().enumerate() {
                let (a, b) = (got.gradient(i), want.gradient(i));
                let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                assert!(norm > 0.0, "{}: no gradient", spec.name);
                let rel = (diff / norm).sqrt();
                assert!(
                    rel <= 1e-5,
                    "{name}, {}: relative difference {rel:e}",
                    spec.name
                );
            }
        }
    }
}

/// Under candle's autograd a half-precision model runs; the kernels do not.
#[test]
fn the_path_is_chosen_from_device_dtype_and_recomputation() {
    let cfg = config(true);
    let cpu = Device::Cpu;
    assert_eq!(
        GradientPath::choose(&cfg, &cpu, DType::F32, true).name(),
        "blockwise"
    );
    assert_eq!(
        GradientPath::choose(&cfg, &cpu, DType::BF16, false).name(),
        "autograd"
    );
    let mut relu = cfg.clone();
    relu.activation_function = "relu".into();
    assert_eq!(
        GradientPath::choose(&relu, &cpu, DType::F32, false).name(),
        "autograd"
    );
}
