//! The floor a trained model must clear: a count-based bigram model of the
//! same tokens, scored like [`super::eval`] scores the model (every position
//! of a block but the first, predicted from the token before it; bits per
//! byte through the dataset's bytes per token).
//!
//! P(b | a) = (c(a, b) + μ·P₁(b)) / (c(a) + μ), with the add-one unigram
//! P₁(b) = (c(b) + 1) / (N + V) (Dirichlet smoothing, MacKay & Peto 1995).
//! μ is chosen from [`MU_GRID`] on the last tenth of the training blocks
//! held out, then the counts are made from every training block: the
//! validation text never picks μ.

use std::collections::HashMap;

use crate::data::Dataset;

/// The smoothing strengths tried.
pub const MU_GRID: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Bigram counts over a vocabulary of `vocab` ids.
#[derive(Debug, Clone)]
pub struct Bigram {
    vocab: usize,
    pairs: HashMap<(u32, u32), u32>,
    /// c(a): how often `a` precedes a counted pair.
    context: Vec<u64>,
    /// c(b): how often `b` is a counted pair's second token.
    unigram: Vec<u64>,
    n: u64,
}

/// What [`Bigram::fit_and_score`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BigramScore {
    pub mu: f64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub loss: f64,
    pub bits_per_byte: f64,
}

impl Bigram {
    /// Ids at or beyond `vocab` are not counted (no model predicts them).
    pub fn fit<'a>(vocab: usize, blocks: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut m = Bigram {
            vocab,
            pairs: HashMap::new(),
            context: vec![0; vocab],
            unigram: vec![0; vocab],
            n: 0,
        };
        m.count(blocks);
        m
    }

    /// Add `blocks`' pairs to the counts.
    fn count<'a>(&mut self, blocks: impl IntoIterator<Item = &'a [u32]>) {
        let (vocab, m) = (self.vocab, self);
        for b in blocks {
            for w in b
                .windows(2)
                .filter(|w| w.iter().all(|&t| (t as usize) < vocab))
            {
                *m.pairs.entry((w[0], w[1])).or_default() += 1;
                m.context[w[0] as usize] += 1;
                m.unigram[w[1] as usize] += 1;
                m.n += 1;
            }
        }
    }

    /// ln P(b | a); an id outside the vocabulary counts as never seen.
    pub fn log_prob(&self, a: u32, b: u32, mu: f64) -> f64 {
        let count = |v: &[u64], t: u32| v.get(t as usize).copied().unwrap_or(0);
        let p1 = (count(&self.unigram, b) + 1) as f64 / (self.n + self.vocab as u64) as f64;
        let c = *self.pairs.get(&(a, b)).unwrap_or(&0) as f64;
        ((c + mu * p1) / (count(&self.context, a) as f64 + mu)).ln()
    }

    /// Mean negative log-likelihood per predicted token of `blocks`.
    pub fn loss<'a>(&self, blocks: impl IntoIterator<Item = &'a [u32]>, mu: f64) -> f64 {
        let (mut nll, mut n) = (0f64, 0usize);
        for b in blocks {
            for w in b.windows(2) {
                nll -= self.log_prob(w[0], w[1], mu);
                n += 1;
            }
        }
        nll / n.max(1) as f64
    }

    /// Choose μ on the last tenth of `train` (at least one block; with one
    /// block, μ is chosen on it), count all of it, score `eval`.
    pub fn fit_and_score(vocab: usize, train: &Dataset, eval: &Dataset) -> BigramScore {
        let blocks: Vec<_> = train.iter().collect();
        let cut = blocks.len() - (blocks.len() / 10).max(1).min(blocks.len());
        let (fit, dev) = blocks.split_at(cut);
        let mut m = Bigram::fit(vocab, fit.iter().map(|b| &b[..]));
        let mu = MU_GRID
            .into_iter()
            .map(|mu| (mu, m.loss(dev.iter().map(|b| &b[..]), mu)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(1.0, |(mu, _)| mu);
        m.count(dev.iter().map(|b| &b[..]));
        let held: Vec<_> = eval.iter().collect();
        let loss = m.loss(held.iter().map(|b| &b[..]), mu);
        BigramScore {
            mu,
            loss,
            bits_per_byte: loss / std::f64::consts::LN_2 / eval.bytes_per_token(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_follow_the_formula_and_sum_to_one() {
        // pairs: (0,1) twice, (1,0) once; N = 3, V = 3.
        let m = Bigram::fit(3, [&[0u32, 1, 0, 1][..]]);
        let mu = 2.0;
        // P1(1) = (2 + 1) / (3 + 3); P(1|0) = (2 + 2·0.5) / (2 + 2).
        assert!((m.log_prob(0, 1, mu) - (3.0f64 / 4.0).ln()).abs() < 1e-12);
        for a in 0..3 {
            let total: f64 = (0..3).map(|b| m.log_prob(a, b, mu).exp()).sum();
            assert!((total - 1.0).abs() < 1e-12, "row {a} sums to {total}");
        }
        let loss = m.loss([&[0u32, 1][..]], mu);
        assert!((loss + (0.75f64).ln()).abs() < 1e-12);
    }
}
