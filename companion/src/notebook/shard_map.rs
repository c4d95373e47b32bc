//! Which part of GPT-2 each rank of a 3D-parallel run holds, as a picture:
//! a row per rank, a column per part of the model (the embeddings, each
//! block, `ln_f`, an untied head), each cell coloured by the rank's
//! pipeline stage and labelled with the slice it holds. Which parts a rank
//! holds comes from the names of the parameters it really holds
//! (`ParallelTrainer::shards`); the labels (which heads, which vocabulary
//! rows) follow from its tensor rank, as `parallel::tensor` cuts them.

use super::display::{emit, escape};
use crate::config::GPT2Config;
use crate::parallel::tensor::vocab_per_rank;
use crate::parallel::{Coords, ParallelLayout};

#[derive(Debug, Clone)]
pub struct ShardMap {
    pub layout: ParallelLayout,
    /// The model's parts, in order.
    pub parts: Vec<String>,
    /// Per rank: its place, and per part the slice it holds (None: nothing).
    pub ranks: Vec<(Coords, Vec<Option<String>>)>,
}

impl ShardMap {
    /// From every rank's place and the names of the parameters it holds.
    pub fn new(
        config: &GPT2Config,
        layout: ParallelLayout,
        held: &[(Coords, Vec<String>)],
    ) -> Self {
        let c = config;
        let mut parts = vec!["wte".to_string(), "wpe".into()];
        parts.extend((0..c.n_layer).map(|l| format!("h.{l}")));
        parts.push("ln_f".into());
        if !c.tie_word_embeddings {
            parts.push("lm_head".into());
        }
        let tp = layout.tp;
        let vocab_rows = |t: usize| {
            let per = vocab_per_rank(c.vocab_size, tp);
            let (a, b) = (t * per, ((t + 1) * per).min(c.vocab_size));
            let pad = (t + 1) * per - b;
            let rows = if tp == 1 {
                "all rows".to_string()
            } else {
                format!("rows {a}–{}", b - 1)
            };
            if pad > 0 {
                format!("{rows} + {pad} padding")
            } else {
                rows
            }
        };
        let ranks = held
            .iter()
            .map(|(at, names)| {
                let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
                let cells = parts
                    .iter()
                    .map(|p| {
                        let heads = c.n_head / tp;
                        match p.as_str() {
                            "wte" if has("transformer.wte.") => Some(if at.pp > 0 {
                                format!("{} (tied head's copy)", vocab_rows(at.tp))
                            } else {
                                vocab_rows(at.tp)
                            }),
                            "wpe" if has("transformer.wpe.") => Some("whole".into()),
                            "ln_f" if has("transformer.ln_f.") => Some("whole".into()),
                            "lm_head" if has("lm_head.") => Some(vocab_rows(at.tp)),
                            b if b.starts_with("h.") && has(&format!("transformer.{b}.")) => {
                                Some(if tp == 1 {
                                    "whole".into()
                                } else {
                                    format!("heads {}–{}", at.tp * heads, (at.tp + 1) * heads - 1)
                                })
                            }
                            _ => None,
                        }
                    })
                    .collect();
                (*at, cells)
            })
            .collect();
        ShardMap {
            layout,
            parts,
            ranks,
        }
    }

    /// The parts no rank of some data-parallel replica holds (none, when
    /// every replica holds the whole model between its ranks).
    pub fn missing(&self) -> Vec<String> {
        let replicas: std::collections::BTreeSet<usize> =
            self.ranks.iter().map(|r| r.0.dp).collect();
        let mut out = Vec::new();
        for d in replicas {
            for (i, p) in self.parts.iter().enumerate() {
                if !self
                    .ranks
                    .iter()
                    .any(|(at, cells)| at.dp == d && cells[i].is_some())
                {
                    out.push(format!("replica {d}: {p}"));
                }
            }
        }
        out
    }

    pub fn to_html(&self) -> String {
        const STAGE: [&str; 4] = ["#cfe2f3", "#d9ead3", "#fce5cd", "#ead1dc"];
        let cell = "border:1px solid #999;padding:2px 6px;font-size:85%";
        let mut h = String::from("<table style=\"border-collapse:collapse\">\n<tr><th></th>");
        for p in &self.parts {
            h.push_str(&format!(
                "<th style=\"{cell}\"><code>{}</code></th>",
                escape(p)
            ));
        }
        h.push_str("</tr>\n");
        for (at, cells) in &self.ranks {
            h.push_str(&format!(
                "<tr><th style=\"{cell};text-align:left\">rank {} (TP {}, DP {}, stage {})</th>",
                self.layout.rank(*at),
                at.tp,
                at.dp,
                at.pp
            ));
            let bg = STAGE[at.pp % STAGE.len()];
            for c in cells {
                match c {
                    Some(t) => h.push_str(&format!(
                        "<td style=\"{cell};background:{bg}\">{}</td>",
                        escape(t)
                    )),
                    None => h.push_str(&format!("<td style=\"{cell};color:#bbb\">–</td>")),
                }
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

    /// tp 2 × pp 2 over 4 blocks, 4 heads, a vocabulary of 63: rank 1
    /// (tensor rank 1, stage 0) holds heads 2–3 of blocks 0–1 and rows
    /// 32–62 of wte with one padding row; rank 3 (stage 1) the tied copy.
    #[test]
    fn each_rank_holds_its_slice() {
        let mut c = crate::config::GPT2Config::preset("gpt2").unwrap();
        (c.vocab_size, c.n_layer, c.n_head) = (63, 4, 4);
        let l = ParallelLayout::new(4, 2, 2).unwrap();
        let held: Vec<(Coords, Vec<String>)> = (0..4)
            .map(|r| {
                let at = l.coords(r);
                let names = crate::params::Gpt2Params::new(&c)
                    .specs
                    .into_iter()
                    .map(|s| s.name)
                    .filter(|n| crate::parallel::stages::holds(n, &c, 2, at.pp))
                    .collect();
                (at, names)
            })
            .collect();
        let m = ShardMap::new(&c, l, &held);
        assert_eq!(m.parts.len(), 2 + 4 + 1);
        let r1 = &m.ranks[1].1;
        assert_eq!(r1[0].as_deref(), Some("rows 32–62 + 1 padding"));
        assert_eq!(r1[2].as_deref(), Some("heads 2–3"));
        assert_eq!(r1[4], None);
        assert_eq!(
            m.ranks[3].1[0].as_deref(),
            Some("rows 32–62 + 1 padding (tied head's copy)")
        );
        assert!(m.missing().is_empty());
        let partial = ShardMap::new(&c, l, &held[..2]);
        assert_eq!(
            partial.missing(),
            vec!["replica 0: h.2", "replica 0: h.3", "replica 0: ln_f"]
        );
        assert!(m.to_html().contains("heads 2–3"));
        // Rows are named by their rank, whatever order they are given in.
        let reversed: Vec<_> = held.iter().rev().cloned().collect();
        let html = ShardMap::new(&c, l, &reversed).to_html();
        assert!(html.find("rank 3 (TP 1, DP 0, stage 1)") < html.find("rank 0 (TP 0"));
    }
}
