//! # qmtot
//!
//! A GPU-native inference engine for LLaMA-family models with 4-bit weights, built for
//! tree-shaped generation (Tree-of-Thought). Sibling thoughts share their parent's KV cache
//! through copy-on-write blocks and decode as one batch.
//!
//! ```text
//!  CLI (clap)                 src/main.rs, src/cli/
//!    │
//!  eval     datasets → method (direct | cot | sc | tot) → resumable results → report
//!  tot      search (bfs/beam/dfs) over a tree; jobs run by the runner:  src/tot/
//!    │      every node a sequence, expand = fork, prune = release
//!  engine   sequences, fork, generate/score tasks, events;    src/engine/
//!    │      continuous-batching scheduler; sampler; stops
//!  kv       block pool (refcounted handles) · block tables    src/kv/
//!    │      (fork, copy-on-write) · radix prefix cache; host only
//!  model    Llama<B: Backend>: weights + batched forward      src/model/
//!    │
//!  backend  trait Backend ── cpu (f32 reference, rayon, AVX2/FMA where present)
//!                        └── cuda (cudarc + NVRTC kernels; not yet run on a GPU)
//!  weights: formats (gguf) → quant (canonical INT4 / grouped INT8 / dense) → backend upload
//! ```
//!
//! Module map: [`error`] (one error enum), [`config`] (validated model hyper-parameters),
//! [`formats`] (checkpoint readers and the GGUF writer), [`quant`] (host weight forms and the
//! dequant oracle), [`tokenizer`] (BPE from GGUF or `tokenizer.json`, chat templates),
//! [`backend`] (the op trait and its CPU implementation), [`kv`] (paged KV bookkeeping),
//! [`eval`] (question sets, baselines, the resumable harness, distillation), [`tot`] (tree
//! search, prompts, the engine runner, drawing), [`model`] (the LLaMA forward), [`engine`] (many sequences in one batched step: fork,
//! generate, score, scheduling, sampling), [`fetch`] (the default model), [`bench`]
//! (`qmtot bench …`).

pub mod backend;
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod formats;
pub mod hash;
pub mod kv;
pub mod model;
pub mod quant;
pub mod server;
pub mod tokenizer;
pub mod tot;

pub use error::{Error, Result};
