"""4.3.4 事前学習の実行: collator, dataset.map + packing, a DeepSpeed config, Trainer."""
from common import DEP, code, listing, md, setup

NAME = "4.3.4_training.ipynb"
CELLS = [
    md("""
# 4.3.4 DeepSpeed を用いた学習
*Training with DeepSpeed: the collator, the tokenized dataset, TrainingArguments with a ds_config, Trainer.*

書籍はこの節で、GPT-2 の設定そのままの 108.9M パラメータのモデル (12 層, 幅 768, 語彙 30003) を GPU 上で
`deepspeed` ランチャーから学習します。このノートブックは同じ流れ (コレータ → `dataset.map` → `TrainingArguments`
+ `ds_config.json` → `Trainer` → `save_model`) を、2 コアの CPU で約 10 分で終わる大きさ、1.86M パラメータ
(4 層, 幅 128, 2 ヘッド, 語彙 8192) で、このプロセスの 2 つのスレッドを DeepSpeed のランクとして実行します。
ZeRO ステージ 2 (オプティマイザの状態を CPU にオフロード) の設定も書籍と同じく `ds_config.json` で渡します。
学習の様子は 100 ステップごとの 1 行と、章のプロンプトに対する生成文 (0, 100, 1000, 2000 ステップ) で追えます。
4.3.5 はここで保存するモデルを使います。
*The book trains GPT-2's own shape (108.9M parameters) on GPUs under the `deepspeed` launcher; this notebook runs the
same steps with a 1.86M-parameter model on two CPU threads acting as DeepSpeed ranks, ZeRO-2 with optimizer offload
from a `ds_config.json`, printing a line every 100 steps and a generation at steps 0, 100, 1000 and 2000.*

#### 書籍の値から変えたところ / What differs from the book, and why

| 項目 | 書籍 | ここ | 理由 |
|---|---|---|---|
| モデル | `gpt2` の Config (12 層, 幅 768, 108.9M) | 4 層, 幅 128, 2 ヘッド (1.86M) | 2 コアの CPU で約 10 分の学習に収まる大きさ (`companion pretrain` と同じ) |
| 語彙数 | 30000 (+ 特殊トークン 3) | 8192 (+ 3) | 幅 128 では 30003 行の出力層が計算の約 3/4 を占める |
| `n_ctx` / `n_positions` | `n_ctx=512` (位置は 1024 のまま) | 128 / 128 | ブロック長 128 (`n_ctx` だけでは長さは変わらない) |
| dropout (3 か所) | 0.1 (`gpt2` の Config) | 0 | 約 2 エポックしか回さず、過学習より学習の遅れが問題になる |
| `num_train_epochs` | 3 | `max_steps=2000` (= 2.12 エポック) | 決まった時間で止めるため (15118 ブロック ÷ 16 = 945 ステップで 1 エポック) |
| `per_device_train_batch_size` | 3 | 8 (× 2 ランク = 16) | 小さいモデルでは大きいバッチのほうが CPU を使い切れる |
| `learning_rate` | 1e-6 | 2e-3 | 1e-6 ではゼロからの学習がほとんど進まない |
| `lr_scheduler_type` | `"linear"` (既定値) | `"cosine"` | GPT-3 や nanoGPT など GPT 系の事前学習の慣例 |
| `warmup_ratio` | 0.1 | `warmup_steps=0.05` (100 ステップ) | transformers 5 では 1 未満の `warmup_steps` が割合。短い学習なので短めに |
| `weight_decay` | 0.01 | 0.1 | GPT-3 論文や nanoGPT の値 |
| `logging_steps` | 100 | 10 (表示は 100 ごと) | 損失の曲線を細かく描くため。画面への 1 行は書籍と同じ 100 ステップごと |
| `save_steps` | 1000 | 500, `save_total_limit=1` | 途中保存から再開できることを示しつつ、ディスクには最新の 1 つだけ残す |
| 評価 | なし | 100 ステップごとに検証データ全体 (542 ブロック) | 汎化の様子 (検証損失) を追うため |
| 混合精度 | `torch.autocast("cuda")` | fp32 | CPU では融合した fp32 カーネルが最速 (bf16 / fp16 は GPU 向け) |
| 実行 | `deepspeed` ランチャー, GPU | このプロセスの 2 スレッド = 2 ランク | GPU がなくても ZeRO の分割とオフロードが動く |

*Each row: the book's value, ours, and why; the cells below repeat the reason where the value is set.*
"""),
    setup(),
    code(DEP),
    md("""
### トークナイザ
4.3.2 と同じバイトレベル BPE を、語彙 30000 ではなく 8192 で学習します (理由はセルのコメントと冒頭の表)。
*The tokenizer: byte-level BPE as in 4.3.2, with 8192 tokens instead of 30000 (deliberate; see the comment).*
"""),
    code("""
use companion::prelude::*;
let fx = notebook::Fixture::load("chapter")?;
let docs = corpus::read_file(Path::new("../data/corpus/train.jsonl"), "text")?;
// 変更点: 語彙は 30000 ではなく 8192 (companion pretrain と同じ)。幅 128 のモデルでは、30003 行の出力層が
// 計算の 3/4 を占め、CPU の約 10 分では学習が進みません。
// Deliberate change: 8192 tokens, not 30000: with a 128-wide model a 30003-row output layer would take 3/4 of the compute.
let tokenizer = tokenizer::train(&TrainArgs { vocab_size: 8192, ..TrainArgs::default() }, docs.iter())?;
tokenizer.save_pretrained(Path::new("tokenizer-8192"))?;
println!("len(tokenizer) = {}, bos/eos/pad = {:?}/{:?}/{:?}", tokenizer.len(),
         tokenizer.bos_token_id(), tokenizer.eos_token_id(), tokenizer.pad_token_id());
let text: String = fx.at("/texts/chapter")?;
check_eq!(tokenizer.len(), fx.at::<usize>("/bpe8192/len")?, "len(tokenizer) (Python tokenizers)");
check_eq!(tokenizer.encode(&text)?, fx.at::<Vec<u32>>("/bpe8192/chapter/ids")?, "ids (Python tokenizers)");
"""),
    listing("transformers を用いた学習 (data_collator の作成)", "The causal-LM collator", """
from transformers import DataCollatorForLanguageModeling

# data_collator の作成
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
# dataset: 4.1 節の前処理済みコーパス (datasets.Dataset, "text" 列)
dataset = dataset.map(lambda data: tokenizer(data["text"]), batched=True)
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
そこで `run_clm.py` の `group_texts` と同じく、map の 1 バッチ (1000 文書) ごとに全トークンをつなげ、
128 トークンずつのブロックに切り、端数を捨てます。ブロックは文書の境目をまたぎます。`run_clm.py` の
`tokenize_function` は文書の後ろに何も足しませんが、ここでは各文書の後ろに `<eos>` を置きます (私たちの選択):
モデルが文書の終わりを学び、4.3.5 の生成が `<eos>` で止まれるようにするためです。
*run_clm's packing per map batch: concatenate, cut into 128-token blocks, drop the remainder. run_clm adds no EOS;
we put `<eos>` after each document (our choice) so the model learns where a document ends.*
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
// 評価用: 検証用コーパス全体を同じようにブロックにします (companion pretrain と同じ)
let valid = corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let eval_dataset = data::tokenize_and_pack(&tokenizer, &valid, &options)?;
let valid_tokens: usize = valid.iter().map(|d| tokenizer.encode(d).map(|ids| ids.len() + 1)).sum::<Result<usize, _>>()?;
println!("eval: {} documents → {} blocks ({} tokens), {:.2} bytes per token", valid.len(), eval_dataset.len(),
         eval_dataset.len() * block_size, eval_dataset.bytes_per_token());
check_eq!(eval_dataset.len(), valid_tokens / block_size, "eval blocks: the whole validation split");
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
from transformers import Trainer, TrainingArguments

# 学習
training_args = TrainingArguments(
    output_dir="./output",
    logging_strategy="steps",
    logging_steps=100,
    save_strategy="steps",
    save_steps=1000,
    num_train_epochs=3,
    per_device_train_batch_size=3,
    learning_rate=1e-6,
    weight_decay=0.01,
    warmup_steps=0.1,              # ⚠ 書籍: warmup_ratio=0.1
    optim="adamw_torch",
    deepspeed="./ds_config.json",  # ⚠ 書籍: ds_config="./ds_config.json"
)
trainer = Trainer(
    model=model,
    processing_class=tokenizer,    # ⚠ 書籍: tokenizer=transformer_tokenizer
    train_dataset=dataset,
    args=training_args,
    data_collator=data_collator,
)

trainer.train()                    # ⚠ 書籍: with torch.autocast("cuda"): trainer.train()

# モデルの保存
trainer.save_model("pretrained_model")
# 実行: deepspeed train.py (GPU の数だけランクが起動する)
""", notes="""
書籍のリストと同じ名前と値で、transformers 5 で動くように ⚠ の 4 か所を直したものです。書籍のままでは:
- ⚠ `ds_config=` という引数はありません (`TypeError: TrainingArguments.__init__() got an unexpected keyword argument 'ds_config'`)。`deepspeed=` です。
- ⚠ `warmup_ratio` は transformers 5.0 で非推奨になり (警告のみ)、5.15.0 で削除されました (`TypeError: ... unexpected keyword argument 'warmup_ratio'`)。1 未満の `warmup_steps` が割合になります。
- ⚠ `Trainer(tokenizer=...)` は transformers 5 では `processing_class=` です (`TypeError: Trainer.__init__() got an unexpected keyword argument 'tokenizer'`)。`transformer_tokenizer` はどこにも定義されていません (`NameError`)。
- ⚠ `torch` を import していません (`NameError`)。また `Trainer` の混合精度は `bf16=True` / `fp16=True` (ds_config では `"auto"`) で指定するもので、`torch.autocast` で包んでも DeepSpeed のエンジンには効きません。
- `learning_rate=1e-6` は動きますが、ゼロからの学習には小さすぎて損失がほとんど下がりません。
*The book's names and values, made to run on transformers 5 (the four ⚠ lines); what the printed listing raises is listed above.*
"""),
    md("""
Rust のセルは書籍の引数を 1 つずつ同じ名前で対応させます。変えた値には書籍の値と理由をコメントで書きました
(冒頭の表と同じ)。CPU では混合精度を使わず fp32 で学習します。
*Field by field with the book's names; each changed value carries the book's value and the reason (as in the table above).*
"""),
    code("""
let config = GPT2Config::from_pretrained_with("gpt2", &ConfigOverrides {
    vocab_size: Some(tokenizer.len()),
    n_layer: Some(4), n_embd: Some(128), n_head: Some(2),   // 書籍: gpt2 の 12 層・幅 768。CPU で約 10 分に収まる大きさ
    n_positions: Some(128), n_ctx: Some(128),               // 書籍: n_ctx=512。ブロック長 128
    bos_token_id: tokenizer.bos_token_id(),
    eos_token_id: tokenizer.eos_token_id(),
    ..Default::default()
})?;
// 書籍: dropout 0.1 (gpt2 の Config)。約 2 エポックの学習では dropout なしのほうが速く下がる
let config = GPT2Config { attn_pdrop: 0.0, embd_pdrop: 0.0, resid_pdrop: 0.0, ..config };
let training_args = TrainingArguments {
    output_dir: "output".into(),                   // 書籍: "./output"
    logging_strategy: IntervalStrategy::Steps,
    logging_steps: 10.0,                           // 書籍: 100。曲線を細かく描くため (画面の 1 行は 100 ごと)
    logging_first_step: true,
    save_strategy: IntervalStrategy::Steps,
    save_steps: 500.0,                             // 書籍: 1000
    save_total_limit: Some(1),                     // 書籍にはない: 最新の checkpoint だけを残す
    max_steps: 2000,                               // 書籍: num_train_epochs=3。2000 × 16 / 15118 = 2.12 エポック
    per_device_train_batch_size: 8,                // 書籍: 3。8 × 2 ランク = 1 ステップ 16 ブロック
    per_device_eval_batch_size: 8,
    learning_rate: 2e-3,                           // 書籍: 1e-6 (小さすぎる)
    lr_scheduler_type: SchedulerType::Cosine,      // 書籍: 既定の linear
    weight_decay: 0.1,                             // 書籍: 0.01
    warmup_steps: 0.05,                            // 書籍: warmup_ratio=0.1
    optim: OptimizerName::AdamwTorch,              // 書籍と同じ "adamw_torch"
    eval_strategy: IntervalStrategy::Steps,        // 書籍にはない: 100 ステップごとに検証データ全体で評価
    eval_steps: Some(100.0),
    seed: 42,
    deepspeed: Some(json!("ds_config.json")),      // 書籍: ds_config="./ds_config.json"
    ..Default::default()
};
let steps_per_epoch = train_dataset.len() as f64 / 16.0;
println!("{:.2}M parameters; {} steps of 16 blocks = {:.2} epochs of {} blocks",
         config.num_parameters() as f64 / 1e6, training_args.max_steps,
         training_args.max_steps as f64 / steps_per_epoch, train_dataset.len());
check!((training_args.max_steps as f64 / steps_per_epoch - 2.12).abs() < 0.005, "2000 steps are 2.12 epochs");
"""),
    md("""
### 学習 (進み具合を見ながら)
*Training, watched: a line every 100 steps (loss, learning rate, tokens/s, time left, and the held-out loss when the step
evaluates) and a greedy generation for the chapter's prompt at steps 0, 100, 1000 and 2000.*

テストコマンド (`./scripts/test`) はこのセルを速く回すため、最初の 100 ステップだけを学習し
(`COMPANION_NOTEBOOKS=quick`)、そのログ (損失, 勾配ノルム, 学習率, 検証損失) と生成文がリポジトリにある
2000 ステップの学習結果 (`fixtures/pretrained_model/`、このノートブックを全ステップで実行して作ったもの) と
一致することを確かめてから、その学習の残りの行を同じ形式で表示します。以降のセルはその結果を表示し、
4.3.5 はそのモデルを使います。環境変数を設定せずに開いたとき (読者) と `./scripts/test --full` では全ステップを学習します。
*The test command trains the first 100 steps here (`COMPANION_NOTEBOOKS=quick`), checks their log and samples against
the committed 2000-step run (`fixtures/pretrained_model/`, made by this notebook in full mode), then prints that run's
remaining lines in the same format; readers and `./scripts/test --full` train every step.*
"""),
    code("""
const WORLD: usize = 2; // CPU のランク 2 つ (スレッド)。GPU なら 1 GPU 1 ランク
const PROMPT: &str = "Hi, how are you?"; // 4.3.5 の書籍のプロンプト
const SAMPLE_AT: [usize; 4] = [0, 100, 1000, 2000];
let mode = notebook::NotebookMode::from_env()?;
let runs = run_ranks(WORLD, |rank, comm| -> Result<_, companion::train::TrainError> {
    let model = GPT2LMHeadModel::new(&config, training_args.seed, &Device::Cpu)?;
    // processing_class (書籍の tokenizer=) はトークナイザ: 保存するモデルのフォルダに一緒に書きます
    let mut trainer = Trainer::new_distributed(model, training_args.clone(), data_collator.clone(),
        train_dataset.clone(), Some(eval_dataset.clone()), Some(tokenizer.clone()), comm)?;
    trainer.verbose = false; // 下の WatchTraining が 100 ステップごとに 1 行だけ表示します
    let watch = notebook::WatchTraining::new(&tokenizer, PROMPT, 100, &SAMPLE_AT, rank == 0)
        .map_err(|e| companion::train::TrainError::Callback(e.0))?;
    let samples = watch.samples();
    trainer.add_callback(watch);
    if let Some(steps) = mode.quick_steps() {
        trainer.add_callback(StopAtStep(steps)); // 学習率のスケジュールは 2000 ステップのまま
    }
    let memory = trainer.memory_report()?;
    let before = trainer.evaluate_dataset(&eval_dataset)?;
    trainer.train()?;
    if mode == notebook::NotebookMode::Full {
        trainer.save_model(Path::new("pretrained_model"))?;
    }
    let samples = samples.lock().unwrap().clone();
    Ok((rank, memory, before, trainer.state.clone(), samples))
})?;
let (_, memory, before, run, live_samples) = runs.into_iter().next().unwrap();
let reference = Path::new("fixtures/pretrained_model");
let samples = notebook::watch::show_rest(reference, mode, &live_samples, 100)?;
let state = notebook::ReferenceRun::check_run(reference, mode, run, Path::new("pretrained_model"))?;
std::fs::write("output/trainer_state.json", state.to_json_string())?;
notebook::watch::save_samples(Path::new("output/samples.json"), &samples)?;
let train_loss = state.log_history.last().and_then(|e| e.get("train_loss")).and_then(|v| v.as_f64()).unwrap();
let runtime = state.log_history.last().and_then(|e| e.get("train_runtime")).and_then(|v| v.as_f64()).unwrap();
println!("trained {} steps on {} ranks in {runtime:.0} s; train_loss {:.4}", state.global_step, WORLD, train_loss);
check_eq!(samples.iter().map(|s| s.step).collect::<Vec<_>>(), SAMPLE_AT.to_vec(), "a sample at each chosen step");
"""),
    md("""
### 各ランクが持つモデルの状態
*What each rank holds under ZeRO-2 with optimizer offload, measured, beside the formula (fp32: weights 4Ψ on every rank,
gradients 4Ψ/N and Adam's moments 8Ψ/N partitioned; the moments live in host memory).*

ZeRO-2 はオプティマイザの状態と勾配を 2 ランクで分け合い、オフロードはその状態を GPU から CPU のメモリへ移します。
ここでは 2 つのランクが 1 つのプロセスのスレッドで、「GPU のメモリ」も CPU のメモリなので、オフロードしても
メモリは減らず、CPU 側の Adam の更新と受け渡しの分だけ遅くなります (同じ学習を 1 ランク・ZeRO なしで行う
`companion pretrain` の時間と比べてください)。GPU では話が違います: 書籍の 108.9M パラメータのモデルを
GPU 1 枚で学習すると、DeepSpeed の見積もりでは下の表のとおり、オフロードで GPU 側のモデル状態が大きく減ります。
*Here both ranks are threads of one process and "device" memory is host memory, so offload saves nothing and costs
time; on a GPU it moves Adam's state off the device: DeepSpeed's estimate for the book's 108.9M model on one GPU below.*
"""),
    code("""
let p = config.num_parameters();
for m in &memory {
    let part = p.div_ceil(2 * m.world_size) * 2; // Ψ padded to a multiple of 2N, over N (DeepSpeed's)
    check_eq!((m.stage, m.world_size), (2, WORLD), "ZeRO stage and ranks from ds_config.json");
    check_eq!((m.params, m.grads, m.optimizer_states), (4 * p, 4 * part, 8 * part), "rank {}: weights, gradients, Adam bytes", m.rank);
    check_eq!(m.offloaded_to_host, m.optimizer_states, "rank {}: the optimizer states are offloaded", m.rank);
}
notebook::zero_measured_table(&[memory.clone()], p)
"""),
    code("""
// 書籍のモデル: gpt2 の Config に語彙 30003 (4.3.2 と同じ)。最大の層は wte (30003 × 768)
let book = GPT2Config { vocab_size: 30003, ..GPT2Config::preset("gpt2").unwrap() };
let (book_params, book_largest) = (book.num_parameters() as u64, companion::zero::memory::largest_layer(&book));
println!("the book's model: {:.1}M parameters", book_params as f64 / 1e6);
check_eq!(book_params, 108_884_736, "30003 × 768 + 1024 × 768 + 12 × (12 · 768² + 13 · 768) + 2 · 768");
let rows = companion::zero::memory::deepspeed_estimates(book_params, book_largest, 1, 1);
let stage2_gpu: Vec<(bool, u64)> = rows.iter().filter(|r| r.stage == 2).map(|r| (r.offload_optimizer, r.gpu_bytes)).collect();
let (with_offload, without) = (stage2_gpu.iter().find(|r| r.0).unwrap().1, stage2_gpu.iter().find(|r| !r.0).unwrap().1);
check!(with_offload * 4 < without, "offload moves most model-state bytes off the GPU: {with_offload} vs {without}");
notebook::zero_estimate_table(book_params, book_largest, 1, 1)
"""),
    md("""
### 損失, パープレキシティ, bits per byte
*Held-out loss, perplexity and bits per byte every 100 steps (the whole validation split), and a bigram baseline.*

損失はトークンあたりの交差エントロピー (自然対数) です。パープレキシティ exp(損失) は「平均して何通りの
トークンで迷っているか」に当たります。どちらもトークナイザに依存するので、語彙の違うモデル同士を比べるには
bits per byte = 損失 / ln 2 ÷ (1 トークンあたりのバイト数) を使います (1 バイトを当てるのに何ビット要るか)。
比較の基準として、同じトークンの出現回数だけで次のトークンを予測する bigram モデル (直前の 1 トークンだけを見る)
の値も計算します (平滑化の強さ μ は学習データの最後の 1 割で選び、検証データは使いません)。
*Perplexity = exp(loss); bits per byte = loss / ln 2 / bytes per token. A count-based bigram model of the same tokens is
the baseline (its smoothing chosen on the last tenth of the training blocks, never on the validation text).*
"""),
    code("""
let bpt = eval_dataset.bytes_per_token();
let mut rows = vec![vec!["step".to_string(), "epoch".into(), "train loss".into(), "eval loss".into(), "perplexity".into(), "bits/byte".into()]];
rows.push(vec!["0".into(), "0".into(), "".into(), format!("{:.4}", before.eval_loss), format!("{:.1}", before.perplexity), format!("{:.3}", before.bits_per_byte)]);
let mut last_loss = f64::NAN;
let mut evals = Vec::new();
for e in &state.log_history {
    if let Some(l) = e.get("loss").and_then(|v| v.as_f64()) { last_loss = l; }
    if let Some(l) = e.get("eval_loss").and_then(|v| v.as_f64()) {
        let (ppl, bpb) = (e["eval_perplexity"].as_f64().unwrap(), e["eval_bits_per_byte"].as_f64().unwrap());
        check!((ppl - l.exp()).abs() < 1e-9 * ppl, "perplexity = exp(loss)");
        check!((bpb - l / std::f64::consts::LN_2 / bpt).abs() < 1e-9, "bits per byte = loss / ln 2 / bytes per token");
        let epoch = e["epoch"].as_f64().unwrap();
        rows.push(vec![e["step"].to_string(), format!("{epoch:.2}"), format!("{last_loss:.4}"), format!("{l:.4}"), format!("{ppl:.1}"), format!("{bpb:.3}")]);
        evals.push((e["step"].as_u64().unwrap() as usize, last_loss, l, bpb));
    }
}
let final_bpb = evals.last().unwrap().3;
let bigram = companion::train::Bigram::fit_and_score(tokenizer.len(), &train_dataset, &eval_dataset);
rows.push(vec!["bigram".into(), "".into(), "".into(), format!("{:.4}", bigram.loss), format!("{:.1}", bigram.loss.exp()), format!("{:.3}", bigram.bits_per_byte)]);
println!("after training: {final_bpb:.3} bits per byte; bigram baseline (μ = {}): {:.3}; untrained: {:.3}", bigram.mu, bigram.bits_per_byte, before.bits_per_byte);
check!(final_bpb <= 1.65, "held-out bits per byte after training: {final_bpb} (bound 1.65)");
check!(final_bpb < bigram.bits_per_byte - 0.2, "the model beats the bigram baseline clearly: {final_bpb} vs {}", bigram.bits_per_byte);
check!(before.bits_per_byte > 3.0, "an untrained model is far from it: {}", before.bits_per_byte);
let table = notebook::Table(rows);
table
"""),
    md("""
### 学習と検証の差、2 エポック目以降
*The train/eval gap, and the flattening after the first epochs.*

1 エポックは 945 ステップです。2 エポック目からモデルは同じブロックをもう一度見るので、学習データの損失は
検証データの損失より速く下がり、差が開きます (検証データはモデルが一度も見ていない文章)。学習率もコサインで
0 に近づくので、最後の数百ステップで検証損失はほとんど動きません。
*An epoch is 945 steps; from the second epoch on the model sees its blocks again, so the training loss falls below the
held-out loss and the gap widens, while the cosine schedule brings the learning rate toward 0 and the curve flattens.*
"""),
    code("""
/// The evaluation at `step`: (step, train loss, eval loss, bits per byte).
fn at(evals: &[(usize, f64, f64, f64)], step: usize) -> (usize, f64, f64, f64) {
    *evals.iter().find(|e| e.0 == step).unwrap()
}
let mut rows = vec![vec!["step".to_string(), "train loss (last 10 steps)".into(), "eval loss".into(), "gap".into()]];
for s in [900, 1000, 1800, 2000] {
    let (_, tr, ev, _) = at(&evals, s);
    rows.push(vec![s.to_string(), format!("{tr:.4}"), format!("{ev:.4}"), format!("{:+.4}", ev - tr)]);
}
let (gap_1, gap_2) = (at(&evals, 900).2 - at(&evals, 900).1, at(&evals, 2000).2 - at(&evals, 2000).1);
let (late, early) = (at(&evals, 1500).2 - at(&evals, 2000).2, at(&evals, 500).2 - at(&evals, 1000).2);
println!("gap at step 900 {gap_1:+.4}, at step 2000 {gap_2:+.4}; eval loss fell {early:.4} over steps 500-1000 and {late:.4} over steps 1500-2000");
check!(gap_2 > gap_1, "the train/eval gap widens after the first epoch");
check!(late < early / 3.0, "the curve flattens: the last 500 steps gain less than a third of steps 500-1000");
let table = notebook::Table(rows);
table
"""),
    md("""
### 損失の推移
学習データの損失 (青)、検証データの損失 (赤)、学習率 (緑) です。灰色の線がエポックの終わり (945, 1890 ステップ)。
学習率は最初の 100 ステップで直線的に上がり (ウォームアップ)、その後コサインで 0 まで下がります。
*The loss and learning-rate curves; grey lines mark the end of each epoch (steps 945 and 1890). The learning rate
rises linearly over the first 100 steps (warmup), then follows a cosine down to 0.*
"""),
    code("""
notebook::LossPlot::from_state(&state).unwrap()
"""),
    md("""
### 学習中の生成文
*The chapter's prompt, continued greedily at four points of training.*

ステップ 0 のランダムなモデルは、たまたまロジットの大きいトークン (`?` や `Distutils`) を繰り返すだけです。
100 ステップでは、コーパスでいちばん多い改行だけを出します (ユニグラムの頻度を覚えた段階)。1000 ステップでは
Python のドキュメントの形 (`>>>` で始まる例や `def __init__(self):`) が現れ、2000 ステップでは
"The following example demonstrates ..." のような説明文と `argparse` の例になります。それでも 1.86M パラメータ・
約 400 万トークンの学習では、意味の通る文章にはなりません (4.3.5 で詳しく見ます)。
*Step 0 repeats whatever token the random weights favour; step 100 writes only newlines, the corpus's most frequent
token; by step 1000 the shape of the documentation appears (`>>>` examples, `def __init__(self):`), by 2000 prose like
"The following example demonstrates ..." and an `argparse` example; still no coherent text (4.3.5 looks closer).*
"""),
    code("""
let mut rows = vec![vec!["step".to_string(), "generation (greedy, repetition_penalty=1.1)".into()]];
for s in &samples {
    rows.push(vec![s.step.to_string(), format!("{:?}", s.text)]);
}
// The last sample is what the saved model writes: make it again from pretrained_model/.
let saved = GPT2LMHeadModel::from_pretrained("pretrained_model", DType::F32, &Device::Cpu)?;
let again = notebook::WatchTraining::new(&tokenizer, PROMPT, 100, &[], true)?.sample(&saved, 2000)?;
check_eq!(&again, samples.last().unwrap(), "the step-2000 sample is what the saved model generates");
/// What the sample at index `i` added to the prompt.
fn new_text(samples: &[notebook::Sample], i: usize) -> String {
    samples[i].text.strip_prefix(PROMPT).unwrap_or_default().to_string()
}
check!(new_text(&samples, 0).matches("Distutils").count() >= 3, "step 0 repeats a token: {:?}", new_text(&samples, 0));
check!(!new_text(&samples, 1).is_empty() && new_text(&samples, 1).trim().is_empty(), "step 100 writes only newlines: {:?}", new_text(&samples, 1));
// ... the corpus's most frequent token:
let mut counts = vec![0usize; tokenizer.len()];
for b in train_dataset.iter() { for &t in b.iter() { counts[t as usize] += 1; } }
let most = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap() as u32;
check_eq!(tokenizer.decode(&[most], false)?, "\n", "the most frequent token of the training blocks");
check!(new_text(&samples, 2).contains(">>>") && new_text(&samples, 2).contains("def __init__(self)"), "step 1000 has the documentation's shape: {:?}", new_text(&samples, 2));
check!(new_text(&samples, 3).contains("The following example") && new_text(&samples, 3).contains("argparse"), "step 2000: {:?}", new_text(&samples, 3));
let table = notebook::Table(rows);
table
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
