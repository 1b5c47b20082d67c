//! One error type for the whole crate. Everything a user can feed in (files, prompts,
//! flags) fails with one of these variants, never with a panic.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // ---- GGUF container --------------------------------------------------------------
    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (qmtot reads versions 2 and 3)")]
    UnsupportedGgufVersion(u32),
    #[error("GGUF file is truncated: needed {needed} bytes at offset {offset} for {what}, file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error("GGUF metadata: {0}")]
    BadMetadata(String),
    #[error("unknown GGUF metadata value type {ty} for key {key:?}")]
    UnknownMetaType { key: String, ty: u32 },
    #[error("tensor {tensor:?} has type {ty_name} (ggml type {ty}), which qmtot does not support; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1")]
    UnsupportedTensorType { tensor: String, ty: u32, ty_name: String },
    #[error("tensor {tensor:?}: {reason}")]
    BadTensor { tensor: String, reason: String },
    #[error("tensor {tensor:?} starts at offset {offset} past the end of the data section ({data_len} bytes)")]
    TensorOffsetOutOfBounds { tensor: String, offset: u64, data_len: u64 },
    #[error(
        "tensor {tensor:?} data is truncated: it needs bytes {offset}..{end} of the data section, which has {data_len}"
    )]
    TruncatedTensorData {
        tensor: String,
        offset: u64,
        end: u64,
        data_len: u64,
    },
    #[error("required tensor {0:?} is missing")]
    MissingTensor(String),

    // ---- checkpoint folders (Hugging Face, GPTQ, AWQ) -----------------------------------------
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("unsupported quantization: {0}")]
    UnsupportedQuantization(String),

    // ---- model configuration ------------------------------------------------------------
    #[error("required metadata key {0:?} is missing")]
    MissingMetadata(String),
    #[error("metadata key {key:?} has the wrong type: expected {expected}")]
    MetadataType { key: String, expected: &'static str },
    #[error("unsupported architecture {0:?} (qmtot runs llama-family models)")]
    UnsupportedArchitecture(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    // ---- tokenizer --------------------------------------------------------------------
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("unknown tokenizer pre-tokenizer {0:?} (supported: smollm, llama-bpe, gpt2)")]
    UnknownPreTokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),

    // ---- requests -------------------------------------------------------------------------
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {tokens} tokens plus {max_new} new tokens exceeds the model's context of {context} tokens")]
    PromptTooLong {
        tokens: usize,
        max_new: usize,
        context: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("KV cache is out of blocks: needed {needed}, {free} free of {total}")]
    OutOfBlocks { needed: usize, free: usize, total: usize },
    #[error(
        "a sequence of {tokens} tokens needs {needed_blocks} KV blocks but the cache holds only {total_blocks}; \
         raise --kv-blocks or shorten the request"
    )]
    KvCapacity {
        tokens: usize,
        needed_blocks: usize,
        total_blocks: usize,
    },

    // ---- datasets -------------------------------------------------------------------------
    #[error("{path}:{line}: {reason}")]
    Dataset { path: PathBuf, line: usize, reason: String },

    // ---- backend --------------------------------------------------------------------------
    #[error("backend {backend}: {reason}")]
    Backend { backend: &'static str, reason: String },

    // ---- default model fetch --------------------------------------------------------------
    #[error("{0}")]
    ModelFetch(String),
}

impl Error {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
