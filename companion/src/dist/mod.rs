//! 4.3.3: what ZeRO saves. Model-state memory per GPU for each ZeRO stage,
//! from the ZeRO paper's formulas (mixed-precision Adam: 2 bytes of fp16
//! parameters, 2 of fp16 gradients and K = 12 of fp32 master weights and
//! Adam moments per parameter), and DeepSpeed's
//! `estimate_zero2/3_model_states_mem_needs` for offload.
//!
//! The training side: [`config`] reads `ds_config.json`, [`comm`] moves
//! tensors between ranks, [`zero`] partitions model states by stage.

pub mod comm;
pub mod config;
pub mod zero;

use serde::Serialize;

/// Bytes of optimizer state per parameter for mixed-precision Adam.
pub const ADAM_K: f64 = 12.0;

/// Model-state bytes per GPU for `params` parameters on `gpus` GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ZeroMemory {
    pub stage: u8,
    pub bytes_per_gpu: f64,
}

/// The paper's formulas: baseline (2+2+K)Ψ; stage 1: 2Ψ + 2Ψ + KΨ/N;
/// stage 2: 2Ψ + (2+K)Ψ/N; stage 3: (2+2+K)Ψ/N.
pub fn zero_paper(params: f64, gpus: usize) -> Vec<ZeroMemory> {
    let n = gpus.max(1) as f64;
    let k = ADAM_K;
    [
        (0, (2.0 + 2.0 + k) * params),
        (1, 2.0 * params + 2.0 * params + k * params / n),
        (2, 2.0 * params + (2.0 + k) * params / n),
        (3, (2.0 + 2.0 + k) * params / n),
    ]
    .into_iter()
    .map(|(stage, bytes_per_gpu)| ZeroMemory {
        stage,
        bytes_per_gpu,
    })
    .collect()
}

/// One row of DeepSpeed's `estimate_zero*_model_states_mem_needs_all_live`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadEstimate {
    pub stage: u8,
    pub offload: &'static str,
    pub gpu_bytes: f64,
    pub cpu_bytes: f64,
}

/// DeepSpeed's estimators (buffer factor 1.5, ZeRO-3 with `zero_init`):
/// `params` total, `largest_layer` the largest layer's parameters,
/// `gpus_per_node` × `nodes` GPUs.
pub fn deepspeed_estimates(
    params: f64,
    largest_layer: f64,
    gpus_per_node: usize,
    nodes: usize,
) -> Vec<OffloadEstimate> {
    let (p, l) = (params, largest_layer);
    let n_per = gpus_per_node.max(1) as f64;
    let nodes_f = nodes.max(1) as f64;
    let total = n_per * nodes_f;
    let f = 1.5;
    vec![
        OffloadEstimate {
            stage: 2,
            offload: "optimizer → CPU",
            gpu_bytes: 2.0 * p,
            cpu_bytes: p * (4.0 * total).max(16.0) * f,
        },
        OffloadEstimate {
            stage: 2,
            offload: "none",
            gpu_bytes: 2.0 * p + 16.0 * p / total,
            cpu_bytes: p * 4.0 * n_per * f,
        },
        OffloadEstimate {
            stage: 3,
            offload: "params + optimizer → CPU",
            gpu_bytes: 4.0 * l,
            cpu_bytes: 18.0 * p * f / nodes_f,
        },
        OffloadEstimate {
            stage: 3,
            offload: "optimizer → CPU",
            gpu_bytes: 4.0 * l + 2.0 * p / total,
            cpu_bytes: 16.0 * p * f / nodes_f,
        },
        OffloadEstimate {
            stage: 3,
            offload: "none",
            gpu_bytes: 4.0 * l + 18.0 * p / total,
            cpu_bytes: 4.0 * l * n_per * f,
        },
    ]
}

/// The largest layer of a GPT-2 config: the token embedding (`wte`).
pub fn largest_layer(cfg: &crate::config::GPT2Config) -> f64 {
    let c = cfg.n_embd as f64;
    (cfg.vocab_size as f64 * c)
        .max(c * 3.0 * c)
        .max(c * cfg.inner_dim() as f64)
}

/// A table of the paper's per-stage memory for several GPU counts, in GB.
pub fn paper_table(params: f64, gpu_counts: &[usize]) -> crate::display::Table {
    let mut rows = vec![vec![
        "GPUs".to_string(),
        "baseline (DDP)".into(),
        "ZeRO-1".into(),
        "ZeRO-2".into(),
        "ZeRO-3".into(),
    ]];
    for &n in gpu_counts {
        let mut r = vec![n.to_string()];
        r.extend(
            zero_paper(params, n)
                .iter()
                .map(|m| format!("{:.2} GB", m.bytes_per_gpu / 1e9)),
        );
        rows.push(r);
    }
    crate::display::Table(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_papers_example() {
        // ZeRO paper, Figure 1: Ψ = 7.5B, N = 64, K = 12.
        let m = zero_paper(7.5e9, 64);
        let gb: Vec<f64> = m
            .iter()
            .map(|m| (m.bytes_per_gpu / 1e9 * 100.0).round() / 100.0)
            .collect();
        assert_eq!(gb, vec![120.0, 31.41, 16.64, 1.88]);
    }

    #[test]
    fn gpt2_largest_layer_is_the_embedding() {
        let cfg = crate::config::GPT2Config::preset("gpt2").unwrap();
        assert_eq!(largest_layer(&cfg), 50257.0 * 768.0);
        let e = deepspeed_estimates(124_439_808.0, largest_layer(&cfg), 8, 1);
        assert_eq!(e.len(), 5);
        assert!((e[1].gpu_bytes - (2.0 + 16.0 / 8.0) * 124_439_808.0).abs() < 1.0);
    }
}
