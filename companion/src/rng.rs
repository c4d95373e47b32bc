//! The project's one seeded random generator, with a stream fixed for good:
//! resume and seeds promise bit-identical runs, and `rand::StdRng` is
//! documented as free to change its algorithm between versions (so are
//! `gen_range`, `shuffle` and `rand_distr`'s samplers). ChaCha12 is a
//! specified cipher (`rand_chacha` promises a value-stable stream), and the
//! few draws built on it (uniform floats, bounded integers, normals, a
//! shuffle) are written out here; a test pins their output.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;

/// A seeded generator: initialisation, data shuffling and sampling all use it.
pub struct SeededRng(ChaCha12Rng);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng(ChaCha12Rng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (Lemire's multiply-and-reject, no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Normal(0, std), by the Box–Muller transform (one value per call).
    pub fn normal(&mut self, std: f64) -> f64 {
        // 1 − uniform is in (0, 1], so the logarithm is finite.
        let (u1, u2) = (1.0 - self.uniform(), self.uniform());
        std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SeededRng;

    /// The stream for seed 42, pinned: if a dependency update changes any of
    /// these, seeded runs stop reproducing earlier ones.
    #[test]
    fn the_stream_is_pinned() {
        let mut r = SeededRng::new(42);
        let raw: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r = SeededRng::new(42);
        let draws = (r.uniform(), r.below(1000), r.normal(0.02));
        let mut v: Vec<u32> = (0..10).collect();
        SeededRng::new(7).shuffle(&mut v);
        let want_raw: [u64; 3] = PINNED_RAW;
        assert_eq!(raw, want_raw, "ChaCha12 for seed 42");
        assert_eq!(format!("{:?}", draws), PINNED_DRAWS);
        assert_eq!(v, PINNED_SHUFFLE);
    }

    const PINNED_RAW: [u64; 3] = [
        9713269763989775522,
        10011513049433592189,
        11740708795755607249,
    ];
    const PINNED_DRAWS: &str = "(0.5265574090027738, 542, -0.02362215000481181)";
    const PINNED_SHUFFLE: [u32; 10] = [5, 8, 6, 9, 4, 7, 3, 1, 2, 0];
}
