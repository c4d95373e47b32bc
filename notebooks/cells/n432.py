"""4.3.2 トークナイザとモデルの準備."""
from common import DEP, code, listing, md, setup

NAME = "4.3.2_tokenizer_and_model.ipynb"
CELLS = [
    md("""
# 4.3.2 Hugging Face Transformers
*Hugging Face Transformers: GPT-2's tokenizer, training our own, and building GPT2LMHeadModel from a config.*

大規模言語モデルに要るのはトークナイザとモデル本体の 2 つです。このノートブックでは、書籍と同じく学習済みの
GPT-2 のトークナイザを読み、コーパスからバイトレベル BPE のトークナイザ (と SentencePiece と同じユニグラムの
トークナイザ) を学習して比べ、保存し、GPT-2 の Config からモデルを作ります。
コーパスには Python 3.11 のドキュメント (約 7.5 MB, 444 文書, PSF ライセンス, `data/README.md` 参照) を使います
(書籍は 4.1 節で作ったコーパス)。各セルは表示した結果を、同じことを Python の `tokenizers` / `transformers` で
行った結果 (`fixtures/chapter.json`, 作り方は `fixtures/make_notebook_fixtures.py`) や書籍に印刷された出力と照合します。
*The two things an LLM needs: a tokenizer and the model. We load GPT-2's tokenizer, train byte-level BPE (and a unigram
model like SentencePiece) on our corpus (the Python 3.11 documentation; the book uses 4.1's corpus), save it, and build the
model from GPT-2's config; each cell checks what it shows against Python's libraries or the book's printed output.*
"""),
    setup(),
    code(DEP),
    listing("学習済みトークナイザの利用", "GPT-2's pretrained tokenizer", """
from transformers import AutoTokenizer

# 学習済みトークナイザの読み込み
gpt2_tokenizer = AutoTokenizer.from_pretrained("gpt2")
"""),
    md("""
`AutoTokenizer::from_pretrained("gpt2")` はハブのキャッシュ (`HF_HOME`) かダウンロードから読みます。
ここではオフラインでも動くよう、リポジトリに同梱した GPT-2 のトークナイザ (ハブと同じファイル) を読みます。
*`from_pretrained("gpt2")` uses the Hugging Face cache or the hub; here we load the copy shipped in `data/`.*
"""),
    code("""
use companion::prelude::*;
let fx = notebook::Fixture::load("chapter")?;
let gpt2_tokenizer = AutoTokenizer::from_pretrained("../data/pretrained/gpt2")?;
let example = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion.";
let gpt2_tokens = gpt2_tokenizer.tokenize(example)?;
check_eq!(gpt2_tokens, fx.at::<Vec<String>>("/gpt2/chapter/tokens")?, "GPT-2's tokens (Python transformers)");
check_eq!(gpt2_tokenizer.encode(example)?, fx.at::<Vec<u32>>("/gpt2/chapter/ids")?, "GPT-2's ids (Python transformers)");
check_eq!(gpt2_tokens[..2], ["ab", "stract"], "GPT-2 splits abstract");
gpt2_tokens
"""),
    listing("BPE トークナイザの学習", "Training a byte-level BPE tokenizer", """
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

# dataset: 4.1 節の前処理済みコーパス (datasets.Dataset, "text" 列)
tokenizer = ByteLevelBPETokenizer()
tokenizer.train_from_iterator(
    dataset["text"],  # コーパスを指定
    vocab_size=30_000,  # 語彙数を指定
)
my_tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
)
"""),
    md("""
`PreTrainedTokenizerFast(tokenizer_object=...)` に渡すと、`transformers` の API (`tokenize`, `save_pretrained`,
`DataCollatorForLanguageModeling` など) から使えるトークナイザになります。特殊トークン `<bos>`, `<eos>`, `<pad>` (文の始まり・終わり・パディング) はこのとき語彙に加わるので、その ID は
学習した語彙の後ろ (30000, 30001, 30002) になります。元の GPT-2 は区切りに `<|endoftext|>` 1 つだけを使います。
`min_frequency` は `train_from_iterator` の既定値 2 です。
*`PreTrainedTokenizerFast` wraps the tokenizer for transformers and adds `<bos>`, `<eos>`, `<pad>` after the learned
vocabulary (ids 30000–30002); GPT-2 itself has only `<|endoftext|>`.*
"""),
    code("""
let docs = corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
let my_tokenizer = tokenizer::train(&TrainArgs { kind: TokenizerKind::Bpe, vocab_size: 30000, ..TrainArgs::default() }, docs.iter())?;
println!("{} documents; vocabulary {} + special tokens = {}", docs.len(), my_tokenizer.vocab_size(), my_tokenizer.len());
println!("bos {:?} = {:?}, eos {:?} = {:?}, pad {:?} = {:?}", my_tokenizer.bos_token(), my_tokenizer.bos_token_id(),
         my_tokenizer.eos_token(), my_tokenizer.eos_token_id(), my_tokenizer.pad_token(), my_tokenizer.pad_token_id());
check_eq!(my_tokenizer.len(), fx.at::<usize>("/bpe30000/len")?, "len(tokenizer) (Python tokenizers)");
check_eq!((my_tokenizer.bos_token_id(), my_tokenizer.eos_token_id(), my_tokenizer.pad_token_id()), (Some(30000), Some(30001), Some(30002)), "special ids");
// The same training in Python tokenizers gives the same tokens and ids.
check_eq!(my_tokenizer.tokenize(example)?, fx.at::<Vec<String>>("/bpe30000/chapter/tokens")?, "our BPE's tokens (Python tokenizers)");
check_eq!(my_tokenizer.encode(example)?, fx.at::<Vec<u32>>("/bpe30000/chapter/ids")?, "our BPE's ids (Python tokenizers)");
"""),
    listing("SentencePiece トークナイザの学習", "Training a SentencePiece (unigram) tokenizer", """
import sentencepiece as spm
from tokenizers import SentencePieceUnigramTokenizer  # ⚠ 書籍にはない行
from transformers import PreTrainedTokenizerFast

# SentencePieceモデルの学習 (corpus.txt: 1 行 1 文のコーパス)
spm.SentencePieceTrainer.Train(
    input="corpus.txt",  # コーパスファイルを指定
    model_prefix="spm",  # 出力ファイル名を指定 (spm.model, spm.vocab)
    vocab_size=30000,    # 語彙数を指定
)

tokenizer = SentencePieceUnigramTokenizer.from_spm("spm.model")  # ⚠ 書籍にはない行
my_tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
)
""", notes="""
書籍のリストの名前と値に、⚠ の 2 行を足したものです。書籍のリストは SentencePiece を学習したあと、このリストでは
定義していない `tokenizer` を包みます (学習した `spm.model` は使われません)。BPE のリストのあとで実行すると
`tokenizer` はバイトレベル BPE のままなので、包まれるのはその BPE です。書籍の出力に `Ġ` が出るのはそのためで、
SentencePiece なら空白は `▁` になります。学習したモデルは `SentencePieceUnigramTokenizer.from_spm("spm.model")`
で読んで包むか、`spm.SentencePieceProcessor(model_file="spm.model")` でそのまま使います。
*The listing wraps `tokenizer`, which it never defines (the BPE, if run after that listing): its printed output, with `Ġ`,
cannot come from SentencePiece, which marks spaces with `▁`. The ⚠ line loads `spm.model` instead.*
"""),
    md("""
ここでは SentencePiece と同じユニグラムモデル (NFKC 正規化, 空白は `▁`) を、SentencePiece と同じく
1 行 1 文で学習します (`tokenizers` の `SentencePieceUnigramTokenizer` と同じ処理)。
*We train the same unigram model as `tokenizers`' `SentencePieceUnigramTokenizer`, one line per sentence.*
"""),
    code("""
let lines: Vec<String> = docs.iter().flat_map(|d| d.split('\\n')).filter(|l| !l.trim().is_empty()).map(String::from).collect();
let sp_tokenizer = tokenizer::train(&TrainArgs { kind: TokenizerKind::Unigram, vocab_size: 30000, ..TrainArgs::default() }, lines.iter())?;
println!("{} lines; vocabulary {} + special tokens = {}", lines.len(), sp_tokenizer.vocab_size(), sp_tokenizer.len());
check_eq!(sp_tokenizer.len(), fx.at::<usize>("/unigram30000/len")?, "len (Python SentencePieceUnigramTokenizer)");
check_eq!(sp_tokenizer.tokenize(example)?, fx.at::<Vec<String>>("/unigram30000/chapter/tokens")?, "unigram tokens (Python tokenizers)");
"""),
    listing("各トークナイザの出力", "The tokenizers' output on the same text", """
example = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion."
print(gpt2_tokenizer.tokenize(example))
# ['ab', 'stract', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġexample', 'Ġof', 'Ġtext', '.', 'Ġintroduction', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġintroduction', '.', 'Ġconclusion', ':', 'ĠThis', 'Ġis', 'Ġa', 'Ġconclusion', '.']
print(my_tokenizer.tokenize(example))
# ['abstract', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġexample', 'Ġof', 'Ġtext', '.', 'Ġintroduction', ':', 'ĠThis', 'Ġis', 'Ġan', 'Ġintroduction', '.', 'Ġconclusion', ':', 'ĠThis', 'Ġis', 'Ġa', 'Ġconclusion', '.']
"""),
    md("""
GPT-2 のトークナイザの出力は書籍に印刷されたものと一致します (下のセルで照合)。書籍と同じく、GPT-2 は `abstract` を
`ab` + `stract` に分け、コーパスで学習した BPE では 1 トークンです。違うのは `conclusion` で、書籍のコーパス
(4.1 節, 論文の文章) では頻出なので 1 トークンですが、Python のドキュメントには一度も出てこないので、私たちの BPE では
`Ġcon` + `cl` + `usion` です。BPE は学習コーパスで頻出する文字列ほど長いトークンにするので、語彙はコーパスを映します
(次のセルの出現回数を参照)。`Ġ` と `▁` は直前の空白を表します。
*GPT-2's tokens equal the book's printed ones. As in the book, our BPE keeps `abstract` whole; unlike the book's,
it splits `conclusion`, which our corpus (the Python docs) never contains: a BPE vocabulary mirrors its corpus.*
"""),
    code("""
// 書籍に印刷された 2 つの出力
let book_gpt2 = ["ab", "stract", ":", "ĠThis", "Ġis", "Ġan", "Ġexample", "Ġof", "Ġtext", ".", "Ġintroduction", ":", "ĠThis", "Ġis", "Ġan", "Ġintroduction", ".", "Ġconclusion", ":", "ĠThis", "Ġis", "Ġa", "Ġconclusion", "."];
let book_mine: Vec<&str> = book_gpt2[2..].iter().copied().collect::<Vec<_>>();
let book_mine = [&["abstract"][..], &book_mine[..]].concat();
check_eq!(gpt2_tokenizer.tokenize(example)?, book_gpt2, "GPT-2's tokens as the book prints them");
let ours = my_tokenizer.tokenize(example)?;
let as_book = ours.join(" ").replace("Ġcon cl usion", "Ġconclusion");
check_eq!(as_book, book_mine.join(" "), "our BPE's tokens are the book's except for conclusion");
let table = notebook::compare_tokenizers(example, &[("gpt2", &gpt2_tokenizer), ("BPE (ours)", &my_tokenizer), ("unigram (ours)", &sp_tokenizer)])?;
check_eq!(table.rows[1].1[0], "abstract", "our BPE keeps abstract whole");
check_eq!(table.rows[0].1[..2], ["ab", "stract"], "GPT-2 splits it");
check!(table.rows[0].1.contains(&"Ġconclusion".to_string()), "GPT-2 has Ġconclusion");
check!(!table.rows[1].1.contains(&"Ġconclusion".to_string()), "our BPE splits conclusion");
table
"""),
    md("""
### コーパスでの出現回数
3 つの語が学習コーパスに何回現れるか (部分文字列として数え、Python の `str.count` と照合) と、それぞれの
トークナイザでの分かれ方です。Python のドキュメントには "abstract" (抽象基底クラス) がよく出てきて、"conclusion" は一度も出てきません。
*How often each word occurs in the training corpus (substring counts, checked against Python's `str.count`):
the Python documentation says "abstract" (abstract base classes) often and "conclusion" never.*
"""),
    code("""
let mut rows = vec![vec!["word".to_string(), "occurrences in train.jsonl".into(), "gpt2".into(), "BPE (ours)".into()]];
for w in ["abstract", "introduction", "conclusion"] {
    let n: usize = docs.iter().map(|d| d.matches(w).count()).sum();
    check_eq!(n, fx.at::<usize>(&format!("/corpus_counts/{w}"))?, "occurrences of {w} (Python str.count)");
    let spaced = format!(" {w}");
    rows.push(vec![w.into(), n.to_string(), gpt2_tokenizer.tokenize(&spaced)?.join(" "), my_tokenizer.tokenize(&spaced)?.join(" ")]);
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
for (name, tok, key) in [("gpt2", &gpt2_tokenizer, "gpt2"), ("BPE (ours)", &my_tokenizer, "bpe30000")] {
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
check_eq!(gpt2_tokenizer.tokenize(" \\n")?, ["Ġ", "Ċ"], "a space and a newline");
let table = notebook::Table(rows);
table
"""),
    listing("トークナイザの保存", "Saving the tokenizer", """
my_tokenizer.save_pretrained("tokenizer")
"""),
    md("""
`transformers` の形式 (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) で保存するので、
Python の `AutoTokenizer.from_pretrained("tokenizer")` でそのまま読めます。読み直して同じトークンになることを確かめます。
*Saved in transformers' format; reloading gives the same tokens.*
"""),
    code("""
my_tokenizer.save_pretrained(Path::new("tokenizer"))?;
sp_tokenizer.save_pretrained(Path::new("tokenizer-spm"))?;
let reloaded = AutoTokenizer::from_pretrained("tokenizer")?;
check_eq!(reloaded.tokenize(example)?, my_tokenizer.tokenize(example)?, "the reloaded tokenizer's tokens");
check_eq!(reloaded.pad_token(), Some("<pad>"), "the pad token survives the save");
let mut files: Vec<String> = std::fs::read_dir("tokenizer")?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
files.sort();
files
"""),
    listing("定義済みの GPT-2 Config を利用する", "Starting from GPT-2's config", """
from transformers import GPT2LMHeadModel, AutoConfig, AutoTokenizer

# トークナイザの読み込み
tokenizer = AutoTokenizer.from_pretrained("tokenizer")

config = AutoConfig.from_pretrained(
    "gpt2",
    vocab_size=len(tokenizer),
    n_ctx=512,  # 最大の入力トークン長 (⚠ 書籍はこの前の空白が全角)
    bos_token_id=tokenizer.bos_token_id,  # ⚠ 書籍: transformer_tokenizer.bos_token_id
    eos_token_id=tokenizer.eos_token_id,  # ⚠ 書籍: transformer_tokenizer.eos_token_id
)
model = GPT2LMHeadModel(config)
""", notes="""
書籍のリストの名前と値で、⚠ の 3 か所を直したものです。書籍のままでは:
- ⚠ `transformer_tokenizer` はどこにも定義されていません (`NameError`)。リスト自身が直前で読んだ `tokenizer` を使います。
- ⚠ `n_ctx=512,` の後ろの空白は全角スペース (U+3000) で、`SyntaxError: invalid non-printable character U+3000` になります。
- `n_ctx` は記録されるだけで、位置埋め込みの大きさ (入力できる長さ) は `n_positions` (1024) のままです。
*`transformer_tokenizer` is undefined (use the listing's own `tokenizer`); the space after `n_ctx=512,` is U+3000 (a
SyntaxError); `n_ctx` is only stored: `n_positions` sets the length.*
"""),
    code("""
let tokenizer = AutoTokenizer::from_pretrained("tokenizer")?;
let config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(tokenizer.len()),
    n_ctx: Some(512), // 最大の入力トークン長 (記録されるだけ)
    bos_token_id: tokenizer.bos_token_id(),
    eos_token_id: tokenizer.eos_token_id(),
    ..Default::default()
})?;
let model = GPT2LMHeadModel::new(&config, 42, &Device::Cpu)?;
let want: companion::serde_json::Map<String, companion::serde_json::Value> = fx.at("/config/fields")?;
let got = config.to_value();
for (k, v) in &want {
    check_eq!(got[k], *v, "config.{k} (Python AutoConfig)");
}
// 書籍に印刷された print(config) の値 (vocab_size の 30004 を除く: 下の説明)
let book = json!({"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 30000, "embd_pdrop": 0.1, "eos_token_id": 30001, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 512, "n_embd": 768, "n_head": 12, "n_inner": null,
    "n_layer": 12, "n_positions": 1024, "reorder_and_upcast_attn": false, "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": false, "scale_attn_weights": true, "summary_activation": null,
    "summary_first_dropout": 0.1, "use_cache": true});
for (k, v) in book.as_object().unwrap() {
    check_eq!(got[k], *v, "config.{k} as the book prints it");
}
println!("{} fields equal the book's printed config; vocab_size {} (the book prints 30004)", book.as_object().unwrap().len(), config.vocab_size);
"""),
    listing("Config の中身", "The config, field by field", """
print(config)
"""),
    md("""
Config はモデルの形を決める値の集まりです: 層の数 (`n_layer`)、幅 (`n_embd`)、ヘッド数 (`n_head`)、
活性化関数 (`activation_function`)、どのクラス用か (`architectures`) など。`GPT2LMHeadModel(config)` はこれを
読んで層を作ります (第 2 章ではこうした値を 1 つずつ引数で渡しました)。
書籍の出力では `vocab_size` が 30004 と印刷されていますが、30000 語彙 + 特殊トークン 3 個の `len(tokenizer)` は
30003 です (Python でも同じ)。太字の 4 行が、リストで指定した項目です。transformers 5.24 の `print(config)` には
書籍の出力にある `"_name_or_path"` は出ません。
*The config holds the architecture, activation, embedding width, head count, …; the model is built from it, as chapter 2
passed hyperparameters one by one. The book prints `vocab_size: 30004`; 30000 learned tokens + 3 specials give 30003 (in
Python too). The four fields the listing sets are in bold.*
"""),
    code("""
notebook::ConfigTable::new(config.clone()).highlight(&["vocab_size", "n_ctx", "bos_token_id", "eos_token_id"])
"""),
    code("""
let n = model.num_parameters();
println!("GPT2LMHeadModel(config): {} parameters ({:.1}M)", n, n as f64 / 1e6);
check_eq!(n, config.num_parameters(), "the model has the parameters its config describes");
println!("the gpt2 preset (vocabulary 50257): {} parameters", GPT2Config::preset("gpt2").unwrap().num_parameters());
check_eq!(n, fx.at::<usize>("/config/num_parameters")?, "GPT2LMHeadModel(config).num_parameters() in transformers");
"""),
]
