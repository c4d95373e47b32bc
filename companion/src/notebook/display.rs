//! Rich output for the notebooks: types with an `evcxr_display` method, which
//! the evcxr Jupyter kernel calls to show a value as HTML instead of Debug text.

use crate::config::GPT2Config;
use crate::tokenizer::AutoTokenizer;
use crate::train::TrainerState;

pub(super) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub(super) fn emit(mime: &str, body: &str) {
    println!("EVCXR_BEGIN_CONTENT {mime}\n{body}\nEVCXR_END_CONTENT");
}

/// Token lists of several tokenizers for one text, side by side.
#[derive(Debug, Clone)]
pub struct TokenComparison {
    pub text: String,
    pub rows: Vec<(String, Vec<String>)>,
}

/// Tokenize `text` with each named tokenizer.
pub fn compare_tokenizers(
    text: &str,
    tokenizers: &[(&str, &AutoTokenizer)],
) -> Result<TokenComparison, crate::tokenizer::TokenizerError> {
    let mut rows = Vec::new();
    for (name, tok) in tokenizers {
        rows.push((name.to_string(), tok.tokenize(text)?));
    }
    Ok(TokenComparison {
        text: text.to_string(),
        rows,
    })
}

impl TokenComparison {
    pub fn to_html(&self) -> String {
        let mut h =
            String::from("<table>\n<tr><th>tokenizer</th><th>tokens</th><th>count</th></tr>\n");
        for (name, toks) in &self.rows {
            let cells: Vec<String> = toks
                .iter()
                .map(|t| {
                    format!(
                        "<code style=\"border:1px solid #bbb;padding:0 2px\">{}</code>",
                        escape(t)
                    )
                })
                .collect();
            h.push_str(&format!(
                "<tr><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td></tr>\n",
                escape(name),
                cells.join(" "),
                toks.len()
            ));
        }
        h.push_str("</table>");
        h
    }

    pub fn evcxr_display(&self) {
        emit("text/html", &self.to_html());
    }
}

/// A config as a table: field, value and what the field means (意味), with
/// the fields a listing sets highlighted.
#[derive(Debug, Clone)]
pub struct ConfigTable {
    pub config: GPT2Config,
    /// Fields shown in bold on a yellow ground.
    pub highlight: Vec<String>,
}

/// What each field of GPT-2's `config.json` means, in Japanese (the
/// notebooks' language); `None` for bookkeeping fields.
pub fn config_field_meaning(field: &str) -> Option<&'static str> {
    Some(match field {
        "vocab_size" => "語彙サイズ (トークン埋め込みと出力層の行数)",
        "n_ctx" => "記録されるだけの文脈長 (モデルの大きさは変えない)",
        "n_positions" => "位置埋め込みの数 = 入力できる最大トークン数",
        "n_embd" => "隠れ状態の次元 (埋め込みの幅)",
        "n_layer" => "Transformer ブロックの数",
        "n_head" => "アテンションヘッドの数 (n_embd を等分)",
        "n_inner" => "MLP の中間次元 (null なら 4 × n_embd)",
        "bos_token_id" => "文頭トークンの ID",
        "eos_token_id" => "文末トークンの ID (生成の停止に使う)",
        "pad_token_id" => "パディングトークンの ID",
        "activation_function" => "MLP の活性化関数 (gelu_new は tanh 近似の GELU)",
        "attn_pdrop" => "アテンション重みのドロップアウト率",
        "embd_pdrop" => "埋め込みのドロップアウト率",
        "resid_pdrop" => "残差接続前のドロップアウト率",
        "layer_norm_epsilon" => "LayerNorm の分母に足す小さな値",
        "initializer_range" => "重みを初期化する正規分布の標準偏差",
        "scale_attn_weights" => "アテンションのスコアを √(ヘッドの次元) で割る",
        "scale_attn_by_inverse_layer_idx" => "スコアをさらに層番号 + 1 で割る",
        "reorder_and_upcast_attn" => "アテンションを fp32 で計算する (混合精度用)",
        "tie_word_embeddings" => "出力層の重みを入力の埋め込みと共有する",
        "use_cache" => "生成時に過去のキーと値を保持する (KV キャッシュ)",
        "add_cross_attention" => "エンコーダへのクロスアテンションを持つか",
        "model_type" => "モデルの種類 (AutoConfig が使う)",
        "architectures" => "この設定で作るクラスの名前",
        _ => return None,
    })
}

impl ConfigTable {
    pub fn new(config: GPT2Config) -> Self {
        ConfigTable {
            config,
            highlight: Vec::new(),
        }
    }

    /// Highlight `fields` (the ones a listing passes).
    pub fn highlight(mut self, fields: &[&str]) -> Self {
        self.highlight = fields.iter().map(|f| f.to_string()).collect();
        self
    }

    pub fn to_html(&self) -> String {
        let v = self.config.to_value();
        let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        keys.sort();
        let mut h = String::from("<table>\n<tr><th>field</th><th>value</th><th>意味</th></tr>\n");
        for k in keys {
            let style = if self.highlight.contains(k) {
                " style=\"background:#fff3b0;font-weight:bold\""
            } else {
                ""
            };
            h.push_str(&format!(
                "<tr{style}><td><code>{}</code></td><td style=\"text-align:left\">{}</td><td style=\"text-align:left\">{}</td></tr>\n",
                escape(k),
                escape(&v[k].to_string()),
                config_field_meaning(k).unwrap_or("")
            ));
        }
        h.push_str("</table>");
        h
    }

    pub fn evcxr_display(&self) {
        emit("text/html", &self.to_html());
    }
}

/// The causal mask of a decoder-only model over `tokens`: position i (a row)
/// attends to positions 0..=i (filled), never to later ones (empty).
#[derive(Debug, Clone)]
pub struct CausalMask {
    pub tokens: Vec<String>,
}

impl CausalMask {
    /// `mask[i][j]`: may position `i` attend to position `j`?
    pub fn mask(&self) -> Vec<Vec<bool>> {
        let n = self.tokens.len();
        (0..n).map(|i| (0..n).map(|j| j <= i).collect()).collect()
    }

    pub fn to_html(&self) -> String {
        let cell = "width:1.6em;height:1.6em;border:1px solid #999";
        let mut h = String::from("<table style=\"border-collapse:collapse\">\n<tr><td></td>");
        for t in &self.tokens {
            h.push_str(&format!(
                "<th style=\"writing-mode:vertical-rl;font-weight:normal\"><code>{}</code></th>",
                escape(t)
            ));
        }
        h.push_str("</tr>\n");
        for (t, row) in self.tokens.iter().zip(self.mask()) {
            h.push_str(&format!(
                "<tr><th style=\"text-align:right;font-weight:normal\"><code>{}</code></th>",
                escape(t)
            ));
            for on in row {
                let bg = if on { "#3b6fb6" } else { "#ffffff" };
                h.push_str(&format!("<td style=\"{cell};background:{bg}\"></td>"));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>");
        h
    }

    pub fn evcxr_display(&self) {
        emit("text/html", &self.to_html());
    }
}

/// The loss and learning-rate curves of a run, as inline SVG.
#[derive(Debug, Clone)]
pub struct LossPlot(pub String);

impl LossPlot {
    pub fn from_state(state: &TrainerState) -> Result<Self, String> {
        crate::train::plot::loss_plot_svg(state).map(LossPlot)
    }

    pub fn evcxr_display(&self) {
        emit("text/html", &self.0);
    }
}

/// Any list of rows as an HTML table (header first).
#[derive(Debug, Clone)]
pub struct Table(pub Vec<Vec<String>>);

impl Table {
    pub fn to_html(&self) -> String {
        let mut h = String::from("<table>\n");
        for (i, row) in self.0.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            h.push_str("<tr>");
            for c in row {
                h.push_str(&format!("<{tag}>{}</{tag}>", escape(c)));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</table>");
        h
    }

    pub fn evcxr_display(&self) {
        emit("text/html", &self.to_html());
    }
}

// -------------------------------------------------------- ZeRO's memory

/// The estimates as a notebook table, in GiB (2³⁰ bytes): DeepSpeed divides
/// by 2³⁰ and prints the unit as "GB".
pub fn zero_estimate_table(params: u64, largest: u64, gpus_per_node: usize, nodes: usize) -> Table {
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let mut rows = vec![vec![
        "ZeRO".to_string(),
        "options".into(),
        "per GPU".into(),
        "per CPU (node)".into(),
    ]];
    for r in crate::zero::memory::deepspeed_estimates(params, largest, gpus_per_node, nodes) {
        rows.push(vec![
            format!("stage {}", r.stage),
            r.options().replace("cpu ", "cpu"),
            gib(r.gpu_bytes),
            gib(r.cpu_bytes),
        ]);
    }
    Table(rows)
}

/// Measured per-rank model-state bytes (from `Trainer::memory_report`) next
/// to the paper's fp32 formula (4Ψ weights + 4Ψ gradients + 8Ψ Adam, with
/// stage s dividing the last s terms by N). Under stage 3 a rank also holds,
/// for a moment, the block it gathered: the peak column adds it (the
/// formula counts model states only). kB = 10³ bytes.
pub fn zero_measured_table(reports: &[Vec<crate::zero::ModelStateBytes>], params: usize) -> Table {
    let kb = |b: usize| format!("{:.1} kB", b as f64 / 1e3);
    let mut rows = vec![vec![
        "ZeRO".to_string(),
        "rank".into(),
        "weights".into(),
        "gradients".into(),
        "Adam moments".into(),
        "model states (measured)".into(),
        "paper's formula".into(),
        "gathered weights (peak)".into(),
        "peak held (measured)".into(),
    ]];
    for report in reports {
        for m in report {
            let n = m.world_size.max(1) as f64;
            let p = params as f64;
            let div = |from: u8| if m.stage >= from { n } else { 1.0 };
            let paper = 4.0 * p / div(3) + 4.0 * p / div(2) + 8.0 * p / div(1);
            rows.push(vec![
                format!("stage {}", m.stage),
                format!("{}/{}", m.rank, m.world_size),
                kb(m.params),
                kb(m.grads),
                kb(m.optimizer_states),
                kb(m.total()),
                kb(paper as usize),
                kb(m.peak_gathered_params),
                kb(m.total() + m.peak_gathered_params),
            ]);
        }
    }
    Table(rows)
}

/// A table of the paper's per-stage memory for several GPU counts, in GB
/// (10⁹ bytes, the paper's unit).
pub fn zero_paper_table(params: f64, gpu_counts: &[usize]) -> Table {
    let mut rows = vec![vec![
        "GPUs".to_string(),
        "baseline (DDP)".into(),
        "ZeRO-1".into(),
        "ZeRO-2".into(),
        "ZeRO-3".into(),
    ]];
    for &n in gpu_counts {
        let mut r = vec![n.to_string()];
        r.extend(
            crate::zero::memory::zero_paper(params, n)
                .iter()
                .map(|m| format!("{:.2} GB", m.bytes_per_gpu / 1e9)),
        );
        rows.push(r);
    }
    Table(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_escape_markers_and_specials() {
        let t = TokenComparison {
            text: "x".into(),
            rows: vec![("gpt2".into(), vec!["<|endoftext|>".into(), "Ġa".into()])],
        };
        let h = t.to_html();
        assert!(h.contains("&lt;|endoftext|&gt;") && h.contains("Ġa") && h.contains("<td>2</td>"));
        let c = ConfigTable::new(GPT2Config::default())
            .highlight(&["n_layer"])
            .to_html();
        assert!(c.contains("<code>n_embd</code></td><td style=\"text-align:left\">768"));
        assert!(c.contains("<tr><td><code>n_embd</code>"));
        assert!(c.contains("font-weight:bold\"><td><code>n_layer</code>"));
        let m = CausalMask {
            tokens: vec!["a".into(), "b".into(), "c".into()],
        };
        assert_eq!(
            m.mask(),
            vec![
                vec![true, false, false],
                vec![true, true, false],
                vec![true, true, true]
            ]
        );
    }
}
