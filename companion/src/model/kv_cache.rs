//! The key/value cache of generation: candle tensors per layer, or the
//! fused CPU kernels' flat buffers, whichever path fills it first.

use candle_core::Tensor;

/// Keys and values of earlier positions, one entry per layer, in buffers
/// `[B, H, capacity, D]` that grow by doubling: appending a token writes one
/// position instead of copying the whole cache, so each new token costs the
/// same whatever its position.
#[derive(Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerCache>>,
    /// The fused CPU kernels' cache (fp32 CPU models in eval mode).
    pub(crate) fused: Option<crate::cpu::KvBuffers>,
    /// Keep to candle's ops even where the fused kernels apply (tests
    /// compare the two).
    pub autograd_path: bool,
}

#[derive(Clone)]
pub(crate) struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Append `[B, H, t, D]` keys and values; return views of all positions.
    pub(crate) fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, usize)> {
        let (b, h, t, d) = k.dims4()?;
        let past = slot.as_ref().map(|c| c.len).unwrap_or(0);
        let cap = slot.as_ref().map(|c| c.k.dim(2)).transpose()?.unwrap_or(0);
        if past + t > cap {
            let new_cap = (past + t).max(2 * cap).max(64);
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let Some(c) = slot.as_ref() {
                nk.slice_set(&c.k.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                nv.slice_set(&c.v.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerCache {
                k: nk,
                v: nv,
                len: past,
            });
        }
        let c = slot.as_mut().expect("allocated above");
        // Detached: a cached tensor must not keep the autograd graph of every
        // earlier step (and its activations) alive.
        c.k.slice_set(&k.detach().contiguous()?, 2, past)?;
        c.v.slice_set(&v.detach().contiguous()?, 2, past)?;
        c.len = past + t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?, past))
    }
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: vec![None; n_layer],
            fused: None,
            autograd_path: false,
        }
    }

    /// How many positions the cache holds.
    pub fn len(&self) -> usize {
        if let Some(f) = &self.fused {
            return f.len();
        }
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|c| c.len)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
