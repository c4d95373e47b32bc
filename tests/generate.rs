//! `generate` against `transformers`' `generate` on a random-init model.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use companion::generate::GenerationConfig;
use companion::model::{GPT2LMHeadModel, KvCache};
use serde_json::Value;

fn model() -> GPT2LMHeadModel {
    tiny_gpt2()
}

fn case(name: &str) -> Value {
    read_json(&fixture("tiny_gpt2_generate.json"))["cases"][name].clone()
}

/// Run one fixture case: its kwargs are GenerationConfig fields plus the inputs.
fn run(
    name: &str,
) -> (
    Vec<Vec<u32>>,
    Vec<Vec<u32>>,
    companion::generate::GenerateOutput,
) {
    let c = case(name);
    let cfg: GenerationConfig = serde_json::from_value(c["kwargs"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(c["kwargs"]["input_ids"].clone()).unwrap();
    let mask: Option<Vec<Vec<u32>>> = c["kwargs"]
        .get("attention_mask")
        .map(|m| serde_json::from_value(m.clone()).unwrap());
    let out = model()
        .generate_with_streamer(&ids, mask.as_deref(), &cfg, true, |_, _| {})
        .unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(c["output"].clone()).unwrap();
    (want, out.sequences.clone(), out)
}

#[test]
fn greedy_cases_equal_transformers() {
    for name in [
        "greedy",
        "greedy_rep_penalty",
        "greedy_no_repeat_ngram",
        "eos_stop",
        "min_new_tokens",
        "left_padded_batch",
        "max_length",
    ] {
        let (want, got, _) = run(name);
        assert_eq!(got, want, "case {name}");
    }
}

/// Beam search (num_beams, num_return_sequences, length_penalty,
/// early_stopping, a left-padded batch) and the fields that ban tokens
/// (bad_words_ids, suppress_tokens, begin_suppress_tokens, min_length):
/// transformers' own outputs (tests/fixtures/make_beam_fixtures.py).
#[test]
fn beam_search_and_banned_tokens_equal_transformers() {
    let all = read_json(&fixture("tiny_gpt2_beam.json"));
    let cases = all["cases"].as_object().unwrap();
    assert!(cases.len() >= 12);
    for (name, c) in cases {
        let cfg: GenerationConfig = serde_json::from_value(c["kwargs"].clone()).unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(c["kwargs"]["input_ids"].clone()).unwrap();
        let mask: Option<Vec<Vec<u32>>> = c["kwargs"]
            .get("attention_mask")
            .map(|m| serde_json::from_value(m.clone()).unwrap());
        let got = model().generate(&ids, mask.as_deref(), &cfg).unwrap();
        let want: Vec<Vec<u32>> = serde_json::from_value(c["output"].clone()).unwrap();
        assert_eq!(got.sequences, want, "case {name}");
    }
}

/// Fields transformers' generate honours and ours does not are refused by
/// name, never ignored; beam sampling is refused too.
#[test]
fn unimplemented_generation_fields_are_refused_by_name() {
    let ids = vec![vec![1u32, 5, 9]];
    for (json, field) in [
        (serde_json::json!({"typical_p": 0.5}), "typical_p"),
        (
            serde_json::json!({"num_beam_groups": 2, "diversity_penalty": 0.0}),
            "num_beam_groups",
        ),
        (
            serde_json::json!({"forced_eos_token_id": 2}),
            "forced_eos_token_id",
        ),
        (
            serde_json::json!({"num_beams": 2, "do_sample": true}),
            "beam sampling",
        ),
        (
            serde_json::json!({"num_beams": 2, "num_return_sequences": 3}),
            "num_return_sequences 3",
        ),
        (
            serde_json::json!({"encoder_repetition_penalty": 1.2}),
            "encoder_repetition_penalty",
        ),
        (
            serde_json::json!({"bad_words_ids": [[64]]}),
            "beyond the model's vocabulary of 64",
        ),
        (serde_json::json!({"bad_words_ids": []}), "bad_words_ids"),
    ] {
        let cfg: GenerationConfig = serde_json::from_value(json).unwrap();
        let err = model().generate(&ids, None, &cfg).unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    // Defaults written out (as transformers' save_pretrained may) are fine.
    let cfg: GenerationConfig = serde_json::from_value(
        serde_json::json!({"typical_p": 1.0, "min_p": null, "max_new_tokens": 2}),
    )
    .unwrap();
    assert_eq!(
        model().generate(&ids, None, &cfg).unwrap().sequences[0].len(),
        5
    );
}

#[test]
fn cached_step_logits_equal_transformers() {
    let c = case("greedy_rep_penalty");
    let (_, _, out) = run("greedy_rep_penalty");
    let raw: Vec<Vec<Vec<f32>>> = serde_json::from_value(c["logits"].clone()).unwrap();
    let scores: Vec<Vec<Vec<f32>>> = serde_json::from_value(c["scores"].clone()).unwrap();
    assert_eq!(out.logits.len(), raw.len());
    for (step, (ours, want)) in out.logits.iter().zip(&raw).enumerate() {
        for (a, b) in ours[0].iter().zip(&want[0]) {
            assert!(
                (a - b).abs() < 1e-4,
                "raw logits of step {step}: {a} vs {b}"
            );
        }
    }
    for (step, (ours, want)) in out.scores.iter().zip(&scores).enumerate() {
        for (a, b) in ours[0].iter().zip(&want[0]) {
            assert!(
                (a - b).abs() < 1e-4,
                "processed scores of step {step}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn kv_cache_logits_equal_a_full_rerun() {
    let m = model();
    let (_, seqs, out) = run("greedy");
    let seq = &seqs[0];
    let prompt = 3;
    for (step, logits) in out.logits.iter().enumerate() {
        let upto = prompt + step;
        let ids = Tensor::new(vec![seq[..upto].to_vec()], &Device::Cpu).unwrap();
        let full = m.forward(&ids, None, None).unwrap();
        let last: Vec<f32> = full
            .narrow(1, upto - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in logits[0].iter().zip(&last) {
            assert!((a - b).abs() < 1e-4, "step {step}: cached {a} vs full {b}");
        }
    }
    // The cache holds exactly the positions fed so far.
    let mut cache = KvCache::new(2);
    m.forward(
        &Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).unwrap(),
        None,
        Some(&mut cache),
    )
    .unwrap();
    assert_eq!(cache.len(), 3);
}

fn sampling(seed: u64, top_k: usize, top_p: f64) -> Vec<u32> {
    let cfg = GenerationConfig {
        do_sample: true,
        max_new_tokens: Some(15),
        top_k,
        top_p,
        seed: Some(seed),
        ..Default::default()
    };
    model()
        .generate(&[vec![1, 5, 9]], None, &cfg)
        .unwrap()
        .sequences[0]
        .clone()
}

#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() {
    assert_eq!(sampling(3, 50, 1.0), sampling(3, 50, 1.0));
    assert_ne!(sampling(3, 0, 1.0), sampling(4, 0, 1.0));
    let greedy = GenerationConfig {
        max_new_tokens: Some(15),
        ..Default::default()
    };
    let g = model()
        .generate(&[vec![1, 5, 9]], None, &greedy)
        .unwrap()
        .sequences[0]
        .clone();
    assert_eq!(sampling(11, 1, 1.0), g);
}

#[test]
fn top_p_samples_only_from_the_nucleus() {
    use companion::generate::apply_top_p;
    // Probabilities ∝ exp(scores): [0.5, 0.3, 0.15, 0.05] → top_p 0.75 keeps {0, 1}.
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let scores: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let mut s = scores.clone();
    apply_top_p(&mut s, 0.75);
    assert!(s[0].is_finite() && s[1].is_finite() && s[2].is_infinite() && s[3].is_infinite());
    // End to end: many draws with top_p from the model never leave the nucleus
    // of the first step, and both nucleus tokens appear.
    let m = model();
    let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).unwrap();
    let logits: Vec<f32> = m
        .forward(&ids, None, None)
        .unwrap()
        .narrow(1, 2, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut nucleus = logits.clone();
    apply_top_p(&mut nucleus, 0.6);
    let allowed: Vec<usize> = (0..nucleus.len())
        .filter(|&i| nucleus[i].is_finite())
        .collect();
    assert!(
        allowed.len() >= 2,
        "the test needs a nucleus of at least two tokens"
    );
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let cfg = GenerationConfig {
            do_sample: true,
            max_new_tokens: Some(1),
            top_k: 0,
            top_p: 0.6,
            seed: Some(seed),
            ..Default::default()
        };
        let t = m.generate(&[vec![1, 5, 9]], None, &cfg).unwrap().sequences[0][3] as usize;
        assert!(
            allowed.contains(&t),
            "token {t} is outside the nucleus {allowed:?}"
        );
        seen.insert(t);
    }
    assert!(
        seen.len() >= 2,
        "sampling never left the top token: {seen:?}"
    );
}

#[test]
fn bad_generation_settings_are_errors() {
    let m = model();
    let err = |cfg: GenerationConfig, ids: Vec<Vec<u32>>| {
        m.generate(&ids, None, &cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(
        GenerationConfig {
            do_sample: true,
            temperature: 0.0,
            ..Default::default()
        },
        vec![vec![1]],
    );
    assert!(e.contains("temperature"), "{e}");
    let e = err(
        GenerationConfig {
            top_p: 1.5,
            ..Default::default()
        },
        vec![vec![1]],
    );
    assert!(e.contains("top_p"), "{e}");
    let e = err(
        GenerationConfig {
            top_p: 0.0,
            ..Default::default()
        },
        vec![vec![1]],
    );
    assert!(e.contains("top_p"), "{e}");
    let e = err(
        GenerationConfig {
            max_new_tokens: Some(40),
            ..Default::default()
        },
        vec![vec![1]],
    );
    assert!(e.contains("n_positions"), "{e}");
    // An empty prompt starts from bos, as HF does; without bos it is an error.
    let e = err(GenerationConfig::default(), vec![vec![]]);
    assert!(e.contains("empty"), "{e}");
    let cfg = GenerationConfig {
        bos_token_id: Some(1),
        max_new_tokens: Some(3),
        ..Default::default()
    };
    let out = m.generate(&[vec![]], None, &cfg).unwrap();
    assert_eq!(out.sequences[0][0], 1);
    assert_eq!(out.sequences[0].len(), 4);
}
