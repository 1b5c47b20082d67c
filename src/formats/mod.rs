//! Checkpoint formats. Each reader turns a file into metadata plus tensors; the model loader
//! converts tensors into the host weight forms of [`crate::quant`]. Later: safetensors
//! (Hugging Face folders), GPTQ and AWQ.

pub mod gguf;
