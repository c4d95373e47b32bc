//! The weights of `GPT2LMHeadModel` by HF's names (the single source of
//! truth for loading and saving): shapes, HF's initialisation,
//! `from_pretrained`, `save_pretrained`, dtype and partitioned copies.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use candle_nn::VarMap;

use super::dropout::Dropout;
use super::error::{ModelError, Result};
use super::gpt2::{build_block, build_ln, GPT2LMHeadModel};
use crate::config::GPT2Config;
use crate::hub;
use crate::params::{Gpt2Params, Init, ParamSpec};
use crate::rng::SeededRng;

/// HF's `_init_weights` for one parameter ([`Init`] says which).
fn init_value(spec: &ParamSpec, rng: &mut SeededRng) -> Vec<f32> {
    let n = spec.numel();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal { std } => (0..n).map(|_| rng.normal(std) as f32).collect(),
    }
}

/// Whether every element of `t` is finite (no NaN, no infinity): checked on
/// weights read from disk and on the state a checkpoint would save.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

/// A safetensors header with a tensor named twice is refused by that name:
/// the parser would keep one entry and blame the next tensor's offsets.
/// (Anything else wrong with the header is the parser's to say.)
fn check_header_keys(f: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let Ok(mut file) = std::fs::File::open(f) else {
        return Ok(());
    };
    let mut n = [0u8; 8];
    if file.read_exact(&mut n).is_err() {
        return Ok(());
    }
    let n = u64::from_le_bytes(n);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // safetensors' own limit on a header is 100 MB.
    if n > len.saturating_sub(8) || n > 100_000_000 {
        return Ok(());
    }
    let mut header = vec![0u8; n as usize];
    if file.read_exact(&mut header).is_err() {
        return Ok(());
    }
    let Ok(text) = std::str::from_utf8(&header) else {
        return Ok(());
    };
    crate::hf_json::refuse_duplicate_keys(text).map_err(|msg| ModelError::File {
        file: f.display().to_string(),
        msg: format!("not a valid safetensors file: its header has a {msg}"),
    })
}

/// Refuse a model this machine cannot hold: its fp32 weights plus as much
/// again while they are built.
fn check_memory(config: &GPT2Config, file: &str) -> Result<()> {
    let bytes = (config.num_parameters() as u64).saturating_mul(8);
    crate::sysmem::check_fits(
        bytes,
        &format!("a model of {} parameters", config.num_parameters()),
    )
    .map_err(|msg| ModelError::File {
        file: file.to_string(),
        msg,
    })
}

impl GPT2LMHeadModel {
    /// `GPT2LMHeadModel(config)`: a fresh model with HF's initialisation, seeded.
    pub fn new(config: &GPT2Config, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        check_memory(config, "(new model)")?;
        let mut rng = SeededRng::new(seed);
        let mut tensors = HashMap::new();
        for spec in Gpt2Params::new(config).specs {
            let data = init_value(&spec, &mut rng);
            tensors.insert(spec.name, Tensor::from_vec(data, spec.shape, device)?);
        }
        Self::from_tensors(config.clone(), tensors, DType::F32, device, "(new model)")
    }

    /// Build from named tensors, checking that every parameter is there with
    /// the shape the config implies.
    pub fn from_tensors(
        config: GPT2Config,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        file: &str,
    ) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap");
            for ParamSpec { name, shape, .. } in Gpt2Params::new(&config).specs {
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| ModelError::MissingTensor {
                        file: file.into(),
                        name: name.clone(),
                    })?;
                if t.dims() != shape.as_slice() {
                    return Err(ModelError::WrongShape {
                        file: file.into(),
                        name,
                        found: t.dims().to_vec(),
                        expected: shape,
                    });
                }
                let t = t.to_device(device)?.to_dtype(dtype)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(Self::assemble(config, varmap, dtype, device, false))
    }

    /// Build the modules over the parameters of `varmap`. With `detached`,
    /// the modules see the same storage without the autograd flag, so a
    /// forward pass records no graph (what `torch.no_grad()` gives).
    pub(crate) fn assemble(
        config: GPT2Config,
        varmap: VarMap,
        dtype: DType,
        device: &Device,
        detached: bool,
    ) -> Self {
        let params = Gpt2Params::new(&config);
        let get = |i: usize| -> Tensor {
            let t = varmap.data().lock().expect("varmap")[params.name(i)]
                .as_tensor()
                .clone();
            if detached {
                t.detach()
            } else {
                t
            }
        };
        let blocks = params
            .blocks
            .iter()
            .enumerate()
            .map(|(l, p)| build_block(&config, l, config.n_head, p, &get))
            .collect();
        GPT2LMHeadModel {
            lm_head: params.lm_head.map(get),
            wte: get(params.wte),
            wpe: get(params.wpe),
            ln_f: build_ln(&config, params.ln_f, &get),
            blocks,
            params,
            varmap,
            config,
            device: device.clone(),
            dtype,
            training: false,
            dropout: Dropout::new(0),
        }
    }

    /// `GPT2LMHeadModel.from_pretrained(id_or_dir)`: `config.json` and
    /// `model.safetensors` (or a sharded `model.safetensors.index.json`),
    /// from a folder, the HF cache or the hub. Original GPT-2 checkpoints
    /// without the `transformer.` prefix and with `attn.bias` buffers load too.
    pub fn from_pretrained(id_or_dir: &str, dtype: DType, device: &Device) -> Result<Self> {
        let config = GPT2Config::from_file(&hub::get_file(id_or_dir, "config.json")?)?;
        let mut files = Vec::new();
        if let Some(index) = hub::get_optional(id_or_dir, "model.safetensors.index.json") {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::File {
                file: index.display().to_string(),
                msg: e.to_string(),
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::File {
                    file: index.display().to_string(),
                    msg: format!("not a safetensors index: {e}"),
                })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| ModelError::File {
                    file: index.display().to_string(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<&str> = Vec::new();
            for (tensor, s) in map {
                // transformers requires shards to be files of the model
                // folder: nothing here may point elsewhere.
                match s.as_str() {
                    Some(s) if !s.contains(['/', '\\']) && crate::hub::is_inside(s) => {
                        shards.push(s)
                    }
                    _ => {
                        return Err(ModelError::File {
                            file: index.display().to_string(),
                            msg: format!(
                                "weight_map sends `{tensor}` to {s}, which is not a file name \
                                 in the model folder"
                            ),
                        })
                    }
                }
            }
            shards.sort();
            shards.dedup();
            for s in shards {
                files.push(hub::get_file(id_or_dir, s)?);
            }
        } else {
            files.push(hub::get_file(id_or_dir, "model.safetensors")?);
        }
        // Sizes before any allocation: a config that does not match its
        // weights (say `"n_layer": 1000000000`) is refused here.
        let on_disk: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let label = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let params = config.num_parameters() as u64;
        // Two bytes a parameter is the smallest dtype a checkpoint holds.
        if params.saturating_mul(2) > on_disk {
            return Err(ModelError::File {
                file: label,
                msg: format!(
                    "config.json implies {params} parameters, more than these weights files \
                     ({on_disk} bytes) can hold"
                ),
            });
        }
        check_memory(&config, &label)?;
        let mut tensors = HashMap::new();
        let mut from_file: HashMap<String, &std::path::PathBuf> = HashMap::new();
        for f in &files {
            check_header_keys(f)?;
            let loaded =
                candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| ModelError::File {
                    file: f.display().to_string(),
                    msg: format!("not a valid safetensors file: {e}"),
                })?;
            for (name, t) in loaded {
                if name.ends_with(".attn.bias")
                    || name.ends_with(".attn.masked_bias")
                    || (name == "lm_head.weight" && config.tie_word_embeddings)
                {
                    continue; // causal-mask buffers and the tied head
                }
                let name = if name.starts_with("transformer.") || name == "lm_head.weight" {
                    name
                } else {
                    format!("transformer.{name}")
                };
                let t = t.to_dtype(DType::F32)?;
                if t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .any(|x| !x.is_finite())
                {
                    return Err(ModelError::File {
                        file: f.display().to_string(),
                        msg: format!("tensor `{name}` holds NaN or infinite values"),
                    });
                }
                if let Some(first) = from_file.insert(name.clone(), f) {
                    return Err(ModelError::File {
                        file: label,
                        msg: format!(
                            "tensor `{name}` is in two weights files, {} and {}",
                            first.display(),
                            f.display()
                        ),
                    });
                }
                tensors.insert(name, t);
            }
        }
        Self::from_tensors(config, tensors, dtype, device, &label)
    }

    /// The parameters by HF name, in `named_parameters()` order.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap");
        self.params
            .specs
            .iter()
            .map(|s| (s.name.clone(), data[&s.name].clone()))
            .collect()
    }

    /// The parameters' tensors by HF name, in `named_parameters()` order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// `model.num_parameters()`.
    pub fn num_parameters(&self) -> usize {
        self.named_parameters()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// The tensors `save_pretrained` writes, as f32 safetensors bytes.
    pub fn state_dict_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (n, v) in self.named_parameters() {
            tensors.push((
                n,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ));
        }
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta)).map_err(
            |e| ModelError::File {
                file: "model.safetensors".into(),
                msg: e.to_string(),
            },
        )
    }

    /// `model.save_pretrained(dir)`: `config.json` and `model.safetensors` in
    /// HF's layout (`lm_head.weight` stored only when untied), both written
    /// atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        let files = self.pretrained_files()?;
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        crate::atomic_write::write_files_atomically(dir, &refs).map_err(|e| ModelError::File {
            file: dir.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// The files `save_pretrained` writes, by name (checkpoints write them too).
    pub fn pretrained_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mut config = self.config.clone();
        config.architectures = Some(vec!["GPT2LMHeadModel".into()]);
        Ok(vec![
            ("model.safetensors", self.state_dict_bytes()?),
            ("config.json", config.to_json_string().into_bytes()),
        ])
    }

    /// The same weights in `dtype` (`model.to(dtype)`), for mixed precision.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        let mut m =
            Self::from_tensors(self.config.clone(), tensors, dtype, &self.device, "(model)")?;
        m.training = self.training;
        m.dropout.set_state(self.dropout.state());
        Ok(m)
    }

    /// A model whose parameters live elsewhere (ZeRO-3 partitions them over
    /// ranks): every parameter is an empty tensor, as DeepSpeed leaves
    /// `param.numel() == 0` placeholders. Only the `*_with` pieces run on it.
    pub fn partitioned(&self) -> Self {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap");
            for s in &self.params.specs {
                let empty = Var::zeros(0, self.dtype, &self.device).expect("an empty tensor");
                data.insert(s.name.clone(), empty);
            }
        }
        let mut m = Self::assemble(self.config.clone(), varmap, self.dtype, &self.device, false);
        m.training = self.training;
        m.dropout.set_state(self.dropout.state());
        m
    }

    /// Borrow every weight's fp32 storage as slices, with their names, for
    /// the fused CPU kernels (which never see the model itself).
    pub fn with_fp32_weights<R>(
        &self,
        f: impl FnOnce(&crate::cpu::Weights) -> Result<R>,
    ) -> Result<R> {
        let params = self.named_parameters();
        let guards: Vec<_> = params
            .iter()
            .map(|(_, v)| v.as_tensor().storage_and_layout())
            .collect();
        let mut slices = Vec::with_capacity(params.len());
        for ((name, _), (storage, layout)) in params.iter().zip(&guards) {
            let Storage::Cpu(CpuStorage::F32(v)) = &**storage else {
                return Err(ModelError::Input(format!(
                    "{name}: expected fp32 on the CPU"
                )));
            };
            let Some((a, z)) = layout.contiguous_offsets() else {
                return Err(ModelError::Input(format!(
                    "{name}: expected a contiguous tensor"
                )));
            };
            slices.push(&v[a..z]);
        }
        f(&crate::cpu::Weights {
            params: &self.params,
            values: &slices,
        })
    }

    /// Whether the fused CPU kernels run this model: fp32 weights on the
    /// CPU and GPT-2's tanh GELU.
    pub fn fused_kernels_apply(&self) -> bool {
        matches!(self.device, Device::Cpu)
            && self.dtype == DType::F32
            && crate::cpu::supports(&self.config)
    }
}
