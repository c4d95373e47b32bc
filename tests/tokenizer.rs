//! 4.3.2's tokenizers against the real thing: GPT-2's tokenizer, training
//! parity with Python `tokenizers`/`sentencepiece`, loading what we save in
//! Python `transformers`, and clear errors on bad input.

mod common;

use common::*;
use companion::tokenizer::{self, AutoTokenizer, TokenizerKind, TrainArgs};
use serde_json::Value;

const CHAPTER_TEXT: &str = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion.";

fn gpt2() -> AutoTokenizer {
    AutoTokenizer::from_pretrained(data("pretrained/gpt2").to_str().unwrap()).unwrap()
}

#[test]
fn gpt2_tokenizes_the_chapter_example() {
    let tokens = gpt2().tokenize(CHAPTER_TEXT).unwrap();
    let expected = [
        "ab",
        "stract",
        ":",
        "ĠThis",
        "Ġis",
        "Ġan",
        "Ġexample",
        "Ġof",
        "Ġtext",
        ".",
        "Ġintroduction",
        ":",
        "ĠThis",
        "Ġis",
        "Ġan",
        "Ġintroduction",
        ".",
        "Ġconclusion",
        ":",
        "ĠThis",
        "Ġis",
        "Ġa",
        "Ġconclusion",
        ".",
    ];
    assert_eq!(tokens, expected);
    let tok = gpt2();
    assert_eq!(tok.len(), 50257);
    assert_eq!(tok.eos_token_id(), Some(50256));
    assert_eq!(tok.bos_token_id(), Some(50256));
    assert_eq!(tok.pad_token_id(), None);
}

/// Byte offsets (Rust) → character offsets (what Python reports).
fn char_offsets(text: &str, offs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let to_char = |b: usize| text[..b].chars().count();
    offs.iter()
        .map(|&(s, e)| (to_char(s), to_char(e)))
        .collect()
}

#[test]
fn gpt2_matches_python_on_varied_strings() {
    let fx = read_json(&fixture("gpt2_tokenization.json"));
    let tok = gpt2();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let tokens: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids, "ids of {text:?}");
        assert_eq!(tok.tokenize(text).unwrap(), tokens, "tokens of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        let (_, offs) = tok.encode_with_offsets(text).unwrap();
        let want: Vec<(usize, usize)> = serde_json::from_value(case["offsets"].clone()).unwrap();
        assert_eq!(char_offsets(text, &offs), want, "offsets of {text:?}");
    }
}

#[test]
fn batch_encoding_pads_on_the_padding_side() {
    let mut tok = gpt2();
    let texts = ["Hello world", "Hi"];
    assert!(
        tok.encode_batch(&texts, true, None).is_err(),
        "GPT-2 has no pad token"
    );
    tok.set_special_token(tokenizer::SpecialRole::Pad, "<|endoftext|>")
        .unwrap();
    let b = tok.encode_batch(&texts, true, None).unwrap();
    assert_eq!(b.input_ids, vec![vec![15496, 995], vec![17250, 50256]]);
    assert_eq!(b.attention_mask, vec![vec![1, 1], vec![1, 0]]);
    tok.padding_side = tokenizer::PaddingSide::Left;
    let b = tok.encode_batch(&texts, true, None).unwrap();
    assert_eq!(b.input_ids[1], vec![50256, 17250]);
    assert_eq!(b.attention_mask[1], vec![0, 1]);
    let t = tok
        .encode_batch(&["Hello world again"], false, Some(2))
        .unwrap();
    assert_eq!(t.input_ids, vec![vec![15496, 995]]);
}

/// A Hugging Face cache holding `gpt2`'s tokenizer, as `huggingface_hub` lays it out.
fn fake_hub_cache() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--gpt2");
    let rev = "607a30d783dfa663caf39e06633721c8d4cfcd7e";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ] {
        std::fs::copy(data("pretrained/gpt2").join(f), snap.join(f)).unwrap();
    }
    cache
}

#[test]
fn from_pretrained_gpt2_through_the_hub_cache() {
    let cache = fake_hub_cache();
    let env = [
        ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let out = companion(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            "gpt2",
            "--text",
            CHAPTER_TEXT,
            "--json",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["tokens"][0], "ab");
    assert_eq!(v["tokens"][1], "stract");
    assert_eq!(v["ids"][0], 397);

    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = tempfile::tempdir().unwrap();
    std::fs::rename(cache.path().join("models--gpt2"), home.path().join("hub")).ok();
    let hub = home.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let out = companion(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            "gpt2",
            "--text",
            "Hi",
            "--json",
        ],
        &[
            ("HF_HOME", home.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_CACHE", ""),
        ],
    );
    // The repo folder was moved to the wrong level above: this must fail and
    // name the cache it looked in.
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(hub.to_str().unwrap()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn offline_miss_names_the_id_and_every_place_looked() {
    let cache = tempfile::tempdir().unwrap();
    let out = companion(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            "no-such/model",
            "--text",
            "x",
        ],
        &[
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no-such/model"), "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");
    assert!(err.contains(cache.path().to_str().unwrap()), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn bpe_training_matches_python_tokenizers() {
    let fx = read_json(&fixture("bpe_train_parity.json"));
    let docs = docs(&data("corpus/train.jsonl"));
    let args = TrainArgs {
        kind: TokenizerKind::Bpe,
        vocab_size: fx["vocab_size"].as_u64().unwrap() as usize,
        min_frequency: fx["min_frequency"].as_u64().unwrap(),
        special_tokens: vec![],
        show_progress: false,
    };
    let tok = tokenizer::train(&args, docs.iter()).unwrap();
    let ours: Value = serde_json::from_str(&tok.backend().to_string(false).unwrap()).unwrap();
    assert_eq!(
        ours["model"]["vocab"], fx["vocab"],
        "learned vocabularies differ"
    );
    let merges: Vec<Value> = ours["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                serde_json::json!([a, b])
            }
            other => other.clone(),
        })
        .collect();
    assert_eq!(Value::Array(merges), fx["merges"], "merges differ");
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids, "{text:?}");
    }
}

#[test]
fn unigram_is_within_two_percent_of_sentencepiece() {
    let fx = read_json(&fixture("sentencepiece_reference.json"));
    let lines = |p: &str| -> Vec<String> {
        docs(&data(p))
            .iter()
            .flat_map(|d| d.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| !l.trim().is_empty())
            .collect()
    };
    let args = TrainArgs {
        kind: TokenizerKind::Unigram,
        vocab_size: fx["vocab_size"].as_u64().unwrap() as usize,
        special_tokens: vec![],
        ..TrainArgs::default()
    };
    let tok = tokenizer::train(&args, lines("corpus/train.jsonl").iter()).unwrap();
    let valid = lines("corpus/validation.jsonl");
    let (tokens, chars) = tokenizer::count_tokens(&tok, &valid).unwrap();
    let ours = tokens as f64 / chars as f64;
    let spm = fx["tokens_per_char"].as_f64().unwrap();
    let rel = (ours - spm).abs() / spm;
    eprintln!(
        "tokens/char: ours {ours:.4}, sentencepiece {spm:.4} ({:.2}% apart)",
        rel * 100.0
    );
    assert!(rel < 0.02, "ours {ours:.4} vs sentencepiece {spm:.4}");
    assert_eq!(
        tok.tokenize("hello world").unwrap()[0].chars().next(),
        Some('▁')
    );
}

#[test]
fn sentencepiece_model_converts_like_sentencepiece() {
    let tok = tokenizer::from_sentencepiece_model(&fixture("spm_small.model")).unwrap();
    let cases = read_json(&fixture("spm_small_cases.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let pieces: Vec<String> = serde_json::from_value(case["pieces"].clone()).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.tokenize(text).unwrap(), pieces, "pieces of {text:?}");
        assert_eq!(tok.encode(text).unwrap(), ids, "ids of {text:?}");
    }
    assert_eq!(tok.unk_token(), Some("<unk>"));
}

/// Texts the round trip is checked on.
fn roundtrip_texts() -> Vec<String> {
    let mut t: Vec<String> = docs(&data("corpus/validation.jsonl"))
        .iter()
        .take(5)
        .map(|d| d.chars().take(400).collect())
        .collect();
    t.extend(
        [
            CHAPTER_TEXT,
            "  leading and  double spaces ",
            "事前学習 🤗 naïve",
            "<bos>Hello<eos><pad>",
            "",
        ]
        .map(String::from),
    );
    t
}

fn check_python_loads(dir: &std::path::Path, tok: &AutoTokenizer) {
    let texts = roundtrip_texts();
    let file = dir.join("texts.json");
    std::fs::write(&file, serde_json::to_string(&texts).unwrap()).unwrap();
    let py = run_python(
        "check_tokenizer_roundtrip.py",
        &[dir.join("tok").to_str().unwrap(), file.to_str().unwrap()],
    );
    assert_eq!(py["len"].as_u64().unwrap() as usize, tok.len());
    assert_eq!(
        py["bos_token_id"].as_u64().map(|x| x as u32),
        tok.bos_token_id()
    );
    assert_eq!(
        py["eos_token_id"].as_u64().map(|x| x as u32),
        tok.eos_token_id()
    );
    assert_eq!(
        py["pad_token_id"].as_u64().map(|x| x as u32),
        tok.pad_token_id()
    );
    for (text, case) in texts.iter().zip(py["cases"].as_array().unwrap()) {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let tokens: Vec<String> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids, "ids of {text:?}");
        // Python's tokens here are convert_ids_to_tokens(ids): `<unk>` for unknown pieces.
        let ours: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(ours, tokens, "tokens of {text:?}");
    }
}

#[test]
fn saved_tokenizers_load_in_python_transformers() {
    let train = docs(&data("corpus/validation.jsonl"));
    for kind in [TokenizerKind::Bpe, TokenizerKind::Unigram] {
        let args = TrainArgs {
            kind,
            vocab_size: 1000,
            ..TrainArgs::default()
        };
        let tok = tokenizer::train(&args, train.iter()).unwrap();
        // The chapter's special tokens follow the learned vocabulary.
        let learned = tok.vocab_size();
        assert_eq!(tok.bos_token_id(), Some(learned as u32));
        assert_eq!(tok.eos_token_id(), Some(learned as u32 + 1));
        assert_eq!(tok.pad_token_id(), Some(learned as u32 + 2));
        let dir = tempfile::tempdir().unwrap();
        tok.save_pretrained(&dir.path().join("tok")).unwrap();
        let back =
            AutoTokenizer::from_pretrained(dir.path().join("tok").to_str().unwrap()).unwrap();
        assert_eq!(back.len(), tok.len());
        assert_eq!(back.pad_token_id(), tok.pad_token_id());
        check_python_loads(dir.path(), &tok);
    }
}

#[test]
fn cli_trains_and_shows_a_tokenizer() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("tok");
    let o = companion(
        &[
            "tokenizer",
            "train",
            "--corpus",
            data("corpus/validation.jsonl").to_str().unwrap(),
            "--model",
            "bpe",
            "--vocab-size",
            "600",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["vocab_size"], 600);
    assert_eq!(v["bos_token_id"], 600);
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let o = companion(
        &[
            "tokenizer",
            "show",
            "--tokenizer",
            out.to_str().unwrap(),
            "--text",
            "import os",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["tokens"].as_array().unwrap().len() >= 2);
}

fn assert_fails(args: &[&str], needle: &str) {
    let o = companion(args, &[]);
    assert!(!o.status.success(), "expected failure for {args:?}");
    let err = stderr(&o);
    assert!(
        err.contains(needle),
        "stderr of {args:?} lacks {needle:?}:\n{err}"
    );
    assert!(stdout(&o).is_empty(), "no stdout on failure");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    let out = d("out");
    // Missing corpus file.
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            &d("nope.jsonl"),
            "--out",
            &out,
        ],
        "nope.jsonl",
    );
    // Empty corpus.
    std::fs::write(d("empty.txt"), "\n\n").unwrap();
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            &d("empty.txt"),
            "--out",
            &out,
        ],
        "no text",
    );
    // Non-UTF-8 bytes.
    std::fs::write(d("latin1.txt"), b"caf\xe9\n").unwrap();
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            &d("latin1.txt"),
            "--out",
            &out,
        ],
        "UTF-8",
    );
    // A JSONL line without the text field.
    std::fs::write(d("c.jsonl"), "{\"text\": \"ok\"}\n{\"content\": \"x\"}\n").unwrap();
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            &d("c.jsonl"),
            "--out",
            &out,
        ],
        "c.jsonl:2",
    );
    // vocab_size too small for the byte alphabet.
    let valid = data("corpus/validation.jsonl");
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            valid.to_str().unwrap(),
            "--vocab-size",
            "100",
            "--out",
            &out,
        ],
        "vocab_size 100 is too small",
    );
    // Unknown model kind.
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            valid.to_str().unwrap(),
            "--model",
            "wordpiece",
            "--out",
            &out,
        ],
        "unknown tokenizer model",
    );
    // Corrupt tokenizer.json.
    std::fs::create_dir_all(d("bad")).unwrap();
    std::fs::write(d("bad/tokenizer.json"), "{\"model\": 3").unwrap();
    assert_fails(
        &["tokenizer", "show", "--tokenizer", &d("bad"), "--text", "x"],
        "tokenizer.json",
    );
    // An output folder that is a file cannot be written, and the file survives.
    std::fs::write(d("file"), "keep").unwrap();
    assert_fails(
        &[
            "tokenizer",
            "train",
            "--corpus",
            valid.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--out",
            &d("file"),
        ],
        "exists and is not a folder",
    );
    assert_eq!(std::fs::read_to_string(d("file")).unwrap(), "keep");
    assert!(
        !dir.path().join("out").exists(),
        "nothing written after failures"
    );
}

#[test]
fn bytes_to_unicode_is_gpt2s_byte_alphabet() {
    let table = tokenizer::bytes_to_unicode();
    // The same 256 characters as `tokenizers`' byte-level alphabet, one per byte.
    let ours: std::collections::HashSet<char> = table.iter().copied().collect();
    let theirs: std::collections::HashSet<char> =
        tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
    assert_eq!(ours.len(), 256);
    assert_eq!(ours, theirs);
    // And the entries Python's bytes_to_unicode gives (notebooks/fixtures).
    let fx = read_json(&root().join("notebooks/fixtures/chapter.json"));
    for (byte, ch) in fx["gpt2"]["byte_to_char"].as_object().unwrap() {
        let b: usize = byte.parse().unwrap();
        assert_eq!(table[b].to_string(), ch.as_str().unwrap(), "byte {b}");
    }
    // What GPT-2's tokenizer shows for a space and a newline.
    assert_eq!(gpt2().tokenize(" \n").unwrap(), ["Ġ", "Ċ"]);
}

#[test]
fn token_bytes_inverts_the_byte_alphabet() {
    assert_eq!(tokenizer::token_bytes("Ġthe").unwrap(), b" the");
    assert_eq!(tokenizer::token_bytes("Ċ").unwrap(), b"\n");
    // 事 is E4 BA 8B in UTF-8; GPT-2 splits it as "äº" + "ĭ".
    let toks = gpt2().tokenize("事").unwrap();
    let bytes: Vec<u8> = toks
        .iter()
        .flat_map(|t| tokenizer::token_bytes(t).unwrap())
        .collect();
    assert_eq!(bytes, "事".as_bytes());
    assert_eq!(tokenizer::token_bytes("▁the"), None);
}

/// A document encoded in pieces (bounded memory) gives the ids of the
/// whole document, for GPT-2's byte-level BPE and a SentencePiece model.
#[test]
fn long_documents_encoded_in_pieces_give_the_same_ids() {
    let text: String =
        companion::data::corpus::read_files(&[&data("corpus/validation.jsonl")], "text")
            .unwrap()
            .join("\n\n");
    let text = &text[..text
        .char_indices()
        .nth(20_000)
        .map_or(text.len(), |(i, _)| i)];
    let spm = tokenizer::from_sentencepiece_model(&fixture("spm_small.model")).unwrap();
    for (name, tok) in [("gpt2", gpt2()), ("sentencepiece", spm)] {
        let whole = tok.encode(text).unwrap();
        for piece in [64, 1000] {
            let pieces = tok.encode_long(text, piece).unwrap();
            assert_eq!(pieces, whole, "{name}, pieces of {piece} bytes");
        }
    }
}

/// Truncation and padding stored in a tokenizer.json are not applied to a
/// call that does not ask for them, as transformers' PreTrainedTokenizerFast
/// does (tests/fixtures/tokenizer_settings.json, from
/// make_tokenizer_settings_fixture.py): a stored `max_length` must not cut
/// the training data, a stored fixed padding must not fill it with pads,
/// and settings that crashed when applied (a 2e9-token padding, a stride
/// not shorter than max_length) load and encode as in Python.
#[test]
fn stored_truncation_and_padding_are_not_applied() {
    let fx = read_json(&fixture("tokenizer_settings.json"));
    let text = fx["text"].as_str().unwrap();
    for (name, case) in fx["cases"].as_object().unwrap() {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(data("pretrained/gpt2"))
            .unwrap()
            .flatten()
        {
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
        let path = dir.path().join("tokenizer.json");
        let mut tj = read_json(&path);
        for (k, v) in case["setting"].as_object().unwrap() {
            tj[k] = v.clone();
        }
        std::fs::write(&path, tj.to_string()).unwrap();
        let tok = AutoTokenizer::from_pretrained(dir.path().to_str().unwrap()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), want, "{name}: the text");
        let short: Vec<u32> = serde_json::from_value(case["short_input_ids"].clone()).unwrap();
        assert_eq!(tok.encode("Hi").unwrap(), short, "{name}: a short text");
    }
}
