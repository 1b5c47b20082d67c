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
            rms_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
            tied_output: g.tensor("output.weight").is_none(),
            architecture: arch,
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
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(format!("rms epsilon {} is not positive", self.rms_eps));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab size {} does not fit token ids", self.vocab_size));
        }
        Ok(())
    }
}
