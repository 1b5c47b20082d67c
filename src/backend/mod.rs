//! The op set the model is written against, and its implementations.
//!
//! # Design note
//!
//! [`Backend`] is deliberately small: upload/allocate, about a dozen ops, and a way to read
//! results back. The LLaMA forward ([`crate::model::llama`]) calls nothing else, so a backend
//! is exactly this trait. Buffers are associated types, so the CPU backend holds `Vec<f32>`
//! and a CUDA backend device pointers, without a common "tensor" abstraction in between.
//!
//! * Activations are 2-D `[rows, cols]`: one row per token of the step's batch.
//!   CPU: f32. CUDA: f16 activations with f32 accumulation, f32 logits.
//! * Linear weights are uploaded from the host forms of [`crate::quant`]; a backend repacks
//!   them as its kernels like. `upload_linear` takes several parts and stacks their rows, so
//!   Q|K|V and gate|up are one matmul each (parts may even differ in format).
//! * K/V live in a paged store `[layer][block][slot in block][kv head][head_dim]`; every
//!   read and write goes through the per-step [`StepInput`] (slots and block tables).
//!
//! Every op checks the shapes it is given and returns a typed error, never panics.

pub mod cpu;
pub mod cuda;

use crate::engine::sampler::{Sampled, SamplingParams};
use crate::error::Result;
use crate::quant::WeightMatrix;

/// Shape of the paged K/V store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// f32 elements of K (or V) for one layer.
    pub fn layer_elems(&self) -> usize {
        self.n_blocks * self.block_size * self.n_kv_heads * self.head_dim
    }

    pub fn n_slots(&self) -> usize {
        self.n_blocks * self.block_size
    }
}

/// Column layout of the fused Q|K|V activation: `[rows, (n_heads + 2·n_kv_heads)·head_dim]`,
/// Q heads first, then K heads, then V heads, each head `head_dim` contiguous values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    pub fn width(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }
    pub fn k_offset(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn v_offset(&self) -> usize {
        (self.n_heads + self.n_kv_heads) * self.head_dim
    }
}

/// Host description of one forward step: `T` rows, each one token of some sequence.
///
/// Invariants (checked by [`StepInput::validate`]): all per-row vectors have length `T`;
/// row `r` belongs to sequence `row_seq[r]`, sits at `positions[r]` and writes its K/V to
/// `slots[r]` (= block · block_size + offset) which must be the slot that sequence's block
/// table maps `positions[r]` to; attention of row `r` reads positions `0..=positions[r]` of
/// its sequence, so those must be written by this or an earlier step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepInput {
    /// `[T]` token ids.
    pub tokens: Vec<u32>,
    /// `[T]` absolute positions.
    pub positions: Vec<u32>,
    /// `[T]` K/V destination slots.
    pub slots: Vec<u32>,
    /// `[T]` index into `block_tables`.
    pub row_seq: Vec<u32>,
    /// Per sequence: physical block ids covering its positions in order.
    pub block_tables: Vec<Vec<u32>>,
    /// Rows whose logits the step returns, in this order.
    pub logit_rows: Vec<u32>,
    /// Sharing groups for cascade attention; empty means plain paged attention for every row.
    pub groups: Vec<SharedPrefix>,
}

/// Sequences of a step whose first `blocks` blocks are physically the same (siblings forked
/// from one parent, or requests that hit the same radix-cache prefix). Attention may read
/// those blocks once for all the group's rows (cascade) instead of once per row.
///
/// Invariants (checked by [`StepInput::validate`]): members are distinct indices into
/// `block_tables`, each sequence is in at most one group, every member's table starts with
/// the same `blocks` ids, and every row of a member sits at a position `≥ blocks·block_size`
/// (the whole shared prefix lies inside each row's causal window).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedPrefix {
    /// Indices into [`StepInput::block_tables`].
    pub seqs: Vec<u32>,
    /// Leading full blocks shared by all members.
    pub blocks: u32,
}

impl StepInput {
    /// One sequence's consecutive `tokens` from position `start` (a prefill chunk, or one
    /// decode row), writing K/V to `slots` under `table`; returns logits for `logit_rows`.
    pub fn one_sequence(tokens: Vec<u32>, start: u32, slots: Vec<u32>, table: Vec<u32>, logit_rows: Vec<u32>) -> Self {
        let n = tokens.len();
        StepInput {
            positions: (start..start + n as u32).collect(),
            tokens,
            slots,
            row_seq: vec![0; n],
            block_tables: vec![table],
            logit_rows,
            groups: Vec::new(),
        }
    }

    /// A decode step: one row per sequence, row `s` is token `tokens[s]` of sequence `s` at
    /// `position`, writing K/V to `slots[s]` under `tables[s]`; every row returns logits.
    pub fn decode(tokens: Vec<u32>, position: u32, slots: Vec<u32>, tables: Vec<Vec<u32>>) -> Self {
        let n = tokens.len() as u32;
        StepInput {
            tokens,
            positions: vec![position; n as usize],
            slots,
            row_seq: (0..n).collect(),
            block_tables: tables,
            logit_rows: (0..n).collect(),
            groups: Vec::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// Checks the invariants above against the model and cache shapes.
    pub fn validate(&self, vocab: usize, context: usize, kv: &KvShape) -> Result<()> {
        use crate::error::Error;
        let t = self.tokens.len();
        let bad = |m: String| Err(Error::InvalidArgument(format!("step: {m}")));
        if t == 0 {
            return bad("no rows".into());
        }
        if self.positions.len() != t || self.slots.len() != t || self.row_seq.len() != t {
            return bad(format!(
                "{} tokens, {} positions, {} slots, {} row_seq",
                t,
                self.positions.len(),
                self.slots.len(),
                self.row_seq.len()
            ));
        }
        for r in 0..t {
            let id = self.tokens[r];
            if id as usize >= vocab {
                return Err(Error::TokenOutOfRange { id, vocab });
            }
            let pos = self.positions[r] as usize;
            if pos >= context {
                return Err(Error::PromptTooLong {
                    tokens: pos + 1,
                    max_new: 0,
                    context,
                });
            }
            let Some(table) = self.block_tables.get(self.row_seq[r] as usize) else {
                return bad(format!(
                    "row {r} names sequence {} of {}",
                    self.row_seq[r],
                    self.block_tables.len()
                ));
            };
            let Some(&block) = table.get(pos / kv.block_size) else {
                return bad(format!(
                    "row {r}: position {pos} beyond its block table of {} blocks",
                    table.len()
                ));
            };
            if block as usize >= kv.n_blocks {
                return bad(format!("block {block} outside the pool of {}", kv.n_blocks));
            }
            let want = block as usize * kv.block_size + pos % kv.block_size;
            if self.slots[r] as usize != want {
                return bad(format!(
                    "row {r}: slot {} but its table maps position {pos} to {want}",
                    self.slots[r]
                ));
            }
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r as usize >= t) {
            return bad(format!("logit row {r} of {t}"));
        }
        self.validate_groups(kv.block_size)
    }

    /// The [`SharedPrefix`] invariants (also checked by backends that read the groups, since
    /// an op can be called without [`StepInput::validate`]).
    pub fn validate_groups(&self, block_size: usize) -> Result<()> {
        use crate::error::Error;
        let bad = |m: String| Err(Error::InvalidArgument(format!("step groups: {m}")));
        let n_seqs = self.block_tables.len();
        // group_of[s]: the group sequence s belongs to.
        let mut group_of = vec![usize::MAX; n_seqs];
        for (gi, g) in self.groups.iter().enumerate() {
            let Some(&first) = g.seqs.first() else {
                return bad(format!("group {gi} is empty"));
            };
            let nb = g.blocks as usize;
            for &s in &g.seqs {
                let s = s as usize;
                if s >= n_seqs {
                    return bad(format!("group {gi} names sequence {s} of {n_seqs}"));
                }
                if group_of[s] != usize::MAX {
                    return bad(format!("sequence {s} is in groups {} and {gi}", group_of[s]));
                }
                group_of[s] = gi;
                let (table, lead) = (&self.block_tables[s], &self.block_tables[first as usize]);
                if table.len() < nb || lead.len() < nb || table[..nb] != lead[..nb] {
                    return bad(format!(
                        "sequence {s} does not share the first {nb} blocks of group {gi}"
                    ));
                }
            }
        }
        for (r, (&s, &pos)) in self.row_seq.iter().zip(&self.positions).enumerate() {
            let gi = group_of[s as usize];
            if gi != usize::MAX && (pos as usize) < self.groups[gi].blocks as usize * block_size {
                return bad(format!(
                    "row {r} at position {pos} lies inside the shared prefix of group {gi}"
                ));
            }
        }
        Ok(())
    }
}

/// Stacked parts of a linear layer as a backend stores them: `(first output row, part)` in row
/// order, with the total rows and the shared input width.
pub struct StackedParts<W> {
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<(usize, W)>,
    /// Input `input_order[j]` feeds stored column `j` of every part (GPTQ act-order).
    pub input_order: Option<Vec<u32>>,
}

/// Checks that `parts` share their input width and uploads each with `upload`, stacking them
/// along the output dimension ([`Backend::upload_linear`] on every backend).
pub fn stack_parts<W>(
    parts: &[&WeightMatrix],
    mut upload: impl FnMut(&WeightMatrix) -> Result<W>,
) -> Result<StackedParts<W>> {
    use crate::error::Error;
    let Some(first) = parts.first() else {
        return Err(Error::InvalidArgument("upload_linear: no parts".into()));
    };
    let cols = first.cols();
    // The parts of one linear read the same input, so they must agree on its order.
    let order = |p: &WeightMatrix| match p {
        WeightMatrix::Int4(m) => m.input_order.clone(),
        _ => None,
    };
    let input_order = order(first);
    if parts.iter().any(|p| order(p) != input_order) {
        return Err(Error::InvalidArgument(
            "upload_linear: the fused parts have different input orders (GPTQ act-order \
             permutations differ between layers that share an input)"
                .into(),
        ));
    }
    let mut row = 0;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        if p.cols() != cols {
            return Err(Error::InvalidArgument(format!(
                "upload_linear: parts have {cols} and {} columns",
                p.cols()
            )));
        }
        out.push((row, upload(p)?));
        row += p.rows();
    }
    Ok(StackedParts {
        rows: row,
        cols,
        parts: out,
        input_order,
    })
}

/// One row's device draw ([`Backend::draw_rows`]): its sampling parameters and the uniform
/// `u ∈ [0, 1)` its sequence's stream gave (`Sampler::next_uniform`).
#[derive(Clone, Copy, Debug)]
pub struct RowDraw<'a> {
    pub params: &'a SamplingParams,
    pub uniform: f64,
}

/// The ops a model runs on. See the module doc.
pub trait Backend: Send + Sync {
    /// Activations `[rows, cols]`.
    type Activations: Send;
    /// A linear weight `W[out, in]` (possibly several stacked parts) as the kernels read it.
    type Linear: Send + Sync;
    /// A vector of f32 (norm weights, RoPE tables).
    type Vector: Send + Sync;
    /// Paged K and V for all layers.
    type KvStore: Send;
    /// A step's index data ([`StepInput`]) as the kernels read it.
    type Step;
    /// A recorded sequence of device work replayed as one launch (CUDA graphs); `()` on a
    /// backend without graphs.
    type Graph;

    /// Human-readable name, e.g. `cpu (2 threads, avx2+fma)`.
    fn name(&self) -> String;

    /// Runs `f` (a whole forward step) in the backend's execution context. The CPU backend
    /// enters its thread pool once here, so the ops inside run their parallel loops without a
    /// cross-thread hand-off each (hundreds per decode step otherwise).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R;

    // ---- upload and allocation ----------------------------------------------------------

    /// Uploads `parts` stacked along the output dimension (all must share `cols`).
    fn upload_linear(&self, parts: &[&WeightMatrix]) -> Result<Self::Linear>;
    fn upload_vector(&self, v: &[f32]) -> Result<Self::Vector>;
    fn alloc_activations(&self, rows: usize, cols: usize) -> Result<Self::Activations>;
    /// Activations that hold logits `[rows, vocab]`: f32 on every backend (CUDA keeps other
    /// activations in f16).
    fn alloc_logits(&self, rows: usize, cols: usize) -> Result<Self::Activations> {
        self.alloc_activations(rows, cols)
    }
    /// A K/V store of `shape`; unwritten slots hold NaN so a kernel that reads one fails loudly.
    fn alloc_kv(&self, shape: KvShape) -> Result<Self::KvStore>;
    fn upload_step(&self, step: &StepInput) -> Result<Self::Step>;

    // ---- ops ------------------------------------------------------------------------------

    /// `out[r] = table[tokens[r]]` (dequantized row): `[T, d]`.
    fn embed(&self, table: &Self::Linear, step: &Self::Step, out: &mut Self::Activations) -> Result<()>;
    /// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) ⊙ w`.
    fn rmsnorm(&self, x: &Self::Activations, w: &Self::Vector, eps: f32, out: &mut Self::Activations) -> Result<()>;
    /// `out = x · Wᵀ`: x `[T, in]`, W `[out, in]`, out `[T, out]`.
    fn matmul(&self, x: &Self::Activations, w: &Self::Linear, out: &mut Self::Activations) -> Result<()>;
    /// Rotates the Q and K heads of `qkv` by each row's position. `cos`/`sin` are
    /// `[max_pos, head_dim/2]`; `half_split` selects the pairing ([`crate::config::RopeStyle`]).
    fn rope(
        &self,
        qkv: &mut Self::Activations,
        layout: QkvLayout,
        cos: &Self::Vector,
        sin: &Self::Vector,
        half_split: bool,
        step: &Self::Step,
    ) -> Result<()>;
    /// Writes the K and V heads of each row of `qkv` into its slot of layer `layer`.
    fn kv_write(
        &self,
        kv: &mut Self::KvStore,
        layer: usize,
        qkv: &Self::Activations,
        layout: QkvLayout,
        step: &Self::Step,
    ) -> Result<()>;
    /// [`Backend::rope`], then [`Backend::kv_write`] of the rotated K (and V) heads: one kernel
    /// on a backend that fuses them (the result is the two ops' result).
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_write(
        &self,
        qkv: &mut Self::Activations,
        layout: QkvLayout,
        cos: &Self::Vector,
        sin: &Self::Vector,
        half_split: bool,
        kv: &mut Self::KvStore,
        layer: usize,
        step: &Self::Step,
    ) -> Result<()> {
        self.rope(qkv, layout, cos, sin, half_split, step)?;
        self.kv_write(kv, layer, qkv, layout, step)
    }
    /// Causal GQA attention of each row's Q heads over its sequence's cached positions
    /// `0..=pos`: out `[T, n_heads·head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Activations,
        kv: &Self::KvStore,
        layer: usize,
        layout: QkvLayout,
        step: &Self::Step,
        out: &mut Self::Activations,
    ) -> Result<()>;
    /// `out = silu(gate) ⊙ up` where `gate_up = [gate | up]`, `[T, 2·f]` → `[T, f]`.
    fn silu_mul(&self, gate_up: &Self::Activations, out: &mut Self::Activations) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Activations, y: &Self::Activations) -> Result<()>;
    /// `x += y`, then `out = rmsnorm(x) ⊙ w`: a residual add and the norm that reads it, one
    /// kernel on a backend that fuses them (the result is the two ops' result).
    fn add_rmsnorm(
        &self,
        x: &mut Self::Activations,
        y: &Self::Activations,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Activations,
    ) -> Result<()> {
        self.add_assign(x, y)?;
        self.rmsnorm(x, w, eps, out)
    }
    /// `x[r, :] += bias` for every row (a projection's bias), `x [T, n]`, `bias [n]`.
    fn add_bias(&self, x: &mut Self::Activations, bias: &Self::Vector) -> Result<()>;
    /// `out[i] = x[step.logit_rows[i]]`.
    fn gather_logit_rows(&self, x: &Self::Activations, step: &Self::Step, out: &mut Self::Activations) -> Result<()>;
    /// Copies whole blocks (all layers, K and V) `src → dst`, as one batch: copy-on-write.
    fn copy_blocks(&self, kv: &mut Self::KvStore, copies: &[(u32, u32)]) -> Result<()>;
    /// Reads activations back as f32 `[rows · cols]`.
    fn to_host(&self, x: &Self::Activations, out: &mut Vec<f32>) -> Result<()>;

    // ---- graphs (optional) ----------------------------------------------------------------

    /// A step for capture: device data that later decode steps of the same shape overwrite
    /// in place ([`Backend::refill_step`]), with block tables long enough for `max_context`
    /// positions, planned for attention of `layout` (the model's). `Ok(None)` on a backend
    /// without graphs.
    fn graph_step(&self, _input: &StepInput, _max_context: usize, _layout: QkvLayout) -> Result<Option<Self::Step>> {
        Ok(None)
    }
    /// Overwrites a [`Backend::graph_step`] with `input`; `Ok(false)` when `input` does not fit
    /// it (another row or sequence count, another number of logit rows, a position past its
    /// `max_context`, sharing groups that attention would launch differently for), and the
    /// caller runs the step without the graph.
    fn refill_step(&self, _step: &mut Self::Step, _input: &StepInput) -> Result<bool> {
        Ok(false)
    }
    /// Records the device work `f` launches, without running it. `Ok(None)` on a backend
    /// without graphs (`f` is not called).
    fn capture(&self, _f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        Ok(None)
    }
    /// Runs a recorded graph.
    fn replay(&self, _graph: &Self::Graph) -> Result<()> {
        Err(crate::error::Error::InvalidArgument(format!(
            "{}: no graphs on this backend",
            self.name()
        )))
    }

    // ---- sampling on the device (optional) -----------------------------------------------

    /// Whether [`Backend::draw_rows`] draws here (asked before a caller takes uniforms from its
    /// sequences' streams for it).
    fn draws_on_device(&self) -> bool {
        false
    }
    /// Draws one token for each row of `logits` (`[draws.len(), vocab]` f32) on the device,
    /// with its log-probability and the `top_logprobs` it asks for, so only those come back to
    /// the host. The draw is [`crate::engine::sampler::draw_with_uniform`] with the row's
    /// uniform, which the host `Sampler` follows too (same kept tokens, same id order), so a
    /// stream draws the same tokens either way up to rounding at a boundary. `Ok(None)` on a
    /// backend without device sampling.
    fn draw_rows(&self, _logits: &Self::Activations, _draws: &[RowDraw]) -> Result<Option<Vec<Sampled>>> {
        Ok(None)
    }

    // ---- profiling (optional) -------------------------------------------------------------

    /// Starts (`true`) or stops collection by an attached profiler (Nsight Compute run with
    /// `--profile-from-start off`), so a benchmark can mark the region worth tracing; nothing
    /// happens without a profiler or on a backend without one.
    fn profile_region(&self, _on: bool) -> Result<()> {
        Ok(())
    }
}
