//! Hugging Face checkpoint folders: `config.json`, `tokenizer.json` (+ chat template and
//! generation config) and safetensors weights, one file or shards listed in
//! `model.safetensors.index.json`, memory-mapped.
//!
//! The folder is a [`WeightSource`]: the model asks for tensors by their GGUF names
//! (`blk.3.attn_q.weight`) and gets them in a host form of [`crate::quant`]:
//!
//! * float weights (f32 / f16 / bf16) become INT4 by round-to-nearest at load
//!   ([`FloatWeights::Int4`], group 128 by default), or stay f16 or f32; the embedding and the
//!   lm_head stay f16 unless `quantize_lm_head` (f32 under [`FloatWeights::F32`]);
//! * GPTQ and AWQ INT4 layers (`qweight` / `qzeros` / `scales` [/ `g_idx`]) convert without
//!   loss into canonical INT4 (`crate::formats::{gptq, awq}`); a GPTQ act-order layer (groups
//!   scattered by `g_idx`) keeps its columns sorted into contiguous groups and carries that
//!   input order, which the backends apply to the activations; in these folders, as in
//!   qmtot's own, float tensors load in the precision they were written in;
//! * qmtot's own INT4 folders (written by `qmtot quantize --format safetensors`: `packed` u8
//!   `[out, in/2]`, `scales` f16 and `mins` f32 `[out, in/g]` per layer, `input_order` u32
//!   `[in]` where a layer has one, `quant_method` = `qmtot_int4`) load as they are.
//!
//! Hugging Face stores W_q and W_k for the half-split RoPE convention; the config says so
//! ([`crate::config::RopeStyle::HalfSplit`]) and the forward rotates accordingly, so no row is
//! permuted here.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::awq::{awq_to_int4, AwqConfig, AwqTensors};
use super::gptq::{gptq_to_int4, GptqConfig, GptqTensors, HostTensor};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::WeightSource;
use crate::quant::{DenseMatrix, F16Matrix, Int4Matrix, WeightMatrix, INT4_GROUP_SIZES};
use crate::tokenizer::Tokenizer;

/// What float weights become at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatWeights {
    /// Round-to-nearest asymmetric INT4 with this group size (32, 64 or 128).
    Int4 {
        group: usize,
    },
    F16,
    /// Exact (CPU comparisons).
    F32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub weights: FloatWeights,
    /// Quantize the embedding and lm_head too (under `Int4`); otherwise they stay f16.
    pub quantize_lm_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            weights: FloatWeights::Int4 { group: 128 },
            quantize_lm_head: false,
        }
    }
}

/// How the folder's linear layers are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Quantization {
    /// `*.weight` in f32 / f16 / bf16.
    Float,
    /// qmtot's canonical INT4 (`*.packed`, `*.scales`, `*.mins`).
    Qmtot { group: usize },
    /// GPTQ (`*.qweight`, `*.qzeros`, `*.scales`, `*.g_idx`).
    Gptq(GptqConfig),
    /// AWQ GEMM (`*.qweight`, `*.qzeros`, `*.scales`).
    Awq(AwqConfig),
}

/// The `quantization_config` of a qmtot INT4 folder.
pub const QMTOT_QUANT_METHOD: &str = "qmtot_int4";

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    /// Safetensors order (row-major; `[out, in]` for a linear weight).
    shape: Vec<usize>,
    /// Byte range in the shard's mapping.
    start: usize,
    end: usize,
}

pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// `config.json` as read.
    pub raw_config: Value,
    pub quantization: Quantization,
    pub options: LoadOptions,
    shards: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, Entry>,
}

fn checkpoint_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| checkpoint_err(path, format!("invalid JSON: {e}")))
}

/// Whether `dir` looks like a Hugging Face checkpoint folder.
pub fn is_hf_folder(dir: &Path) -> bool {
    dir.is_dir() && dir.join("config.json").is_file()
}

/// The GGUF name the model asks for → the Hugging Face module holding it, and whether it is a
/// linear layer (`.weight`, or `.qweight` & co. when quantized) rather than a norm vector.
fn hf_module(gguf: &str) -> Option<(String, bool)> {
    let fixed = match gguf {
        "token_embd.weight" => Some(("model.embed_tokens".to_string(), true)),
        "output_norm.weight" => Some(("model.norm".to_string(), false)),
        "output.weight" => Some(("lm_head".to_string(), true)),
        _ => None,
    };
    if fixed.is_some() {
        return fixed;
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = rest.strip_suffix(".weight")?;
    let (module, linear) = match part {
        "attn_norm" => ("input_layernorm", false),
        "ffn_norm" => ("post_attention_layernorm", false),
        "attn_q" => ("self_attn.q_proj", true),
        "attn_k" => ("self_attn.k_proj", true),
        "attn_v" => ("self_attn.v_proj", true),
        "attn_output" => ("self_attn.o_proj", true),
        "ffn_gate" => ("mlp.gate_proj", true),
        "ffn_up" => ("mlp.up_proj", true),
        "ffn_down" => ("mlp.down_proj", true),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{module}"), linear))
}

/// The Hugging Face tensor holding a float weight or norm the model asks for by GGUF name.
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    hf_module(gguf).map(|(m, _)| format!("{m}.weight"))
}

/// The Hugging Face tensor of a projection bias asked for by GGUF name (`blk.3.attn_q.bias` →
/// `model.layers.3.self_attn.q_proj.bias`).
fn hf_bias_name(gguf: &str) -> Option<String> {
    let weight = format!("{}.weight", gguf.strip_suffix(".bias")?);
    match hf_module(&weight)? {
        (m, true) => Some(format!("{m}.bias")),
        _ => None,
    }
}

impl HfCheckpoint {
    /// Reads the folder's config and maps its safetensors files (no tensor is read yet).
    pub fn open(dir: impl AsRef<Path>, options: LoadOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if let FloatWeights::Int4 { group } = options.weights {
            if !INT4_GROUP_SIZES.contains(&group) {
                return Err(Error::InvalidArgument(format!(
                    "group size {group} is not supported (32, 64 or 128)"
                )));
            }
        }
        let raw_config = read_json(&dir.join("config.json"))?;
        let config = ModelConfig::from_hf(&raw_config)?;
        let quantization = quantization_of(&dir, &raw_config)?;

        // Shards: the index's files, or the one model.safetensors.
        let index_path = dir.join("model.safetensors.index.json");
        let (files, expected): (Vec<String>, BTreeMap<String, String>) = if index_path.is_file() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| checkpoint_err(&index_path, "no weight_map object"))?;
            let mut expected = BTreeMap::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| checkpoint_err(&index_path, format!("weight_map[{tensor:?}] is not a file name")))?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(checkpoint_err(
                        &index_path,
                        format!("shard name {file:?} leaves the folder"),
                    ));
                }
                expected.insert(tensor.clone(), file.to_string());
            }
            let files: BTreeSet<String> = expected.values().cloned().collect();
            (files.into_iter().collect(), expected)
        } else if dir.join("model.safetensors").is_file() {
            (vec!["model.safetensors".into()], BTreeMap::new())
        } else {
            let found: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(&dir, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            return Err(checkpoint_err(
                &dir,
                format!(
                    "no model.safetensors or model.safetensors.index.json (found: {}); \
                     qmtot reads safetensors checkpoints (Hugging Face, GPTQ, AWQ) and GGUF files",
                    found.join(", ")
                ),
            ));
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (shard, file) in files.iter().enumerate() {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(checkpoint_err(
                    &path,
                    "shard named in model.safetensors.index.json is missing",
                ));
            }
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the mapping is read-only and private to this process; a checkpoint
            // file changed underneath a running model is outside what qmtot guards against
            // (as with every mmap-based loader).
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            let (header, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| checkpoint_err(&path, format!("not a safetensors file: {e}")))?;
            let data_start = 8 + header;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    Entry {
                        shard,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + a,
                        end: data_start + b,
                    },
                );
            }
            shards.push((path, map));
        }
        for (tensor, file) in &expected {
            match tensors.get(tensor) {
                Some(e) if files[e.shard] == *file => {}
                _ => {
                    return Err(checkpoint_err(
                        &dir.join(file),
                        format!("tensor {tensor:?} is listed in the index for this shard but is not in it"),
                    ))
                }
            }
        }
        Ok(Self {
            dir,
            config,
            raw_config,
            quantization,
            options,
            shards,
            tensors,
        })
    }

    /// The tokenizer: `tokenizer.json`, eos ids from `generation_config.json` (else
    /// `config.json`), the chat template from `chat_template.jinja` or `tokenizer_config.json`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|i| i as u32).collect(),
                _ => Vec::new(),
            }
        };
        let gen_path = self.dir.join("generation_config.json");
        let mut eos = if gen_path.is_file() {
            ids(read_json(&gen_path)?.get("eos_token_id"))
        } else {
            Vec::new()
        };
        if eos.is_empty() {
            eos = ids(self.raw_config.get("eos_token_id"));
        }
        let tc_path = self.dir.join("tokenizer_config.json");
        let tokenizer_config = if tc_path.is_file() {
            Some(read_json(&tc_path)?)
        } else {
            None
        };
        let jinja = self.dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            match tokenizer_config.as_ref().and_then(|c| c.get("chat_template")) {
                Some(Value::String(t)) => Some(t.clone()),
                // A list of named templates: the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let tok = Tokenizer::from_file(self.dir.join("tokenizer.json"), eos, template)?;
        if !tok.eos_ids().is_empty() {
            return Ok(tok);
        }
        // Fall back to the tokenizer config's eos token by name.
        match tokenizer_config
            .as_ref()
            .and_then(|c| c.get("eos_token"))
            .and_then(|v| v.as_str().or_else(|| v.get("content").and_then(Value::as_str)))
            .and_then(|name| tok.token_to_id(name))
        {
            Some(id) => Ok(tok.with_eos(vec![id])),
            None => Ok(tok),
        }
    }

    /// Every tensor: name, dtype, shape (for `qmtot info`).
    pub fn tensor_list(&self) -> impl Iterator<Item = (&str, Dtype, &[usize])> {
        self.tensors
            .iter()
            .map(|(n, e)| (n.as_str(), e.dtype, e.shape.as_slice()))
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    fn bytes(&self, name: &str) -> Result<(&Entry, &[u8])> {
        let e = self.entry(name)?;
        let (path, map) = &self.shards[e.shard];
        let data = map
            .get(e.start..e.end)
            .ok_or_else(|| checkpoint_err(path, format!("tensor {name:?} lies past the end of the file")))?;
        let elems: usize = e.shape.iter().product();
        if data.len() * 8 != elems * e.dtype.bitsize() {
            return Err(Error::BadTensor {
                tensor: name.to_string(),
                reason: format!("{} bytes for shape {:?} of {:?}", data.len(), e.shape, e.dtype),
            });
        }
        Ok((e, data))
    }

    fn wrong_dtype(name: &str, found: Dtype, allowed: &str) -> Error {
        Error::BadTensor {
            tensor: name.to_string(),
            reason: format!("dtype {found:?} is not allowed here (expected {allowed})"),
        }
    }

    /// A float tensor as f32 (exact for f32, f16 and bf16).
    fn floats(&self, name: &str) -> Result<Vec<f32>> {
        let (e, b) = self.bytes(name)?;
        Ok(match e.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(Self::wrong_dtype(name, other, "F32, F16 or BF16")),
        })
    }

    /// A float tensor as f16: exact for f16, rounded to nearest for f32 and bf16.
    fn halves(&self, name: &str) -> Result<Vec<f16>> {
        let (e, b) = self.bytes(name)?;
        Ok(match e.dtype {
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect(),
            _ => self.floats(name)?.into_iter().map(f16::from_f32).collect(),
        })
    }

    fn typed<T>(&self, name: &str, dtype: Dtype, allowed: &str, conv: impl Fn(&[u8]) -> T) -> Result<Vec<T>> {
        let (e, b) = self.bytes(name)?;
        if e.dtype != dtype {
            return Err(Self::wrong_dtype(name, e.dtype, allowed));
        }
        Ok(b.chunks_exact(dtype.bitsize() / 8).map(conv).collect())
    }

    /// A float linear weight in the form the options ask for (`name` is the GGUF name).
    fn float_matrix(&self, name: &str, tensor: &str) -> Result<WeightMatrix> {
        let shape = &self.entry(tensor)?.shape;
        let &[rows, cols] = shape.as_slice() else {
            return Err(Error::BadTensor {
                tensor: tensor.to_string(),
                reason: format!("shape {shape:?} is not a matrix"),
            });
        };
        let embed_or_head = name == "token_embd.weight" || name == "output.weight";
        // In a quantized folder the float tensors (embedding, lm_head, any layer left
        // unquantized) load in the precision they were written in: nothing is rounded again.
        if self.quantization != Quantization::Float {
            return Ok(match self.entry(tensor)?.dtype {
                Dtype::F16 => WeightMatrix::F16(F16Matrix::new(rows, cols, self.halves(tensor)?)?),
                _ => WeightMatrix::Dense(DenseMatrix::new(rows, cols, self.floats(tensor)?)?),
            });
        }
        let weights = match self.options.weights {
            FloatWeights::Int4 { .. } if embed_or_head && !self.options.quantize_lm_head => FloatWeights::F16,
            // Embedding rows must split into whole groups to be quantized; keep them f16 if not.
            FloatWeights::Int4 { group } if cols % group != 0 => FloatWeights::F16,
            w => w,
        };
        Ok(match weights {
            FloatWeights::F32 => WeightMatrix::Dense(DenseMatrix::new(rows, cols, self.floats(tensor)?)?),
            FloatWeights::F16 => WeightMatrix::F16(F16Matrix::new(rows, cols, self.halves(tensor)?)?),
            FloatWeights::Int4 { group } => {
                WeightMatrix::Int4(Int4Matrix::quantize_rtn(rows, cols, group, &self.floats(tensor)?)?)
            }
        })
    }

    fn i32s(&self, name: &str) -> Result<Vec<i32>> {
        self.typed(name, Dtype::I32, "I32", |c| {
            i32::from_le_bytes([c[0], c[1], c[2], c[3]])
        })
    }

    /// GPTQ/AWQ scales: f16 as stored (a bf16 or f32 scale would need rounding, so it is refused).
    fn scales_f16(&self, name: &str) -> Result<Vec<f16>> {
        self.typed(name, Dtype::F16, "F16", |c| f16::from_le_bytes([c[0], c[1]]))
    }

    fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// `[out, in]` of a quantized layer, from its packed weight.
    fn packed_dims(&self, name: &str, module: &str) -> Result<(usize, usize)> {
        match self.shape(name).as_deref() {
            Some(&[out, inp]) => Ok((out, inp)),
            _ => Err(Error::MissingTensor(format!("{module}.qweight"))),
        }
    }

    /// A GPTQ layer (act-order ones carry their input order).
    fn gptq_matrix(&self, name: &str, module: &str, cfg: &GptqConfig) -> Result<WeightMatrix> {
        let (out, inp) = self.packed_dims(name, module)?;
        let [qw, qz, sc, gi] = ["qweight", "qzeros", "scales", "g_idx"].map(|t| format!("{module}.{t}"));
        let (qweight, qzeros, scales) = (self.i32s(&qw)?, self.i32s(&qz)?, self.scales_f16(&sc)?);
        let (qw_shape, qz_shape, sc_shape) = (self.shape_of(&qw)?, self.shape_of(&qz)?, self.shape_of(&sc)?);
        let g_idx = if self.tensors.contains_key(&gi) {
            Some((self.i32s(&gi)?, self.shape_of(&gi)?))
        } else {
            None
        };
        let t = GptqTensors {
            qweight: HostTensor::new(&qw_shape, &qweight),
            qzeros: HostTensor::new(&qz_shape, &qzeros),
            scales: HostTensor::new(&sc_shape, &scales),
            g_idx: g_idx.as_ref().map(|(d, s)| HostTensor::new(s, d)),
        };
        let converted = gptq_to_int4(module, inp, out, cfg, &t)?;
        Ok(WeightMatrix::Int4(match converted.perm {
            // Act-order: the columns were sorted into contiguous groups; the backends gather
            // the activations into the same order before the matmul.
            Some(perm) => converted.matrix.with_input_order(perm)?,
            None => converted.matrix,
        }))
    }

    fn awq_matrix(&self, name: &str, module: &str, cfg: &AwqConfig) -> Result<WeightMatrix> {
        let (out, inp) = self.packed_dims(name, module)?;
        let [qw, qz, sc] = ["qweight", "qzeros", "scales"].map(|t| format!("{module}.{t}"));
        let (qweight, qzeros, scales) = (self.i32s(&qw)?, self.i32s(&qz)?, self.scales_f16(&sc)?);
        let (qw_shape, qz_shape, sc_shape) = (self.shape_of(&qw)?, self.shape_of(&qz)?, self.shape_of(&sc)?);
        let t = AwqTensors {
            qweight: HostTensor::new(&qw_shape, &qweight),
            qzeros: HostTensor::new(&qz_shape, &qzeros),
            scales: HostTensor::new(&sc_shape, &scales),
        };
        Ok(WeightMatrix::Int4(awq_to_int4(module, inp, out, cfg, &t)?))
    }

    /// A layer stored in qmtot's canonical INT4 (`module.packed/scales/mins`).
    fn canonical_matrix(&self, module: &str, group: usize) -> Result<WeightMatrix> {
        let packed_name = format!("{module}.packed");
        let shape = self.entry(&packed_name)?.shape.clone();
        let &[rows, half] = shape.as_slice() else {
            return Err(Error::BadTensor {
                tensor: packed_name,
                reason: format!("shape {shape:?} is not a matrix"),
            });
        };
        let cols = half * 2;
        let packed = self.typed(&packed_name, Dtype::U8, "U8", |c| c[0])?;
        let scales = self.typed(&format!("{module}.scales"), Dtype::F16, "F16", |c| {
            f16::from_le_bytes([c[0], c[1]])
        })?;
        let mins = self.typed(&format!("{module}.mins"), Dtype::F32, "F32", |c| {
            f32::from_le_bytes([c[0], c[1], c[2], c[3]])
        })?;
        let m = Int4Matrix::new(rows, cols, group, packed, scales, mins)?;
        let order_name = format!("{module}.input_order");
        Ok(WeightMatrix::Int4(if self.tensors.contains_key(&order_name) {
            let order = self.typed(&order_name, Dtype::U32, "U32", |c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            })?;
            m.with_input_order(order)?
        } else {
            m
        }))
    }
}

/// Reads the folder's quantization (`quantization_config` in config.json, or
/// `quantize_config.json` / `quant_config.json` beside it).
fn quantization_of(dir: &Path, config: &Value) -> Result<Quantization> {
    let mut q = config.get("quantization_config").cloned();
    for file in ["quantize_config.json", "quant_config.json"] {
        if q.is_none() && dir.join(file).is_file() {
            q = Some(read_json(&dir.join(file))?);
        }
    }
    let Some(q) = q else { return Ok(Quantization::Float) };
    // AutoGPTQ's quantize_config.json has no quant_method; AWQ's quant_config.json has w_bit.
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or(if q.get("w_bit").is_some() { "awq" } else { "gptq" });
    match method {
        "gptq" => Ok(Quantization::Gptq(GptqConfig::from_json(&q)?)),
        "awq" => Ok(Quantization::Awq(AwqConfig::from_json(&q)?)),
        QMTOT_QUANT_METHOD => {
            let group = q.get("group_size").and_then(Value::as_u64).unwrap_or(0) as usize;
            if !INT4_GROUP_SIZES.contains(&group) {
                return Err(Error::UnsupportedQuantization(format!(
                    "{QMTOT_QUANT_METHOD} with group size {group} (32, 64 or 128)"
                )));
            }
            Ok(Quantization::Qmtot { group })
        }
        other => Err(Error::UnsupportedQuantization(format!(
            "quant_method {other:?} (qmtot loads float safetensors, gptq, awq and {QMTOT_QUANT_METHOD})"
        ))),
    }
}

impl WeightSource for HfCheckpoint {
    fn has(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(b) = hf_bias_name(name) {
            return self.tensors.get(&b).map(|e| e.shape.clone());
        }
        let (module, linear) = hf_module(name)?;
        if !linear {
            return self.tensors.get(&format!("{module}.weight")).map(|e| e.shape.clone());
        }
        if let Some(e) = self.tensors.get(&format!("{module}.weight")) {
            return Some(e.shape.clone());
        }
        let packed = |suffix: &str| {
            self.tensors
                .get(&format!("{module}.{suffix}"))
                .map(|e| e.shape.as_slice())
        };
        match (&self.quantization, packed("packed"), packed("qweight")) {
            // packed [out, in/2]: 2 inputs per byte.
            (Quantization::Qmtot { .. }, Some(&[rows, half]), _) => Some(vec![rows, half * 2]),
            // qweight [in/8, out]: 8 inputs per word.
            (Quantization::Gptq(_), _, Some(&[in8, out])) => Some(vec![out, in8 * 8]),
            // qweight [in, out/8]: 8 outputs per word.
            (Quantization::Awq(_), _, Some(&[inp, out8])) => Some(vec![out8 * 8, inp]),
            _ => None,
        }
    }

    fn matrix(&self, name: &str) -> Result<WeightMatrix> {
        let (module, linear) = hf_module(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if !linear {
            return Err(Error::BadTensor {
                tensor: name.to_string(),
                reason: "a norm vector, not a matrix".into(),
            });
        }
        // Embeddings, the lm_head and any layer left unquantized are float.
        let float = format!("{module}.weight");
        if self.tensors.contains_key(&float) {
            return self.float_matrix(name, &float);
        }
        match &self.quantization {
            Quantization::Float => Err(Error::MissingTensor(float)),
            Quantization::Qmtot { group } => self.canonical_matrix(&module, *group),
            Quantization::Gptq(cfg) => self.gptq_matrix(name, &module, cfg),
            Quantization::Awq(cfg) => self.awq_matrix(name, &module, cfg),
        }
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        if let Some(b) = hf_bias_name(name) {
            return self.floats(&b);
        }
        let (module, _) = hf_module(name).ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        self.floats(&format!("{module}.weight"))
    }
}
