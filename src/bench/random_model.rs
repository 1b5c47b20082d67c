//! Random-weight models at real LLaMA shapes (`qmtot bench decode --shape … --random-weights`):
//! what an 8B or 70B model costs per step, without its checkpoint. INT4 layers (group 128, the
//! canonical form with `m = −8s`, as GGUF Q4_0 stores it), f16 embedding and lm_head (untied),
//! norm weights 1. Scales are `0.25/sqrt(in)`, so every projection keeps its activations near
//! unit size and the residual stream stays finite in f16 through 80 layers.
//!
//! Generated tensor by tensor as the model loads (an xorshift stream per tensor), so host
//! memory holds one tensor at a time.

use half::f16;

use crate::config::{ModelConfig, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::model::WeightSource;
use crate::quant::{F16Matrix, Int4Matrix, WeightMatrix};

/// Model shapes `qmtot bench decode --shape` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapePreset {
    Llama3_8b,
    Llama2_70b,
}

impl ShapePreset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "llama3-8b" => Ok(Self::Llama3_8b),
            "llama2-70b" => Ok(Self::Llama2_70b),
            _ => Err(Error::InvalidArgument(format!(
                "--shape {s:?}: llama3-8b or llama2-70b"
            ))),
        }
    }

    /// The preset's configuration, with its first `layers` blocks only when given.
    pub fn config(self, layers: Option<usize>) -> ModelConfig {
        let mut c = match self {
            Self::Llama3_8b => ModelConfig {
                architecture: "llama".into(),
                n_layers: 32,
                d_model: 4096,
                d_ff: 14336,
                n_heads: 32,
                n_kv_heads: 8,
                head_dim: 128,
                vocab_size: 128_256,
                context_length: 131_072,
                rope_theta: 500_000.0,
                rope_style: RopeStyle::HalfSplit,
                rope_scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_context: 8192.0,
                },
                rms_eps: 1e-5,
                tied_output: false,
            },
            Self::Llama2_70b => ModelConfig {
                architecture: "llama".into(),
                n_layers: 80,
                d_model: 8192,
                d_ff: 28672,
                n_heads: 64,
                n_kv_heads: 8,
                head_dim: 128,
                vocab_size: 32_000,
                context_length: 4096,
                rope_theta: 10_000.0,
                rope_style: RopeStyle::HalfSplit,
                rope_scaling: RopeScaling::None,
                rms_eps: 1e-5,
                tied_output: false,
            },
        };
        if let Some(n) = layers {
            c.n_layers = n.clamp(1, c.n_layers);
        }
        c
    }
}

/// Every weight of a model of `config`, random.
pub struct RandomWeights {
    config: ModelConfig,
}

const GROUP: usize = 128;

impl RandomWeights {
    pub fn new(config: ModelConfig) -> Self {
        Self { config }
    }

    fn shape_of(&self, name: &str) -> Option<(usize, usize)> {
        let c = &self.config;
        let (d, f) = (c.d_model, c.d_ff);
        if name == "token_embd.weight" || name == "output.weight" {
            return Some((c.vocab_size, d));
        }
        if name == "output_norm.weight" {
            return Some((d, 1));
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, part) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= c.n_layers {
            return None;
        }
        Some(match part {
            "attn_norm.weight" | "ffn_norm.weight" => (d, 1),
            "attn_q.weight" => (c.q_dim(), d),
            "attn_k.weight" | "attn_v.weight" => (c.kv_dim(), d),
            "attn_output.weight" => (d, c.q_dim()),
            "ffn_gate.weight" | "ffn_up.weight" => (f, d),
            "ffn_down.weight" => (d, f),
            _ => return None,
        })
    }
}

/// A stream of pseudo-random u64 seeded by a tensor name (FNV-1a of it).
fn stream(name: &str) -> impl FnMut() -> u64 {
    let mut x = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

impl WeightSource for RandomWeights {
    fn has(&self, name: &str) -> bool {
        self.shape_of(name).is_some()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shape_of(name)
            .map(|(r, c)| if c == 1 { vec![r] } else { vec![r, c] })
    }

    fn matrix(&self, name: &str) -> Result<WeightMatrix> {
        let (rows, cols) = self
            .shape_of(name)
            .filter(|&(_, c)| c > 1)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        let mut next = stream(name);
        if name == "token_embd.weight" || name == "output.weight" {
            // Uniform in ±1/sqrt(cols) (embedding rows and logits of moderate size).
            let a = 1.0 / (cols as f32).sqrt();
            let data = (0..rows * cols)
                .map(|_| f16::from_f32(((next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a))
                .collect();
            return Ok(WeightMatrix::F16(F16Matrix::new(rows, cols, data)?));
        }
        let mut packed = vec![0u8; rows * cols / 2];
        for chunk in packed.chunks_mut(8) {
            let bytes = next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let s = 0.25 / (cols as f32).sqrt();
        let groups = rows * cols / GROUP;
        Ok(WeightMatrix::Int4(Int4Matrix::new(
            rows,
            cols,
            GROUP,
            packed,
            vec![f16::from_f32(s); groups],
            vec![-8.0 * f16::from_f32(s).to_f32(); groups],
        )?))
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        match self.shape_of(name) {
            Some((n, 1)) => Ok(vec![1.0; n]),
            _ => Err(Error::MissingTensor(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::Llama;

    #[test]
    fn presets_have_their_models_shapes() {
        let c = ShapePreset::Llama3_8b.config(None);
        assert_eq!(
            (c.n_layers, c.d_model, c.d_ff, c.n_kv_heads, c.vocab_size),
            (32, 4096, 14336, 8, 128_256)
        );
        c.validate().unwrap();
        let c = ShapePreset::Llama2_70b.config(Some(2));
        assert_eq!((c.n_layers, c.d_model, c.d_ff, c.n_heads), (2, 8192, 28672, 64));
        c.validate().unwrap();
        assert!(ShapePreset::parse("llama2-70b").is_ok() && ShapePreset::parse("gpt2").is_err());
    }

    #[test]
    fn a_random_model_loads_and_decodes_in_batches() {
        // The 8B preset's structure at a small width, so the test stays quick.
        let c = ModelConfig {
            n_layers: 2,
            d_model: 256,
            d_ff: 512,
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 32,
            vocab_size: 1000,
            context_length: 64,
            ..ShapePreset::Llama3_8b.config(None)
        };
        // Every tensor the model reads exists at the shape it expects (load checks them).
        let src = RandomWeights::new(c.clone());
        assert!(!src.has("blk.2.attn_q.weight") && src.matrix("blk.0.attn_norm.weight").is_err());
        let model = Llama::load(CpuBackend::new(2).unwrap(), c, &src, |_, _| {}).unwrap();
        let mut seq = crate::engine::SequenceKv::new(&model, 8).unwrap();
        let logits = seq.extend(&model, &[1, 2, 3], false).unwrap();
        assert_eq!(logits.len(), 1000);
        assert!(logits.iter().all(|v| v.is_finite()));
        assert!(logits.iter().any(|&v| v != logits[0]));
        let r = crate::bench::decode::run_batched(&model, 3, 5, 2, 1, true).unwrap();
        assert_eq!(
            (r.batch, r.context, r.steps, r.graphs),
            (3, 5, 2, false),
            "no graphs on the CPU"
        );
        assert!(r.ms_per_step > 0.0 && r.tok_per_s.is_finite());
        assert!(
            crate::bench::decode::run_batched(&model, 3, 60, 10, 1, false).is_err(),
            "past the context"
        );
    }
}
