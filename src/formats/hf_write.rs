//! Writes Hugging Face checkpoint folders: `config.json` (transformers 4.x keys), the
//! tokenizer files and one `model.safetensors`. Used to export a GGUF model as a float
//! Hugging Face folder ([`export_gguf`]: weights dequantized, W_q / W_k rows un-permuted back to
//! the half-split RoPE convention) and by `qmtot quantize --format safetensors`.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::WeightSource;
use crate::tokenizer::Tokenizer;

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OutTensor {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn f16(name: impl Into<String>, shape: Vec<usize>, v: &[half::f16]) -> Self {
        Self {
            name: name.into(),
            dtype: Dtype::F16,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// `config.json` for `config` in transformers 4.x form (`rope_theta`, `rope_scaling`), with an
/// optional `quantization_config`.
pub fn config_json(c: &ModelConfig, eos: &[u32], quantization: Option<Value>) -> Value {
    let rope_scaling = match c.rope_scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_context}),
    };
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tied_output,
        "hidden_act": "silu",
        "attention_bias": false,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    });
    if let Some(q) = quantization {
        v["quantization_config"] = q;
    }
    v
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes `dir/` with `config.json`, `generation_config.json`, `tokenizer.json`,
/// `chat_template.jinja` (when the tokenizer has one) and `model.safetensors`.
pub fn write_folder(dir: &Path, config: &Value, tokenizer: &Tokenizer, tensors: &[OutTensor]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize");
    write_text(&dir.join("config.json"), &pretty(config))?;
    write_text(
        &dir.join("generation_config.json"),
        &pretty(&json!({"eos_token_id": tokenizer.eos_ids()})),
    )?;
    write_text(&dir.join("tokenizer.json"), &tokenizer.to_json()?)?;
    if let Some(t) = tokenizer.chat_template() {
        write_text(&dir.join("chat_template.jinja"), t)?;
    }
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::BadTensor {
                    tensor: t.name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// The row order that takes a GGUF W_q / W_k (`[heads · hd, in]`, pairs adjacent per head,
/// as llama.cpp's converter permutes them) back to Hugging Face order (per head, first halves
/// then second halves): HF row `h·hd + j·hd/2 + i` is GGUF row `h·hd + 2i + j`, i.e. HF row
/// `r` = GGUF row `order[r]`.
pub fn rope_unpermute_order(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; heads * head_dim];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * head_dim + j * half + i] = h * head_dim + 2 * i + j;
            }
        }
    }
    order
}

/// `w` (`[heads · hd, cols]` f32, GGUF order) in Hugging Face row order.
pub fn unpermute_rope_rows(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    rope_unpermute_order(heads, head_dim)
        .iter()
        .flat_map(|&r| w[r * cols..(r + 1) * cols].iter().copied())
        .collect()
}

/// Float precision of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
}

/// The GGUF model as a float Hugging Face folder: every weight dequantized (exactly, in f32,
/// or rounded to f16), Q/K rows un-permuted to the half-split convention, the tokenizer, its
/// chat template and eos ids.
pub fn export_gguf(g: &GgufFile, tokenizer: &Tokenizer, dir: &Path, dtype: ExportDtype) -> Result<()> {
    let c = ModelConfig::from_gguf(g)?;
    let names = crate::model::tensor_names(&c);
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let hf = super::safetensors::hf_tensor_name(name).expect("every exported name maps");
        let shape = g.shape(name).ok_or_else(|| Error::MissingTensor(name.clone()))?;
        let mut values = if shape.len() == 1 {
            g.vector(name)?
        } else {
            g.matrix(name)?.dequant()
        };
        if name.ends_with("attn_q.weight") {
            values = unpermute_rope_rows(&values, c.n_heads, c.head_dim, c.d_model);
        } else if name.ends_with("attn_k.weight") {
            values = unpermute_rope_rows(&values, c.n_kv_heads, c.head_dim, c.d_model);
        }
        tensors.push(match dtype {
            ExportDtype::F32 => OutTensor::f32(hf, shape, &values),
            ExportDtype::F16 => {
                let h: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
                OutTensor::f16(hf, shape, &h)
            }
        });
    }
    let mut config = config_json(&c, tokenizer.eos_ids(), None);
    config["torch_dtype"] = json!(match dtype {
        ExportDtype::F32 => "float32",
        ExportDtype::F16 => "float16",
    });
    write_folder(dir, &config, tokenizer, &tensors)
}
