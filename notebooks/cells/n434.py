"""4.3.4 事前学習の実行: collator, dataset.map + packing, a DeepSpeed config, Trainer."""
from common import DEP, code, listing, md, setup

NAME = "4.3.4_training.ipynb"
CELLS = [
    md("""
# 4.3.4 事前学習の実行
*Running the pretraining: collator, dataset, TrainingArguments + a DeepSpeed config, Trainer.*

このノートブックは `companion pretrain` (README の本番ジョブ) と同じレシピで GPT-2 を学習します:
4 層, 幅 128, 2 ヘッド, 128 トークンのブロック, 1 ステップ 16 ブロック, 2000 ステップ。
書籍と同じく `TrainingArguments(..., deepspeed="ds_config.json")` で DeepSpeed の設定を渡し、
ZeRO ステージ 2 (オプティマイザの状態を CPU にオフロード) を 2 つの CPU ランクで動かします。
2 コアの CPU で 7〜8 分かかります。4.3.5 はここで保存するモデルを使います。
*The main job's recipe (4×128, 128-token blocks, 16 blocks a step, 2000 steps) through a ds_config: ZeRO-2 with
optimizer offload on 2 CPU ranks; 7–8 minutes on a 2-core CPU. 4.3.5 uses the model saved here.*
"""),
    setup(),
    code(DEP),
    md("""
### トークナイザ
*The tokenizer: byte-level BPE as in 4.3.2, with 8192 tokens instead of 30000 (deliberate; see the comment).*
"""),
    code("""
use companion::prelude::*;
let fx = notebook::Fixture::load("chapter")?;
let docs = corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
// 変更点: 語彙は 30000 ではなく 8192 (companion pretrain と同じ)。幅 128 のモデルでは、30003 行の出力層が
// 計算の 3/4 を占め、CPU の数分では学習が進みません。
// Deliberate change: 8192 tokens, not 30000: with a 128-wide model a 30003-row output layer would take 3/4 of the compute.
let tokenizer = tokenizer::train(&TrainArgs { vocab_size: 8192, ..TrainArgs::default() }, docs.iter())?;
tokenizer.save_pretrained(Path::new("tokenizer-8192"))?;
println!("len(tokenizer) = {}, bos/eos/pad = {:?}/{:?}/{:?}", tokenizer.len(),
         tokenizer.bos_token_id(), tokenizer.eos_token_id(), tokenizer.pad_token_id());
let text: String = fx.at("/texts/chapter")?;
check_eq!(tokenizer.len(), fx.at::<usize>("/bpe8192/len")?, "len(tokenizer) (Python tokenizers)");
check_eq!(tokenizer.encode(&text)?, fx.at::<Vec<u32>>("/bpe8192/chapter/ids")?, "ids (Python tokenizers)");
"""),
    listing("data_collator の作成", "The causal-LM collator", """
from transformers import DataCollatorForLanguageModeling

data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
""", notes="""
⚠ 本文では `DataCollatorForLanguageModelling` (l が 2 つ) と綴られていますが、`transformers` のクラス名は
`DataCollatorForLanguageModeling` です (`ImportError: cannot import name 'DataCollatorForLanguageModelling'`)。
*The prose spells it `...Modelling`; the class is `DataCollatorForLanguageModeling`.*
"""),
    code("""
let data_collator = DataCollatorForLanguageModeling { mlm: false, ..DataCollatorForLanguageModeling::new(&tokenizer) };
let texts: Vec<String> = fx.at("/bpe8192/collate_texts")?;
let (a, b) = (tokenizer.encode(&texts[0])?, tokenizer.encode(&texts[1])?);
let batch = data_collator.collate(&[&a, &b])?;
println!("{:?}", texts);
println!("input_ids      {:?}", batch.input_ids);
println!("attention_mask {:?}", batch.attention_mask);
println!("labels         {:?}", batch.labels);
let want: companion::serde_json::Value = fx.at("/bpe8192/collated")?;
check_eq!(json!(batch.input_ids), want["input_ids"], "input_ids (Python DataCollatorForLanguageModeling)");
check_eq!(json!(batch.attention_mask), want["attention_mask"], "attention_mask (Python)");
check_eq!(json!(batch.labels), want["labels"], "labels (Python)");
for (labels, mask) in batch.labels.iter().zip(&batch.attention_mask) {
    for (l, m) in labels.iter().zip(mask) {
        check!((*l == -100) == (*m == 0), "labels are -100 exactly at padding: label {l}, mask {m}");
    }
}
println!("labels are -100 exactly where attention_mask is 0, and equal to Python's");
"""),
    md("""
`mlm=False` は因果言語モデル (次のトークンの予測) 用の指定です。`mlm=True` (既定値) は BERT のように
15% のトークンを隠して当てさせるマスク言語モデル用で、GPT-2 には使いません。コレータは短い例を右側に
パディングし (`attention_mask` が 0)、ラベルを入力 ID のコピーにしてパディング位置だけ -100 (損失に数えない)
にします。ラベルを 1 つずらすのはモデルの中です。
*`mlm=False`: causal LM. Right padding; labels are the ids with -100 at padding; the model shifts them.*
"""),
    listing("データセットのトークン化", "Tokenizing the dataset", """
tokenized_dataset = dataset.map(lambda examples: tokenizer(examples["text"]), batched=True)
""", notes="""
⚠ 1 文書を 1 例にしたまま切り詰めもまとめもしないので、GPT-2 の位置埋め込み (1024) より長い文書が残り、
学習中に `IndexError: index out of range in self` になります (次のセルで数えます)。`run_clm.py` のように
全文書をつなげて固定長のブロックに切る (`group_texts`) か、`truncation=True` を渡します。
*Without truncation or grouping, documents longer than 1024 tokens overflow GPT-2's positions.*
"""),
    md("""
`dataset.map(f, batched=True)` は `f` を 1 例ずつではなく 1000 例ずつのバッチ (列ごとのリストの辞書) に適用します。
トークナイザはバッチをまとめて (ここでは全コアで) 処理できるので速くなります。まず 1 文書 1 例のままの長さを数えます。
*`map(batched=True)` calls the function on batches of 1000 examples; first, the length of each document as one example.*
"""),
    code("""
let lengths: Vec<usize> = docs.iter().map(|d| tokenizer.encode(d).map(|ids| ids.len())).collect::<Result<_, _>>()?;
let too_long = lengths.iter().filter(|&&n| n > 1024).count();
let longest = *lengths.iter().max().unwrap();
println!("{} documents, {} tokens; the longest has {} tokens; {} are longer than GPT-2's 1024 positions",
         docs.len(), lengths.iter().sum::<usize>(), longest, too_long);
check!(too_long > 0 && longest > 1024, "the book's map leaves examples longer than n_positions");
"""),
    md("""
そこで `run_clm.py` の `group_texts` と同じく、map の 1 バッチ (1000 文書) ごとに全トークンをつなげ
(各文書の後ろに `<eos>`)、128 トークンずつのブロックに切り、端数を捨てます。ブロックは文書の境目をまたぎます。
*run_clm's packing: per map batch, concatenate (an `<eos>` after each document), cut into 128-token blocks, drop the remainder.*
"""),
    code("""
let block_size = 128;
let options = TokenizeOptions { packing: Packing::Group { block_size }, append_eos: tokenizer.eos_token_id(), ..Default::default() };
let train_dataset = data::tokenize_and_pack(&tokenizer, &docs, &options)?;
let tokens_with_eos: usize = lengths.iter().map(|n| n + 1).sum();
println!("train: {} blocks of {} tokens ({} tokens of text, {:.2} bytes per token)",
         train_dataset.len(), block_size, train_dataset.text_tokens(), train_dataset.bytes_per_token());
// 444 documents are one map batch: blocks = ⌊tokens / 128⌋.
check_eq!(train_dataset.len(), tokens_with_eos / block_size, "number of blocks");
check!(train_dataset.iter().all(|b| b.len() == block_size), "every block has {block_size} tokens");
let eos = tokenizer.eos_token_id().unwrap();
let across = train_dataset.iter().position(|b| b.contains(&eos)).unwrap();
println!("\\nblock {across} (it crosses a document boundary):\\n{}", tokenizer.decode(&train_dataset.example(across), false)?);
"""),
    code("""
// 評価用: 検証用コーパスの最初の 128 ブロック (16k トークン; companion pretrain と同じ)
let valid = corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let mut eval_dataset = data::tokenize_and_pack(&tokenizer, &valid, &options)?;
eval_dataset.truncate(128);
println!("eval: {} blocks, {:.2} bytes per token", eval_dataset.len(), eval_dataset.bytes_per_token());
check_eq!(eval_dataset.len(), 128, "eval blocks");
"""),
    md("""
### DeepSpeed の設定ファイル
*The DeepSpeed config this notebook trains with: ZeRO stage 2, optimizer states offloaded to the CPU.*

`"auto"` の値は `transformers` と同じく `TrainingArguments` から埋めます (バッチサイズ、勾配累積、
クリッピング)。`train_batch_size` = ランクあたりのバッチ × 勾配累積 × ランク数 = 8 × 1 × 2 = 16 です。
`optimizer` / `scheduler` を書かないので、`Trainer` が `TrainingArguments` から AdamW と学習率スケジュールを作ります。
*"auto" is filled from the TrainingArguments as transformers does; with no optimizer/scheduler section, the Trainer's AdamW and schedule are used.*
"""),
    code("""
let ds_config = json!({
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": { "device": "cpu" }
    }
});
std::fs::write("ds_config.json", companion::serde_json::to_string_pretty(&ds_config)?)?;
println!("{}", std::fs::read_to_string("ds_config.json")?);
"""),
    listing("transformers を用いた学習", "Training with TrainingArguments and Trainer", """
from transformers import TrainingArguments, Trainer

training_args = TrainingArguments(
    output_dir=...,
    num_train_epochs=...,
    per_device_train_batch_size=...,
    logging_strategy=...,
    logging_steps=...,
    save_strategy=...,
    save_steps=...,
    learning_rate=1e-6,
    weight_decay=...,
    warmup_ratio=...,
    optim=...,
    ds_config="./ds_config.json",
)
trainer = Trainer(
    model=model,
    args=training_args,
    data_collator=data_collator,
    train_dataset=tokenized_dataset,
    tokenizer=transformer_tokenizer,
)
with torch.autocast("cuda"):
    trainer.train()
trainer.save_model("pretrained_model")
""", notes="""
`...` はこのリポジトリに値を記録していない引数です。問題点:
- ⚠ `ds_config=` という引数はありません (`TypeError: TrainingArguments.__init__() got an unexpected keyword argument 'ds_config'`)。`deepspeed="./ds_config.json"` です。
- ⚠ `warmup_ratio` は transformers 5 で削除されました (`TypeError: ... unexpected keyword argument 'warmup_ratio'`)。`warmup_steps` に 1 未満の値を渡すと割合になります。
- ⚠ `Trainer(tokenizer=...)` は transformers 5 では `processing_class=` です (`TypeError: Trainer.__init__() got an unexpected keyword argument 'tokenizer'`)。また `transformer_tokenizer` は未定義です。
- ⚠ `with torch.autocast("cuda"): trainer.train()`: `torch` が import されておらず (`NameError`)、`Trainer` の混合精度は `bf16=True` / `fp16=True` (DeepSpeed の設定では `"auto"`) で指定します。autocast で包んでも DeepSpeed のエンジンには効きません。
- ⚠ `learning_rate=1e-6` はゼロからの学習には小さすぎ、損失がほとんど下がりません。
"""),
    md("""
Rust のセルは書籍の引数を 1 つずつ対応させ、変えた値にはその理由をコメントしています。CPU では混合精度を使わず
fp32 で学習します (このマシンでは融合した fp32 カーネルが最速で、bf16 / fp16 は GPU 向けです)。
*Field by field as in the book; every changed value says why. fp32 on the CPU (bf16/fp16 are for GPUs).*
"""),
    code("""
let config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(tokenizer.len()),
    n_layer: Some(4), n_embd: Some(128), n_head: Some(2),   // CPU で数分に収まる大きさ (companion pretrain と同じ)
    n_positions: Some(128), n_ctx: Some(128),               // ブロック長 128
    bos_token_id: tokenizer.bos_token_id(),
    eos_token_id: tokenizer.eos_token_id(),
    ..Default::default()
})?;
let config = GPT2Config { attn_pdrop: 0.0, embd_pdrop: 0.0, resid_pdrop: 0.0, ..config }; // 数エポックの学習では dropout なしが良い
let training_args = TrainingArguments {
    output_dir: "output".into(),
    max_steps: 2000,                      // 書籍: num_train_epochs。2000 ステップ × 16 ブロック ≈ 2.3 エポック
    per_device_train_batch_size: 8,       // ランクあたり 8 ブロック × 2 ランク = 1 ステップ 16 ブロック
    per_device_eval_batch_size: 8,
    logging_strategy: IntervalStrategy::Steps,
    logging_steps: 10.0,
    logging_first_step: true,
    save_strategy: IntervalStrategy::Steps,
    save_steps: 500.0,
    save_total_limit: Some(1),
    learning_rate: 2e-3,                  // 書籍: 1e-6 (小さすぎる)。2e-3 + ウォームアップ + コサイン減衰
    lr_scheduler_type: SchedulerType::Cosine,
    weight_decay: 0.1,
    warmup_steps: 0.05,                   // 書籍: warmup_ratio (transformers 5 では 1 未満の warmup_steps が割合)
    optim: OptimizerName::AdamwTorch,
    eval_strategy: IntervalStrategy::Steps,        // 書籍にはない: 100 ステップごとに検証データの損失を測る
    eval_steps: Some(100.0),
    seed: 42,
    deepspeed: Some(json!("ds_config.json")), // 書籍: ds_config="./ds_config.json"
    ..Default::default()
};
println!("{:.2}M parameters; {} steps of {} blocks", config.num_parameters() as f64 / 1e6, training_args.max_steps, 16);
"""),
    md("""
テストコマンド (`./scripts/test`) はこのセルを速く回すため、最初の 100 ステップだけを学習し
(`COMPANION_NOTEBOOKS=quick`)、そのログ (損失, 勾配ノルム, 学習率, 検証損失) がリポジトリにある
2000 ステップの学習結果 (`fixtures/pretrained_model/`、このノートブックを全ステップで実行して作ったもの) と
一致することを確かめます。以降のセルはその結果を表示し、4.3.5 はそのモデルを使います。
環境変数を設定せずに開いたとき (読者) と `./scripts/test --full` では全ステップを学習します。
*The test command trains only the first 100 steps here (`COMPANION_NOTEBOOKS=quick`) and checks their log against the
committed 2000-step run (`fixtures/pretrained_model/`, made by this notebook in full mode), which the cells below then
show; readers and `./scripts/test --full` train every step.*
"""),
    code("""
const WORLD: usize = 2; // CPU のランク 2 つ (スレッド)。GPU なら 1 GPU 1 ランク
let mode = notebook::NotebookMode::from_env()?;
let runs = run_ranks(WORLD, |rank, comm| -> Result<_, companion::train::TrainError> {
    let model = GPT2LMHeadModel::new(&config, training_args.seed, &Device::Cpu)?;
    // processing_class (書籍の tokenizer=) はトークナイザ: 保存するモデルのフォルダに一緒に書きます
    let mut trainer = Trainer::new_distributed(model, training_args.clone(), data_collator.clone(),
        train_dataset.clone(), Some(eval_dataset.clone()), Some(tokenizer.clone()), comm)?;
    trainer.verbose = false;
    if let Some(steps) = mode.quick_steps() {
        trainer.add_callback(StopAtStep(steps)); // 学習率のスケジュールは 2000 ステップのまま
    }
    let memory = trainer.memory_report()?;
    let before = trainer.evaluate_dataset(&eval_dataset)?;
    trainer.train()?;
    if mode == notebook::NotebookMode::Full {
        trainer.save_model(Path::new("pretrained_model"))?;
    }
    Ok((rank, memory, before, trainer.state.clone()))
})?;
let (_, memory, before, run) = runs.into_iter().next().unwrap();
let state = notebook::ReferenceRun::check_run(Path::new("fixtures/pretrained_model"), mode, run, Path::new("pretrained_model"))?;
std::fs::write("output/trainer_state.json", state.to_json_string())?;
let train_loss = state.log_history.last().and_then(|e| e.get("train_loss")).and_then(|v| v.as_f64()).unwrap();
println!("trained {} steps on {} ranks; train_loss {:.4}", state.global_step, WORLD, train_loss);
"""),
    md("""
### 各ランクが持つモデルの状態
*What each rank holds under ZeRO-2 with optimizer offload, measured, beside the formula (fp32: weights 4Ψ on every rank,
gradients 4Ψ/N and Adam's moments 8Ψ/N partitioned; the moments live in host memory).*
"""),
    code("""
let p = config.num_parameters();
for m in &memory {
    let part = p.div_ceil(m.world_size);
    check_eq!((m.stage, m.world_size), (2, WORLD), "ZeRO stage and ranks from ds_config.json");
    check_eq!((m.params, m.grads, m.optimizer_states), (4 * p, 4 * part, 8 * part), "rank {}: weights, gradients, Adam bytes", m.rank);
    check_eq!(m.offloaded_to_host, m.optimizer_states, "rank {}: the optimizer states are offloaded", m.rank);
}
notebook::zero_measured_table(&[memory.clone()], p)
"""),
    md("""
### 損失, パープレキシティ, bits per byte
*Held-out loss, perplexity and bits per byte every 100 steps.*

損失はトークンあたりの交差エントロピー (自然対数) です。パープレキシティ exp(損失) は「平均して何通りの
トークンで迷っているか」に当たります。どちらもトークナイザに依存するので、語彙の違うモデル同士を比べるには
bits per byte = 損失 / ln 2 × (トークン数 / バイト数) を使います (1 バイトを当てるのに何ビット要るか)。
*Perplexity = exp(loss); bits per byte = loss / ln 2 × tokens / bytes compares models across tokenizers.*
"""),
    code("""
let bpt = eval_dataset.bytes_per_token();
let mut rows = vec![vec!["step".to_string(), "train loss".into(), "eval loss".into(), "perplexity".into(), "bits/byte".into()]];
rows.push(vec!["0".into(), "".into(), format!("{:.4}", before.eval_loss), format!("{:.1}", before.perplexity), format!("{:.3}", before.bits_per_byte)]);
let mut last_loss = f64::NAN;
let mut final_bpb = f64::NAN;
for e in &state.log_history {
    if let Some(l) = e.get("loss").and_then(|v| v.as_f64()) { last_loss = l; }
    if let Some(l) = e.get("eval_loss").and_then(|v| v.as_f64()) {
        let (ppl, bpb) = (e["eval_perplexity"].as_f64().unwrap(), e["eval_bits_per_byte"].as_f64().unwrap());
        check!((ppl - l.exp()).abs() < 1e-9 * ppl, "perplexity = exp(loss)");
        check!((bpb - l / std::f64::consts::LN_2 / bpt).abs() < 1e-9, "bits per byte = loss / ln 2 / bytes per token");
        rows.push(vec![e["step"].to_string(), format!("{last_loss:.4}"), format!("{l:.4}"), format!("{ppl:.1}"), format!("{bpb:.3}")]);
        final_bpb = bpb;
    }
}
// companion pretrain reaches 1.544 with this recipe; a bigram count model scores 1.92 on the same text.
check!(final_bpb <= 1.60, "held-out bits per byte after training: {final_bpb} (bound 1.60)");
check!(before.bits_per_byte > 3.0, "an untrained model is far from it: {}", before.bits_per_byte);
let table = notebook::Table(rows);
table
"""),
    md("""
### 損失の推移
*The loss and learning-rate curves: the learning rate rises linearly over the first 100 steps (warmup), then
follows a cosine down to 0.*
"""),
    code("""
notebook::LossPlot::from_state(&state).unwrap()
"""),
    code("""
let mut files: Vec<String> = std::fs::read_dir("pretrained_model")?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
files.sort();
for f in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
    check!(files.iter().any(|x| x == f), "pretrained_model/ has {f} (what from_pretrained reads)");
}
files
"""),
]
