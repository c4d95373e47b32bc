//! The ids-only path for byte-level BPE (`tokenizer/fast_ids.rs`) gives the
//! ids `tokenizers` gives (`Tokenizer::encode_fast`), document for document,
//! for GPT-2's tokenizer and for one trained here the chapter's way; other
//! pipelines and texts holding an added token go through `tokenizers`.
//! (`tests/tokenizer.rs` also checks `encode` against Python's ids.)

mod common;

use common::*;
use companion::data::corpus::read_files;
use companion::tokenizer::{self, AutoTokenizer, TrainArgs};

fn reference(tok: &AutoTokenizer, text: &str) -> Vec<u32> {
    tok.backend()
        .encode_fast(text, true)
        .unwrap()
        .get_ids()
        .to_vec()
}

fn edge_cases() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "   ",
        "\n\n\n",
        " \t\n x",
        "a  b   c    ",
        "it's they're we've I'm you'll he'd IT'S 'tis",
        "1234567890 3.14159 ٣٤٥ ½",
        "日本語のテキストです。事前学習、GPT-2。",
        "😀👍🏽 emoji 🇯🇵",
        "tab\tsep\r\nwindows\rold mac",
        "Ġ literal Ċ and \u{0}\u{7f}\u{a0} controls",
        "e\u{301} combining, ﬁ ligature",
        "<|endoftext|>",
        "before<|endoftext|>after",
        "<|endoftext",
        "<bos>text<eos><pad>",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("a".repeat(5000));
    v.push("ab ".repeat(3000));
    v.push("字".repeat(300));
    v
}

fn corpus() -> Vec<String> {
    let mut docs = read_files(&[&data("corpus/train.jsonl")], "text").unwrap();
    docs.extend(read_files(&[&data("corpus/validation.jsonl")], "text").unwrap());
    docs
}

fn check_same_ids(name: &str, tok: &AutoTokenizer, texts: &[String]) {
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            tok.encode(text).unwrap(),
            reference(tok, text),
            "{name}: text {i} ({:?}…)",
            &text[..text.char_indices().nth(40).map_or(text.len(), |(b, _)| b)]
        );
    }
}

#[test]
fn fast_ids_equal_tokenizers_on_the_corpus_and_edge_cases() {
    let gpt2 = AutoTokenizer::from_pretrained(data("pretrained/gpt2").to_str().unwrap()).unwrap();
    let docs = corpus();
    assert!(docs.len() > 400, "{} documents", docs.len());
    let args = TrainArgs {
        vocab_size: 2000,
        ..TrainArgs::default()
    };
    let ours = tokenizer::train(&args, docs[..60].iter()).unwrap();
    for (name, tok) in [("gpt2", &gpt2), ("trained bpe", &ours)] {
        assert!(tok.has_fast_ids(), "{name} should take the fast path");
        check_same_ids(name, tok, &edge_cases());
        check_same_ids(name, tok, &docs);
        // The per-thread cache is warm now: a second pass must agree too.
        check_same_ids(name, tok, &docs[..50]);
    }
}

#[test]
fn other_pipelines_keep_the_tokenizers_path() {
    let spm = tokenizer::from_sentencepiece_model(&fixture("spm_small.model")).unwrap();
    assert!(!spm.has_fast_ids());
    check_same_ids("sentencepiece", &spm, &edge_cases());
    // A prefix space, or a normalizer, changes what ByteLevel does: not ours.
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("pretrained/gpt2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    json["pre_tokenizer"]["add_prefix_space"] = true.into();
    let prefixed: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    let prefixed = AutoTokenizer::from_tokenizer(prefixed);
    assert!(!prefixed.has_fast_ids());
    check_same_ids("prefix space", &prefixed, &edge_cases());
}

#[test]
fn a_new_special_token_is_split_out_after_the_fast_path_was_built() {
    let mut tok =
        AutoTokenizer::from_pretrained(data("pretrained/gpt2").to_str().unwrap()).unwrap();
    let text = "x [PAD] y";
    let before = tok.encode(text).unwrap();
    tok.set_special_token(tokenizer::SpecialRole::Pad, "[PAD]")
        .unwrap();
    let pad = tok.pad_token_id().unwrap();
    let after = tok.encode(text).unwrap();
    assert_ne!(before, after);
    assert!(after.contains(&pad), "{after:?} lacks {pad}");
    assert_eq!(after, reference(&tok, text));
}
