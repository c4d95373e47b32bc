//! Beam search (`num_beams > 1`, `do_sample=False`) as transformers 5's
//! `_beam_search` runs it, prompt by prompt: the logits processors on the
//! log-softmax of each beam's next-token logits, the beam's running score
//! added, the top `max(2, 1 + n_eos)·num_beams` continuations of all beams;
//! the best `num_beams` that did not stop keep running, the ones among the
//! first `num_beams` that stopped (eos, or the length limit) compete for the
//! `num_beams` finished slots with score / (new tokens)^length_penalty;
//! `early_stopping` (false / true / "never") decides when no running beam
//! can still win. Scores are f32 as in HF, so ties break the same way.
//!
//! Each step runs the model on every beam's whole sequence (no KV cache to
//! reorder): slower than greedy decoding, the same tokens.

use candle_core::{DType, Tensor};

use super::config::{EarlyStopping, GenerationConfig};
use super::processors::process;
use crate::model::{GPT2LMHeadModel, Result};

/// HF's "impossible" score.
const NEG: f32 = -1.0e9;

/// The indices of `scores`' `k` largest values, largest first; on a tie the
/// lower index first.
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // torch's order: (x - max) - log(sum(exp(x - max))).
    let lse: f32 = x.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
    x.iter().map(|&v| (v - m) - lse).collect()
}

/// One prompt's search: its `num_return_sequences` best finished
/// sequences (prompt included, unequal lengths).
pub(crate) fn search(
    model: &GPT2LMHeadModel,
    prompt: &[u32],
    prompt_mask: &[u32],
    cfg: &GenerationConfig,
    eos: &[u32],
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let nb = cfg.num_beams;
    let p = prompt.len();
    let keep = 2usize.max(1 + eos.len()) * nb;
    let mut running: Vec<Vec<u32>> = vec![prompt.to_vec(); nb];
    let mut running_scores: Vec<f32> = (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect();
    // Finished slots: sequence, score, finished.
    let mut done: Vec<(Vec<u32>, f32, bool)> = vec![(prompt.to_vec(), NEG, false); nb];
    let mut improvable = true;
    let mut cur = p;
    while cur < max_len {
        let mask: Vec<Vec<u32>> = (0..nb)
            .map(|_| {
                prompt_mask
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(1, cur - p))
                    .collect()
            })
            .collect();
        let ids = Tensor::new(running.clone(), model.device())?;
        let logits = model.forward(&ids, Some(&mask), None)?;
        let last: Vec<Vec<f32>> = logits
            .narrow(1, cur - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        let vocab = last[0].len();
        let mut acc = Vec::with_capacity(nb * vocab);
        for (b, row) in last.iter().enumerate() {
            let mut s = log_softmax(row);
            process(&mut s, &running[b], cur - p, cfg, eos);
            acc.extend(s.iter().map(|&x| x + running_scores[b]));
        }
        // The top continuations of all beams, and whether each stops here.
        let cand: Vec<(Vec<u32>, f32, bool)> = top_k(&acc, keep)
            .into_iter()
            .map(|i| {
                let (beam, tok) = (i / vocab, (i % vocab) as u32);
                let mut seq = running[beam].clone();
                seq.push(tok);
                let stops = eos.contains(&tok) || seq.len() >= max_len;
                (seq, acc[i], stops)
            })
            .collect();
        // The best num_beams that did not stop run on.
        let run_scores: Vec<f32> = cand
            .iter()
            .map(|c| c.1 + if c.2 { NEG } else { 0.0 })
            .collect();
        let next = top_k(&run_scores, nb);
        running = next.iter().map(|&i| cand[i].0.clone()).collect();
        running_scores = next.iter().map(|&i| run_scores[i]).collect();
        // Those among the first num_beams that stopped compete for the slots.
        let all_done = done.iter().all(|d| d.2);
        let full = all_done && cfg.early_stopping == EarlyStopping::Bool(true);
        // A Python float (f64) in HF, used as an f32 scalar.
        let norm = ((cur + 1 - p) as f64).powf(cfg.length_penalty) as f32;
        let mut merged = done.clone();
        for (k, c) in cand.iter().enumerate() {
            let finished = c.2 && k < nb;
            let mut score = c.1 / norm;
            if full {
                score += NEG;
            }
            if !improvable {
                score += NEG;
            }
            if !finished {
                score += NEG;
            }
            merged.push((c.0.clone(), score, finished));
        }
        let merged_scores: Vec<f32> = merged.iter().map(|m| m.1).collect();
        done = top_k(&merged_scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();
        cur += 1;
        // Can a running beam still beat the worst finished one?
        let best_len = match cfg.early_stopping {
            EarlyStopping::Never(_) if cfg.length_penalty > 0.0 => max_len - p,
            _ => cur - p,
        };
        let best_possible = running_scores[0] / (best_len as f64).powf(cfg.length_penalty) as f32;
        let worst = done.iter().map(|d| d.1).fold(f32::INFINITY, f32::min);
        improvable &= done
            .iter()
            .any(|d| best_possible > if d.2 { worst } else { NEG });
        let open = !(done.iter().all(|d| d.2) && cfg.early_stopping == EarlyStopping::Bool(true));
        let can_continue = !cand.iter().all(|c| c.2);
        if !(improvable && open && can_continue) {
            break;
        }
    }
    Ok(done
        .into_iter()
        .take(cfg.num_return_sequences)
        .map(|d| d.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_takes_the_largest_lower_index_first_on_ties() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        let l = log_softmax(&[0.0, 0.0]);
        assert!((l[0] - 0.5f32.ln()).abs() < 1e-6);
    }
}
