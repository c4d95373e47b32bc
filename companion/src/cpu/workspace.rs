//! The buffers of the fused training step: every activation the backward
//! pass needs, sized for one batch shape and reused from step to step (a
//! fresh allocation per step costs page faults on every touch).

use crate::config::GPT2Config;

/// One block's saved activations.
#[derive(Default)]
pub(crate) struct LayerActs {
    pub(crate) ln1: Vec<f32>,
    pub(crate) ln1_mean: Vec<f32>,
    pub(crate) ln1_rstd: Vec<f32>,
    /// `[B·T, 3C]`: queries, keys, values.
    pub(crate) qkv: Vec<f32>,
    /// `[B, H, T, T]` attention probabilities, and after dropout (empty
    /// without attention dropout).
    pub(crate) att: Vec<f32>,
    pub(crate) att_d: Vec<f32>,
    /// `[B·T, C]` heads' outputs before `c_proj`.
    pub(crate) atty: Vec<f32>,
    pub(crate) attn_mask: Vec<f32>,
    /// The residual stream after attention: input of `ln_2`.
    pub(crate) x2: Vec<f32>,
    pub(crate) ln2: Vec<f32>,
    pub(crate) ln2_mean: Vec<f32>,
    pub(crate) ln2_rstd: Vec<f32>,
    /// `[B·T, inner]` before and after the activation.
    pub(crate) fc: Vec<f32>,
    pub(crate) fc_act: Vec<f32>,
    pub(crate) mlp_mask: Vec<f32>,
}

impl LayerActs {
    /// Zeroed buffers for `(b, t)` tokens: the residual width `c`, and the
    /// `cl` attention columns over `heads` heads and `inner` MLP columns
    /// this rank computes (all of them on one rank; a tensor-parallel rank's
    /// share); the dropout masks only where `(att, res)` dropout is on.
    pub(crate) fn size(
        &mut self,
        (b, t): (usize, usize),
        (c, cl, heads, inner): (usize, usize, usize, usize),
        (att, res): (bool, bool),
    ) {
        let bt = b * t;
        let on = |yes: bool, n: usize| if yes { n } else { 0 };
        zeroed(&mut self.ln1, bt * c);
        zeroed(&mut self.ln1_mean, bt);
        zeroed(&mut self.ln1_rstd, bt);
        zeroed(&mut self.qkv, bt * 3 * cl);
        zeroed(&mut self.att, b * heads * t * t);
        zeroed(&mut self.att_d, on(att, b * heads * t * t));
        zeroed(&mut self.atty, bt * cl);
        zeroed(&mut self.attn_mask, on(res, bt * c));
        zeroed(&mut self.x2, bt * c);
        zeroed(&mut self.ln2, bt * c);
        zeroed(&mut self.ln2_mean, bt);
        zeroed(&mut self.ln2_rstd, bt);
        zeroed(&mut self.fc, bt * inner);
        zeroed(&mut self.fc_act, bt * inner);
        zeroed(&mut self.mlp_mask, on(res, bt * c));
    }
}

/// Activation and gradient buffers for one batch shape, reused from step to
/// step (a fresh allocation per step costs page faults on every touch).
#[derive(Default)]
pub struct Workspace {
    pub(crate) shape: (usize, usize),
    /// The residual stream entering each block, and leaving the last.
    pub(crate) res: Vec<Vec<f32>>,
    pub(crate) layers: Vec<LayerActs>,
    pub(crate) emb_mask: Vec<f32>,
    pub(crate) lnf: Vec<f32>,
    pub(crate) lnf_mean: Vec<f32>,
    pub(crate) lnf_rstd: Vec<f32>,
    /// `[B·T, V]` logits, overwritten by their gradient.
    pub(crate) logits: Vec<f32>,
    pub(crate) tmp: Vec<f32>,
    pub(crate) dres: Vec<f32>,
    pub(crate) dtmp: Vec<f32>,
    pub(crate) dln: Vec<f32>,
    pub(crate) dqkv: Vec<f32>,
    pub(crate) dfc: Vec<f32>,
    pub(crate) datt: Vec<f32>,
}

/// Resize `v` to `n` zeros, reusing its allocation.
pub(crate) fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn allocate(&mut self, cfg: &GPT2Config, b: usize, t: usize, drop: [bool; 3]) {
        let (c, h, l) = (cfg.n_embd, cfg.n_head, cfg.n_layer);
        let f = cfg.inner_dim();
        let bt = b * t;
        let [emb, att, resid] = drop;
        let sized = |on: bool, n: usize| if on { n } else { 0 };
        if self.shape != (b, t) || self.layers.len() != l {
            *self = Workspace::default();
            self.shape = (b, t);
        }
        self.res.resize_with(l + 1, Vec::new);
        for r in &mut self.res {
            zeroed(r, bt * c);
        }
        self.layers.resize_with(l, LayerActs::default);
        for a in &mut self.layers {
            a.size((b, t), (c, c, h, f), (att, resid));
        }
        zeroed(&mut self.emb_mask, sized(emb, bt * c));
        zeroed(&mut self.lnf, bt * c);
        zeroed(&mut self.lnf_mean, bt);
        zeroed(&mut self.lnf_rstd, bt);
        zeroed(&mut self.logits, bt * cfg.vocab_size);
        zeroed(&mut self.tmp, bt * c);
        zeroed(&mut self.dres, bt * c);
        zeroed(&mut self.dtmp, bt * c);
        zeroed(&mut self.dln, bt * c);
        zeroed(&mut self.dqkv, bt * 3 * c);
        zeroed(&mut self.dfc, bt * f);
        zeroed(&mut self.datt, b * h * t * t);
    }
}
