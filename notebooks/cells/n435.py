"""4.3.5 学習済みモデルによる推論: generate, its arguments, streaming, sampling."""
from common import DEP, code, listing, md, setup

NAME = "4.3.5_inference.ipynb"
CELLS = [
    md("""
# 4.3.5 学習済みモデルによる推論
*Generating text with the model trained in 4.3.4 (run that notebook first).*
"""),
    setup(),
    code(DEP),
    md("""
### 保存したモデルを読む
*Load the saved model; it scores on the held-out text exactly what training reported in 4.3.4.*
"""),
    code("""
use companion::prelude::*;
check!(Path::new("pretrained_model/model.safetensors").exists(), "run 4.3.4_training.ipynb first: it trains and saves pretrained_model/");
let model = GPT2LMHeadModel::from_pretrained("pretrained_model", DType::F32, &Device::Cpu)?;
let tokenizer = AutoTokenizer::from_pretrained("pretrained_model")?;
let valid = corpus::read_file(Path::new("../data/corpus/validation.jsonl"), "text")?;
let options = TokenizeOptions { packing: Packing::Group { block_size: 128 }, append_eos: tokenizer.eos_token_id(), ..Default::default() };
let mut eval_dataset = data::tokenize_and_pack(&tokenizer, &valid, &options)?;
eval_dataset.truncate(128);
let m = companion::train::evaluate_model(&model, &eval_dataset, &DataCollatorForLanguageModeling::new(&tokenizer), 16)?;
println!("{:.2}M parameters; held-out loss {:.4}, perplexity {:.1}, {:.3} bits per byte",
         model.num_parameters() as f64 / 1e6, m.eval_loss, m.perplexity, m.bits_per_byte);
let state: companion::serde_json::Value = companion::serde_json::from_str(&std::fs::read_to_string("output/trainer_state.json")?)?;
let trained = state["log_history"].as_array().unwrap().iter().rev().find_map(|e| e["eval_bits_per_byte"].as_f64()).unwrap();
check!((m.bits_per_byte - trained).abs() < 1e-4, "the saved model scores what training reported: {} vs {trained}", m.bits_per_byte);
check!(m.bits_per_byte <= 1.60, "at least as good as the main job (1.54): {}", m.bits_per_byte);
"""),
    listing("学習済みモデルによる推論", "Inference with the pretrained model", """
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("pretrained_model")
input_ids = tokenizer.encode("Hi, how are you?", return_tensors="pt")
output = model.generate(
    input_ids,
    max_new_tokens=128,
    do_sample=False,
    repetition_penalty=1.1,
    pad_token_id=tokenizer.eos_token_id,
)
print(tokenizer.decode(output[0], skip_special_tokens=False))
""", notes="""
⚠ リストは正しく `max_new_tokens` ですが、本文の説明では `max_new_token` と綴られています
(`generate(max_new_token=128)` は `ValueError: The following model_kwargs are not used by the model: ['max_new_token']`)。
*The listing is right; the prose spells it `max_new_token`.*
"""),
    md("""
`generate` の 3 つの引数:
- `max_new_tokens=128`: プロンプトの後ろに生成する最大トークン数 (`<eos>` が出ればそこで止まる)。
- `do_sample=False`: 毎回いちばん確率の高いトークンを選ぶ (貪欲法)。同じ入力からは同じ出力になります。
- `repetition_penalty=1.1`: すでに出たトークンのロジットを、正なら 1.1 で割り、負なら 1.1 倍して選ばれにくくします
  (CTRL 論文の方法)。貪欲法は同じ句を繰り返しがちなので、それを抑えます。

`pad_token_id=tokenizer.eos_token_id` は、GPT-2 にパディングトークンがないときの警告を避けるための指定です。
*max_new_tokens bounds the continuation; do_sample=False is greedy; repetition_penalty=1.1 divides the positive logits
(multiplies the negative ones) of tokens already present.*
"""),
    code("""
let input_ids = tokenizer.encode("Hi, how are you?")?;
// 変更点: 書籍は max_new_tokens=128。このモデルの位置埋め込みは 128 個 (n_positions) なので、
// プロンプトの 7 トークンと合わせて 128 トークンまでしか入力できません。
// Deliberate change: 121 new tokens, not 128: 7 prompt tokens + 121 fill the model's 128 positions.
let max_new = model.config.n_positions - input_ids.len();
let config = GenerationConfig {
    max_new_tokens: Some(max_new),
    do_sample: false,
    repetition_penalty: 1.1,
    pad_token_id: tokenizer.eos_token_id(),
    ..GenerationConfig::from_model_config(&model.config)
};
let output = model.generate(&[input_ids.clone()], None, &config)?;
let text = tokenizer.decode(&output.sequences[0], false)?;
println!("{text}");
println!("\n({} prompt tokens + {} new tokens)", input_ids.len(), output.sequences[0].len() - input_ids.len());
let stats = notebook::TextStats::of(&text);
check!(text.starts_with("Hi, how are you?"), "the output continues the prompt");
check!(stats.words >= 20 && stats.distinct_words >= 10, "real text, not a loop: {stats:?}");
check!(stats.longest_blank_run < 2, "no run of blank lines: {stats:?}");
"""),
    md("""
### 繰り返しペナルティなしの貪欲法
*Greedy without the repetition penalty.*

小さなモデルの貪欲法は、同じ行を繰り返すループに入りがちです。`repetition_penalty=1.1` は既出のトークンの
ロジットを少し下げるだけなので、ここではループをほとんど止めません (繰り返した 4-gram の数を比べます)。
*A small model's greedy decoding falls into loops; a penalty of 1.1 barely changes that here (compare the repeated 4-grams).*
"""),
    code("""
let plain = GenerationConfig { repetition_penalty: 1.0, ..config.clone() };
let out_plain = model.generate(&[input_ids.clone()], None, &plain)?;
let text_plain = tokenizer.decode(&out_plain.sequences[0], false)?;
println!("{text_plain}");
/// How many n-grams of `ids` occurred earlier in `ids`.
fn repeated_ngrams(ids: &[u32], n: usize) -> usize {
    let mut seen = std::collections::HashSet::new();
    ids.windows(n).filter(|w| !seen.insert(w.to_vec())).count()
}
let n = input_ids.len();
let (rep_plain, rep_penalty) = (repeated_ngrams(&out_plain.sequences[0][n..], 4), repeated_ngrams(&output.sequences[0][n..], 4));
println!("\\nrepeated 4-grams among the new tokens: {rep_plain} without the penalty, {rep_penalty} with it");
check!(text_plain != text, "the penalty changes what greedy decoding writes");
check!(rep_penalty <= rep_plain, "the penalty does not add repetition: {rep_penalty} vs {rep_plain}");
"""),
    md("""
### 同じ n-gram を繰り返さない: `no_repeat_ngram_size`
*`no_repeat_ngram_size=3` forbids any 3-gram from occurring twice (prompt included): the loop cannot start.*
"""),
    code("""
let no_repeat = GenerationConfig { no_repeat_ngram_size: 3, ..config.clone() };
let out_nr = model.generate(&[input_ids.clone()], None, &no_repeat)?;
println!("{}", tokenizer.decode(&out_nr.sequences[0], false)?);
check_eq!(repeated_ngrams(&out_nr.sequences[0], 3), 0, "repeated 3-grams with no_repeat_ngram_size=3");
"""),
    md("""
### 次のトークンの確率
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
*Streaming: each token is printed as soon as it is chosen (one output block; the cell checks it is generate's text).*
"""),
    code("""
// A block: the decoder borrows the tokenizer, so it cannot outlive the cell.
{
    let mut stream = tokenizer.backend().decode_stream(false);
    let mut streamed = String::from("Hi, how are you?");
    print!("{streamed}");
    model.generate_with_streamer(&[input_ids.clone()], None, &config, false, |_, id| {
        if let Ok(Some(piece)) = stream.step(id) {
            print!("{piece}");
            streamed.push_str(&piece);
        }
    })?;
    println!();
    check_eq!(streamed, text, "the streamed text");
};
"""),
    md("""
### サンプリング
*Sampling with temperature and top-p (seeded, so it repeats).*

`do_sample=True` では確率に従ってトークンを引きます。`temperature` < 1 は分布を尖らせ、`top_p=0.95` は
確率の高い順に累積 95% までのトークンだけから引きます。
"""),
    code("""
let sampling = GenerationConfig { do_sample: true, temperature: 0.8, top_p: 0.95, seed: Some(0), ..config.clone() };
let out = model.generate(&[tokenizer.encode("The module")?], None, &sampling)?;
let sampled = tokenizer.decode(&out.sequences[0], false)?;
println!("{sampled}");
let stats = notebook::TextStats::of(&sampled);
check!(stats.words >= 20 && stats.distinct_words >= 10 && stats.longest_blank_run < 2, "real text: {stats:?}");
"""),
    md("""
### モデルは質問に答えず、文章を続ける
*The model continues the text rather than answering.*

"Hi, how are you?" に対する出力は返事ではなく、学習に使った Python のドキュメントらしい文章の続きです。
事前学習したモデルが学んだのは「この文章の次に来そうなトークン」だけで、質問に答えるという振る舞いは
学習していないからです。指示に従って答えるようにするのが、第 5 章 (5.2) の指示チューニングです。
*A pretrained model only continues text like its corpus (here: Python documentation); answering is what instruction
tuning (5.2) teaches.*
"""),
]
