//! Models over a [`crate::backend::Backend`]: LLaMA-family for now.
//!
//! Weights reach a model through [`WeightSource`], named the GGUF way (`blk.{i}.attn_q.weight`
//! …), so every checkpoint format maps its names onto one model: a format is a source, not a
//! second model.

pub mod llama;

pub use llama::{KvCache, Llama};

use crate::error::Result;
use crate::formats::gguf::GgufFile;
use crate::quant::WeightMatrix;

/// Every tensor a LLaMA model of `c` reads, by GGUF name, in load order.
pub fn tensor_names(c: &crate::config::ModelConfig) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string()];
    for l in 0..c.n_layers {
        for part in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{l}.{part}.weight"));
        }
    }
    names.push("output_norm.weight".into());
    if !c.tied_output {
        names.push("output.weight".into());
    }
    names
}

/// Where a model's tensors come from, by GGUF tensor name.
pub trait WeightSource {
    fn has(&self, name: &str) -> bool;
    /// Shape in row-major order (`[out, in]` for a matrix), or `None` if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A matrix in its lossless host form.
    fn matrix(&self, name: &str) -> Result<WeightMatrix>;
    /// A vector (norm weights) as f32.
    fn vector(&self, name: &str) -> Result<Vec<f32>>;
}

impl WeightSource for GgufFile {
    fn has(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor(name).map(|t| t.shape())
    }

    fn matrix(&self, name: &str) -> Result<WeightMatrix> {
        self.weight_matrix(name)
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor_f32(name)
    }
}
