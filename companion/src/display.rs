//! Rich output for the notebooks: types with an `evcxr_display` method, which
//! the evcxr Jupyter kernel calls to show a value as HTML instead of Debug text.

use crate::config::GPT2Config;
use crate::tokenizer::AutoTokenizer;
use crate::train::TrainerState;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn emit(mime: &str, body: &str) {
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

/// A config as a two-column table.
#[derive(Debug, Clone)]
pub struct ConfigTable(pub GPT2Config);

impl ConfigTable {
    pub fn to_html(&self) -> String {
        let v = self.0.to_value();
        let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        keys.sort();
        let mut h = String::from("<table>\n<tr><th>field</th><th>value</th></tr>\n");
        for k in keys {
            h.push_str(&format!(
                "<tr><td><code>{}</code></td><td style=\"text-align:left\">{}</td></tr>\n",
                escape(k),
                escape(&v[k].to_string())
            ));
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
        crate::plot::loss_plot_svg(state).map(LossPlot)
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
        let c = ConfigTable(GPT2Config::default()).to_html();
        assert!(c.contains("<code>n_embd</code></td><td style=\"text-align:left\">768"));
    }
}
