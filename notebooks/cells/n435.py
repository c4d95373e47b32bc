"""4.3.5 学習済みモデルによる推論: generate, its arguments, streaming, sampling."""
from common import DEP, code, listing, md, setup

NAME = "4.3.5_inference.ipynb"
CELLS = [
    md("""
# 4.3.5 学習済みモデルを用いた推論
*Inference with the model trained in 4.3.4 (run that notebook first).*

4.3.4 で保存したモデルで、書籍と同じプロンプト "Hi, how are you?" の続きを生成します。書籍の 108.9M パラメータの
モデルに対して、ここでは 1.86M パラメータを CPU で約 10 分学習しただけのモデルなので、出てくるのは意味の通る文章ではなく、
学習に使った Python のドキュメントの断片です。貪欲法 (毎回いちばん確率の高いトークン) がこの大きさのモデルでは
同じ句の繰り返し (ループ) に陥ることを確かめ、それを抑える方法 (繰り返しペナルティ、`no_repeat_ngram_size`、
サンプリング) を比べます。
*The chapter's prompt continued by a 1.86M-parameter model trained for minutes on a CPU (the book's has 108.9M): not
coherent text but fragments of the Python documentation it was trained on. We show where greedy decoding loops, and
compare the remedies.*
"""),
    setup(),
    code(DEP),
    md("""
### 保存したモデルを読む
保存したモデルを読み、検証データ全体で評価します。4.3.4 の学習の最後に記録した値と同じになることを確かめます。
*Load the saved model; on the whole validation split it scores exactly what training reported in 4.3.4.*
"""),
    code("""
use companion::prelude::*;
check!(Path::new("pretrained_model/model.safetensors").exists(), "run 4.3.4_training.ipynb first: it trains and saves pretrained_model/");
let model = GPT2LMHeadModel::from_pretrained("pretrained_model", DType::F32, &Device::Cpu)?;
let tokenizer = AutoTokenizer::from_pretrained("pretrained_model")?;
let valid = corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let options = TokenizeOptions { packing: Packing::Group { block_size: 128 }, append_eos: tokenizer.eos_token_id(), ..Default::default() };
let eval_dataset = data::tokenize_and_pack(&tokenizer, &valid, &options)?;
let m = companion::train::evaluate_model(&model, &eval_dataset, &DataCollatorForLanguageModeling::new(&tokenizer), 16)?;
println!("{:.2}M parameters; held-out ({} blocks) loss {:.4}, perplexity {:.1}, {:.3} bits per byte",
         model.num_parameters() as f64 / 1e6, eval_dataset.len(), m.eval_loss, m.perplexity, m.bits_per_byte);
let state: companion::serde_json::Value = companion::serde_json::from_str(&std::fs::read_to_string("output/trainer_state.json")?)?;
let trained = state["log_history"].as_array().unwrap().iter().rev().find_map(|e| e["eval_bits_per_byte"].as_f64()).unwrap();
check!((m.bits_per_byte - trained).abs() < 1e-4, "the saved model scores what training reported: {} vs {trained}", m.bits_per_byte);
"""),
    listing("学習済みモデルによる推論", "Inference with the pretrained model", """
import torch  # ⚠ 書籍にはない 4 行: 書籍では 4.3.4 の model と tokenizer がメモリにある
from transformers import AutoModelForCausalLM, AutoTokenizer  # ⚠
model = AutoModelForCausalLM.from_pretrained("pretrained_model").to("cuda")  # ⚠
tokenizer = AutoTokenizer.from_pretrained("pretrained_model")  # ⚠

prompt = "Hi, how are you?"

# トークン化
input_ids = tokenizer.encode(prompt, return_tensors="pt").to("cuda")

# モデルで生成
with torch.inference_mode():
    output = model.generate(
        input_ids,
        max_new_tokens=128,
        do_sample=False,
        repetition_penalty=1.1,
        pad_token_id=tokenizer.eos_token_id,
    )

# 生成されたテキストをデコード
generated_text = tokenizer.decode(output[0], skip_special_tokens=False)
print(generated_text)
""", notes="""
書籍のリストの名前と値のままです。⚠ の 4 行 (import と読み込み) は、書籍では 4.3.4 から続けて実行するので
ありません。GPU がなければ `.to("cuda")` を外します。
- ⚠ 本文の説明では `max_new_token` と綴られています (リストは正しく `max_new_tokens`)。
`generate(max_new_token=128)` は ``ValueError: The following `model_kwargs` are not used by the model: ['max_new_token']`` です。
*The listing's names and values; the load lines are ours (the book runs on from 4.3.4). The prose spells `max_new_token`.*
"""),
    md("""
`generate` の引数:
- `max_new_tokens=128`: プロンプトの後ろに生成する最大トークン数 (`<eos>` が出ればそこで止まる)。
- `do_sample=False`: 毎回いちばん確率の高いトークンを選ぶ (貪欲法)。同じ入力からは同じ出力になります。
- `repetition_penalty=1.1`: すでに出たトークンのロジットを、正なら 1.1 で割り、負なら 1.1 倍して選ばれにくくします
  (CTRL 論文の方法)。
- `pad_token_id=tokenizer.eos_token_id`: GPT-2 の元のトークナイザにはパディングトークンがなく、指定しないと
  `generate` が警告を出すための指定です。このトークナイザには `<pad>` (ID 8194) がありますが、1 文だけの生成では
  パディングは起きないので、どちらを指定しても出力は同じです。

変更点: 書籍は `max_new_tokens=128` ですが、このモデルの位置埋め込みは 128 個 (`n_positions`) なので、
プロンプトの 7 トークンと合わせて 128 トークンまで、つまり 121 トークンを生成します。
*max_new_tokens bounds the continuation; do_sample=False is greedy; repetition_penalty=1.1 divides the positive logits
(multiplies the negative ones) of tokens already present; pad_token_id only silences a warning (this tokenizer has `<pad>`,
8194, and one prompt needs no padding). Deliberate change: 121 new tokens, as the model has 128 positions.*
"""),
    code("""
let prompt = "Hi, how are you?";
let input_ids = tokenizer.encode(prompt)?;
check_eq!(tokenizer.pad_token_id(), Some(8194), "this tokenizer has its own <pad>");
let max_new = model.config.n_positions - input_ids.len(); // 書籍: 128。位置は 128 個まで
let config = GenerationConfig {
    max_new_tokens: Some(max_new),
    do_sample: false,
    repetition_penalty: 1.1,
    pad_token_id: tokenizer.eos_token_id(),
    ..GenerationConfig::from_model_config(&model.config)
};
let output = model.generate(&[input_ids.clone()], None, &config)?;
let generated_text = tokenizer.decode(&output.sequences[0], false)?;
println!("{generated_text}");
let n = input_ids.len();
println!("\\n({} prompt tokens + {} new tokens)", n, output.sequences[0].len() - n);
check_eq!((n, output.sequences[0].len() - n), (7, 121), "7 prompt tokens and 121 new ones (the text below says so)");
check!(generated_text.starts_with(prompt), "the output continues the prompt");
/// Say whether the new tokens end in a loop, and what repeats.
fn describe_loop(tokenizer: &AutoTokenizer, new: &[u32]) -> Result<Option<notebook::Loop>, Box<dyn std::error::Error>> {
    let found = notebook::Loop::find(new, 32);
    match found {
        Some(l) => println!("loop: from new token {} on, {:?} ({} tokens) repeats {:.1} times",
                            l.start, tokenizer.decode(&new[l.start..l.start + l.period], false)?, l.period, l.repeats()),
        None => println!("no loop: the new tokens do not end by repeating one stretch three times"),
    }
    Ok(found)
}
let loop_penalty = describe_loop(&tokenizer, &output.sequences[0][n..])?;
"""),
    md("""
### 繰り返しペナルティなしの貪欲法
*Greedy decoding without the penalty.*

小さなモデルの貪欲法は、いったん同じ句を出すと、その句の後ろでは同じ句がいちばん確からしくなり、抜け出せない
ループに入ります。確率の高い 1 本の道だけをたどる貪欲法は、モデルが文脈を十分に使えないほど、直前の数トークンで
決まる同じ道に戻ってきやすいからです。上の書籍の設定 (`repetition_penalty=1.1`) の出力も、`'foo'` を 25 回繰り返す
ループで終わっています。ペナルティはすでに出たトークンのロジットを少し下げるだけなので、ペナルティなしと比べると
前半の文が変わるだけで、同じ `'foo'` のループに同じ位置から入ります。
*Once a small model writes a phrase, the same phrase becomes the most likely continuation and greedy decoding cannot
leave it: the book's setting above ends by repeating `'foo'` 25 times, and without the penalty the loop starts at the
same token; a penalty of 1.1 only changes the text before it.*
"""),
    code("""
let plain = GenerationConfig { repetition_penalty: 1.0, ..config.clone() };
let out_plain = model.generate(&[input_ids.clone()], None, &plain)?;
let text_plain = tokenizer.decode(&out_plain.sequences[0], false)?;
println!("{text_plain}\\n");
let loop_plain = describe_loop(&tokenizer, &out_plain.sequences[0][n..])?;
check!(text_plain != generated_text, "the penalty changes what greedy decoding writes");
check!(loop_plain.is_some(), "greedy decoding without the penalty ends in a loop (the text above says so)");
match (loop_plain, loop_penalty) {
    (Some(a), Some(b)) => println!("both loop; without the penalty from new token {}, with it from {}", a.start, b.start),
    (Some(a), None) => println!("without the penalty it loops from new token {}; with it, it does not end in a loop", a.start),
    _ => {}
};
check!(loop_penalty.is_some(), "with the book's repetition_penalty=1.1 greedy decoding still loops (the text above says so)");
let (a, b) = (loop_plain.unwrap(), loop_penalty.unwrap());
check_eq!(a.start, b.start, "both loops start at the same new token (the text above says so)");
let stretch = tokenizer.decode(&output.sequences[0][n + b.start..n + b.start + b.period], false)?;
check!(stretch.contains("foo") && b.repeats() >= 25.0, "the book's setting repeats 'foo' 25 times: {stretch:?} × {}", b.repeats());
"""),
    md("""
### 同じ n-gram を繰り返さない: `no_repeat_ngram_size`
*`no_repeat_ngram_size=3` forbids any 3-gram from occurring twice (prompt included): no loop can form, but the text is no
more meaningful.*

3 トークンの並びの 2 回目を禁止するので、ループは構造的に起きません。ただし、モデルが知らないことを書けるように
なるわけではなく、禁止されたトークンの次に確からしいトークンを選び続けるので、出てくるのは単語の寄せ集めです。
ループが消えることと文章が良くなることは別です。
*Loops cannot form, but the model still knows no more: it keeps taking the next most likely token, and the result is a
jumble of documentation words. No loop is not the same as good text.*
"""),
    code("""
/// How many n-grams of `ids` occurred earlier in `ids`.
fn repeated_ngrams(ids: &[u32], n: usize) -> usize {
    let mut seen = std::collections::HashSet::new();
    ids.windows(n).filter(|w| !seen.insert(w.to_vec())).count()
}
let no_repeat = GenerationConfig { no_repeat_ngram_size: 3, ..config.clone() };
let out_nr = model.generate(&[input_ids.clone()], None, &no_repeat)?;
println!("{}\\n", tokenizer.decode(&out_nr.sequences[0], false)?);
check_eq!(repeated_ngrams(&out_nr.sequences[0], 3), 0, "repeated 3-grams with no_repeat_ngram_size=3");
check!(describe_loop(&tokenizer, &out_nr.sequences[0][n..])?.is_none(), "no loop can form");
"""),
    md("""
### 次のトークンの確率
プロンプトの次のトークンとして確率の高い 5 つです。貪欲法はこのうち 1 番目を選びます。
*The five most likely next tokens after the prompt: greedy decoding takes the first of them.*
"""),
    code("""
let logits = model.forward(&Tensor::new(vec![input_ids.clone()], &Device::Cpu)?, None, None)?;
let last = logits.squeeze(0)?.get(input_ids.len() - 1)?;
let probs = companion::candle_nn::ops::softmax(&last, 0)?.to_vec1::<f32>()?;
let mut order: Vec<usize> = (0..probs.len()).collect();
order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
let mut rows = vec![vec!["rank".to_string(), "token".into(), "id".into(), "probability".into()]];
for (i, &id) in order.iter().take(5).enumerate() {
    rows.push(vec![(i + 1).to_string(), format!("{:?}", tokenizer.decode(&[id as u32], false)?), id.to_string(), format!("{:.4}", probs[id])]);
}
check_eq!(out_plain.sequences[0][input_ids.len()], order[0] as u32, "greedy's first new token is the most likely one");
check!((probs.iter().map(|&p| p as f64).sum::<f64>() - 1.0).abs() < 1e-4, "the probabilities sum to 1");
let table = notebook::Table(rows);
table
"""),
    md("""
### ストリーミング生成
トークンが選ばれるたびに表示します (出力は 1 つのブロックにまとめて保存。セルは `generate` と同じ文になることを確かめます)。
*Streaming: each token is printed as soon as it is chosen (one output block; the cell checks it is generate's text).*
"""),
    code("""
// A block: the decoder borrows the tokenizer, so it cannot outlive the cell.
{
    let mut stream = tokenizer.backend().decode_stream(false);
    let mut streamed = String::from(prompt);
    print!("{streamed}");
    model.generate_with_streamer(&[input_ids.clone()], None, &config, false, |_, id| {
        if let Ok(Some(piece)) = stream.step(id) {
            print!("{piece}");
            streamed.push_str(&piece);
        }
    })?;
    println!();
    check_eq!(streamed, generated_text, "the streamed text");
};
"""),
    md("""
### サンプリング: ループから抜ける方法
*Sampling: the usual way out of loops (temperature, top-k, top-p; seeded, so it repeats).*

`do_sample=True` では確率に従ってトークンを引くので、確率の高い 1 本の道に閉じ込められません。`temperature`
< 1 は分布を尖らせ (確からしいトークンをより選びやすく)、`top_k=50` は上位 50 個、`top_p=0.95` は確率の高い順に
累積 95% までのトークンだけから引きます (確率の低い外れたトークンを除く)。同じシードなら同じ出力になります。
ループはなくなりますが、出てくるのはドキュメント風の語の並びで、意味の通る文ではありません。
*Sampling draws from the distribution, so it is not trapped on the single most likely path; temperature < 1 sharpens
it, top-k and top-p cut its unlikely tail. The loop is gone; the text is documentation-flavoured words, not sense.*
"""),
    code("""
let sampling = GenerationConfig { do_sample: true, temperature: 0.8, top_k: 50, top_p: 0.95, seed: Some(0), ..config.clone() };
let out = model.generate(&[input_ids.clone()], None, &sampling)?;
let sampled = tokenizer.decode(&out.sequences[0], false)?;
println!("{sampled}\\n");
let stats = notebook::TextStats::of(&sampled);
check!(sampled.starts_with(prompt), "sampling continues the prompt too");
check!(describe_loop(&tokenizer, &out.sequences[0][n..])?.is_none(), "sampling does not end in a loop");
check!(stats.distinct_words >= 20 && stats.longest_blank_run < 2, "many distinct words, no run of blank lines: {stats:?}");
"""),
    md("""
### モデルは質問に答えず、文章を続ける
*The model continues the text rather than answering, and why coherent text needs far more.*

"Hi, how are you?" に対する出力は返事ではなく、学習に使った文章 (Python のドキュメント) の続きのような
トークンの並びです。事前学習したモデルが学んだのは「この文章の次に来そうなトークン」だけで、質問に答えるという
振る舞いは学習していません。指示に従って答えるようにするのが、第 5 章のアラインメント (5.2 の指示チューニング) です。

文として意味が通るには規模も要ります。このモデルは 1.86M パラメータで約 400 万トークン (2.1 エポック) を見ただけで、
検証データで 1 バイトあたり約 1.6 ビットです。GPT-2 (124M パラメータ, 約 40GB の WebText) になってようやく
段落単位で文法的な文章が続き、質問に答える対話はさらに大きな事前学習モデルに指示チューニングを加えて得られます。
*A pretrained model continues text like its corpus; answering is what alignment and instruction tuning (chapter 5, 5.2)
teach. Coherence also needs scale: this model has 1.86M parameters and saw 4M tokens; GPT-2 (124M parameters, 40 GB of
WebText) is where paragraphs of grammatical text begin.*
"""),
]
