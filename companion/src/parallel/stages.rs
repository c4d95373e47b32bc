//! What each pipeline stage holds: an equal share of the blocks, the
//! embeddings with the first stage, `ln_f` and the head with the last (and,
//! with tied embeddings, a copy of `wte` there for the head).

/// The blocks of stage `s` of `pp` over `n_layer` (an equal share each).
pub fn stage_layers(n_layer: usize, pp: usize, s: usize) -> std::ops::Range<usize> {
    let per = n_layer / pp;
    s * per..(s + 1) * per
}

/// Whether stage `s` of `pp` holds parameter `name`.
pub fn holds(name: &str, cfg: &crate::config::GPT2Config, pp: usize, s: usize) -> bool {
    let n_layer = cfg.n_layer;
    let last = s + 1 == pp;
    if let Some(rest) = name.strip_prefix("transformer.h.") {
        let l: usize = rest
            .split('.')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(usize::MAX);
        return stage_layers(n_layer, pp, s).contains(&l);
    }
    match name {
        // The last stage's copy serves the tied head.
        "transformer.wte.weight" => s == 0 || (last && cfg.tie_word_embeddings),
        "transformer.wpe.weight" => s == 0,
        _ => last, // ln_f, an untied lm_head
    }
}
