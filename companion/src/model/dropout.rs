//! Dropout with its own seeded, counter-based generator.

use std::sync::Mutex;

use candle_core::Tensor;
use rayon::prelude::*;

/// Where a dropout generator stands: its seed and how many draws it has
/// made. Saved and restored around a recomputed piece so that it draws the
/// same masks (ZeRO-3, gradient checkpointing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutState {
    seed: u64,
    offset: u64,
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of a counter.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Dropout with its own seeded generator, so that training is reproducible
/// and resumable (candle's `ops::dropout` draws from an unseeded one). The
/// generator is counter-based (draw `i` is a hash of the seed and `i`, as
/// PyTorch's Philox is), so a mask of millions of elements is drawn on every
/// thread at once, and the autograd path and the fused kernels
/// ([`crate::cpu`]) draw identical masks.
pub struct Dropout {
    state: Mutex<DropoutState>,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Dropout {
            state: Mutex::new(DropoutState {
                seed: mix64(seed),
                offset: 0,
            }),
        }
    }

    pub fn reseed(&self, seed: u64) {
        *self.state.lock().expect("dropout state") = DropoutState {
            seed: mix64(seed),
            offset: 0,
        };
    }

    pub fn state(&self) -> DropoutState {
        *self.state.lock().expect("dropout state")
    }

    pub fn set_state(&self, state: DropoutState) {
        *self.state.lock().expect("dropout state") = state;
    }

    /// Fill `out` with the next mask of dropout probability `p`: 0 for a
    /// dropped element, `1 / (1 − p)` for a kept one.
    pub fn fill_mask(&self, out: &mut [f32], p: f64) {
        let s = {
            let mut st = self.state.lock().expect("dropout state");
            let s = *st;
            st.offset += out.len() as u64;
            s
        };
        fill(s, out, p);
    }

    /// Fill `out` with the draws `offset..offset + out.len()` of the stream
    /// this generator was seeded with, leaving its place unchanged: a split
    /// model's rank draws just the part of a mask it applies.
    pub fn fill_mask_at(&self, offset: u64, out: &mut [f32], p: f64) {
        let seed = self.state.lock().expect("dropout state").seed;
        fill(DropoutState { seed, offset }, out, p);
    }

    pub(crate) fn apply(&self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let mut mask = vec![0f32; x.elem_count()];
        self.fill_mask(&mut mask, p);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// The draws of `s` from its offset on, as a mask of dropout probability `p`.
fn fill(s: DropoutState, out: &mut [f32], p: f64) {
    let scale = (1.0 / (1.0 - p)) as f32;
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let base = s.offset + (c * CHUNK) as u64;
        for (i, m) in o.iter_mut().enumerate() {
            let h = mix64(s.seed ^ (base + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let u = (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            *m = if u < p { 0.0 } else { scale };
        }
    });
}

impl crate::cpu::DropoutMasks for Dropout {
    fn fill_mask(&self, out: &mut [f32], p: f64) {
        Dropout::fill_mask(self, out, p)
    }
}
