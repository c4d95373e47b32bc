//! GPT2Config and GPT2LMHeadModel against Python `transformers`: logits and
//! losses from fixtures, our saved models loaded in Python, bad checkpoints.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use companion::config::GPT2Config;
use companion::model::GPT2LMHeadModel;
use serde_json::Value;

fn load(dir: &str) -> GPT2LMHeadModel {
    GPT2LMHeadModel::from_pretrained(fixture(dir).to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
}

fn ids_tensor(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn logits3(v: &Value) -> Vec<Vec<Vec<f32>>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn logits_and_loss_match_transformers() {
    let fx = read_json(&fixture("tiny_gpt2_outputs.json"));
    let model = load("tiny_gpt2");
    let single = &fx["single"];
    let ids = ids_tensor(&single["input_ids"]);
    let labels = ids.to_dtype(DType::I64).unwrap();
    let out = model.forward_with_labels(&ids, None, &labels).unwrap();
    let d = max_diff(&out.logits, &logits3(&single["logits"]), None);
    assert!(d < 1e-4, "logits differ by {d}");
    let loss: f32 = out.loss.unwrap().to_scalar().unwrap();
    let want = single["loss"].as_f64().unwrap() as f32;
    assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");

    let ig = &fx["labels_ignore"];
    let labels: Vec<Vec<i64>> = serde_json::from_value(ig["labels"].clone()).unwrap();
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    let out = model
        .forward_with_labels(&ids_tensor(&ig["input_ids"]), None, &labels)
        .unwrap();
    let loss: f32 = out.loss.unwrap().to_scalar().unwrap();
    let want = ig["loss"].as_f64().unwrap() as f32;
    assert!(
        (loss - want).abs() < 1e-5,
        "loss with -100 labels {loss} vs {want}"
    );
}

#[test]
fn left_padded_batch_matches_transformers() {
    let fx = read_json(&fixture("tiny_gpt2_outputs.json"));
    let lp = &fx["left_padded"];
    let model = load("tiny_gpt2");
    let mask: Vec<Vec<u32>> = serde_json::from_value(lp["attention_mask"].clone()).unwrap();
    let logits = model
        .forward(&ids_tensor(&lp["input_ids"]), Some(&mask), None)
        .unwrap();
    let d = max_diff(&logits, &logits3(&lp["logits"]), Some(&mask));
    assert!(d < 1e-4, "left-padded logits differ by {d}");
}

#[test]
fn other_activation_and_layer_scaling_match() {
    let fx = read_json(&fixture("tiny_gpt2_outputs.json"));
    let ids = ids_tensor(&fx["single"]["input_ids"]);
    for (dir, key) in [
        ("tiny_gpt2_gelu", "gelu_erf"),
        ("tiny_gpt2_inv_layer", "inv_layer"),
    ] {
        let model = load(dir);
        let want = fx[key].get("logits").unwrap_or(&fx[key]);
        let logits = model.forward(&ids, None, None).unwrap();
        let d = max_diff(&logits, &logits3(want), None);
        assert!(d < 1e-4, "{dir}: logits differ by {d}");
    }
}

fn tiny_config() -> GPT2Config {
    GPT2Config::from_file(&fixture("tiny_gpt2/config.json")).unwrap()
}

#[test]
fn our_saved_model_loads_in_transformers() {
    let model = GPT2LMHeadModel::new(&tiny_config(), 7, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let ids = vec![vec![1u32, 5, 9, 13, 2, 40], vec![3, 3, 7, 63, 0, 1]];
    let ours = model
        .forward(&Tensor::new(ids.clone(), &Device::Cpu).unwrap(), None, None)
        .unwrap();
    let py = run_python(
        "check_model_roundtrip.py",
        &[
            dir.path().to_str().unwrap(),
            &serde_json::to_string(&ids).unwrap(),
        ],
    );
    let d = max_diff(&ours, &logits3(&py["logits"]), None);
    assert!(
        d < 1e-4,
        "transformers' logits for our checkpoint differ by {d}"
    );
    // And we read back exactly what we wrote.
    let back =
        GPT2LMHeadModel::from_pretrained(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu)
            .unwrap();
    let again = back
        .forward(&Tensor::new(ids, &Device::Cpu).unwrap(), None, None)
        .unwrap();
    assert_eq!(max_abs_diff(&ours, &again), 0.0);
}

#[test]
fn initialisation_follows_hf() {
    let mut cfg = tiny_config();
    cfg.n_embd = 64;
    cfg.n_head = 4;
    cfg.n_layer = 4;
    cfg.initializer_range = 0.02;
    cfg.vocab_size = 500;
    let model = GPT2LMHeadModel::new(&cfg, 0, &Device::Cpu).unwrap();
    let params: HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
    let std = |n: &str| -> f32 {
        let t = params[n].flatten_all().unwrap();
        let v: Vec<f32> = t.to_vec1().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    };
    assert!((std("transformer.wte.weight") - 0.02).abs() < 0.001);
    assert!((std("transformer.h.0.mlp.c_fc.weight") - 0.02).abs() < 0.001);
    let proj = 0.02 / (2.0f32 * 4.0).sqrt();
    assert!((std("transformer.h.1.attn.c_proj.weight") - proj).abs() < 0.0005);
    assert_eq!(std("transformer.h.0.attn.c_attn.bias"), 0.0);
    let ln: Vec<f32> = params["transformer.ln_f.weight"].to_vec1().unwrap();
    assert!(ln.iter().all(|&x| x == 1.0));
    // Seeded: the same seed gives the same weights, another seed others.
    let again = GPT2LMHeadModel::new(&cfg, 0, &Device::Cpu).unwrap();
    let other = GPT2LMHeadModel::new(&cfg, 1, &Device::Cpu).unwrap();
    assert_eq!(
        model.state_dict_bytes().unwrap(),
        again.state_dict_bytes().unwrap()
    );
    assert_ne!(
        model.state_dict_bytes().unwrap(),
        other.state_dict_bytes().unwrap()
    );
    assert_eq!(model.num_parameters(), cfg.num_parameters());
}

#[test]
fn gpt2_config_round_trip_is_lossless() {
    let path = data("pretrained/gpt2/config.json");
    let original = read_json(&path);
    let cfg = GPT2Config::from_file(&path).unwrap();
    assert_eq!(cfg.num_parameters(), 124_439_808);
    let dir = tempfile::tempdir().unwrap();
    cfg.save_pretrained(dir.path()).unwrap();
    let written = read_json(&dir.path().join("config.json"));
    for (k, v) in original.as_object().unwrap() {
        assert_eq!(&written[k], v, "field {k}");
    }
    let back = GPT2Config::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(back, cfg);
    // Python's format: 1e-05, sorted keys, two-space indent.
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(text.contains("\"layer_norm_epsilon\": 1e-05,"), "{text}");
    let display = format!("{cfg}");
    assert!(display.starts_with("GPT2Config {\n  \"activation_function\": \"gelu_new\","));
}

/// Copy the tiny checkpoint with one tensor changed (or removed).
fn tampered(f: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny_gpt2/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut t =
        candle_core::safetensors::load(fixture("tiny_gpt2/model.safetensors"), &Device::Cpu)
            .unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    match GPT2LMHeadModel::from_pretrained(dir.to_str().unwrap(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let d = tampered(|t| {
        t.remove("transformer.h.1.mlp.c_fc.bias");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("transformer.h.1.mlp.c_fc.bias") && e.contains("missing"),
        "{e}"
    );

    let d = tampered(|t| {
        t.insert(
            "transformer.wpe.weight".into(),
            Tensor::zeros((31, 16), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("transformer.wpe.weight") && e.contains("[31, 16]") && e.contains("[32, 16]"),
        "{e}"
    );

    // A config that does not match the weights.
    let d = tampered(|_| {});
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"n_embd\": 16", "\"n_embd\": 32"),
    )
    .unwrap();
    // Twice the width is more parameters than the file holds: refused
    // before any tensor is read.
    let e = load_err(d.path());
    assert!(
        e.contains("config.json implies 28544 parameters, more than these weights files"),
        "{e}"
    );

    // n_embd not divisible by n_head.
    std::fs::write(
        d.path().join("config.json"),
        cfg.replace("\"n_head\": 2", "\"n_head\": 3"),
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("divisible"), "{e}");

    // A header naming one tensor twice: refused by that name (the parser
    // would keep one entry and blame another tensor's offsets).
    let d = tampered(|_| {});
    let f = d.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (k, v) = header.iter().find(|(k, _)| *k != "__metadata__").unwrap();
    let text = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let doubled = format!("{{\"{k}\":{v},{}", &text[1..]);
    let mut out = (doubled.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(doubled.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&f, out).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains(&format!("duplicate key `{k}`")),
        "{e}"
    );

    // A corrupt safetensors file.
    let d = tampered(|_| {});
    // (as long as real weights, so the size check passes and the parser speaks)
    let mut bytes = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json".to_vec();
    bytes.resize(64 * 1024, 0);
    std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn original_gpt2_names_load() {
    // Hub `gpt2` has no `transformer.` prefix and carries `attn.bias` buffers.
    let d = tampered(|t| {
        let old: Vec<(String, Tensor)> = t.drain().collect();
        for (n, v) in old {
            t.insert(n.trim_start_matches("transformer.").to_string(), v);
        }
        t.insert(
            "h.0.attn.bias".into(),
            Tensor::ones((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let m = GPT2LMHeadModel::from_pretrained(d.path().to_str().unwrap(), DType::F32, &Device::Cpu)
        .unwrap();
    let reference = load("tiny_gpt2");
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let a = m.forward(&ids, None, None).unwrap();
    let b = reference.forward(&ids, None, None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn an_untied_head_matches_transformers_and_round_trips() {
    let fx = read_json(&fixture("tiny_gpt2_untied.json"));
    let model = load("tiny_gpt2_untied");
    assert!(!model.config.tie_word_embeddings);
    let n = fx["num_parameters"].as_u64().unwrap() as usize;
    assert_eq!(model.num_parameters(), n, "lm_head counted as a parameter");
    assert_eq!(model.config.num_parameters(), n);
    let ids = ids_tensor(&fx["ids"]);
    let logits = model.forward(&ids, None, None).unwrap();
    let d = max_diff(&logits, &logits3(&fx["logits"]), None);
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
    let labels = ids.to_dtype(DType::I64).unwrap();
    let loss: f32 = model
        .forward_with_labels(&ids, None, &labels)
        .unwrap()
        .loss
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((loss as f64 - fx["loss"].as_f64().unwrap()).abs() < 1e-5);

    // generate(max_new_tokens=12, do_sample=False, repetition_penalty=1.1), token for token.
    let g = &fx["generate"];
    let cfg = companion::generate::GenerationConfig {
        max_new_tokens: Some(g["max_new_tokens"].as_u64().unwrap() as usize),
        repetition_penalty: g["repetition_penalty"].as_f64().unwrap(),
        pad_token_id: Some(0),
        ..companion::generate::GenerationConfig::from_model_config(&model.config)
    };
    let prompt: Vec<Vec<u32>> = serde_json::from_value(fx["ids"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(g["sequences"].clone()).unwrap();
    assert_eq!(model.generate(&prompt, None, &cfg).unwrap().sequences, want);

    // save_pretrained writes lm_head.weight; transformers and we read it back.
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(st.contains_key("lm_head.weight"), "an untied head is saved");
    let py = run_python(
        "check_model_roundtrip.py",
        &[dir.path().to_str().unwrap(), &fx["ids"].to_string()],
    );
    let d = max_diff(&logits, &logits3(&py["logits"]), None);
    assert!(
        d < 1e-4,
        "transformers' logits for our saved copy differ by {d}"
    );
    let back =
        GPT2LMHeadModel::from_pretrained(dir.path().to_str().unwrap(), DType::F32, &Device::Cpu)
            .unwrap();
    assert_eq!(
        max_abs_diff(&logits, &back.forward(&ids, None, None).unwrap()),
        0.0
    );
}

#[test]
fn cross_attention_is_refused_by_name() {
    let mut cfg = tiny_config();
    cfg.add_cross_attention = true;
    let e = GPT2LMHeadModel::new(&cfg, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("add_cross_attention"), "{e}");
}
