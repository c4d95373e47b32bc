"""4.3.3 分散並列学習のためのライブラリ: what ZeRO saves, computed and measured."""
from common import DEP, code, md, setup

NAME = "4.3.3_distributed.ipynb"
CELLS = [
    md("""
# 4.3.3 分散並列学習のためのライブラリ
*Libraries for distributed training: what ZeRO saves.*

Megatron-LM, DeepSpeed, Megatron-DeepSpeed, GPT-NeoX は、データ並列・テンソル並列・パイプライン並列を
組み合わせて大きなモデルを多数の GPU で学習します。DeepSpeed の ZeRO は、データ並列の各 GPU が
重複して持っていたモデルの状態 (パラメータ、勾配、オプティマイザの状態) を GPU 間で分割します。
この節には書籍のリストがないので、ZeRO の論文の式と DeepSpeed の見積もり関数を計算し、
CPU 上の「ランク」で実際に ZeRO を動かして各ランクが持つバイト数を測ります。
"""),
    setup(),
    code(DEP),
    md("""
### ZeRO の各ステージで 1 GPU が持つメモリ
*Model-state memory per GPU (ZeRO paper, mixed-precision Adam: 2 + 2 + K = 12 bytes per parameter Ψ):
baseline (2 + 2 + K)Ψ, stage 1: 2Ψ + 2Ψ + KΨ/N, stage 2: 2Ψ + (2 + K)Ψ/N, stage 3: (2 + 2 + K)Ψ/N.*

ステージ 1 はオプティマイザの状態、ステージ 2 はさらに勾配、ステージ 3 はパラメータも分割します。
"""),
    code("""
use companion::prelude::*;
let gpt2 = GPT2Config::preset("gpt2").unwrap();
let params = gpt2.num_parameters() as f64;
println!("gpt2: {} parameters", gpt2.num_parameters());
check_eq!(gpt2.num_parameters(), 124439808, "GPT2LMHeadModel.from_pretrained(\\"gpt2\\").num_parameters()");
notebook::zero_paper_table(params, &[1, 2, 4, 8, 64])
"""),
    md("""
### 論文の例: 7.5B パラメータを 64 GPU で
*The ZeRO paper's example (its Figure 1): 7.5B parameters on 64 GPUs → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.*
"""),
    code("""
let paper_gb = [120.0, 31.4, 16.6, 1.9];
for (row, want) in companion::zero::memory::zero_paper(7.5e9, 64).iter().zip(paper_gb) {
    check!((row.bytes_per_gpu / 1e9 - want).abs() < 0.05, "stage {}: {} GB, the paper prints {want}", row.stage, row.bytes_per_gpu / 1e9);
}
notebook::zero_paper_table(7.5e9, &[64])
"""),
    md("""
### オフロードを使う場合: DeepSpeed の見積もり関数
*With CPU offload: what DeepSpeed's `estimate_zero2/3_model_states_mem_needs_all_live` print for gpt2 on 1 node × 8 GPUs
(checked against the numbers DeepSpeed 0.19 itself computed, `../tests/fixtures/zero_estimates.json`;
`companion zero-estimate --model gpt2 --num-gpus 8` prints DeepSpeed's text).*

対応する Python:
```python
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=1)
estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=1)
```
"""),
    code("""
let largest = companion::zero::memory::largest_layer(&gpt2);
println!("largest layer (wte): {} parameters", largest);
let ds = notebook::Fixture::from_file(Path::new("../tests/fixtures/zero_estimates.json"))?;
check_eq!(largest, ds.at::<u64>("/largest_layer_params")?, "largest layer (DeepSpeed)");
let ours = companion::zero::memory::deepspeed_estimates(gpt2.num_parameters() as u64, largest, 8, 1);
let theirs: Vec<companion::serde_json::Value> = [ds.at::<Vec<_>>("/cases/0/zero2")?, ds.at::<Vec<_>>("/cases/0/zero3")?].concat();
check_eq!(ours.len(), theirs.len(), "rows");
for (o, t) in ours.iter().zip(&theirs) {
    check_eq!((o.gpu_bytes, o.cpu_bytes), (t["gpu"].as_u64().unwrap(), t["cpu"].as_u64().unwrap()), "{} (DeepSpeed)", o.options());
}
notebook::zero_estimate_table(gpt2.num_parameters() as u64, largest, 8, 1)
"""),
    md("""
### CPU の「ランク」で ZeRO を実際に動かす
*Running ZeRO for real on 4 CPU ranks (threads of this process, each with its own model replica) and measuring
what each rank keeps.*

GPU がなくても、DeepSpeed と同じ `ds_config.json` でステージ 0〜3 を動かせます。各ランクが実際に保持している
テンソルのバイト数を測り、論文の式 (fp32 なのでパラメータ 4Ψ、勾配 4Ψ、Adam の状態 8Ψ) と照合します。
4 ステージとも損失は同じになります (同じグローバルバッチを 4 つに分けて計算しているだけなので)。
"""),
    code("""
// 小さなトークナイザとモデル (2 層, 幅 64), 検証用コーパスを 64 トークンのブロックに
let docs = corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let mut tok = tokenizer::train(&TrainArgs { vocab_size: 1000, ..TrainArgs::default() }, docs.iter())?;
tok.set_special_token(SpecialRole::Pad, "<eos>")?;
let ds = data::tokenize_and_pack(&tok, &docs, &TokenizeOptions {
    packing: Packing::Group { block_size: 64 }, append_eos: tok.eos_token_id(), ..Default::default() })?;
let small = GPT2Config { vocab_size: tok.len(), n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64, n_ctx: Some(64), ..GPT2Config::default() };
println!("{} blocks of 64 tokens, model of {} parameters", ds.len(), small.num_parameters());
"""),
    code("""
let mut reports = Vec::new();
let mut losses = Vec::new();
for stage in 0..=3 {
    let ds_config = json!({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "zero_optimization": { "stage": stage }
    });
    let out = run_ranks(4, |_, comm: Arc<dyn Communicator>| -> Result<(Vec<companion::zero::ModelStateBytes>, f64), companion::train::TrainError> {
        let args = TrainingArguments {
            output_dir: "zero_demo".into(), max_steps: 2, per_device_train_batch_size: 2,
            learning_rate: 1e-3, logging_steps: 1.0, save_strategy: IntervalStrategy::No,
            deepspeed: Some(ds_config.clone()), ..Default::default()
        };
        let model = GPT2LMHeadModel::new(&small, 42, &Device::Cpu).unwrap();
        let collator = DataCollatorForLanguageModeling::new(&tok);
        let mut trainer = Trainer::new_distributed(model, args, collator, ds.clone(), None, None, comm)?;
        trainer.verbose = false;
        let result = trainer.train()?;
        Ok((trainer.memory_report()?, result.training_loss))
    })?;
    println!("ZeRO-{stage}: train_loss {:.6}", out[0].1);
    losses.push(out[0].1);
    reports.push(out[0].0.clone());
}
for l in &losses {
    check!((l - losses[0]).abs() < 1e-5 * losses[0], "every stage trains the same: {l} vs {}", losses[0]);
}
println!("the four stages train the same (within 1e-5)");
"""),
    code("""
let p = small.num_parameters();
for m in reports.iter().flatten() {
    // fp32: weights 4Ψ (split from stage 3), gradients 4Ψ (from stage 2), Adam's two moments 8Ψ (from stage 1).
    let part = |from: u8| if m.stage >= from { p.div_ceil(m.world_size) } else { p };
    let want = (4 * part(3), 4 * part(2), 8 * part(1));
    check_eq!((m.params, m.grads, m.optimizer_states), want, "stage {} rank {}: bytes of weights, gradients, Adam", m.stage, m.rank);
}
notebook::zero_measured_table(&reports, small.num_parameters())
"""),
    md("""
ステージが上がるごとに、各ランクの持つ量が 1/4 になっていく項が増えます (ステージ 1: Adam の状態、
ステージ 2: さらに勾配、ステージ 3: さらにパラメータ)。ステージ 3 では各ランクは全パラメータを一度に持たず、
順伝播・逆伝播のたびに 1 ブロックずつ集めて (all-gather)、使い終わったら捨てます。
*Each stage divides one more term by the number of ranks; under stage 3 no rank ever holds the whole model:
each block's weights are gathered for its forward and again for its backward, then dropped.*

同じことはコマンドラインからもできます: `companion pretrain --deepspeed data/ds_config/zero3.json --num-ranks 4`。
4.3.4 では、この仕組みで ZeRO-2 (オプティマイザの CPU オフロード付き) の `ds_config.json` を使って本番の学習をします。
*The same from the command line, with the example configs in `data/ds_config/`; 4.3.4 trains the real model through a ds_config.*
"""),
]
