//! ZeRO (Rajbhandari et al. 2020) as DeepSpeed runs it, stage by stage.
//!
//! Where things live: the **settings** arrive typed ([`ZeroStrategy`],
//! [`Precision`], from `train::TrainPlan`); **gradients** arrive from the
//! model's gradient path through the engine's `ParamStore` (`store.rs`);
//! the **state** (flat fp32 buffers, partitions, moments, masters, the loss
//! scaler) is the [`ZeroEngine`]'s, which reduces, clips and steps it.
//!
//! All parameters are laid end to end in one flat fp32 buffer (in
//! `named_parameters` order), padded to a multiple of the world size and cut
//! into one contiguous partition per rank — DeepSpeed's flat buffers. Then:
//!
//! | stage | parameters | gradients | Adam moments |
//! |---|---|---|---|
//! | 0 | full on every rank | full, all-reduced | full |
//! | 1 | full | full, all-reduced | own partition |
//! | 2 | full | own partition, reduce-scattered every micro-batch | own partition |
//! | 3 | own partition, gathered one block at a time | own partition | own partition |
//!
//! Each rank updates only its partition; stages 1–2 all-gather the updated
//! weights afterwards. Stage 3 never materialises the whole model: the
//! forward pass gathers each block's weights, runs it and drops them,
//! keeping only the block's input; the backward pass gathers the block
//! again, recomputes it from that input (with the same dropout masks), takes
//! its gradients and reduce-scatters them. `offload_optimizer: cpu` keeps the
//! Adam moments in host memory and updates there (multi-threaded);
//! otherwise they are tensors on the rank's device, updated with tensor ops.

pub mod comm;
pub mod ds_config;
pub mod ds_schema;
mod ds_values;
pub mod engine;
mod error;
mod hf_auto;
pub mod layout;
pub mod memory;
pub mod precision;
pub mod state;
mod store;
pub mod strategy;

pub use ds_config::{DeepSpeedConfig, DsConfigError, HfTrainingValues};
pub use engine::ZeroEngine;
pub use error::{Result, ZeroError};
pub use layout::FlatLayout;
pub use memory::ModelStateBytes;
pub use state::NamedMoments;
pub use strategy::{Precision, ZeroStrategy};

#[cfg(test)]
mod tests {
    use super::comm::SingleRank;
    use super::engine::ZeroEngine;
    use super::layout::*;
    use crate::model::{GPT2LMHeadModel, GradientPath, MicroBatch};
    use crate::optim::adamw::*;
    use candle_core::{DType, Device, Tensor};
    use std::sync::Arc;

    #[test]
    fn partitions_cover_the_buffer_once() {
        let cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        let l = FlatLayout::new(&cfg, 3);
        assert_eq!(l.numel, 124_439_808);
        assert_eq!(l.part, 124_439_808usize.div_ceil(3));
        assert_eq!(l.partition(2).end, 3 * l.part);
        let covered: usize = (0..3)
            .map(|r| intersect(&l.partition(r), &(0..l.numel)).len())
            .sum();
        assert_eq!(covered, l.numel);
        let mask = decay_mask(&l, &l.partition(0));
        assert_eq!(mask[0], 1.0); // wte decays
    }

    /// The tensor-op AdamW (moments on a GPU) and the host loop (offload,
    /// and CPU ranks) update identically: the CPU runs the first only here.
    #[test]
    fn device_and_host_moments_give_the_same_step() {
        let mut cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.n_positions,
        ) = (1, 16, 2, 50, 8);
        let adam = AdamWParams {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let ids = Tensor::new(vec![vec![1u32, 7, 3, 9, 4]], &Device::Cpu).unwrap();
        let labels = ids.to_dtype(DType::I64).unwrap();
        let run = |on_device: bool| {
            let model = GPT2LMHeadModel::new(&cfg, 1, &Device::Cpu).unwrap();
            let mut e = ZeroEngine::new(
                &model,
                super::ZeroStrategy::Stage1 {
                    offload_optimizer: false,
                },
                adam,
                Arc::new(SingleRank),
            )
            .unwrap();
            assert!(
                matches!(e.moments, Moments::Host { .. }),
                "CPU ranks use the host loop"
            );
            if on_device {
                e.moments = device_moments(&e.layout, &e.owned, &Device::Cpu).unwrap();
            }
            let batch = MicroBatch {
                input_ids: &ids,
                labels: &labels,
                attention_mask: None,
                n_items: 4.0,
                loss_scale: 1.0,
            };
            for _ in 0..2 {
                GradientPath::Autograd
                    .forward_backward(&model, &batch, &mut e)
                    .unwrap();
                e.step(&model, 1e-2, 1.0).unwrap();
            }
            flatten_params(&model, &e.layout).unwrap()
        };
        let (host, device) = (run(false), run(true));
        let d = host
            .iter()
            .zip(&device)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Updates are ~lr = 1e-2; the two differ only in rounding order.
        assert!(d < 1e-5, "max difference {d}");
    }
}
