//! `--model PATH`: a GGUF file or a Hugging Face folder, told apart by what is there (the GGUF
//! magic, or a `config.json`), behind one [`WeightSource`].

use std::io::Read;
use std::path::Path;

use super::gguf::GgufFile;
use super::safetensors::{is_hf_folder, HfCheckpoint, LoadOptions};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::WeightSource;
use crate::quant::WeightMatrix;
use crate::tokenizer::Tokenizer;

pub enum Checkpoint {
    Gguf(Box<GgufFile>),
    Hf(Box<HfCheckpoint>),
}

impl Checkpoint {
    /// Opens `path` as whatever checkpoint it is. `options` apply to float Hugging Face
    /// weights (GGUF tensors load in their own types).
    pub fn open(path: &Path, options: LoadOptions) -> Result<Self> {
        let unknown = |found: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "{found}; qmtot reads a GGUF file or a Hugging Face folder (config.json + \
                 safetensors: float, GPTQ, AWQ or qmtot INT4)"
            ),
        };
        if path.is_dir() {
            if is_hf_folder(path) {
                return Ok(Checkpoint::Hf(Box::new(HfCheckpoint::open(path, options)?)));
            }
            return Err(unknown("a folder without config.json".into()));
        }
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n == 4 && &magic == b"GGUF" {
            return Ok(Checkpoint::Gguf(Box::new(GgufFile::open(path)?)));
        }
        if path.extension().is_some_and(|e| e == "safetensors") {
            return Err(unknown(format!(
                "a lone safetensors file; give the folder that holds it with its config.json ({})",
                path.parent().map_or_else(String::new, |p| p.display().to_string())
            )));
        }
        Err(unknown(format!("a file starting with bytes {:02x?}", &magic[..n])))
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Checkpoint::Gguf(g) => ModelConfig::from_gguf(g),
            Checkpoint::Hf(h) => Ok(h.config.clone()),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Checkpoint::Gguf(g) => Tokenizer::from_gguf(g),
            Checkpoint::Hf(h) => h.tokenizer(),
        }
    }

    /// The group size of the INT4 linear layers this checkpoint loads as, if it has any: 32 for
    /// GGUF Q4_0 / Q4_1 layers, the quantizer's group for GPTQ, AWQ and qmtot folders, the
    /// `--group-size` of float folders loaded as INT4. (Read from metadata: no layer is
    /// converted to find it.)
    pub fn int4_group(&self) -> Option<usize> {
        use super::gguf::GgmlType;
        use super::safetensors::{FloatWeights, Quantization};
        match self {
            Checkpoint::Gguf(g) => g
                .tensors
                .iter()
                .filter(|t| t.name != "token_embd.weight" && t.name != "output.weight")
                .any(|t| matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q4_1))
                .then_some(32),
            Checkpoint::Hf(h) => match &h.quantization {
                Quantization::Float => match h.options.weights {
                    FloatWeights::Int4 { group } => Some(group),
                    FloatWeights::F16 | FloatWeights::F32 => None,
                },
                Quantization::Qmtot { group } => Some(*group),
                Quantization::Gptq(c) => Some(c.group_size),
                Quantization::Awq(c) => Some(c.group_size),
            },
        }
    }

    fn source(&self) -> &dyn WeightSource {
        match self {
            Checkpoint::Gguf(g) => g.as_ref(),
            Checkpoint::Hf(h) => h.as_ref(),
        }
    }
}

impl WeightSource for Checkpoint {
    fn has(&self, name: &str) -> bool {
        self.source().has(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.source().shape(name)
    }

    fn matrix(&self, name: &str) -> Result<WeightMatrix> {
        self.source().matrix(name)
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.source().vector(name)
    }
}
