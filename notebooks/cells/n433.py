"""4.3.3 分散並列学習のためのライブラリ: what ZeRO saves, computed and measured."""
from common import DEP, code, md, setup

NAME = "4.3.3_distributed.ipynb"
CELLS = [
    md("""
# 4.3.3 分散学習のためのライブラリ
*Libraries for distributed training: the four the chapter names, 3D parallelism, and what ZeRO saves.*

4.2 節の 3D 並列化 (データ並列・テンソル並列・パイプライン並列) と ZeRO を自分で設計・実装するのは難しいので、
大規模言語モデルの学習には分散学習を支えるライブラリを使います。書籍が挙げる 4 つ:

| ライブラリ | 誰が | 書籍から (要点) | ほかに加えるもの |
|---|---|---|---|
| Megatron-LM | NVIDIA, 2019 | 数十億パラメータの LLM の名前 → 今は Transformer 系モデルと学習コードのリポジトリ | テンソル並列 (層の中の行列を GPU 間で分割, Shoeybi et al. 2019)。パイプライン並列は 2021 年 (PTD-P) に加わった |
| DeepSpeed | Microsoft | 学習のフレームワーク: 3D 並列化, ZeRO, MoE, 推論の効率化, モデル圧縮 | ZeRO (状態の分割と CPU / NVMe へのオフロード)。transformers の `Trainer` から `deepspeed=` で使える (4.3.4) |
| Megatron-DeepSpeed | Microsoft | Megatron-LM のコード + DeepSpeed の機能, 学習のサンプル | Megatron のテンソル・パイプライン並列と DeepSpeed の ZeRO を 1 つの学習で組み合わせる |
| GPT-NeoX | EleutherAI | Megatron-LM 系のモデル + DeepSpeed | 設定ファイルだけで組み替えられる学習の仕組み (GPT-NeoX-20B, Pythia の学習に使われた) |

この節には書籍のリストがありません。このノートブックでは、3D 並列化で各ランクが何を持ち何を送り合うかを GPT-2 の
形で数えてから、小さな GPT-2 を CPU 上の「ランク」で実際に 3D 並列で学習し、ZeRO の論文の式と DeepSpeed の
見積もり関数を計算し、CPU 上のランクで ZeRO を動かして各ランクが持つバイト数を測ります。
*The chapter's four libraries (Megatron-LM, DeepSpeed, Megatron-DeepSpeed, GPT-NeoX): who made each, what the chapter
says of it, and what it adds to the others. The section has no listing: we count what 3D parallelism puts on each rank,
train a small GPT-2 with it on CPU ranks, compute ZeRO's memory, and run ZeRO on CPU ranks.*
"""),
    setup(),
    code(DEP),
    md("""
### 3D 並列化: 各ランクが持つもの、ランク間を流れるもの
*3D parallelism for GPT-2 small on 8 ranks (tensor 2 × pipeline 2 × data 2), as Megatron-LM lays it out: which slice of
each weight a rank holds, and what crosses between ranks.*

- **テンソル並列 (TP)**: 1 つの層の行列を分けます。アテンションの `c_attn` と MLP の `c_fc` は列 (出力) で、
  それぞれの `c_proj` は行 (入力) で分け、各ブロックの順伝播でアテンションと MLP の後に 1 回ずつ all-reduce します
  (逆伝播でも 2 回)。LayerNorm は全ランクが同じものを持ちます。通信が多いので、同じノードの隣り合う GPU に置きます。
- **パイプライン並列 (PP)**: ブロックを段 (ステージ) に分け、マイクロバッチの活性を隣の段へ送ります
  (埋め込みは最初の段、`ln_f` と出力層は最後の段)。
- **データ並列 (DP)**: 同じ分割を持つ組が別々のデータを処理し、勾配を all-reduce します (ZeRO ならその状態も分割)。

ランク r のテンソル並列の番号は r mod TP、データ並列の番号は ⌊r / TP⌋ mod DP、パイプラインの段は ⌊r / (TP·DP)⌋ です
(Megatron-LM の並べ方: テンソル並列のランクが隣り合う)。まず GPT-2 small での分割を式で数え、パラメータの合計が
元のモデルと合うことを確かめます。次の節で、小さな GPT-2 を CPU のランク (スレッド) の上で実際に 3D 並列で学習します。
*TP splits c_attn/c_fc by columns and c_proj by rows (two all-reduces per block forward, two backward), PP sends
activations between neighbouring stages, DP all-reduces gradients. Rank r has TP index r mod TP, DP index ⌊r/TP⌋ mod
DP, stage ⌊r/(TP·DP)⌋. First the split of GPT-2 small is counted; the next section trains a small GPT-2 this way on
CPU ranks.*
"""),
    code("""
use companion::prelude::*;
let gpt2 = GPT2Config::preset("gpt2").unwrap();
let (tp, pp, dp) = (2usize, 2usize, 2usize);
let (c, l, v, p) = (gpt2.n_embd, gpt2.n_layer, gpt2.vocab_size, gpt2.n_positions);
// A rank's parameters by Megatron's split (`expected_held`): per block its share of the column-split c_attn
// (3C/tp columns + bias) and c_fc (4C/tp + bias), of the row-split c_proj of attention (C/tp rows) and MLP (4C/tp
// rows) with their biases whole, both LayerNorms whole; on the first stage ⌈V/tp⌉ rows of wte and the whole wpe;
// on the last ln_f and the tied head's copy of the wte rows.
let vp = v.div_ceil(tp);                          // wte rows per TP rank (the vocabulary padded to divide)
let per_stage = l / pp;
let mut rows = vec![vec!["rank".to_string(), "TP".into(), "DP".into(), "stage".into(), "blocks".into(), "parameters".into(), "sends/receives".into()]];
let mut sum_over_one_replica = 0usize;
for r in 0..tp * pp * dp {
    let (t, d, s) = (r % tp, (r / tp) % dp, r / (tp * dp));
    let n = companion::parallel::traffic::expected_held(&gpt2, tp, pp, s);
    if d == 0 { sum_over_one_replica += n; }
    let comm = format!("TP all-reduce with rank {}; {} ; DP all-reduce with rank {}",
        r ^ 1, if s == 0 { format!("activations → rank {0}, their gradients ← {0}", r + tp * dp) } else { format!("activations ← rank {0}, their gradients → {0}", r - tp * dp) }, (s * dp + (1 - d)) * tp + t);
    rows.push(vec![r.to_string(), t.to_string(), d.to_string(), s.to_string(),
                   format!("{}–{}", s * per_stage, (s + 1) * per_stage - 1), format!("{:.1}M", n as f64 / 1e6), comm]);
}
// One data-parallel replica holds the model once, except what every TP rank keeps whole (LayerNorms, the row-split
// layers' biases, wpe), the tied wte held by both the first and the last stage, and the vocabulary's padding rows.
let replicated = (tp - 1) * (l * (4 * c + 2 * c) + 2 * c + p * c) + v * c;
let padding = 2 * (tp * vp - v) * c;
check_eq!(sum_over_one_replica, gpt2.num_parameters() + replicated + padding,
          "one replica's slices add up to GPT-2 plus what is kept whole on several ranks");
println!("GPT-2 small ({:.1}M) on tp={tp} × pp={pp} × dp={dp} = {} ranks", gpt2.num_parameters() as f64 / 1e6, tp * pp * dp);
let table = notebook::Table(rows);
table
"""),
    md("""
### 3D 並列化で学習する (CPU のランク)
*3D parallel training of a small GPT-2 (4 blocks, 64 wide, 4 heads) on CPU thread ranks, with
`companion::parallel::ParallelTrainer`: tensor 2 × pipeline 2 (4 ranks) and tensor 2 × data 2 (4 ranks), 3 AdamW
steps of 4 micro-batches each, pipeline in 1F1B order, ZeRO-1 over the data-parallel group (gradients reduce-scattered,
updated parts all-gathered). Each layout's losses must equal one rank's (1e-5); the elements each rank hands to its
tensor, pipeline and data groups in a step must equal the count built from the Megatron-LM and ZeRO papers' terms. The
tokens are a fixed pseudo-random sequence: the point is that the split changes nothing.*

テンソル並列はアテンションのヘッドと MLP の列・行を、パイプライン並列はブロックを段に分けます。
パイプラインは 1F1B の順 (前向き 1 回と逆向き 1 回を交互に) でマイクロバッチを流し、データ並列の組では
ZeRO-1 (勾配を reduce-scatter し、Adam の状態を分け持ち、更新した部分を all-gather) を使います。
どの分け方でも損失が 1 ランクで学習した場合と 1e-5 の範囲で同じになること、各ランクが 1 ステップで
テンソル並列・パイプライン並列・データ並列の組に渡す要素数が論文の式から数えた値と一致することを確かめ、
各ランクが持つ部分を表にします。
(`Trainer` と `companion pretrain` でも `--tensor-model-parallel-size` と `--pipeline-model-parallel-size` で
同じ分け方ができます。2 つ先の節で使います。)
*(The Trainer and `companion pretrain` take the same split with `--tensor-model-parallel-size` and
`--pipeline-model-parallel-size`; used two sections below.)*
"""),
    code("""
use companion::parallel::{ParallelTrainer, StepOutput};
use companion::optim::adamw::AdamWParams;
let mut small3d = GPT2Config::preset("gpt2").unwrap();
(small3d.vocab_size, small3d.n_positions, small3d.n_embd, small3d.n_layer, small3d.n_head) = (256, 32, 64, 4, 4);
(small3d.attn_pdrop, small3d.resid_pdrop, small3d.embd_pdrop) = (0.0, 0.0, 0.0);
let init3d = GPT2LMHeadModel::new(&small3d, 42, &Device::Cpu).unwrap();
let weights3d: Vec<(String, Tensor)> = init3d.named_parameters().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
// 3 steps × 4 micro-batches × 2 rows × 16 tokens.
let batches3d: Vec<Vec<Vec<Vec<u32>>>> = (0..3u32).map(|s| (0..4u32).map(|m| (0..2u32).map(|i|
    (0..16u32).map(|j| (s * 97 + m * 31 + i * 13 + j * 7 + 5) % 256).collect()).collect()).collect()).collect();
/// Per rank: its (TP, DP, stage), the losses of the steps, the parameters it holds, its Adam bytes, what its
/// last step sent through each group beside the papers' count, and the names of the weights it holds.
fn train3d(cfg: &GPT2Config, w: &[(String, Tensor)], b: &[Vec<Vec<Vec<u32>>>], tp: usize, pp: usize, dp: usize)
    -> Vec<((usize, usize, usize), Vec<f64>, usize, usize, (companion::parallel::traffic::Traffic, companion::parallel::traffic::Traffic), Vec<String>)> {
    let adam = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    run_ranks(tp * pp * dp, |_, comm| -> Result<_, companion::zero::comm::CommError> {
        let err = |e: companion::candle_core::Error| companion::zero::comm::CommError::Transport(e.to_string());
        let mut t = ParallelTrainer::new(cfg, w, comm, tp, pp, adam).map_err(err)?;
        let mut losses = vec![];
        for mb in b {
            losses.push(t.step(mb, 1e-3, 1.0).map_err(err)?.loss);
        }
        let held = t.stage.model.shards.iter().map(|(_, v)| v.elem_count()).sum();
        let c = t.groups.coords;
        let formula = companion::parallel::traffic::expected(&companion::parallel::traffic::StepShape {
            config: cfg, tp, pp, dp, stage: c.pp, micro_batches: b[0].len() / dp, rows: b[0][0].len(),
            seq: b[0][0][0].len(), held });
        let names: Vec<String> = t.shards().into_iter().map(|(n, _)| n).collect();
        Ok(((c.tp, c.dp, c.pp), losses, held, t.optimizer.state_bytes(), (t.last_traffic, formula), names))
    }).unwrap()
}
let one3d = train3d(&small3d, &weights3d, &batches3d, 1, 1, 1).remove(0);
let mut rows3d = vec![vec!["layout".to_string(), "rank".into(), "TP".into(), "DP".into(), "stage".into(),
    "blocks".into(), "parameters held".into(), "Adam state".into(), "sent per step: TP / PP / DP".into(),
    "losses (3 steps)".into()]];
let mut held2x2: Vec<(companion::parallel::Coords, Vec<String>)> = vec![];
for (tp, pp, dp) in [(2, 2, 1), (2, 1, 2)] {
    let ranks = train3d(&small3d, &weights3d, &batches3d, tp, pp, dp);
    if (tp, pp) == (2, 2) {
        held2x2 = ranks.iter().map(|x| (companion::parallel::Coords { tp: x.0 .0, dp: x.0 .1, pp: x.0 .2 }, x.5.clone())).collect();
    }
    // ZeRO-1: the replicas of one shard hold Adam's two fp32 moments for it once between them (up to padding).
    for shard in ranks.iter().filter(|x| x.0 .1 == 0) {
        let group: usize = ranks.iter().filter(|x| (x.0 .0, x.0 .2) == (shard.0 .0, shard.0 .2)).map(|x| x.3).sum();
        check!(group >= 8 * shard.2 && group < 8 * (shard.2 + dp),
               "tp {tp} pp {pp} dp {dp}: Adam bytes over the replicas {group} vs 8 × {} held", shard.2);
    }
    for (r, ((t, d, s), losses, held, adam, (sent, formula), _)) in ranks.into_iter().enumerate() {
        // Megatron: 2 all-reduces of b·s·h per layer forward, 2 backward; a stage boundary carries b·s·h each way per
        // micro-batch; data parallelism all-reduces the gradients and ZeRO-1 all-gathers the updated parts.
        check_eq!(sent, formula, "tp {tp} pp {pp} dp {dp} rank {r}: elements sent in a step vs the papers' count");
        check_eq!(held, companion::parallel::traffic::expected_held(&small3d, tp, pp, s),
                  "tp {tp} pp {pp} dp {dp} rank {r}: parameters held vs Megatron's split");
        for (a, b) in losses.iter().zip(&one3d.1) {
            check!((a - b).abs() <= 1e-5 * b, "tp {tp} pp {pp} dp {dp} rank {r}: loss {a} vs one rank's {b}");
        }
        let per = small3d.n_layer / pp;
        rows3d.push(vec![format!("{tp}×{pp}×{dp}"), r.to_string(), t.to_string(), d.to_string(), s.to_string(),
            format!("{}–{}", s * per, (s + 1) * per - 1), held.to_string(), format!("{} B", adam),
            format!("{} / {} / {}", sent.tensor, sent.pipeline, sent.data),
            losses.iter().map(|l| format!("{l:.5}")).collect::<Vec<_>>().join(", ")]);
    }
}
println!("one rank: {} parameters; losses {}", small3d.num_parameters(), one3d.1.iter().map(|l| format!("{l:.5}")).collect::<Vec<_>>().join(", "));
let table3d = notebook::Table(rows3d);
table3d
"""),
    md("""
### どのランクがどの部分を持つか
*Which slice of each part of the model each rank of the tensor 2 × pipeline 2 run holds, read from the weights each
rank really holds (`ParallelTrainer::shards`): a row per rank, coloured by pipeline stage. Every part must be held by
some rank of the replica.*

行がランク、列がモデルの部分 (埋め込み `wte` と `wpe`、各ブロック、`ln_f`) です。各ランクが実際に持っている重みの
名前から作り、セルの色はパイプラインの段を表します。テンソル並列の 2 ランクがアテンションのヘッドと語彙の行を
半分ずつ持ち、最後の段は出力層のために `wte` の写しを持ちます (重みを共有しているため)。語彙 256 は 2 で割り切れる
ので詰め物の行はありません。
"""),
    code("""
let map3d = notebook::ShardMap::new(&small3d, companion::parallel::ParallelLayout::new(4, 2, 2).unwrap(), &held2x2);
check!(map3d.missing().is_empty(), "parts no rank holds: {:?}", map3d.missing());
check_eq!(map3d.ranks[1].1[2].as_deref(), Some("heads 2–3"), "rank 1 (TP 1, stage 0) holds heads 2–3 of block 0");
check_eq!(map3d.ranks[2].1[2], None, "rank 2 (stage 1) holds nothing of block 0");
map3d
"""),
    md("""
### Trainer で 3D 並列化し、別の並べ方で再開する
*The same through the `Trainer` (as `companion pretrain --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2`
runs it): 2 steps at tensor 2 × pipeline 2 with ZeRO-1 on 4 ranks, saved; resumed on 2 data-parallel ranks with
ZeRO-3 for 2 steps more. The checkpoint holds the whole state by parameter name (gathered from the shards), and the
new run cuts it for its own layout. Every step's loss must equal an uninterrupted run on one rank (1e-5).*

DeepSpeed や transformers の Trainer では、保存したときと違う並べ方で再開するには変換が要ります
(DeepSpeed の universal checkpoint)。ここでは保存するときに各ランクの断片を集めてパラメータ名ごとの全体の状態にし、
再開するときに新しい並べ方に切り直します。データローダーは同じ例から続けます (ランクあたりのバッチ × データ並列の
ランク数が同じとき)。
"""),
    code("""
use companion::train::TrainError;
/// Losses by step of a Trainer run of `cfg` on tp × pp × dp CPU ranks (ZeRO `stage` in its ds_config), 4 steps of
/// 2 micro-batches of 4 rows, stopped after `stop` steps or resumed from `resume`.
fn trainer3d(cfg: &GPT2Config, out: &Path, (tp, pp, dp): (usize, usize, usize), stage: Option<u8>, stop: Option<usize>,
             resume: Option<&Path>) -> Vec<(u64, f64)> {
    let rows: Vec<Vec<u32>> = (0..32u32).map(|i| (0..16u32).map(|j| (i * 37 + j * 11 + 3) % 256).collect()).collect();
    let ds = Dataset::from_rows(rows, 32 * 16 * 4, 32 * 16);
    run_ranks(tp * pp * dp, |_, comm| -> Result<Vec<(u64, f64)>, TrainError> {
        let args = TrainingArguments {
            output_dir: out.display().to_string(), max_steps: 4, per_device_train_batch_size: 4 / dp,
            gradient_accumulation_steps: 2, learning_rate: 3e-3, weight_decay: 0.1, logging_steps: 1.0, save_steps: 2.0,
            tensor_model_parallel_size: tp, pipeline_model_parallel_size: pp,
            resume_from_checkpoint: resume.map(|p| p.display().to_string()),
            deepspeed: stage.map(|s| json!({"train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": s}})),
            ..Default::default()
        };
        let collator = DataCollatorForLanguageModeling { pad_token_id: Some(0), mlm: false, pad_to_multiple_of: None,
            padding_side: tokenizer::PaddingSide::Right };
        let model = GPT2LMHeadModel::new(cfg, 42, &Device::Cpu)?;
        let mut t = Trainer::new_distributed(model, args, collator, ds.clone(), None, None, comm)?;
        t.verbose = false;
        if let Some(s) = stop { t.add_callback(StopAtStep(s)); }
        t.train()?;
        Ok(t.state.log_history.iter().filter_map(|e| Some((e.get("step")?.as_u64()?, e.get("loss")?.as_f64()?))).collect())
    }).unwrap().remove(0)
}
let work3d = std::env::temp_dir().join(format!("companion-433-3d-{}", std::process::id()));
let _ = std::fs::remove_dir_all(&work3d);
let straight3d = trainer3d(&small3d, &work3d.join("one"), (1, 1, 1), None, None, None);
let first3d = trainer3d(&small3d, &work3d.join("tp2pp2"), (2, 2, 1), Some(1), Some(2), None);
let then3d = trainer3d(&small3d, &work3d.join("dp2"), (1, 1, 2), Some(3), None, Some(&work3d.join("tp2pp2/checkpoint-2")));
check_eq!(then3d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4],
          "the resumed run's log history: the checkpoint's steps 1–2, then its own 3–4");
let then3d: Vec<(u64, f64)> = then3d.into_iter().filter(|x| x.0 > 2).collect();
let mut rows_resume = vec![vec!["step".to_string(), "one rank".into(), "tp 2 × pp 2 + ZeRO-1 (4 ranks)".into(),
    "resumed: dp 2 + ZeRO-3 (2 ranks)".into()]];
for (step, want) in &straight3d {
    let got = first3d.iter().chain(&then3d).find(|x| x.0 == *step).map(|x| x.1).unwrap();
    check!((got - want).abs() <= 1e-5 * want, "step {step}: {got} vs one rank's {want}");
    let cell = |v: &[(u64, f64)]| v.iter().find(|x| x.0 == *step).map_or(String::new(), |x| format!("{:.5}", x.1));
    rows_resume.push(vec![step.to_string(), format!("{want:.5}"), cell(&first3d), cell(&then3d)]);
}
let _ = std::fs::remove_dir_all(&work3d);
let table_resume = notebook::Table(rows_resume);
table_resume
"""),

    md("""
### ZeRO の各ステージで 1 GPU が持つメモリ
*Model-state memory per GPU in the ZeRO paper (mixed-precision Adam: 2 bytes of fp16 weights, 2 of fp16 gradients and
K = 12 of optimizer state — fp32 weights, momentum, variance — per parameter, 16 in all): baseline (2 + 2 + K)Ψ,
stage 1: 2Ψ + 2Ψ + KΨ/N, stage 2: 2Ψ + (2 + K)Ψ/N, stage 3: (2 + 2 + K)Ψ/N. Units: GB = 10⁹ bytes, as in the paper.*

ステージ 1 はオプティマイザの状態、ステージ 2 はさらに勾配、ステージ 3 はパラメータも分割します。
1 パラメータあたり fp16 の重み 2 バイト、fp16 の勾配 2 バイト、オプティマイザの状態 K = 12 バイト
(fp32 の重みのコピー、1 次と 2 次のモーメント各 4 バイト) で、合計 16 バイトです。
"""),
    code("""
let params = gpt2.num_parameters() as f64;
println!("gpt2: {} parameters", gpt2.num_parameters());
check_eq!(gpt2.num_parameters(), 124439808, "GPT2LMHeadModel.from_pretrained(\\"gpt2\\").num_parameters()");
notebook::zero_paper_table(params, &[1, 2, 4, 8, 64])
"""),
    md("""
### 論文の例: 7.5B パラメータを 64 GPU で
ZeRO の論文の図 1 の例 (7.5B パラメータ, 64 GPU) を同じ式で計算し、論文に印刷された値と照合します。
*The ZeRO paper's example (its Figure 1): 7.5B parameters on 64 GPUs → 120 GB, 31.4 GB, 16.6 GB, 1.9 GB (10⁹ bytes).*
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
`companion zero-estimate --model gpt2 --num-gpus 8` prints DeepSpeed's text). Units: GiB = 2³⁰ bytes; DeepSpeed divides
by 2³⁰ but prints "GB".*

DeepSpeed の見積もりは 2³⁰ バイトで割った値を「GB」と表示します。ここでは GiB と書きます (上の論文の表は 10⁹ バイトの GB)。

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

*Each rank is a thread here; on GPUs each is a process with its own device.*

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
    // fp32: weights 4Ψ (split from stage 3), gradients 4Ψ (from stage 2), Adam's two moments 8Ψ (from stage 1);
    // a partition is Ψ padded to a multiple of 2N (DeepSpeed's padding), over N.
    let part = |from: u8| if m.stage >= from { p.div_ceil(2 * m.world_size) * 2 } else { p };
    let want = (4 * part(3), 4 * part(2), 8 * part(1));
    check_eq!((m.params, m.grads, m.optimizer_states), want, "stage {} rank {}: bytes of weights, gradients, Adam", m.stage, m.rank);
}
notebook::zero_measured_table(&reports, small.num_parameters())
"""),
    md("""
ステージが上がるごとに、各ランクの持つ量が 1/4 になっていく項が増えます (ステージ 1: Adam の状態、
ステージ 2: さらに勾配、ステージ 3: さらにパラメータ)。ステージ 3 では各ランクは全パラメータを一度に持たず、
順伝播・逆伝播のたびに 1 ブロックずつ集めて (all-gather)、使い終わったら捨てます。その一時的に集めた重みは
論文の式 (モデルの状態だけを数える) には入らないので、表では「gathered weights (peak)」の列に分け、
「peak held」に足しています。kB は 10³ バイトです。
*Each stage divides one more term by the number of ranks; under stage 3 no rank ever holds the whole model:
each block's weights are gathered for its forward and again for its backward, then dropped.*

同じことはコマンドラインからもできます: `companion pretrain --deepspeed data/ds_config/zero3.json --num-ranks 4`。
4.3.4 では、この仕組みで ZeRO-2 (オプティマイザの CPU オフロード付き) の `ds_config.json` を使って本番の学習をします。
*The same from the command line, with the example configs in `data/ds_config/`; 4.3.4 trains the real model through a ds_config.*
"""),
]
