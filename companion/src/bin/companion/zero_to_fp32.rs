//! `companion zero-to-fp32`: DeepSpeed's `zero_to_fp32.py` for a
//! `checkpoint-N` folder (ours or DeepSpeed's), streaming.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use companion::zero::ds_checkpoint::{latest_tag_dir, DsCheckpoint};
use serde_json::json;

#[derive(Args)]
pub struct ZeroToFp32Cmd {
    /// A `checkpoint-N` folder (DeepSpeed's `latest` names its ZeRO files), or
    /// the `global_stepN` folder itself.
    checkpoint: PathBuf,
    /// The folder to write: `model.safetensors` (every weight in fp32) and the
    /// checkpoint's `config.json`, loadable with `from_pretrained`. Must not
    /// exist yet (or be empty).
    output_dir: PathBuf,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

/// The ZeRO files' folder of `ckpt` (itself, or the one `latest` names)
/// and the folder holding the model's config (`ckpt`, or its parent when
/// `ckpt` is the `global_stepN` folder).
fn tag_dir(ckpt: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    if ckpt.join("latest").is_file() {
        return Ok(Some((latest_tag_dir(ckpt)?, ckpt.to_path_buf())));
    }
    let own = ckpt
        .join("zero_pp_rank_0_mp_rank_00_optim_states.pt")
        .is_file();
    let parent = ckpt.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(own.then(|| (ckpt.to_path_buf(), parent)))
}

pub fn run(c: ZeroToFp32Cmd) -> Result<()> {
    if !c.checkpoint.is_dir() {
        bail!(
            "{}: not a folder (expected a checkpoint-N folder)",
            c.checkpoint.display()
        );
    }
    if c.output_dir.exists()
        && std::fs::read_dir(&c.output_dir).map_or(true, |mut d| d.next().is_some())
    {
        bail!(
            "{} exists and is not empty: choose a new folder (nothing is overwritten)",
            c.output_dir.display()
        );
    }
    // Written beside the destination, renamed into place when complete.
    let parent = c
        .output_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".zero-to-fp32-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a folder in {}", parent.display()))?;
    let weights = tmp.path().join("model.safetensors");
    let mut config_dir = c.checkpoint.clone();
    let summary = match tag_dir(&c.checkpoint)? {
        Some((dir, config)) => {
            config_dir = config;
            let ck = DsCheckpoint::open(&dir)?;
            let (tensors, elements) = ck.write_fp32_safetensors(&weights)?;
            json!({"kind": "deepspeed", "zero_stage": ck.stage, "world_size": ck.world,
                   "tensors": tensors, "elements": elements})
        }
        None => {
            // Without ZeRO the checkpoint's model.safetensors is the whole model.
            let src = c.checkpoint.join("model.safetensors");
            if !src.is_file() {
                bail!(
                    "{}: neither DeepSpeed's files (latest, *_optim_states.pt) nor a model.safetensors",
                    c.checkpoint.display()
                );
            }
            std::fs::copy(&src, &weights).with_context(|| format!("copying {}", src.display()))?;
            json!({"kind": "plain", "copied": "model.safetensors"})
        }
    };
    for f in ["config.json", "generation_config.json"] {
        let src = config_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.path().join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    if c.output_dir.exists() {
        std::fs::remove_dir(&c.output_dir)
            .with_context(|| format!("replacing the empty {}", c.output_dir.display()))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &c.output_dir)
        .with_context(|| format!("moving the result to {}", c.output_dir.display()))?;
    if c.json {
        println!("{summary}");
    } else {
        eprintln!(
            "{summary}\nwrote {}",
            c.output_dir.join("model.safetensors").display()
        );
    }
    Ok(())
}
