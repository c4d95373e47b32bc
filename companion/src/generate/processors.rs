//! The logits processors of `generate`, in HF's order: repetition penalty
//! → no-repeat n-gram → min new tokens; for sampling, temperature → top-k →
//! top-p; then the pick (greedy argmax, or a draw from the softmax).

use super::config::GenerationConfig;
use crate::rng::SeededRng;

/// HF's `RepetitionPenaltyLogitsProcessor`: every id already in the sequence
/// (prompt and padding included) has its score divided by the penalty if
/// positive, multiplied if negative.
pub fn apply_repetition_penalty(scores: &mut [f32], ids: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in ids {
        let i = id as usize;
        if i < scores.len() && !seen[i] {
            seen[i] = true;
            let s = scores[i];
            scores[i] = if s < 0.0 {
                s * penalty as f32
            } else {
                s / penalty as f32
            };
        }
    }
}

/// HF's `NoRepeatNGramLogitsProcessor`: ban every token that would repeat an
/// n-gram already in the sequence.
pub fn apply_no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    if n == 0 || ids.len() + 1 < n {
        return;
    }
    let prefix = &ids[ids.len() + 1 - n..];
    for start in 0..=(ids.len() - n) {
        if &ids[start..start + n - 1] == prefix {
            let banned = ids[start + n - 1] as usize;
            if banned < scores.len() {
                scores[banned] = f32::NEG_INFINITY;
            }
        }
    }
}

/// HF's `NoBadWordsLogitsProcessor`: ban the last token of each sequence
/// whose other tokens end `ids` (a one-token sequence always); a sequence
/// that is just an eos id is left out, as HF does.
pub fn apply_bad_words(scores: &mut [f32], ids: &[u32], bad: &[Vec<u32>], eos: &[u32]) {
    for seq in bad {
        let Some((&last, head)) = seq.split_last() else {
            continue;
        };
        if head.is_empty() && eos.contains(&last) {
            continue;
        }
        if ids.ends_with(head) && (last as usize) < scores.len() {
            scores[last as usize] = f32::NEG_INFINITY;
        }
    }
}

/// Set `tokens`' scores to -inf (HF's `SuppressTokens*LogitsProcessor`).
fn suppress(scores: &mut [f32], tokens: &[u32]) {
    for &t in tokens {
        if (t as usize) < scores.len() {
            scores[t as usize] = f32::NEG_INFINITY;
        }
    }
}

/// The logits processors (not the sampling warpers), in HF's order, on one
/// row: repetition penalty, no-repeat n-gram, bad words, min length / min
/// new tokens, suppressed tokens. `new_tokens` counts the tokens generated
/// so far. Beam search applies them to log-probabilities, as HF does.
pub(crate) fn process(
    s: &mut [f32],
    ids: &[u32],
    new_tokens: usize,
    cfg: &GenerationConfig,
    eos: &[u32],
) {
    apply_repetition_penalty(s, ids, cfg.repetition_penalty);
    apply_no_repeat_ngram(s, ids, cfg.no_repeat_ngram_size);
    if let Some(bad) = &cfg.bad_words_ids {
        apply_bad_words(s, ids, bad, eos);
    }
    if ids.len() < cfg.min_length || new_tokens < cfg.min_new_tokens.unwrap_or(0) {
        suppress(s, eos);
    }
    if let Some(t) = &cfg.suppress_tokens {
        suppress(s, t);
    }
    if let (0, Some(t)) = (new_tokens, &cfg.begin_suppress_tokens) {
        suppress(s, t);
    }
}

/// HF's `TopKLogitsWarper`: keep the k highest scores (ties at the k-th kept).
pub fn apply_top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted: Vec<f32> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f64> {
    let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = scores.iter().map(|&s| ((s as f64) - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// HF's `TopPLogitsWarper`: keep the smallest set of tokens whose probability
/// reaches `top_p` (at least one).
pub fn apply_top_p(scores: &mut [f32], top_p: f64) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Ascending, as HF sorts; remove while the cumulative mass ≤ 1 − top_p.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut cum = 0.0;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - top_p && rank < last {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(scores: &[f32], rng: &mut SeededRng) -> u32 {
    let probs = softmax(scores);
    let r = rng.uniform();
    let mut cum = 0.0;
    let mut last_ok = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            last_ok = i;
        }
        cum += p;
        if r < cum {
            return i as u32;
        }
    }
    last_ok as u32
}

/// Process one row's logits in HF's order and pick the next token.
pub(crate) fn next_token(
    logits: &[f32],
    ids: &[u32],
    new_tokens: usize,
    cfg: &GenerationConfig,
    eos: &[u32],
    rng: &mut SeededRng,
) -> (u32, Vec<f32>) {
    let mut s = logits.to_vec();
    process(&mut s, ids, new_tokens, cfg, eos);
    if !cfg.do_sample {
        return (argmax(&s), s);
    }
    if cfg.temperature != 1.0 {
        s.iter_mut().for_each(|x| *x /= cfg.temperature as f32);
    }
    apply_top_k(&mut s, cfg.top_k);
    apply_top_p(&mut s, cfg.top_p);
    (sample(&s, rng), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut s = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        let mut s = vec![0.0; 5];
        // bigram (1, 2) seen; the sequence ends in 1 → 2 is banned.
        apply_no_repeat_ngram(&mut s, &[1, 2, 3, 1], 2);
        assert_eq!(s[2], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|x| x.is_infinite()).count(), 1);
    }

    #[test]
    fn bad_words_ban_the_completion_and_eos_alone_is_kept() {
        let mut s = vec![0.0; 6];
        apply_bad_words(
            &mut s,
            &[4, 1, 2],
            &[vec![2, 3], vec![1, 5], vec![4], vec![0]],
            &[0],
        );
        // [2, 3]: the ids end in 2 → 3 banned; [1, 5]: they do not end in 1; [4] always; [0] is eos alone.
        let banned: Vec<usize> = (0..6).filter(|&i| s[i].is_infinite()).collect();
        assert_eq!(banned, [3, 4]);
        let cfg = GenerationConfig {
            suppress_tokens: Some(vec![1]),
            begin_suppress_tokens: Some(vec![2]),
            min_length: 4,
            ..Default::default()
        };
        let mut s = vec![0.0; 4];
        process(&mut s, &[3, 3, 3], 0, &cfg, &[0]);
        assert_eq!(
            s,
            [f32::NEG_INFINITY; 3]
                .iter()
                .copied()
                .chain([0.0])
                .collect::<Vec<_>>()
        );
        let mut s = vec![0.0; 4];
        process(&mut s, &[3, 3, 3, 3], 1, &cfg, &[0]);
        assert_eq!(s, vec![0.0, f32::NEG_INFINITY, 0.0, 0.0]);
    }

    #[test]
    fn top_k_and_top_p_keep_the_head() {
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        apply_top_k(&mut s, 2);
        assert_eq!(s[0], f32::NEG_INFINITY);
        assert_eq!(s[3], f32::NEG_INFINITY);
        assert_eq!((s[1], s[2]), (3.0, 2.0));
        // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps two.
        let mut s = vec![3.0, 2.0, 1.0, 0.0];
        apply_top_p(&mut s, 0.7);
        assert!(s[0].is_finite() && s[1].is_finite());
        assert!(s[2].is_infinite() && s[3].is_infinite());
        // top_p tiny still keeps the best token.
        let mut s = vec![3.0, 2.0];
        apply_top_p(&mut s, 1e-9);
        assert!(s[0].is_finite() && s[1].is_infinite());
    }
}
