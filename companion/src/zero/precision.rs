//! fp16 loss scaling as DeepSpeed's `DynamicLossScaler` does it: the loss is
//! multiplied by a scale before the backward pass so small gradients survive
//! fp16; a step whose gradients overflow is skipped and the scale lowered
//! (after `hysteresis` overflows), and it doubles again after
//! `loss_scale_window` clean steps. `loss_scale > 0` fixes it instead.

use super::ds_config::Fp16Config;

use crate::torch_file::PyValue;

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
    /// A static scale of 1: what DeepSpeed records when nothing is scaled.
    pub fn unit() -> Self {
        LossScaler {
            cur_scale: 1.0,
            dynamic: false,
            scale_window: 1,
            min_scale: 1.0,
            delayed_shift: 1,
            consecutive_hysteresis: false,
            cur_hysteresis: 1,
            cur_iter: 0,
            last_overflow_iter: -1,
        }
    }

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

    /// DeepSpeed's own scaler object (`LossScaler` or `DynamicLossScaler`,
    /// attribute for attribute), as its `*_optim_states.pt` pickles it.
    pub fn to_py(&self) -> PyValue {
        let s = PyValue::str;
        let mut state = vec![
            (s("cur_scale"), PyValue::Float(self.cur_scale)),
            (s("dynamic"), PyValue::Bool(self.dynamic)),
        ];
        if self.dynamic {
            state.extend([
                (s("cur_iter"), PyValue::Int(self.cur_iter)),
                (
                    s("last_overflow_iter"),
                    PyValue::Int(self.last_overflow_iter),
                ),
                (s("scale_factor"), PyValue::Float(2.0)),
                (s("scale_window"), PyValue::Int(self.scale_window as i64)),
                (s("min_scale"), PyValue::Float(self.min_scale)),
                (s("delayed_shift"), PyValue::Int(self.delayed_shift as i64)),
                (
                    s("cur_hysteresis"),
                    PyValue::Int(self.cur_hysteresis as i64),
                ),
                (
                    s("consecutive_hysteresis"),
                    PyValue::Bool(self.consecutive_hysteresis),
                ),
                (s("raise_error_at_min_scale"), PyValue::Bool(true)),
                (
                    s("dtype"),
                    PyValue::Global {
                        module: "torch".into(),
                        name: "float16".into(),
                    },
                ),
            ]);
        }
        PyValue::Object {
            module: "deepspeed.runtime.fp16.loss_scaler".into(),
            name: if self.dynamic {
                "DynamicLossScaler"
            } else {
                "LossScaler"
            }
            .into(),
            state: Box::new(PyValue::Dict(state)),
        }
    }

    /// Take the position of a dynamic scaler a checkpoint saved
    /// ([`Self::to_py`]'s attributes; the configuration stays this run's).
    /// A static scaler's saved scale (every run without fp16 records 1) is
    /// not taken: this run's configuration says its scale.
    pub fn restore(&mut self, saved: &PyValue) -> Result<(), String> {
        let dynamic = saved.get("dynamic").and_then(PyValue::as_int) == Some(1);
        if !self.dynamic || !dynamic {
            return Ok(());
        }
        let scale = saved.get("cur_scale").and_then(PyValue::as_float);
        match scale {
            Some(x) if x.is_finite() && x > 0.0 => self.cur_scale = x,
            other => {
                return Err(format!(
                    "loss_scaler.cur_scale is {other:?}: expected a positive finite number"
                ))
            }
        }
        if let Some(x) = saved.get("cur_iter").and_then(PyValue::as_int) {
            self.cur_iter = x;
        }
        if let Some(x) = saved.get("last_overflow_iter").and_then(PyValue::as_int) {
            self.last_overflow_iter = x;
        }
        if let Some(x) = saved.get("cur_hysteresis").and_then(PyValue::as_int) {
            self.cur_hysteresis = x.clamp(1, self.delayed_shift as i64) as usize;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic() -> LossScaler {
        LossScaler::from_config(&Fp16Config {
            enabled: true,
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        })
    }

    #[test]
    fn a_saved_scaler_restores_its_position_and_nothing_else() {
        let mut saved = dynamic();
        saved.update(true); // hysteresis 2 → 1, scale kept
        saved.update(true); // halved
        let mut s = dynamic();
        s.restore(&saved.to_py()).unwrap();
        assert_eq!(s, saved);
        // A static scale of 1 (every run without fp16 saves one) is not taken.
        let mut s = dynamic();
        s.restore(&LossScaler::unit().to_py()).unwrap();
        assert_eq!(s, dynamic());
        // A scale that could only poison the run is refused.
        let mut bad = saved.clone();
        bad.cur_scale = 0.0;
        let e = dynamic().restore(&bad.to_py()).unwrap_err();
        assert!(e.contains("cur_scale"), "{e}");
    }
}
