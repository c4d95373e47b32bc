//! Tensor and pipeline parallelism through the Trainer, on thread ranks:
//! Megatron-LM's layouts train like one rank on the same global batch
//! (tied and untied heads, ragged rows with masked labels, dropout).

mod common;

use common::parallel_runs::*;
use common::*;
use companion::train::TrainingArguments;

/// tp × pp × dp layouts (with DeepSpeed's ZeRO-1 over two replicas) give one
/// rank's losses, gradient norms, evaluation losses (1e-5 relative) and
/// weights (1e-4), tied and untied; each rank holds less than the whole
/// model, a replica's ranks all of it, and each pipeline stage the
/// activations 1F1B keeps in flight.
#[test]
fn tensor_and_pipeline_parallel_runs_train_like_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let one = train(
            &dir.path().join("one"),
            layout(1, 1, 1, None),
            tied,
            None,
            None,
        )
        .unwrap();
        assert_eq!(one.losses.len(), STEPS as usize);
        assert!(
            one.norms.iter().all(|&n| n > 0.5),
            "clipping acts: {:?}",
            one.norms
        );
        assert_eq!(one.eval_losses.len(), 2, "evaluated at steps 4 and 8");
        let whole: usize = one.memory[0].params;
        for (i, l) in [
            layout(2, 1, 1, None),
            layout(1, 2, 1, None),
            layout(2, 2, 1, None),
            layout(2, 1, 2, Some(1)),
            layout(1, 2, 2, Some(1)),
        ]
        .into_iter()
        .enumerate()
        {
            let what = format!("{l:?} tied {tied}");
            let run = train(&dir.path().join(format!("l{i}{tied}")), l, tied, None, None).unwrap();
            assert_eq!(run.losses.len(), STEPS as usize, "{what}");
            for ((s, a), (_, b)) in run.losses.iter().zip(&one.losses) {
                assert!(close(*a, *b), "{what}: step {s} loss {a} vs {b}");
            }
            for (a, b) in run.norms.iter().zip(&one.norms) {
                assert!(close(*a, *b), "{what}: grad_norm {a} vs {b}");
            }
            for (a, b) in run.eval_losses.iter().zip(&one.eval_losses) {
                assert!(close(*a, *b), "{what}: eval_loss {a} vs {b}");
            }
            assert_eq!(run.eval_losses.len(), 2, "{what}");
            for ((name, a), (_, b)) in run.weights.iter().zip(&one.weights) {
                // (The key bias's slice left out: `compared_values`.)
                let (a, b) = (compared_values(name, a), compared_values(name, b));
                let d = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(d <= 1e-4, "{what}: {name} off by {d}");
            }
            // Every rank holds less than the whole model; a replica's ranks
            // together hold it (plus the replicated layer norms and biases
            // on each tensor rank, and a tied head's copy on the last stage).
            assert_eq!(run.memory.len(), l.tp * l.pp * l.dp, "{what}");
            for m in &run.memory {
                assert!(
                    m.params < whole,
                    "{what}: rank {} holds {}",
                    m.rank,
                    m.params
                );
                assert_eq!(m.stage, u8::from(l.dp > 1), "{what}");
                assert!(m.activations_held.is_some(), "{what}");
            }
            let replica0: usize = run
                .memory
                .iter()
                .filter(|m| (m.rank / l.tp) % l.dp == 0)
                .map(|m| m.params)
                .sum();
            assert!(
                replica0 >= whole,
                "{what}: a replica holds {replica0} of {whole}"
            );
            if l.pp == 2 {
                // 1F1B keeps min(pp − s, micro-batches) in flight on stage s:
                // the first stage both micro-batches' outputs [B·T, C], the
                // last one micro-batch's input and its loss.
                let first = run.memory.iter().find(|m| m.rank < l.tp * l.dp).unwrap();
                let last = run.memory.iter().find(|m| m.rank >= l.tp * l.dp).unwrap();
                let acts = (GLOBAL_MICRO / l.dp) * 12 * 16;
                assert_eq!(first.activations_held, Some(2 * acts * 4), "{what}");
                assert_eq!(last.activations_held, Some((acts + 1) * 4), "{what}");
            }
        }
        assert!(one.memory[0].activations_held.is_none());
    }
}

/// Rows of different lengths padded on the right, the pad id's labels
/// masked by the collator: every layout counts the tokens one rank counts
/// (the loss is the global batch's mean however the replicas' shares
/// differ) and gives its losses within 1e-5.
#[test]
fn padded_batches_and_masked_labels_train_like_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let one = train_on(
        ragged_rows(),
        &dir.path().join("one"),
        layout(1, 1, 1, None),
        true,
        None,
        None,
    )
    .unwrap();
    for (i, l) in [
        layout(2, 2, 1, None),
        layout(1, 2, 2, Some(1)),
        layout(2, 1, 2, Some(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let run = train_on(
            ragged_rows(),
            &dir.path().join(format!("l{i}")),
            l,
            true,
            None,
            None,
        )
        .unwrap();
        assert_eq!(run.losses.len(), STEPS as usize, "{l:?}");
        for ((s, a), (_, b)) in run.losses.iter().zip(&one.losses) {
            assert!(close(*a, *b), "{l:?}: step {s} loss {a} vs {b}");
        }
    }
}

/// With dropout (0.1 on the embeddings, the attention probabilities and
/// both residual branches, or some of them off) every layout drops exactly
/// what one rank drops:
/// each stage draws its blocks' part of the model's counter-based masks,
/// each tensor rank the part of the attention mask over its heads. Losses
/// within 1e-5 of one rank's.
#[test]
fn dropout_on_a_split_model_drops_what_one_rank_drops() {
    let dir = tempfile::tempdir().unwrap();
    // Masks follow each micro-batch's place in the global order (as on the
    // ZeRO path): two replicas of 2-row micro-batches draw what one rank
    // draws with 2-row micro-batches and twice the accumulation.
    let run = |name: &str, l: Layout, one_rank_of: usize| {
        let out = dir.path().join(name);
        let tweak = |a: &mut TrainingArguments| {
            if one_rank_of > 1 {
                a.per_device_train_batch_size = GLOBAL_MICRO / one_rank_of;
                a.gradient_accumulation_steps = ACCUM * one_rank_of;
            }
        };
        train_model(
            &|| dropout_model(true),
            &tweak,
            ragged_rows(),
            &out,
            l,
            None,
            None,
        )
        .unwrap()
        .losses
    };
    let one = run("one", layout(1, 1, 1, None), 1);
    let without = train_on(
        ragged_rows(),
        &dir.path().join("nodrop"),
        layout(1, 1, 1, None),
        true,
        None,
        None,
    )
    .unwrap()
    .losses;
    assert!(
        one.iter()
            .zip(&without)
            .all(|(a, b)| (a.1 - b.1).abs() > 1e-3),
        "dropout changes every step: {one:?} vs {without:?}"
    );
    let one_of_two = run("one_of_two", layout(1, 1, 1, None), 2);
    // Some masks off (not drawn, so the others move up the stream).
    for (attn, embd) in [(0.0, 0.1), (0.1, 0.0)] {
        let make = || {
            let mut m = dropout_model(true);
            (m.config.attn_pdrop, m.config.embd_pdrop) = (attn, embd);
            m
        };
        let what = format!("attn {attn} embd {embd}");
        split_trains_like_one_rank(&make, dir.path(), &format!("{attn}{embd}"), &what);
    }
    for (i, l) in [
        layout(2, 2, 1, None),
        layout(2, 1, 2, Some(1)),
        layout(1, 2, 2, Some(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let got = run(&format!("l{i}"), l, 1);
        let want = if l.dp == 2 { &one_of_two } else { &one };
        assert_eq!(got.len(), STEPS as usize, "{l:?}");
        for ((s, a), (_, b)) in got.iter().zip(want) {
            assert!(close(*a, *b), "{l:?}: step {s} loss {a} vs {b}");
        }
    }
}

/// A model the fused kernels do not compute (HF's exact-erf `gelu`) runs
/// the split stages on candle's autograd instead: tp 2 × pp 2 with dropout
/// gives one rank's losses (which run on autograd too).
#[test]
fn another_activation_runs_the_split_model_on_autograd() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("gelu_model");
    std::fs::create_dir(&model_dir).unwrap();
    for e in std::fs::read_dir(fixture("tiny_gpt2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model_dir.join(e.file_name())).unwrap();
    }
    let cfg_path = model_dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["activation_function"], "gelu_new");
    cfg["activation_function"] = "gelu".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let make = || {
        let m = companion::model::GPT2LMHeadModel::from_pretrained(
            model_dir.to_str().unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(!companion::cpu::supports(&m.config) && m.config.attn_pdrop > 0.0);
        m
    };
    split_trains_like_one_rank(&make, dir.path(), "gelu", "gelu");
}

/// `make`'s model on ragged rows at tp 2 × pp 2 gives one rank's losses
/// (1e-5); the runs' folders under `dir` start with `prefix`.
fn split_trains_like_one_rank(
    make: &(dyn Fn() -> companion::model::GPT2LMHeadModel + Sync),
    dir: &std::path::Path,
    prefix: &str,
    what: &str,
) {
    let go = |name: &str, l: Layout| {
        let out = dir.join(format!("{prefix}{name}"));
        train_model(make, &|_| {}, ragged_rows(), &out, l, None, None)
            .unwrap()
            .losses
    };
    let want = go("one", layout(1, 1, 1, None));
    let got = go("tp2pp2", layout(2, 2, 1, None));
    assert_eq!(got.len(), want.len(), "{what}");
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(close(*a, *b), "{what}: step {s} loss {a} vs {b}");
    }
}
