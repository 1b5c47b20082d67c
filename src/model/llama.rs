//! The LLaMA forward pass, written once for every backend and batch shape.
//!
//! One call of [`Llama::forward`] runs `T` rows (tokens) that may belong to different
//! sequences: prefill chunks and single-token decodes alike. Shapes, with `d` the model width,
//! `h·hd` the query width, `kv·hd` the K/V width and `f` the MLP width:
//!
//! ```text
//! x        [T, d]                 residual stream
//! qkv      [T, (h + 2·kv)·hd]     fused projection, Q heads | K heads | V heads
//! attn     [T, h·hd]
//! gate_up  [T, 2f]                fused gate | up
//! logits   [R, vocab]             R = rows that asked for logits
//! ```

use crate::backend::{Backend, KvShape, QkvLayout, RowDraw, StepInput};
use crate::config::{ModelConfig, RopeStyle};
use crate::engine::sampler::Sampled;
use crate::error::{Error, Result};
use crate::model::WeightSource;

/// One transformer block's weights on the backend.
pub struct LayerWeights<B: Backend> {
    /// `[d]`
    pub attn_norm: B::Vector,
    /// `[(h + 2·kv)·hd, d]`: W_q, W_k, W_v stacked.
    pub wqkv: B::Linear,
    /// `[d, h·hd]`
    pub wo: B::Linear,
    /// `[d]`
    pub ffn_norm: B::Vector,
    /// `[2f, d]`: W_gate, W_up stacked.
    pub w_gate_up: B::Linear,
    /// `[d, f]`
    pub w_down: B::Linear,
    /// Projection biases where the checkpoint has them (Qwen2: q, k, v; `attention_bias`:
    /// also o; `mlp_bias`: gate, up, down), each stacked like its weight (a missing part is
    /// zeros).
    pub qkv_bias: Option<B::Vector>,
    pub o_bias: Option<B::Vector>,
    pub gate_up_bias: Option<B::Vector>,
    pub down_bias: Option<B::Vector>,
}

/// A paged K/V store with its shape.
pub struct KvCache<B: Backend> {
    pub shape: KvShape,
    pub store: B::KvStore,
}

pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    /// `[vocab, d]`, also the output projection when `config.tied_output`.
    embed: B::Linear,
    layers: Vec<LayerWeights<B>>,
    /// `[d]`
    out_norm: B::Vector,
    /// `[vocab, d]` when not tied.
    lm_head: Option<B::Linear>,
    /// `[context, hd/2]`: cos and sin of `pos · θ^(−2i/hd)`.
    rope_cos: B::Vector,
    rope_sin: B::Vector,
}

impl<B: Backend> Llama<B> {
    /// Loads and uploads every weight from `src`, checking each shape against `config`.
    /// `progress(done, total)` is called after each tensor.
    pub fn load(
        backend: B,
        config: ModelConfig,
        src: &impl WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, f, hd) = (c.d_model, c.d_ff, c.head_dim);
        let total = 2 + 9 * c.n_layers + usize::from(!c.tied_output);
        let mut done = 0;
        let mut tick = || {
            done += 1;
            progress(done, total);
        };

        let check_shape = |name: &str, expected: Vec<usize>| -> Result<()> {
            match src.shape(name) {
                None => Err(Error::MissingTensor(name.to_string())),
                Some(found) if found != expected => Err(Error::ShapeMismatch {
                    tensor: name.to_string(),
                    expected,
                    found,
                }),
                Some(_) => Ok(()),
            }
        };
        let matrix = |name: &str, rows: usize, cols: usize| {
            check_shape(name, vec![rows, cols])?;
            src.matrix(name)
        };
        let vector = |name: &str, n: usize| -> Result<B::Vector> {
            check_shape(name, vec![n])?;
            backend.upload_vector(&src.vector(name)?)
        };
        // The stacked bias of a fused projection, if any part has one: `(name, length)` per part.
        let bias = |parts: &[(String, usize)]| -> Result<Option<B::Vector>> {
            if !parts.iter().any(|(n, _)| src.has(n)) {
                return Ok(None);
            }
            let mut all = Vec::with_capacity(parts.iter().map(|p| p.1).sum());
            for (name, n) in parts {
                if src.has(name) {
                    check_shape(name, vec![*n])?;
                    all.extend(src.vector(name)?);
                } else {
                    all.resize(all.len() + n, 0.0);
                }
            }
            backend.upload_vector(&all).map(Some)
        };

        let embed = backend.upload_linear(&[&matrix("token_embd.weight", c.vocab_size, d)?])?;
        tick();
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let name = |t: &str| format!("blk.{l}.{t}.weight");
            let attn_norm = vector(&name("attn_norm"), d)?;
            let wq = matrix(&name("attn_q"), c.q_dim(), d)?;
            let wk = matrix(&name("attn_k"), c.kv_dim(), d)?;
            let wv = matrix(&name("attn_v"), c.kv_dim(), d)?;
            let wqkv = backend.upload_linear(&[&wq, &wk, &wv])?;
            drop((wq, wk, wv));
            let wo = backend.upload_linear(&[&matrix(&name("attn_output"), d, c.q_dim())?])?;
            let ffn_norm = vector(&name("ffn_norm"), d)?;
            let gate = matrix(&name("ffn_gate"), f, d)?;
            let up = matrix(&name("ffn_up"), f, d)?;
            let w_gate_up = backend.upload_linear(&[&gate, &up])?;
            drop((gate, up));
            let w_down = backend.upload_linear(&[&matrix(&name("ffn_down"), d, f)?])?;
            let b = |t: &str, n: usize| (format!("blk.{l}.{t}.bias"), n);
            let qkv_bias = bias(&[b("attn_q", c.q_dim()), b("attn_k", c.kv_dim()), b("attn_v", c.kv_dim())])?;
            let o_bias = bias(&[b("attn_output", d)])?;
            let gate_up_bias = bias(&[b("ffn_gate", f), b("ffn_up", f)])?;
            let down_bias = bias(&[b("ffn_down", d)])?;
            for _ in 0..9 {
                tick();
            }
            layers.push(LayerWeights {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
                qkv_bias,
                o_bias,
                gate_up_bias,
                down_bias,
            });
        }
        let out_norm = vector("output_norm.weight", d)?;
        tick();
        let lm_head = if c.tied_output {
            None
        } else {
            let w = backend.upload_linear(&[&matrix("output.weight", c.vocab_size, d)?])?;
            tick();
            Some(w)
        };

        // RoPE tables in f64, rounded once to f32: θ_i = theta^(−2i/hd), then scaled.
        let half = hd / 2;
        let mut cos = Vec::with_capacity(c.context_length * half);
        let mut sin = Vec::with_capacity(c.context_length * half);
        for pos in 0..c.context_length {
            for i in 0..half {
                let inv_freq = c
                    .rope_scaling
                    .apply((c.rope_theta as f64).powf(-((2 * i) as f64) / hd as f64));
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let rope_cos = backend.upload_vector(&cos)?;
        let rope_sin = backend.upload_vector(&sin)?;

        Ok(Self {
            config,
            backend,
            embed,
            layers,
            out_norm,
            lm_head,
            rope_cos,
            rope_sin,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// A K/V cache of `n_blocks` blocks of `block_size` tokens for this model.
    pub fn new_kv_cache(&self, n_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        let shape = KvShape {
            n_layers: self.config.n_layers,
            n_blocks,
            block_size,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        };
        Ok(KvCache {
            shape,
            store: self.backend.alloc_kv(shape)?,
        })
    }

    fn qkv_layout(&self) -> QkvLayout {
        QkvLayout {
            n_heads: self.config.n_heads,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Applies pending copy-on-write block copies (one batch per step).
    pub fn copy_blocks(&self, kv: &mut KvCache<B>, copies: &[(u32, u32)]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        self.backend.copy_blocks(&mut kv.store, copies)
    }

    /// Runs one batched step: writes every row's K/V into its slot and returns the logits of
    /// `input.logit_rows`, `[R, vocab]` row-major f32.
    pub fn forward(&self, kv: &mut KvCache<B>, input: &StepInput) -> Result<Vec<f32>> {
        Ok(self.backend.run(|| self.forward_in_context(kv, input, None))?.undrawn())
    }

    /// [`Llama::forward`], drawing one token per logit row on the device with `draws` (one per
    /// row of `input.logit_rows`, in order) when the backend can ([`Backend::draw_rows`]): then
    /// only the drawn tokens come back; otherwise the logits do.
    pub fn forward_drawing(&self, kv: &mut KvCache<B>, input: &StepInput, draws: &[RowDraw]) -> Result<StepOutput> {
        self.backend.run(|| self.forward_in_context(kv, input, Some(draws)))
    }

    fn forward_in_context(
        &self,
        kv: &mut KvCache<B>,
        input: &StepInput,
        draws: Option<&[RowDraw]>,
    ) -> Result<StepOutput> {
        let c = &self.config;
        input.validate(c.vocab_size, c.context_length, &kv.shape)?;
        check_draws(input, draws)?;
        let step = self.backend.upload_step(input)?;
        let r = input.logit_rows.len();
        let mut bufs = self.alloc_buffers(input.rows(), r)?;
        self.run_step(&mut kv.store, &step, &mut bufs)?;
        self.step_output(&bufs.logits, r, draws)
    }

    /// The step's result from its logits buffer (`r` rows): drawn on the device when `draws`
    /// asks and the backend can, else copied to the host.
    fn step_output(&self, logits: &B::Activations, r: usize, draws: Option<&[RowDraw]>) -> Result<StepOutput> {
        if let Some(draws) = draws.filter(|_| r > 0) {
            if let Some(drawn) = self.backend.draw_rows(logits, draws)? {
                return Ok(StepOutput::Drawn(drawn));
            }
        }
        let mut logits_host = Vec::new();
        if r > 0 {
            self.backend.to_host(logits, &mut logits_host)?;
        }
        Ok(StepOutput::Logits(logits_host))
    }

    /// The activations of a step of `t` rows, `r` of them returning logits.
    fn alloc_buffers(&self, t: usize, r: usize) -> Result<StepBuffers<B>> {
        let (b, c) = (&self.backend, &self.config);
        Ok(StepBuffers {
            x: b.alloc_activations(t, c.d_model)?,
            h: b.alloc_activations(t, c.d_model)?,
            qkv: b.alloc_activations(t, c.qkv_dim())?,
            attn: b.alloc_activations(t, c.q_dim())?,
            proj: b.alloc_activations(t, c.d_model)?,
            gate_up: b.alloc_activations(t, 2 * c.d_ff)?,
            act: b.alloc_activations(t, c.d_ff)?,
            last: b.alloc_activations(r, c.d_model)?,
            normed: b.alloc_activations(r, c.d_model)?,
            logits: b.alloc_logits(r, c.vocab_size)?,
            logit_rows: r,
        })
    }

    /// The forward proper, on device data only (so a graph can record it): every layer, then
    /// the logits of the step's logit rows into `bufs.logits`.
    fn run_step(&self, kv: &mut B::KvStore, step: &B::Step, bufs: &mut StepBuffers<B>) -> Result<()> {
        let (b, c) = (&self.backend, &self.config);
        let layout = self.qkv_layout();
        let half_split = c.rope_style == RopeStyle::HalfSplit;
        let StepBuffers {
            x,
            h,
            qkv,
            attn,
            proj,
            gate_up,
            act,
            last,
            normed,
            logits,
            logit_rows,
        } = bufs;

        b.embed(&self.embed, step, x)?; //                                x = E[tokens]
        if let Some(first) = self.layers.first() {
            b.rmsnorm(x, &first.attn_norm, c.rms_eps, h)?; //             h = rmsnorm(x) ⊙ g_attn
        }
        for (l, w) in self.layers.iter().enumerate() {
            // Attention block (h = rmsnorm(x) ⊙ g_attn is ready: above, or the previous layer's
            // last op).
            b.matmul(h, &w.wqkv, qkv)?; //                                [q|k|v] = h · W_qkvᵀ (+ b_qkv)
            if let Some(bias) = &w.qkv_bias {
                b.add_bias(qkv, bias)?;
            }
            // q, k rotated by position; K[slot], V[slot] = k, v
            b.rope_kv_write(qkv, layout, &self.rope_cos, &self.rope_sin, half_split, kv, l, step)?;
            b.attention(qkv, kv, l, layout, step, attn)?; //              a = softmax(q·Kᵀ/√hd)·V (causal, GQA)
            b.matmul(attn, &w.wo, proj)?; //                              o = a · W_oᵀ (+ b_o)
            if let Some(bias) = &w.o_bias {
                b.add_bias(proj, bias)?;
            }
            // MLP block.
            b.add_rmsnorm(x, proj, &w.ffn_norm, c.rms_eps, h)?; //        x = x + o; h = rmsnorm(x) ⊙ g_ffn
            b.matmul(h, &w.w_gate_up, gate_up)?; //                       [g|u] = h · W_gate_upᵀ (+ b_gate_up)
            if let Some(bias) = &w.gate_up_bias {
                b.add_bias(gate_up, bias)?;
            }
            b.silu_mul(gate_up, act)?; //                                 m = silu(g) ⊙ u
            b.matmul(act, &w.w_down, proj)?; //                           y = m · W_downᵀ (+ b_down)
            if let Some(bias) = &w.down_bias {
                b.add_bias(proj, bias)?;
            }
            match self.layers.get(l + 1) {
                // x = x + y; h = rmsnorm(x) ⊙ g_attn of the next layer
                Some(next) => b.add_rmsnorm(x, proj, &next.attn_norm, c.rms_eps, h)?,
                None => b.add_assign(x, proj)?, //                         x = x + y
            }
        }

        if *logit_rows == 0 {
            return Ok(());
        }
        b.gather_logit_rows(x, step, last)?; //                           rows that want logits
        b.rmsnorm(last, &self.out_norm, c.rms_eps, normed)?; //          h = rmsnorm(x) ⊙ g_out
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        b.matmul(normed, head, logits) //                                 logits = h · W_outᵀ
    }

    /// Records the decode step shaped like `input` as a graph (CUDA graphs): later steps with
    /// as many rows, sequences and logit rows, every position below `max_context`, replay it
    /// with [`Llama::replay_decode`], one launch for the whole forward. Nothing runs here
    /// (`input`'s K/V are not written). `Ok(None)` on a backend without graphs. The graph
    /// belongs to `kv`: replay it only with that cache.
    pub fn capture_decode(
        &self,
        kv: &mut KvCache<B>,
        input: &StepInput,
        max_context: usize,
    ) -> Result<Option<DecodeGraph<B>>> {
        let c = &self.config;
        input.validate(c.vocab_size, c.context_length, &kv.shape)?;
        let b = &self.backend;
        let Some(step) = b.graph_step(input, max_context.min(c.context_length), self.qkv_layout())? else {
            return Ok(None);
        };
        let mut bufs = self.alloc_buffers(input.rows(), input.logit_rows.len())?;
        let Some(graph) = b.capture(&mut || self.run_step(&mut kv.store, &step, &mut bufs))? else {
            return Ok(None);
        };
        Ok(Some(DecodeGraph {
            step,
            bufs,
            graph,
            kv_shape: kv.shape,
        }))
    }

    /// Runs `input` through `g`: its logits, or `Ok(None)` when `input` does not fit the
    /// graph (then run [`Llama::forward`]).
    pub fn replay_decode(
        &self,
        g: &mut DecodeGraph<B>,
        kv: &mut KvCache<B>,
        input: &StepInput,
    ) -> Result<Option<Vec<f32>>> {
        Ok(self.replay_decode_inner(g, kv, input, None)?.map(StepOutput::undrawn))
    }

    /// [`Llama::replay_decode`] with device draws, as [`Llama::forward_drawing`].
    pub fn replay_decode_drawing(
        &self,
        g: &mut DecodeGraph<B>,
        kv: &mut KvCache<B>,
        input: &StepInput,
        draws: &[RowDraw],
    ) -> Result<Option<StepOutput>> {
        self.replay_decode_inner(g, kv, input, Some(draws))
    }

    fn replay_decode_inner(
        &self,
        g: &mut DecodeGraph<B>,
        kv: &mut KvCache<B>,
        input: &StepInput,
        draws: Option<&[RowDraw]>,
    ) -> Result<Option<StepOutput>> {
        let c = &self.config;
        input.validate(c.vocab_size, c.context_length, &kv.shape)?;
        check_draws(input, draws)?;
        if kv.shape != g.kv_shape || !self.backend.refill_step(&mut g.step, input)? {
            return Ok(None);
        }
        self.backend.replay(&g.graph)?;
        self.step_output(&g.bufs.logits, input.logit_rows.len(), draws)
            .map(Some)
    }
}

/// What a step brings back to the host.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutput {
    /// The logits of the step's logit rows, `[R, vocab]` row-major f32.
    Logits(Vec<f32>),
    /// One token drawn on the device per logit row, in order ([`Backend::draw_rows`]).
    Drawn(Vec<Sampled>),
}

impl StepOutput {
    /// The logits of a step that asked for no device draws (the only output it can have).
    fn undrawn(self) -> Vec<f32> {
        match self {
            StepOutput::Logits(logits) => logits,
            StepOutput::Drawn(_) => unreachable!("no draws were asked"),
        }
    }
}

/// Device draws, when asked, come one per logit row.
fn check_draws(input: &StepInput, draws: Option<&[RowDraw]>) -> Result<()> {
    match draws {
        Some(d) if d.len() != input.logit_rows.len() => Err(Error::InvalidArgument(format!(
            "{} device draws for {} logit rows",
            d.len(),
            input.logit_rows.len()
        ))),
        _ => Ok(()),
    }
}

/// Every activation of one step (see the module doc for the shapes).
struct StepBuffers<B: Backend> {
    x: B::Activations,
    h: B::Activations,
    qkv: B::Activations,
    attn: B::Activations,
    proj: B::Activations,
    gate_up: B::Activations,
    act: B::Activations,
    /// `[R, d]`, `[R, d]`, `[R, vocab]` for the `R` logit rows.
    last: B::Activations,
    normed: B::Activations,
    logits: B::Activations,
    logit_rows: usize,
}

/// A captured decode step ([`Llama::capture_decode`]): its step data and activations stay
/// allocated, so every replay reads and writes the same device memory.
pub struct DecodeGraph<B: Backend> {
    step: B::Step,
    bufs: StepBuffers<B>,
    graph: B::Graph,
    kv_shape: KvShape,
}
