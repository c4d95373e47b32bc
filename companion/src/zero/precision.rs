//! fp16 loss scaling as DeepSpeed's `DynamicLossScaler` does it: the loss is
//! multiplied by a scale before the backward pass so small gradients survive
//! fp16; a step whose gradients overflow is skipped and the scale lowered
//! (after `hysteresis` overflows), and it doubles again after
//! `loss_scale_window` clean steps. `loss_scale > 0` fixes it instead.

use super::ds_config::Fp16Config;

#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    pub cur_scale: f64,
    pub dynamic: bool,
    pub scale_window: usize,
    pub min_scale: f64,
    pub delayed_shift: usize,
    pub consecutive_hysteresis: bool,
    cur_hysteresis: usize,
    cur_iter: i64,
    last_overflow_iter: i64,
}

impl LossScaler {
    /// From the ds_config `fp16` block.
    pub fn from_config(c: &Fp16Config) -> Self {
        let dynamic = c.loss_scale == 0.0;
        LossScaler {
            cur_scale: if dynamic {
                2f64.powi(c.initial_scale_power as i32)
            } else {
                c.loss_scale
            },
            dynamic,
            scale_window: c.loss_scale_window.max(1),
            min_scale: c.min_loss_scale,
            delayed_shift: c.hysteresis.max(1),
            consecutive_hysteresis: c.consecutive_hysteresis,
            cur_hysteresis: c.hysteresis.max(1),
            cur_iter: 0,
            last_overflow_iter: -1,
        }
    }

    /// After a step: `overflow` says whether its gradients held inf/NaN (the
    /// step was skipped). Returns DeepSpeed's log line for an overflow.
    pub fn update(&mut self, overflow: bool) -> Option<String> {
        let mut msg = None;
        if !self.dynamic {
            if overflow {
                msg = Some(format!(
                    "[deepspeed] OVERFLOW! Rank 0 Skipping step. Static loss scale: {}",
                    self.cur_scale as i64
                ));
            }
            self.cur_iter += 1;
            return msg;
        }
        if overflow {
            if self.delayed_shift == 1 || self.cur_hysteresis == 1 {
                let next = (self.cur_scale / 2.0).max(self.min_scale);
                msg = Some(format!(
                    "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: {}, reducing to {}",
                    self.cur_scale as i64, next as i64
                ));
                self.cur_scale = next;
            } else {
                msg = Some(format!(
                    "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: {}, but hysteresis is {}. Reducing hysteresis to {}",
                    self.cur_scale as i64,
                    self.cur_hysteresis,
                    self.cur_hysteresis - 1
                ));
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter;
        } else {
            if self.consecutive_hysteresis {
                self.cur_hysteresis = self.delayed_shift;
            }
            let stable = self.cur_iter - self.last_overflow_iter - 1;
            if stable > 0 && stable % self.scale_window as i64 == 0 {
                if !self.consecutive_hysteresis {
                    self.cur_hysteresis = self.delayed_shift;
                }
                self.cur_scale *= 2.0;
            }
        }
        self.cur_iter += 1;
        msg
    }
}
