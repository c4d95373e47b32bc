//! What ZeRO saves (4.3.3): the bytes each rank really holds, measured
//! ([`ModelStateBytes`]); model-state memory per GPU for each stage from the
//! ZeRO paper's formulas (mixed-precision Adam: 2 bytes of fp16 parameters,
//! 2 of fp16 gradients and K = 12 of fp32 master weights and Adam moments
//! per parameter); and DeepSpeed's `estimate_zero2/3_model_states_mem_needs`
//! for offload (checked against DeepSpeed's own output in tests/zero.rs).

use serde::Serialize;

/// Bytes of model state one rank really holds, measured from its buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ModelStateBytes {
    pub rank: usize,
    pub stage: u8,
    pub world_size: usize,
    /// fp32 weights kept between steps (the whole model, or a partition).
    pub params: usize,
    /// Gradient accumulation buffer.
    pub grads: usize,
    /// Adam's exp_avg and exp_avg_sq.
    pub optimizer_states: usize,
    /// How much of the above lives in host memory because of offload.
    pub offloaded_to_host: usize,
    /// Stage 3: the most gathered (full) weights alive at once.
    pub peak_gathered_params: usize,
    /// Tensor/pipeline parallelism: the most stage inputs and outputs kept
    /// at once between a micro-batch's forward and backward in the last
    /// step (measured; `None` on the ZeRO path, which does not count them).
    pub activations_held: Option<usize>,
}

impl ModelStateBytes {
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optimizer_states
    }
}

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

/// One row of DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_live`
/// tables: bytes per GPU and per CPU (node) for one choice of options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadEstimate {
    pub stage: u8,
    pub offload_optimizer: bool,
    pub offload_param: bool,
    /// ZeRO-3: parameters created already partitioned (`deepspeed.zero.Init`).
    pub zero_init: bool,
    pub gpu_bytes: u64,
    pub cpu_bytes: u64,
}

impl OffloadEstimate {
    /// DeepSpeed's "Options" column.
    pub fn options(&self) -> String {
        let dev = |on: bool| if on { "cpu " } else { "none" };
        if self.stage == 2 {
            format!("offload_optimizer={}", dev(self.offload_optimizer))
        } else {
            format!(
                "offload_param={}, offload_optimizer={}, zero_init={}",
                dev(self.offload_param),
                dev(self.offload_optimizer),
                u8::from(self.zero_init)
            )
        }
    }
}

/// DeepSpeed 0.19's `estimate_zero2_model_states_mem_needs` and
/// `estimate_zero3_model_states_mem_needs` (buffer factor 1.5), for every
/// option combination its `*_all_live` functions print, in their order.
pub fn deepspeed_estimates(
    params: u64,
    largest_layer: u64,
    gpus_per_node: usize,
    nodes: usize,
) -> Vec<OffloadEstimate> {
    let (p, l) = (params as f64, largest_layer as f64);
    let n_per = gpus_per_node.max(1) as f64;
    let nodes_f = nodes.max(1) as f64;
    let total = n_per * nodes_f;
    let buf = 1.5;
    let trunc = |x: f64| x as u64; // Python's int()
    let mut rows = Vec::new();
    for off in [true, false] {
        let (cpu, gpu) = if off {
            (p * (4.0 * total).max(16.0) * buf, 2.0 * p)
        } else {
            // 2 bytes of fp16 weights; 18 = 2 fp16 + 4 fp32 gradients,
            // 4 fp32 weights, 8 Adam moments, partitioned.
            (
                p * 4.0 * n_per * buf,
                2.0 * p + trunc(18.0 * p / total) as f64,
            )
        };
        rows.push(OffloadEstimate {
            stage: 2,
            offload_optimizer: off,
            offload_param: false,
            zero_init: false,
            gpu_bytes: trunc(gpu),
            cpu_bytes: trunc(cpu),
        });
    }
    let factor = 1.0 / nodes_f;
    let largest_mem = 4.0 * l;
    for (off, off_p) in [(true, true), (true, false), (false, false)] {
        for zero_init in [true, false] {
            let (cpu, gpu) = match (off, off_p) {
                (true, true) => (
                    if zero_init {
                        p * 18.0 * factor * buf
                    } else {
                        p * (4.0 * n_per).max(18.0 * factor) * buf
                    },
                    largest_mem,
                ),
                (true, false) => (
                    if zero_init {
                        p * 16.0 * factor * buf
                    } else {
                        p * (4.0 * n_per).max(16.0 * factor) * buf
                    },
                    largest_mem + trunc(2.0 * p / total) as f64,
                ),
                _ => (
                    if zero_init {
                        l * 4.0 * n_per * buf
                    } else {
                        p * 4.0 * n_per * buf
                    },
                    largest_mem + trunc(18.0 * p / total) as f64,
                ),
            };
            rows.push(OffloadEstimate {
                stage: 3,
                offload_optimizer: off,
                offload_param: off_p,
                zero_init,
                gpu_bytes: trunc(gpu),
                cpu_bytes: trunc(cpu),
            });
        }
    }
    rows
}

/// DeepSpeed's largest layer: the most parameters held directly by one
/// module — for GPT-2 the token embedding `wte` (which the tied head shares),
/// else an attention or MLP projection (weight and bias).
pub fn largest_layer(cfg: &crate::config::GPT2Config) -> u64 {
    let c = cfg.n_embd as u64;
    let i = cfg.inner_dim() as u64;
    [
        cfg.vocab_size as u64 * c,
        cfg.n_positions as u64 * c,
        c * 3 * c + 3 * c,
        c * i + i,
        i * c + c,
    ]
    .into_iter()
    .max()
    .expect("non-empty")
}

/// What `estimate_zero2_model_states_mem_needs_all_live` and
/// `estimate_zero3_model_states_mem_needs_all_live` print (sizes in GiB).
pub fn estimate_text(params: u64, largest: u64, gpus_per_node: usize, nodes: usize) -> String {
    let rows = deepspeed_estimates(params, largest, gpus_per_node, nodes);
    let head = |with_largest: bool| {
        let nodes_s = if nodes > 1 { "nodes" } else { "node" };
        let gpus_s = if gpus_per_node > 1 { "GPUs" } else { "GPU" };
        let mut h = format!(
            "Estimated memory needed for params, optim states and gradients for a:\n\
             HW: Setup with {nodes} {nodes_s}, {gpus_per_node} {gpus_s} per node.\n\
             SW: Model with {}M total params",
            params / 1_000_000
        );
        if with_largest {
            h += &format!(", {}M largest layer params", largest / 1_000_000);
        }
        h + ".\n  per CPU  |  per GPU |   Options\n"
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut out = String::new();
    for stage in [2, 3] {
        out += &head(stage == 3);
        for r in rows.iter().filter(|r| r.stage == stage) {
            out += &format!(
                " {:7.2}GB | {:6.2}GB | {}\n",
                gib(r.cpu_bytes),
                gib(r.gpu_bytes),
                r.options()
            );
        }
    }
    out
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
        assert_eq!(largest_layer(&cfg), 50257 * 768);
    }
}
