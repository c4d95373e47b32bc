"""4.3.1 事前学習とは: next-token prediction, the causal mask, the loss."""
from common import DEP, code, md, setup

NAME = "4.3.1_pretraining.ipynb"
CELLS = [
    md("""
# 4.3.1 事前学習とは
*What pretraining is: learning to predict the next token.*

事前学習でモデルが学ぶのは、文章の各位置で「次のトークン」を当てることです。

- **学習の形**: 正解は文章そのもの (1 トークンずらしたもの) なので、人手のラベルは要りません (自己教師あり学習)。
  第 2 章の翻訳モデルも、デコーダの側では同じく次の単語を当てて学びました。
- **モデルの形**: 第 2 章の Transformer はエンコーダとデコーダの組で、入力文を別の文に変換しました。GPT-2 は
  (第 3 章で見たとおり) デコーダのブロックだけを積み重ね、入力文と出力文の区別もクロスアテンションもありません。
  表すのは 1 つの文章の確率 p(x₁…xₙ) = Π p(xᵢ | x₁…xᵢ₋₁) です。各位置は自分とそれより前だけに注意を向けるので
  (因果マスク)、1 回の順伝播で全位置の予測が同時に得られます。
- **なぜ「事前」か**: この段階のあとに続く学習があるからです。以前は、次の単語の予測で学んだモデルを、翻訳などの
  下流タスクごとにファインチューニングして使いました。大規模言語モデルは追加の学習なしでも多くのタスクを解けます
  (ゼロショット性能) が、指示に従って答えるようになるには 5.2 節の指示チューニングが要ります (4.3.5 で、事前学習
  だけのモデルが質問に答えず文章を続けることを確かめます)。事前学習はその前に、言語モデルとしての知識をつける段階です。

損失は、正解の次トークンにモデルが与えた確率の負の対数 (交差エントロピー) の平均です。学習前の
ランダムなモデルはどのトークンにもほぼ同じ確率を与えるので、損失は語彙サイズの対数 ln(50257) ≈ 10.8 に近くなります。
*Chapter 2's Transformer was an encoder-decoder translating one text into another; GPT is decoder-only and models the
probability of text itself, trained the same way, by predicting the next token (a causal mask lets every position do so in
one pass). It is "pre"-training because it comes before fine-tuning on downstream tasks and before instruction tuning
(5.2), which a pretrained model still needs despite its zero-shot ability.*
"""),
    setup(),
    code(DEP),
    md("""
### GPT-2 のトークナイザで文をトークンに分ける
GPT-2 のトークナイザで 1 文をトークンに分けます。トークンと ID は Python の `transformers` の結果と照合します。
*GPT-2's tokenizer on one sentence; the cell checks the tokens and ids against Python `transformers`.*
"""),
    code("""
use companion::prelude::*;
let fx = notebook::Fixture::load("chapter")?;
let tokenizer = AutoTokenizer::from_pretrained("../data/pretrained/gpt2")?;
let text = "Pretraining teaches a language model to predict the next token.";
let ids = tokenizer.encode(text)?;
let tokens = tokenizer.tokenize(text)?;
check_eq!(tokens, fx.at::<Vec<String>>("/gpt2/pretraining/tokens")?, "tokens (Python transformers)");
check_eq!(ids, fx.at::<Vec<u32>>("/gpt2/pretraining/ids")?, "ids (Python transformers)");
tokens
"""),
    md("""
### 小さな GPT-2 を作る
GPT-2 の語彙のまま、2 層・幅 64 の小さな GPT-2 をランダムに初期化して作ります。パラメータ数は
V·C + P·C + L·(12C² + 13C) + 2C (トークンと位置の埋め込み、ブロックごとに LayerNorm 2 つ (4C)、アテンション
(4C² + 4C) と MLP (8C² + 5C)、最後の LayerNorm。出力層はトークン埋め込みと重みを共有) で、セルはこの式と照合します。
*A small, randomly initialised GPT-2 (2 layers, 64 wide) with GPT-2's vocabulary. Its parameter count is the formula
V·C + P·C + L·(12C² + 13C) + 2C: token and position embeddings, per block two LayerNorms (4C), attention (4C² + 4C)
and MLP (8C² + 5C), the final LayerNorm; the output layer shares the token embedding.*
"""),
    code("""
let config = GPT2Config { n_layer: 2, n_embd: 64, n_head: 2, ..GPT2Config::default() };
let model = GPT2LMHeadModel::new(&config, 0, &Device::Cpu)?;
let input = Tensor::new(vec![ids.clone()], &Device::Cpu)?;
let logits = model.forward(&input, None, None)?;
println!("logits: {:?} (batch, positions, vocabulary)", logits.dims());
println!("parameters: {}", model.num_parameters());
let (v, p, c, l) = (config.vocab_size, config.n_positions, config.n_embd, config.n_layer);
check_eq!(logits.dims(), &[1, ids.len(), v][..], "logits shape");
check_eq!(model.num_parameters(), v * c + p * c + l * (12 * c * c + 13 * c) + 2 * c, "parameter count");
"""),
    md("""
### 因果マスク: 各位置は前だけを見る
行 i の位置は列 0..i (青) にだけ注意を向けられます。セルはこれをモデルそのもので確かめます: 後ろのトークンを
変えても、それより前の位置のロジットはまったく変わりません。
*The causal mask: row i may attend to columns 0..i (blue). The cell checks it on the model itself: changing the last
tokens leaves the logits of every earlier position exactly as they were.*
"""),
    code("""
let k = 6;
let mut changed = ids.clone();
for id in &mut changed[k..] { *id = tokenizer.token_to_id(".").unwrap(); }
let logits2 = model.forward(&Tensor::new(vec![changed.clone()], &Device::Cpu)?, None, None)?;
fn max_diff(a: &Tensor, b: &Tensor) -> companion::candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}
let n = ids.len();
let before = max_diff(&logits.narrow(1, 0, k)?, &logits2.narrow(1, 0, k)?)?;
let after = max_diff(&logits.narrow(1, k, n - k)?, &logits2.narrow(1, k, n - k)?)?;
println!("tokens {k}.. changed: positions 0..{k} moved by {before}, positions {k}.. by {after:.3}");
check!(before == 0.0, "earlier positions must not see later tokens (moved by {before})");
check!(after > 1e-3, "changed positions must change (moved by {after})");
notebook::CausalMask { tokens: tokens.clone() }
"""),
    md("""
### 各位置で次のトークンを予測する
各位置が次のトークンを予測し、損失は正解の次トークンの −log p の平均です (モデル自身の損失と照合)。
学習前は ln(語彙数) に近い値です。
*Each position predicts the next token; the loss is the mean of −log p of the true next tokens (checked against the
model's own loss), near ln(vocabulary) before training.*
"""),
    code("""
let logp = companion::candle_nn::ops::log_softmax(&logits.squeeze(0)?, 1)?.to_vec2::<f32>()?;
let mut nll = Vec::new();
for i in 0..ids.len() - 1 {
    let x = -logp[i][ids[i + 1] as usize];
    println!("{:>12} → {:<12} -log p = {:.3}", tokens[i], tokens[i + 1], x);
    nll.push(x as f64);
}
let labels = input.to_dtype(DType::I64)?;
let loss: f32 = model.forward_with_labels(&input, None, &labels)?.loss.unwrap().to_scalar()?;
let mean = nll.iter().sum::<f64>() / nll.len() as f64;
let ln_v = (config.vocab_size as f64).ln();
println!("mean loss {:.3}, ln(vocab) = {:.3}", loss, ln_v);
check!((loss as f64 - mean).abs() < 1e-4, "the loss is the mean -log p: {loss} vs {mean}");
check!((loss as f64 - ln_v).abs() < 0.25, "an untrained model is near uniform: {loss} vs ln V = {ln_v}");
"""),
]
