"""4.3.2 トークナイザとモデルの準備."""
from common import DEP, code, listing, md, setup

NAME = "4.3.2_tokenizer_and_model.ipynb"
CELLS = [
    md("""
# 4.3.2 トークナイザとモデルの準備
*Tokenizers (GPT-2's and our own) and the model config.*

コーパスには Python 3.11 のドキュメント (約 7.5 MB, 444 文書, PSF ライセンス, `data/README.md` 参照) を使います。
各セルは表示した結果を、同じことを Python の `tokenizers` / `transformers` で行った結果
(`fixtures/chapter.json`, 作り方は `fixtures/make_notebook_fixtures.py`) と照合します。
"""),
    setup(),
    code(DEP),
    listing("学習済みトークナイザの利用", "GPT-2's pretrained tokenizer", """
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("gpt2")
text = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion."
tokenizer.tokenize(text)
"""),
    md("""
`AutoTokenizer::from_pretrained("gpt2")` はハブのキャッシュ (`HF_HOME`) かダウンロードから読みます。
ここではオフラインでも動くよう、リポジトリに同梱した GPT-2 のトークナイザ (ハブと同じファイル) を読みます。
*`from_pretrained("gpt2")` uses the Hugging Face cache or the hub; here we load the copy shipped in `data/`.*
"""),
    code("""
use companion::prelude::*;
let fx = notebook::Fixture::load("chapter")?;
let gpt2 = AutoTokenizer::from_pretrained("../data/pretrained/gpt2")?;
let text = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion.";
let gpt2_tokens = gpt2.tokenize(text)?;
check_eq!(gpt2_tokens, fx.at::<Vec<String>>("/gpt2/chapter/tokens")?, "GPT-2's tokens (Python transformers)");
check_eq!(gpt2.encode(text)?, fx.at::<Vec<u32>>("/gpt2/chapter/ids")?, "GPT-2's ids (Python transformers)");
check_eq!(gpt2_tokens[..2], ["ab", "stract"], "GPT-2 splits abstract");
gpt2_tokens
"""),
    listing("BPE トークナイザの学習", "Training a byte-level BPE tokenizer", """
from tokenizers import ByteLevelBPETokenizer

tokenizer = ByteLevelBPETokenizer()
tokenizer.train_from_iterator(dataset["text"], vocab_size=30000)
"""),
    md("""
特殊トークン `<bos>`, `<eos>`, `<pad>` は学習のあとで加えるので、その ID は学習した語彙の後ろ
(30000, 30001, 30002) になります。`min_frequency` は `train_from_iterator` の既定値 2 です。
*The three special tokens are added after training, so their ids follow the learned vocabulary.*
"""),
    code("""
let docs = corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
let bpe = tokenizer::train(&TrainArgs { kind: TokenizerKind::Bpe, vocab_size: 30000, ..TrainArgs::default() }, docs.iter())?;
println!("{} documents; vocabulary {} + special tokens = {}", docs.len(), bpe.vocab_size(), bpe.len());
println!("bos {:?} = {:?}, eos {:?} = {:?}, pad {:?} = {:?}", bpe.bos_token(), bpe.bos_token_id(),
         bpe.eos_token(), bpe.eos_token_id(), bpe.pad_token(), bpe.pad_token_id());
check_eq!(bpe.len(), fx.at::<usize>("/bpe30000/len")?, "len(tokenizer) (Python tokenizers)");
check_eq!((bpe.bos_token_id(), bpe.eos_token_id(), bpe.pad_token_id()), (Some(30000), Some(30001), Some(30002)), "special ids");
// The same training in Python tokenizers gives the same tokens and ids.
check_eq!(bpe.tokenize(text)?, fx.at::<Vec<String>>("/bpe30000/chapter/tokens")?, "our BPE's tokens (Python tokenizers)");
check_eq!(bpe.encode(text)?, fx.at::<Vec<u32>>("/bpe30000/chapter/ids")?, "our BPE's ids (Python tokenizers)");
"""),
    listing("SentencePiece トークナイザの学習", "Training a SentencePiece (unigram) tokenizer", """
import sentencepiece as spm
from transformers import PreTrainedTokenizerFast

spm.SentencePieceTrainer.Train(input=..., model_prefix=..., vocab_size=30000)
sp_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
""", notes="""
⚠ このリストは SentencePiece を学習したあと、定義されていない `tokenizer` を包んでいます
(学習した `sentencepiece.model` は使われません)。BPE のリストのあとで実行すると `tokenizer` は
バイトレベル BPE のままなので、包まれるのはその BPE です。書籍に印刷された出力の `Ġ` はそのためで、
SentencePiece なら空白は `▁` になります。学習したモデルは `spm.SentencePieceProcessor(model_file="sentencepiece.model")`
で使うか、`tokenizers` の `SentencePieceUnigramTokenizer` で学習して `PreTrainedTokenizerFast(tokenizer_object=...)` で包みます。
*The listing wraps an undefined `tokenizer`, and its printed output (with `Ġ`) cannot come from SentencePiece, which marks spaces with `▁`.*
"""),
    md("""
ここでは SentencePiece と同じユニグラムモデル (NFKC 正規化, 空白は `▁`) を、SentencePiece と同じく
1 行 1 文で学習します (`tokenizers` の `SentencePieceUnigramTokenizer` と同じ処理)。
*We train the same unigram model as `tokenizers`' `SentencePieceUnigramTokenizer`, one line per sentence.*
"""),
    code("""
let lines: Vec<String> = docs.iter().flat_map(|d| d.split('\\n')).filter(|l| !l.trim().is_empty()).map(String::from).collect();
let spm = tokenizer::train(&TrainArgs { kind: TokenizerKind::Unigram, vocab_size: 30000, ..TrainArgs::default() }, lines.iter())?;
println!("{} lines; vocabulary {} + special tokens = {}", lines.len(), spm.vocab_size(), spm.len());
check_eq!(spm.len(), fx.at::<usize>("/unigram30000/len")?, "len (Python SentencePieceUnigramTokenizer)");
check_eq!(spm.tokenize(text)?, fx.at::<Vec<String>>("/unigram30000/chapter/tokens")?, "unigram tokens (Python tokenizers)");
"""),
    listing("各トークナイザの出力", "The three tokenizers on the same text", """
print(tokenizer.tokenize(text))
print(bpe_tokenizer.tokenize(text))
print(sp_tokenizer.tokenize(text))
"""),
    md("""
GPT-2 は `abstract` を `ab` + `stract` に分けますが、このコーパスで学習した BPE では 1 トークンです。
逆に `conclusion` は GPT-2 では 1 トークン、私たちの BPE では `Ġcon` + `cl` + `usion` です。
BPE は学習コーパスで頻出する文字列ほど長いトークンにするので、語彙はコーパスを映します
(次のセルの出現回数を参照)。`Ġ` と `▁` は直前の空白を表します。
*Our BPE keeps `abstract` whole and GPT-2 splits it; for `conclusion` it is the other way round: a BPE vocabulary mirrors its corpus.*
"""),
    code("""
let table = notebook::compare_tokenizers(text, &[("gpt2", &gpt2), ("BPE (ours)", &bpe), ("unigram (ours)", &spm)])?;
check_eq!(table.rows[1].1[0], "abstract", "our BPE keeps abstract whole");
check_eq!(table.rows[0].1[..2], ["ab", "stract"], "GPT-2 splits it");
check!(table.rows[0].1.contains(&"Ġconclusion".to_string()), "GPT-2 has Ġconclusion");
check!(!table.rows[1].1.contains(&"Ġconclusion".to_string()), "our BPE splits conclusion");
table
"""),
    md("""
### コーパスでの出現回数
*How often each word occurs in the training corpus (substring counts, checked against Python's `str.count`):
the Python documentation says "abstract" (abstract base classes) often and "conclusion" never.*
"""),
    code("""
let mut rows = vec![vec!["word".to_string(), "occurrences in train.jsonl".into(), "gpt2".into(), "BPE (ours)".into()]];
for w in ["abstract", "introduction", "conclusion"] {
    let n: usize = docs.iter().map(|d| d.matches(w).count()).sum();
    check_eq!(n, fx.at::<usize>(&format!("/corpus_counts/{w}"))?, "occurrences of {w} (Python str.count)");
    let spaced = format!(" {w}");
    rows.push(vec![w.into(), n.to_string(), gpt2.tokenize(&spaced)?.join(" "), bpe.tokenize(&spaced)?.join(" ")]);
}
let table = notebook::Table(rows);
table
"""),
    md("""
### 日本語はバイトの断片になる
*Japanese text: byte-level BPE falls back to byte fragments.*

バイトレベル BPE は文字列を UTF-8 のバイト列として扱います。日本語の 1 文字は 3 バイトなので、
語彙にない文字はバイトの断片のトークンになります。英語の Python 文書だけで学習した私たちの BPE は
日本語を 1 バイトずつに、GPT-2 は一部のバイトの組をまとめます。どちらも復号すれば元の文に戻ります。
*Each token below is shown with the UTF-8 bytes it stands for; decoding the ids gives the text back.*
"""),
    code("""
let ja = "事前学習では、次のトークンを予測します。";
let mut rows = vec![vec!["tokenizer".to_string(), "tokens".into(), "count".into(), "bytes of the first tokens".into()]];
for (name, tok, key) in [("gpt2", &gpt2, "gpt2"), ("BPE (ours)", &bpe, "bpe30000")] {
    let toks = tok.tokenize(ja)?;
    check_eq!(toks, fx.at::<Vec<String>>(&format!("/{key}/japanese/tokens"))?, "{name} on Japanese (Python)");
    check_eq!(tok.decode(&tok.encode(ja)?, false)?, ja, "{name} decodes back to the text");
    let bytes: Vec<String> = toks.iter().take(4)
        .map(|t| tokenizer::token_bytes(t).unwrap().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(" "))
        .collect();
    rows.push(vec![name.into(), toks.join(" "), toks.len().to_string(), bytes.join(" | ")]);
}
println!("「事」 in UTF-8: {:02X?}", "事".as_bytes());
let table = notebook::Table(rows);
table
"""),
    md("""
### `Ġ` と `Ċ` はどこから来るか
*Where `Ġ` and `Ċ` come from: GPT-2's byte → character table.*

バイトレベル BPE は 256 通りのバイトそれぞれを**目に見える 1 文字**に置き換えてから BPE を学習します。
語彙 (`vocab.json`) と結合規則 (`merges.txt`, 1 行に空白区切りの 2 トークン) はテキストとして保存され、
BPE の処理も文字列の上で行うので、空白・改行・制御文字のバイトがそのまま入ると、区切りの空白と区別できず、
表示もできないためです。表示できる 188 個のバイトはその文字のまま、残りの 68 個 (制御文字、空白など) には
U+0100 以降の文字を順に割り当てます。空白 0x20 は `Ġ` (U+0120)、改行 0x0A は `Ċ` (U+010A) になります。
*Every byte gets a visible, non-whitespace character so that vocabularies and merges are plain text: the 188 printable
bytes stand for themselves, the other 68 take U+0100 onwards; space becomes `Ġ`, newline `Ċ`.*
"""),
    code("""
let table = tokenizer::bytes_to_unicode();
let mut rows = vec![vec!["byte".to_string(), "as text".into(), "character".into(), "code point".into()]];
for b in [0x20u8, 0x0A, 0x09, 0x41, 0xE4] {
    let c = table[b as usize];
    check_eq!(c.to_string(), fx.at::<String>(&format!("/gpt2/byte_to_char/{b}"))?, "byte {b:#04X} (Python bytes_to_unicode)");
    rows.push(vec![format!("{b:#04X}"), format!("{:?}", b as char), c.to_string(), format!("U+{:04X}", c as u32)]);
}
check_eq!(gpt2.tokenize(" \\n")?, ["Ġ", "Ċ"], "a space and a newline");
let table = notebook::Table(rows);
table
"""),
    listing("トークナイザの保存", "Saving the tokenizer", """
tokenizer.save_pretrained("tokenizer")
"""),
    md("""
`transformers` の形式 (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) で保存するので、
Python の `AutoTokenizer.from_pretrained("tokenizer")` でそのまま読めます。読み直して同じトークンになることを確かめます。
*Saved in transformers' format; reloading gives the same tokens.*
"""),
    code("""
bpe.save_pretrained(Path::new("tokenizer"))?;
spm.save_pretrained(Path::new("tokenizer-spm"))?;
let reloaded = AutoTokenizer::from_pretrained("tokenizer")?;
check_eq!(reloaded.tokenize(text)?, bpe.tokenize(text)?, "the reloaded tokenizer's tokens");
check_eq!(reloaded.pad_token(), Some("<pad>"), "the pad token survives the save");
let mut files: Vec<String> = std::fs::read_dir("tokenizer")?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
files.sort();
files
"""),
    listing("定義済みの GPT-2 Config を利用する", "Starting from GPT-2's config", """
from transformers import AutoConfig

config = AutoConfig.from_pretrained(
    "gpt2",
    vocab_size=len(transformer_tokenizer),
    n_ctx=512,　# …
    bos_token_id=transformer_tokenizer.bos_token_id,
    eos_token_id=transformer_tokenizer.eos_token_id,
)
""", notes="""
⚠ `transformer_tokenizer` はどこにも定義されていません (`NameError`)。上で学習・保存したトークナイザ
(`PreTrainedTokenizerFast(tokenizer_object=tokenizer, ...)` で包んだもの) を使います。
⚠ `n_ctx=512,` の後ろの空白は全角スペース (U+3000) で、このままでは
`SyntaxError: invalid non-printable character U+3000` になります。
⚠ `n_ctx` は記録されるだけで、位置埋め込みの大きさ (入力できる長さ) は `n_positions` (1024) のままです。
*`transformer_tokenizer` is undefined; the space after `n_ctx=512,` is U+3000 (a SyntaxError); `n_ctx` is stored only.*
"""),
    code("""
let config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(bpe.len()),
    n_ctx: Some(512), // コンテキスト長 (記録されるだけ)
    bos_token_id: bpe.bos_token_id(),
    eos_token_id: bpe.eos_token_id(),
    ..Default::default()
})?;
let want: companion::serde_json::Map<String, companion::serde_json::Value> = fx.at("/config/fields")?;
let got = config.to_value();
for (k, v) in &want {
    check_eq!(got[k], *v, "config.{k} (Python AutoConfig)");
}
println!("{config}");
"""),
    listing("Config の中身", "The config, field by field, and the model it builds", """
print(config)
model = GPT2LMHeadModel(config)
"""),
    md("""
書籍の出力では `vocab_size` が 30004 と印刷されていますが、30000 語彙 + 特殊トークン 3 個の `len(tokenizer)` は
30003 です (Python でも同じ)。黄色の 4 行が、リストで指定した項目です。
*The book prints `vocab_size: 30004`; 30000 learned tokens + 3 specials give 30003 (in Python too). The four fields
the listing sets are highlighted.*
"""),
    code("""
notebook::ConfigTable::new(config.clone()).highlight(&["vocab_size", "n_ctx", "bos_token_id", "eos_token_id"])
"""),
    code("""
let n = config.num_parameters();
println!("GPT2LMHeadModel(config): {} parameters ({:.1}M)", n, n as f64 / 1e6);
println!("the gpt2 preset (vocabulary 50257): {} parameters", GPT2Config::preset("gpt2").unwrap().num_parameters());
check_eq!(n, fx.at::<usize>("/config/num_parameters")?, "GPT2LMHeadModel(config).num_parameters() in transformers");
"""),
]
