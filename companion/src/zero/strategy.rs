//! A run's ZeRO strategy and precision as typed values (what the engine is
//! built from): the stage with its offload settings, and the dtype with
//! fp16's loss scaler.

use candle_core::DType;

use super::ds_config::{DeepSpeedConfig, Fp16Config, OffloadDevice};

/// Where model states live: plain AdamW on one rank, or a ZeRO stage with
/// its offload settings (DeepSpeed's `zero_optimization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStrategy {
    /// No DeepSpeed: one rank, plain AdamW.
    Plain,
    Stage0,
    Stage1 {
        offload_optimizer: bool,
    },
    Stage2 {
        offload_optimizer: bool,
    },
    Stage3 {
        offload_optimizer: bool,
        offload_param: bool,
    },
}

impl ZeroStrategy {
    pub fn stage(&self) -> u8 {
        match self {
            ZeroStrategy::Plain | ZeroStrategy::Stage0 => 0,
            ZeroStrategy::Stage1 { .. } => 1,
            ZeroStrategy::Stage2 { .. } => 2,
            ZeroStrategy::Stage3 { .. } => 3,
        }
    }

    pub fn offload_optimizer(&self) -> bool {
        match *self {
            ZeroStrategy::Stage1 { offload_optimizer }
            | ZeroStrategy::Stage2 { offload_optimizer }
            | ZeroStrategy::Stage3 {
                offload_optimizer, ..
            } => offload_optimizer,
            ZeroStrategy::Plain | ZeroStrategy::Stage0 => false,
        }
    }

    pub fn offload_param(&self) -> bool {
        matches!(
            self,
            ZeroStrategy::Stage3 {
                offload_param: true,
                ..
            }
        )
    }

    /// Whether DeepSpeed runs this (its checkpoint layout, its log line).
    pub fn is_deepspeed(&self) -> bool {
        *self != ZeroStrategy::Plain
    }

    /// The `zero_optimization` block's stage and offload devices.
    pub fn from_ds_config(d: &DeepSpeedConfig) -> Self {
        let offload_optimizer = d.zero.offload_optimizer == OffloadDevice::Cpu;
        match d.zero.stage {
            0 => ZeroStrategy::Stage0,
            1 => ZeroStrategy::Stage1 { offload_optimizer },
            2 => ZeroStrategy::Stage2 { offload_optimizer },
            _ => ZeroStrategy::Stage3 {
                offload_optimizer,
                offload_param: d.zero.offload_param == OffloadDevice::Cpu,
            },
        }
    }
}

/// The dtype forward and backward run in; fp32 master weights are kept
/// under both half precisions, fp16 with a dynamic loss scaler.
#[derive(Debug, Clone, PartialEq)]
pub enum Precision {
    F32,
    Bf16,
    Fp16 { scaler: Fp16Config },
}

impl Precision {
    pub fn dtype(&self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 { .. } => DType::F16,
        }
    }
}
