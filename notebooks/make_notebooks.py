#!/usr/bin/env python3
"""Writes the notebooks of section 4.3 from the cells below (the source of
truth), without outputs. Run the notebooks afterwards to store real outputs:

    python3 notebooks/make_notebooks.py
    cd notebooks && for nb in 4.3.*.ipynb; do
        jupyter nbconvert --to notebook --execute --inplace "$nb"; done

Each Rust cell follows the chapter's listing, which is shown before it as a
Python reference block.
"""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent
DEP = ':dep companion = { path = "../companion", default-features = false, features = ["fancy-regex"] }'


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    c = nbf.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = tags
    return c


def listing(title, english, python):
    return md(f"### {title}\n*{english}*\n\n書籍のリスト (Python):\n```python\n{python.strip()}\n```")


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "rust", "display_name": "Rust", "language": "rust"}
    nb.metadata["language_info"] = {"name": "Rust", "file_extension": ".rs", "mimetype": "text/rust"}
    nb.cells = cells
    nbf.write(nb, HERE / name)


SETUP = md("""
このノートブックは Rust カーネル (evcxr) で動きます。最初のセルは `companion` クレートを読み込みます
(初回はビルドに数分かかります)。正規表現エンジンには純 Rust の fancy-regex を使います
(evcxr ではセルごとに別の共有ライブラリになるため、Oniguruma が使えません)。
*Runs on the evcxr Rust kernel; the first cell builds the `companion` crate (a few minutes the first time),
with the pure-Rust regex engine (Oniguruma breaks across evcxr cells).*
""")

# ---------------------------------------------------------------- 4.3.1
write("4.3.1_pretraining.ipynb", [
    md("""
# 4.3.1 事前学習とは
*What pretraining is: learning to predict the next token.*

事前学習では、大量のテキストで「次のトークンを予測する」ことを学習します。損失は、正解の次トークンに
モデルが与えた確率の負の対数 (交差エントロピー) の平均です。学習前のランダムなモデルでは、どのトークンも
ほぼ同じ確率なので、損失は語彙サイズの対数 ln(50257) ≈ 10.8 に近くなります。
"""),
    SETUP,
    code(DEP),
    code("""
use companion::{AutoTokenizer, GPT2Config, GPT2LMHeadModel};
use companion::candle_core::{DType, Device, Tensor};

let tokenizer = AutoTokenizer::from_pretrained("../data/pretrained/gpt2")?;
let text = "Pretraining teaches a language model to predict the next token.";
let ids = tokenizer.encode(text)?;
let tokens = tokenizer.tokenize(text)?;
tokens
"""),
    md("""
### 小さな GPT-2 を作る
*A small, randomly initialised GPT-2 (2 layers, 64 wide) with GPT-2's vocabulary.*
"""),
    code("""
let config = GPT2Config { n_layer: 2, n_embd: 64, n_head: 2, ..GPT2Config::default() };
let model = GPT2LMHeadModel::new(&config, 0, &Device::Cpu)?;
let input = Tensor::new(vec![ids.clone()], &Device::Cpu)?;
let logits = model.forward(&input, None, None)?;
println!("logits: {:?} (batch, positions, vocabulary)", logits.dims());
println!("parameters: {}", model.num_parameters());
"""),
    md("""
### 各位置で次のトークンを予測する
*Each position predicts the next token; the loss is −log p of the true one.*
"""),
    code("""
let logp = companion::candle_nn::ops::log_softmax(&logits.squeeze(0)?, 1)?.to_vec2::<f32>()?;
for i in 0..ids.len() - 1 {
    println!("{:>12} → {:<12} -log p = {:.3}", tokens[i], tokens[i + 1], -logp[i][ids[i + 1] as usize]);
}
let labels = input.to_dtype(DType::I64)?;
let loss: f32 = model.forward_with_labels(&input, None, &labels)?.loss.unwrap().to_scalar()?;
println!("mean loss {:.3}, ln(vocab) = {:.3}", loss, (config.vocab_size as f64).ln());
"""),
])

# ---------------------------------------------------------------- 4.3.2
write("4.3.2_tokenizer_and_model.ipynb", [
    md("""
# 4.3.2 トークナイザとモデルの準備
*Tokenizers (GPT-2's and our own) and the model config.*

コーパスには Python 3.11 のドキュメント (約 7.5 MB, PSF ライセンス, `data/README.md` 参照) を使います。
"""),
    SETUP,
    code(DEP),
    listing("学習済みトークナイザの利用", "GPT-2's pretrained tokenizer", """
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("gpt2")
text = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion."
tokenizer.tokenize(text)
"""),
    md("""
`AutoTokenizer::from_pretrained("gpt2")` はハブのキャッシュ (`HF_HOME`) かダウンロードから読みます。
ここではオフラインでも動くよう、リポジトリに同梱した GPT-2 のトークナイザを読みます。
*`from_pretrained("gpt2")` uses the Hugging Face cache or the hub; here we load the copy shipped in `data/`.*
"""),
    code("""
use companion::tokenizer::{self, AutoTokenizer, TokenizerKind, TrainArgs};
let gpt2 = AutoTokenizer::from_pretrained("../data/pretrained/gpt2")?;
let text = "abstract: This is an example of text. introduction: This is an introduction. conclusion: This is a conclusion.";
gpt2.tokenize(text)?
"""),
    listing("BPE トークナイザの学習", "Training a byte-level BPE tokenizer", """
from tokenizers import ByteLevelBPETokenizer
tokenizer = ByteLevelBPETokenizer()
tokenizer.train_from_iterator(dataset["text"], vocab_size=30000, special_tokens=[...])
"""),
    code("""
let docs = companion::corpus::read_file(std::path::Path::new("../data/corpus/train.jsonl"), "text")?;
let bpe = tokenizer::train(&TrainArgs { kind: TokenizerKind::Bpe, vocab_size: 30000, ..TrainArgs::default() }, docs.iter())?;
println!("{} documents; vocabulary {} + special tokens = {}", docs.len(), bpe.vocab_size(), bpe.len());
println!("bos {:?} = {:?}, eos {:?} = {:?}, pad {:?} = {:?}", bpe.bos_token(), bpe.bos_token_id(),
         bpe.eos_token(), bpe.eos_token_id(), bpe.pad_token(), bpe.pad_token_id());
"""),
    listing("SentencePiece トークナイザの学習", "Training a SentencePiece (unigram) tokenizer", """
import sentencepiece as spm
spm.SentencePieceTrainer.Train(input="corpus.txt", model_prefix="sentencepiece", vocab_size=30000)
# 書籍のリストは未定義の tokenizer を渡しています (errata 参照)
"""),
    md("""
書籍のリストは定義されていない `tokenizer` を参照しているため、そのままでは動きません。
SentencePiece の学習は `input` (1 行 1 文のファイル) と `vocab_size` を渡すのが正しい形です。
ここでは SentencePiece と同じユニグラムモデル (NFKC 正規化, `▁` 記号) を学習します。
*The printed listing passes an undefined `tokenizer`; we train the same unigram model here.*
"""),
    code("""
let lines: Vec<String> = docs.iter().flat_map(|d| d.lines()).filter(|l| !l.trim().is_empty()).map(String::from).collect();
let spm = tokenizer::train(&TrainArgs { kind: TokenizerKind::Unigram, vocab_size: 30000, ..TrainArgs::default() }, lines.iter())?;
println!("{} lines; vocabulary {} + special tokens = {}", lines.len(), spm.vocab_size(), spm.len());
"""),
    listing("各トークナイザの出力", "The three tokenizers on the same text", """
print(gpt2_tokenizer.tokenize(text))
print(bpe_tokenizer.tokenize(text))
print(sp_tokenizer.tokenize(text))
"""),
    md("""
GPT-2 は "abstract" を `ab` + `stract` に分けますが、このコーパスで学習したトークナイザでは
頻出する単語が 1 トークンになります (`Ġ` と `▁` は直前の空白を表します)。
*Words frequent in our corpus become single tokens; GPT-2 splits them.*
"""),
    code("""
companion::display::compare_tokenizers(text, &[("gpt2", &gpt2), ("BPE (ours)", &bpe), ("unigram (ours)", &spm)])?
"""),
    listing("トークナイザの保存", "Saving the tokenizer", """
tokenizer.save_pretrained("tokenizer")
"""),
    code("""
bpe.save_pretrained(std::path::Path::new("tokenizer"))?;
spm.save_pretrained(std::path::Path::new("tokenizer-spm"))?;
let mut files: Vec<String> = std::fs::read_dir("tokenizer")?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
files.sort();
files
"""),
    listing("定義済みの GPT-2 Config を利用する", "Starting from GPT-2's config", """
from transformers import AutoConfig
config = AutoConfig.from_pretrained("gpt2", vocab_size=len(tokenizer), n_ctx=512,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
# 書籍では transformer_tokenizer という未定義の名前が使われています (errata 参照)
"""),
    code("""
use companion::config::{ConfigOverrides, GPT2Config};
let config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(bpe.len()), n_ctx: Some(512),
    bos_token_id: bpe.bos_token_id(), eos_token_id: bpe.eos_token_id(), ..Default::default() })?;
println!("{config}");
"""),
    md("""
`n_ctx=512` は設定に記録されるだけで、位置埋め込みの大きさは `n_positions` (1024) のままです
(transformers と同じ挙動)。文脈長を変えるには `n_positions` を指定します。
*As in transformers, `n_ctx` is only stored; `n_positions` sizes the model.*
"""),
    listing("Config の中身", "The config, field by field, and the model it builds", """
print(config)
model = GPT2LMHeadModel(config)
"""),
    code("""
companion::display::ConfigTable(config.clone())
"""),
    code("""
println!("GPT2LMHeadModel(config): {} parameters ({:.1}M)", config.num_parameters(), config.num_parameters() as f64 / 1e6);
println!("the gpt2 preset: {} parameters", GPT2Config::preset("gpt2").unwrap().num_parameters());
"""),
])

# ---------------------------------------------------------------- 4.3.3
write("4.3.3_distributed.ipynb", [
    md("""
# 4.3.3 分散並列学習のためのライブラリ
*Libraries for distributed training: what ZeRO saves.*

Megatron-LM, DeepSpeed, Megatron-DeepSpeed, GPT-NeoX は、データ並列・テンソル並列・パイプライン並列を
組み合わせて大きなモデルを多数の GPU で学習します。DeepSpeed の ZeRO は、データ並列の各 GPU が
重複して持っていたモデルの状態 (パラメータ、勾配、オプティマイザの状態) を GPU 間で分割します。
"""),
    SETUP,
    code(DEP),
    md("""
### ZeRO の各ステージで 1 GPU が持つメモリ
*Model-state memory per GPU (ZeRO paper, mixed-precision Adam: 2 + 2 + 12 bytes per parameter).*

ステージ 1 はオプティマイザの状態、ステージ 2 はさらに勾配、ステージ 3 はパラメータも分割します。
"""),
    code("""
let gpt2 = companion::GPT2Config::preset("gpt2").unwrap();
let params = gpt2.num_parameters() as f64;
println!("gpt2: {} parameters", gpt2.num_parameters());
companion::dist::paper_table(params, &[1, 2, 4, 8, 64])
"""),
    md("""
### 論文の例: 7.5B パラメータを 64 GPU で
*The ZeRO paper's example: 7.5B parameters on 64 GPUs → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.*
"""),
    code("""
companion::dist::paper_table(7.5e9, &[64])
"""),
    md("""
### オフロードを使う場合: DeepSpeed の見積もり関数
*With CPU offload: what DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_live` print for gpt2 on 1 node × 8 GPUs
(the same numbers; `companion zero-estimate --model gpt2 --num-gpus 8` prints DeepSpeed's text).*

書籍のリスト相当 (Python):
```python
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=1)
estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=1)
```
"""),
    code("""
let largest = companion::dist::largest_layer(&gpt2);
println!("largest layer (wte): {} parameters", largest);
companion::dist::estimate_table(gpt2.num_parameters() as u64, largest, 8, 1)
"""),
    md("""
### CPU の「ランク」で ZeRO を実際に動かす
*Running ZeRO for real on 4 CPU ranks (threads of this process, each with its own model replica) and measuring
what each rank keeps.*

GPU がなくても、DeepSpeed と同じ `ds_config.json` でステージ 0〜3 を動かせます。各ランクが実際に保持している
テンソルのバイト数を測り、論文の式 (fp32 なのでパラメータ 4Ψ、勾配 4Ψ、Adam の状態 8Ψ) と並べます。
4 ステージとも損失は同じになります (同じグローバルバッチを 4 つに分けて計算しているだけなので)。
"""),
    code("""
use companion::data::{DataCollatorForLanguageModeling, Packing};
use companion::dist::comm::{run_ranks, Communicator};
use companion::{GPT2Config, GPT2LMHeadModel};
use companion::train::{TrainError, Trainer, TrainingArguments};
use companion::tokenizer::{self, TrainArgs};
use std::path::Path;
use std::sync::Arc;

// 小さなトークナイザとモデル (2 層, 幅 64), 検証用コーパスを 64 トークンのブロックに
let valid = Path::new("../data/corpus/validation.jsonl");
let docs = companion::corpus::read_file(valid, "text")?;
let mut tok = tokenizer::train(&TrainArgs { vocab_size: 1000, ..TrainArgs::default() }, docs.iter())?;
tok.set_special_token(companion::tokenizer::SpecialRole::Pad, "<eos>")?;
let ds = companion::data::tokenize_and_pack(&tok, &docs, Packing::Group { block_size: 64 }, 1000, tok.eos_token_id(), false)?;
let small = GPT2Config { vocab_size: tok.len(), n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64, n_ctx: Some(64), ..GPT2Config::default() };
println!("{} blocks of 64 tokens, model of {} parameters", ds.len(), small.num_parameters());
"""),
    code("""
let mut reports = Vec::new();
for stage in 0..=3 {
    let ds_config = companion::serde_json::json!({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "zero_optimization": { "stage": stage }
    });
    let out = run_ranks(4, |_, comm: Arc<dyn Communicator>| -> Result<(Vec<companion::dist::zero::ModelStateBytes>, f64), TrainError> {
        let args = TrainingArguments {
            output_dir: "zero_demo".into(), max_steps: 2, per_device_train_batch_size: 2,
            learning_rate: 1e-3, logging_steps: 1.0, save_strategy: "no".into(),
            deepspeed: Some(ds_config.clone()), ..Default::default()
        };
        let model = GPT2LMHeadModel::new(&small, 42, &companion::candle_core::Device::Cpu).unwrap();
        let collator = DataCollatorForLanguageModeling::new(&tok, false);
        let mut trainer = Trainer::new_distributed(model, args, collator, ds.clone(), None, None, comm)?;
        trainer.verbose = false;
        let result = trainer.train()?;
        Ok((trainer.memory_report()?, result.training_loss))
    })?;
    println!("ZeRO-{stage}: train_loss {:.6}", out[0].1);
    reports.push(out[0].0.clone());
}
"""),
    code("""
companion::dist::measured_table(&reports, small.num_parameters())
"""),
    md("""
ステージが上がるごとに、各ランクの持つ量が 1/4 になっていく項が増えます (ステージ 1: Adam の状態、
ステージ 2: さらに勾配、ステージ 3: さらにパラメータ)。ステージ 3 では各ランクは全パラメータを一度に持たず、
順伝播・逆伝播のたびに 1 ブロックずつ集めて (all-gather)、使い終わったら捨てます。
*Each stage divides one more term by the number of ranks; under stage 3 no rank ever holds the whole model:
each block's weights are gathered for its forward and again for its backward, then dropped.*

同じことはコマンドラインからもできます: `companion pretrain --deepspeed data/ds_config/zero3.json --num-ranks 4`
*The same from the command line, with the example configs in `data/ds_config/`.*
"""),
])

# ---------------------------------------------------------------- 4.3.4
write("4.3.4_training.ipynb", [
    md("""
# 4.3.4 事前学習の実行
*Running the pretraining: collator, dataset, TrainingArguments, Trainer.*

CPU で 1〜2 分で終わるよう、小さなモデル (2 層, 幅 128, 128 トークンのブロック, 位置埋め込み 256) で学習します。
*A small model (2 layers, 128 wide, 128-token blocks, 256 positions so that 4.3.5 can add 128 tokens) that trains in a minute or two on a laptop CPU.*
"""),
    SETUP,
    code(DEP),
    code("""
use companion::tokenizer::{self, AutoTokenizer, TrainArgs};
use std::path::Path;
// 4.3.2 で保存したトークナイザ (なければ同じ設定で学習し直します)
let tokenizer = if Path::new("tokenizer/tokenizer.json").exists() {
    AutoTokenizer::from_pretrained("tokenizer")?
} else {
    let docs = companion::corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
    let t = tokenizer::train(&TrainArgs { vocab_size: 30000, ..TrainArgs::default() }, docs.iter())?;
    t.save_pretrained(Path::new("tokenizer"))?;
    t
};
println!("len(tokenizer) = {}, pad = {:?}", tokenizer.len(), tokenizer.pad_token_id());
"""),
    listing("data_collator の作成", "The causal-LM collator", """
from transformers import DataCollatorForLanguageModeling
data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
"""),
    code("""
use companion::data::DataCollatorForLanguageModeling;
let data_collator = DataCollatorForLanguageModeling::new(&tokenizer, false);
let a = tokenizer.encode("def main():")?;
let b = tokenizer.encode("import os")?;
let batch = data_collator.collate(&[&a, &b])?;
println!("input_ids      {:?}", batch.input_ids);
println!("attention_mask {:?}", batch.attention_mask);
println!("labels         {:?}", batch.labels);
"""),
    md("""
パディングは右側に詰められ、ラベルはパディング位置が -100 (損失に数えない) になります。
ラベルを 1 つずらすのはモデルの中です。
*Right padding; labels are the ids with -100 at padding; the model shifts them.*
"""),
    listing("データセットのトークン化", "Tokenizing the dataset", """
def tokenize(examples):
    return tokenizer(examples["text"])
tokenized_dataset = dataset.map(tokenize, batched=True, remove_columns=["text"])
"""),
    code("""
use companion::data::{self, Packing};
let eos = tokenizer.eos_token_id();
let texts = companion::corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
let valid = companion::corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let train_dataset = data::tokenize_and_pack(&tokenizer, &texts, Packing::Group { block_size: 128 }, 1000, eos, false)?;
let mut eval_dataset = data::tokenize_and_pack(&tokenizer, &valid, Packing::Group { block_size: 128 }, 1000, eos, false)?;
eval_dataset.input_ids.truncate(64);
println!("train: {} blocks of 128 tokens ({} tokens of text, {:.2} bytes per token)",
         train_dataset.len(), train_dataset.text_tokens, train_dataset.bytes_per_token());
println!("eval:  {} blocks", eval_dataset.len());
"""),
    listing("transformers を用いた学習", "Training with TrainingArguments and Trainer", """
from transformers import TrainingArguments, Trainer
training_args = TrainingArguments(output_dir="output", num_train_epochs=1, per_device_train_batch_size=8,
                                  learning_rate=1e-6, deepspeed="./ds_config.json")  # 書籍: ds_config=
trainer = Trainer(model=model, args=training_args, data_collator=data_collator, train_dataset=tokenized_dataset)
trainer.train()
trainer.save_model("pretrained_model")
"""),
    md("""
書籍の `learning_rate=1e-6` はゼロからの学習には小さすぎて、損失がほとんど下がりません。
ここでは 3e-3 (ウォームアップ + コサイン減衰) を使います。また引数名は `ds_config=` ではなく `deepspeed=` です。
*1e-6 does not train a model from scratch; we use 3e-3 with warmup and cosine decay. The argument is `deepspeed=`.*
"""),
    code("""
use companion::train::{Trainer, TrainingArguments};
use companion::{GPT2Config, GPT2LMHeadModel};
use companion::config::ConfigOverrides;
let mut config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(tokenizer.len()), n_layer: Some(2), n_embd: Some(128), n_head: Some(2), n_positions: Some(256),
    bos_token_id: tokenizer.bos_token_id(), eos_token_id: tokenizer.eos_token_id(), ..Default::default() })?;
config.attn_pdrop = 0.0; config.embd_pdrop = 0.0; config.resid_pdrop = 0.0;
let model = GPT2LMHeadModel::new(&config, 42, &companion::candle_core::Device::Cpu)?;
let training_args = TrainingArguments {
    output_dir: "output".into(), max_steps: 60, per_device_train_batch_size: 8,
    learning_rate: 3e-3, weight_decay: 0.1, lr_scheduler_type: "cosine".into(), warmup_ratio: 0.05,
    logging_steps: 10.0, eval_strategy: "steps".into(), eval_steps: Some(30.0), save_steps: 30.0,
    save_total_limit: Some(1), ..Default::default() };
let mut trainer = Trainer::new(model, training_args, data_collator.clone(), train_dataset, Some(eval_dataset), Some(tokenizer.clone()))?;
trainer.verbose = false;
let before = trainer.evaluate_dataset(&trainer.eval_dataset.clone().unwrap())?;
let result = trainer.train()?;
for e in &trainer.state.log_history {
    if let Some(l) = e.get("loss") {
        println!("step {:>3}  loss {:.4}  lr {:.2e}", e["step"], l.as_f64().unwrap(), e["learning_rate"].as_f64().unwrap());
    }
    if let Some(l) = e.get("eval_loss") {
        println!("step {:>3}  eval_loss {:.4}  perplexity {:.1}", e["step"], l.as_f64().unwrap(), e["eval_perplexity"].as_f64().unwrap());
    }
}
println!("held-out bits per byte: {:.3} → {:.3}", before.bits_per_byte,
         trainer.state.log_history.iter().rev().find_map(|e| e.get("eval_bits_per_byte")).unwrap().as_f64().unwrap());
"""),
    md("""
### 損失の推移
*The loss and learning-rate curves.*
"""),
    code("""
companion::display::LossPlot::from_state(&trainer.state).unwrap()
"""),
    code("""
trainer.save_model(Path::new("pretrained_model"))?;
let mut files: Vec<String> = std::fs::read_dir("pretrained_model")?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
files.sort();
files
"""),
])

# ---------------------------------------------------------------- 4.3.5
write("4.3.5_inference.ipynb", [
    md("""
# 4.3.5 学習済みモデルによる推論
*Generating text with the model trained in 4.3.4 (run that notebook first).*
"""),
    SETUP,
    code(DEP),
    listing("学習済みモデルによる推論", "Inference with the pretrained model", """
model = AutoModelForCausalLM.from_pretrained("pretrained_model")
input_ids = tokenizer.encode("Hi, how are you?", return_tensors="pt")
output = model.generate(input_ids, max_new_tokens=128, do_sample=False, repetition_penalty=1.1,
                        pad_token_id=tokenizer.eos_token_id)   # 書籍: max_new_token
print(tokenizer.decode(output[0], skip_special_tokens=False))
"""),
    code("""
use companion::{AutoTokenizer, GPT2LMHeadModel};
use companion::generate::{GenerationConfig, TokenIds};
use companion::candle_core::{DType, Device};
assert!(std::path::Path::new("pretrained_model/model.safetensors").exists(), "run 4.3.4_training.ipynb first");
let model = GPT2LMHeadModel::from_pretrained("pretrained_model", DType::F32, &Device::Cpu)?;
let tokenizer = AutoTokenizer::from_pretrained("pretrained_model")?;
let input_ids = tokenizer.encode("Hi, how are you?")?;
let config = GenerationConfig {
    max_new_tokens: Some(128), do_sample: false, repetition_penalty: 1.1,
    pad_token_id: tokenizer.eos_token_id(), eos_token_id: tokenizer.eos_token_id().map(TokenIds::One),
    ..Default::default() };
let output = model.generate(&[input_ids.clone()], None, &config)?;
println!("{}", tokenizer.decode(&output.sequences[0], false)?);
"""),
    md("""
### ストリーミング生成
*Streaming: print each token as soon as it is chosen.*
"""),
    code("""
// A block: the decoder borrows the tokenizer, so it cannot outlive the cell.
{
    let mut stream = tokenizer.backend().decode_stream(false);
    print!("Hi, how are you?");
    let prompt = tokenizer.encode("Hi, how are you?")?;
    let short = GenerationConfig { max_new_tokens: Some(40), ..config.clone() };
    model.generate_with_streamer(&[prompt], None, &short, false, |_, id| {
        if let Ok(Some(piece)) = stream.step(id) { print!("{piece}"); }
    })?;
    println!();
}
"""),
    md("""
### サンプリング
*Sampling with temperature and top-p (seeded, so it repeats).*
"""),
    code("""
let sampling = GenerationConfig { do_sample: true, temperature: 0.8, top_p: 0.95, seed: Some(0), max_new_tokens: Some(40), ..config.clone() };
let out = model.generate(&[tokenizer.encode("The module")?], None, &sampling)?;
println!("{}", tokenizer.decode(&out.sequences[0], false)?);
"""),
])
print("wrote", ", ".join(sorted(p.name for p in HERE.glob("4.3.*.ipynb"))))
