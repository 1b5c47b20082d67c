//! Checkpoint formats. Each reader turns a file into metadata plus tensors; the model loader
//! converts tensors into the host weight forms of [`crate::quant`]: GGUF files, and Hugging
//! Face safetensors folders (float, GPTQ, AWQ or qmtot's own INT4).

pub mod awq;
pub mod checkpoint;
pub mod gguf;
pub mod gptq;
pub mod hf_write;
pub mod quantize;
pub mod safetensors;
