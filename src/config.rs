//! `ModelConfig`: the hyper-parameters of a LLaMA-family model, read once from GGUF metadata
//! (later also from a Hugging Face `config.json`) and validated once, so the rest of the code
//! can rely on them.

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

/// How RoPE pairs the elements of a head vector. Both rotate pair `i` by `pos · θ^(−2i/d)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`. GGUF llama checkpoints: llama.cpp's converter permutes the
    /// rows of W_q and W_k so that this form computes the same function as Hugging Face's.
    AdjacentPairs,
    /// Pairs `(x[i], x[i + d/2])`, Hugging Face's `rotate_half` form.
    HalfSplit,
}

/// How RoPE frequencies are stretched for long contexts (Hugging Face `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: θ_i = theta^(−2i/d).
    None,
    /// `linear`: every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// `llama3` (LLaMA-3.1): long wavelengths divided by `factor`, short ones kept, a smooth
    /// blend between, decided against the original training context.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
}

impl RopeScaling {
    /// The scaled inverse frequency of one rotation pair.
    pub fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let low_freq_wavelen = original_context / low_freq_factor;
                let high_freq_wavelen = original_context / high_freq_factor;
                if wavelen < high_freq_wavelen {
                    inv_freq
                } else if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = match *self {
            RopeScaling::None => true,
            RopeScaling::Linear { factor } => factor.is_finite() && factor > 0.0,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                [factor, low_freq_factor, high_freq_factor, original_context]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0)
                    && high_freq_factor > low_freq_factor
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!("bad RoPE scaling {self:?}")))
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// MLP hidden width.
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model was trained for.
    pub context_length: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// The output projection is the token embedding (no separate `output.weight`).
    pub tied_output: bool,
}

impl ModelConfig {
    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the fused Q|K|V projection output: `(n_heads + 2·n_kv_heads) · head_dim`.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Reads `general.architecture` and the `<arch>.*` keys of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let usize_key = |k: &str| -> Result<usize> {
            let v = g.get_u64(&key(k))?;
            usize::try_from(v).map_err(|_| Error::InvalidConfig(format!("{} = {v} is too large", key(k))))
        };
        let n_heads = usize_key("attention.head_count")?;
        let n_kv_heads = match g.get(&key("attention.head_count_kv")) {
            Some(_) => usize_key("attention.head_count_kv")?,
            None => n_heads,
        };
        let d_model = usize_key("embedding_length")?;
        let head_dim = match g.get(&key("rope.dimension_count")) {
            Some(_) => usize_key("rope.dimension_count")?,
            None if n_heads > 0 => d_model / n_heads,
            None => 0,
        };
        let vocab_size = match g.get(&key("vocab_size")) {
            Some(_) => usize_key("vocab_size")?,
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = match g.get(&key("rope.freq_base")) {
            Some(_) => g.get_f64(&key("rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        let cfg = ModelConfig {
            n_layers: usize_key("block_count")?,
            d_model,
            d_ff: usize_key("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length: usize_key("context_length")?,
            rope_theta,
            rope_style: RopeStyle::AdjacentPairs,
            rope_scaling: RopeScaling::None,
            rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            tied_output: g.tensor("output.weight").is_none(),
            architecture: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM`, as transformers 4.x writes it —
    /// `rope_theta`, `rope_scaling` — or 5.x — `rope_parameters` holding `rope_theta` and
    /// `rope_type`). Q/K use the half-split RoPE convention there.
    pub fn from_hf(config: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| Error::InvalidConfig(format!("config.json: {m}"));
        let obj = config.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let archs: Vec<&str> = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let model_type = obj.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        // The LLaMA block with optional projection biases (Qwen2: q/k/v; `attention_bias`,
        // `mlp_bias`), which the loader finds by their tensors.
        let known = archs
            .iter()
            .any(|a| matches!(*a, "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"))
            || matches!(model_type, "llama" | "mistral" | "qwen2");
        if !known {
            return Err(Error::UnsupportedArchitecture(format!(
                "{} (model_type {model_type:?}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
                if archs.is_empty() {
                    "no architectures".to_string()
                } else {
                    archs.join(", ")
                }
            )));
        }
        if obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad(
                "sliding-window attention (use_sliding_window) is not supported".into()
            ));
        }
        let uint = |k: &str| -> Result<Option<usize>> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{k} = {v} is not a non-negative integer"))),
            }
        };
        let need = |k: &str| -> Result<usize> { uint(k)?.ok_or_else(|| bad(format!("{k} is missing"))) };
        let float = |o: &serde_json::Map<String, serde_json::Value>, k: &str| -> Result<Option<f64>> {
            match o.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("{k} = {v} is not a number"))),
            }
        };
        let d_model = need("hidden_size")?;
        let n_heads = need("num_attention_heads")?;
        let n_kv_heads = uint("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match uint("head_dim")? {
            Some(h) => h,
            None if n_heads > 0 => d_model / n_heads,
            None => 0,
        };
        // RoPE: 5.x nests it in rope_parameters, 4.x has rope_theta + rope_scaling.
        let empty = serde_json::Map::new();
        let params = obj.get("rope_parameters").and_then(|v| v.as_object());
        let scaling = params
            .or_else(|| obj.get("rope_scaling").and_then(|v| v.as_object()))
            .unwrap_or(&empty);
        let rope_theta = match params.map(|p| float(p, "rope_theta")).transpose()?.flatten() {
            Some(t) => t,
            None => float(obj, "rope_theta")?.unwrap_or(10_000.0),
        };
        let rope_type = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let factor =
            || -> Result<f64> { float(scaling, "factor")?.ok_or_else(|| bad("rope scaling without factor".into())) };
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: float(scaling, "low_freq_factor")?.unwrap_or(1.0),
                high_freq_factor: float(scaling, "high_freq_factor")?.unwrap_or(4.0),
                original_context: float(scaling, "original_max_position_embeddings")?
                    .ok_or_else(|| bad("llama3 RoPE scaling without original_max_position_embeddings".into()))?,
            },
            other => {
                return Err(bad(format!(
                    "RoPE type {other:?} is not supported (default, linear, llama3)"
                )))
            }
        };
        let cfg = ModelConfig {
            architecture: "llama".into(),
            n_layers: need("num_hidden_layers")?,
            d_model,
            d_ff: need("intermediate_size")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: need("vocab_size")?,
            context_length: need("max_position_embeddings")?,
            rope_theta: rope_theta as f32,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling,
            rms_eps: float(obj, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            tied_output: obj
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The invariants the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        for (name, v) in [
            ("n_layers", self.n_layers),
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if self.n_heads * self.head_dim != self.d_model {
            return bad(format!(
                "n_heads {} × head_dim {} != d_model {}",
                self.n_heads, self.head_dim, self.d_model
            ));
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {} (GQA ratio must be integral)",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} is odd; RoPE rotates pairs", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope theta {} is not positive", self.rope_theta));
        }
        self.rope_scaling.validate()?;
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(format!("rms epsilon {} is not positive", self.rms_eps));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab size {} does not fit token ids", self.vocab_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama31() -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": false
        })
    }

    #[test]
    fn transformers_4_and_5_configs_read_the_same() {
        let v4 = ModelConfig::from_hf(&llama31()).unwrap();
        let mut five = llama31();
        let o = five.as_object_mut().unwrap();
        let mut params = o.remove("rope_scaling").unwrap();
        params["rope_theta"] = o.remove("rope_theta").unwrap();
        o.insert("rope_parameters".into(), params);
        let v5 = ModelConfig::from_hf(&five).unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.rope_style, RopeStyle::HalfSplit);
        assert_eq!((v4.n_kv_heads, v4.head_dim, v4.gqa_group()), (8, 128, 4));
        assert_eq!(v4.rope_theta, 500000.0);
        assert!(!v4.tied_output);
        assert!(matches!(v4.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_divides_long_ones_and_is_continuous() {
        let s = ModelConfig::from_hf(&llama31()).unwrap().rope_scaling;
        let at_wavelen = |w: f64| 2.0 * std::f64::consts::PI / w;
        // Shorter than 8192 / 4 = 2048: unchanged; longer than 8192 / 1: divided by 8.
        assert_eq!(s.apply(at_wavelen(100.0)), at_wavelen(100.0));
        assert_eq!(s.apply(at_wavelen(20_000.0)), at_wavelen(20_000.0) / 8.0);
        // Continuous at both edges of the blend.
        for (edge, near) in [(2048.0, 1.0), (8192.0, 1.0 / 8.0)] {
            let f = at_wavelen(edge);
            assert!((s.apply(f) / f - near).abs() < 1e-9, "at wavelength {edge}");
        }
        let mid = at_wavelen(4096.0);
        let r = s.apply(mid) / mid;
        assert!(r > 1.0 / 8.0 && r < 1.0, "blended in between: {r}");
        assert_eq!(RopeScaling::Linear { factor: 4.0 }.apply(2.0), 0.5);
    }

    #[test]
    fn impossible_or_unsupported_configs_are_typed_errors() {
        let with = |k: &str, v: serde_json::Value| {
            let mut c = llama31();
            c[k] = v;
            ModelConfig::from_hf(&c)
        };
        assert!(matches!(with("num_key_value_heads", json!(7)), Err(Error::InvalidConfig(m)) if m.contains("GQA")));
        assert!(matches!(
            with("num_attention_heads", json!(0)),
            Err(Error::InvalidConfig(_))
        ));
        assert!(matches!(with("hidden_size", json!("big")), Err(Error::InvalidConfig(m)) if m.contains("hidden_size")));
        let mut gpt2 = llama31();
        gpt2["architectures"] = json!(["GPT2LMHeadModel"]);
        gpt2["model_type"] = json!("gpt2");
        assert!(matches!(ModelConfig::from_hf(&gpt2), Err(Error::UnsupportedArchitecture(m)) if m.contains("GPT2")));
        let mut yarn = llama31();
        yarn["rope_scaling"]["rope_type"] = json!("yarn");
        assert!(matches!(ModelConfig::from_hf(&yarn), Err(Error::InvalidConfig(m)) if m.contains("yarn")));
        assert!(
            matches!(with("use_sliding_window", json!(true)), Err(Error::InvalidConfig(m)) if m.contains("sliding"))
        );
        assert!(
            with("attention_bias", json!(true)).is_ok(),
            "biases are found by their tensors"
        );
        let mut missing = llama31();
        missing.as_object_mut().unwrap().remove("num_hidden_layers");
        assert!(
            matches!(ModelConfig::from_hf(&missing), Err(Error::InvalidConfig(m)) if m.contains("num_hidden_layers"))
        );
    }
}
