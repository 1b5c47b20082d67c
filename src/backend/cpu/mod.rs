//! The CPU backend: the f32 reference every other backend is tested against, and a usable
//! engine on its own (rayon threads, AVX2/FMA kernels where the CPU has them).

mod attention;
pub mod matmul;
mod ops;
mod q8;
pub(crate) mod simd;

pub use matmul::{CpuLinear, Isa, MatmulPrecision};

use crate::backend::{Backend, KvShape, QkvLayout, StepInput};
use crate::error::{Error, Result};
use crate::quant::WeightMatrix;

/// f32 activations `[rows, cols]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Paged K/V: `k` and `v` are each `[n_layers, n_blocks, block_size, n_kv_heads, head_dim]` f32.
pub struct CpuKv {
    pub shape: KvShape,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CpuKv {
    fn layer_k(&self, layer: usize) -> &[f32] {
        let n = self.shape.layer_elems();
        &self.k[layer * n..(layer + 1) * n]
    }

    fn layer_v(&self, layer: usize) -> &[f32] {
        let n = self.shape.layer_elems();
        &self.v[layer * n..(layer + 1) * n]
    }

    /// Elements of one block (one layer, K or V).
    fn block_elems(&self) -> usize {
        self.shape.block_size * self.shape.n_kv_heads * self.shape.head_dim
    }
}

/// On the CPU the step's index data is the host description itself.
pub type CpuStep = StepInput;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    isa: Isa,
    precision: MatmulPrecision,
}

impl CpuBackend {
    /// A backend running on `threads` threads with the best kernels this CPU supports.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_isa(threads, Isa::detect())
    }

    /// As [`CpuBackend::new`] with a chosen kernel family (tests run every family).
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self> {
        if threads == 0 {
            return Err(Error::InvalidArgument("--threads must be at least 1".into()));
        }
        if isa == Isa::Avx2Fma && Isa::detect() != Isa::Avx2Fma {
            return Err(Error::Backend {
                backend: "cpu",
                reason: "this CPU lacks AVX2/FMA".into(),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("qmtot-cpu-{i}"))
            .build()
            .map_err(|e| Error::Backend {
                backend: "cpu",
                reason: format!("thread pool: {e}"),
            })?;
        Ok(Self {
            pool,
            threads,
            isa,
            precision: MatmulPrecision::F32,
        })
    }

    /// Selects the matmul arithmetic (f32 by default).
    pub fn with_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> MatmulPrecision {
        self.precision
    }

    /// Threads used when none are asked for: every core the OS gives this process.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

fn shape_err(op: &str, msg: String) -> Error {
    Error::Backend {
        backend: "cpu",
        reason: format!("{op}: {msg}"),
    }
}

fn check(op: &str, what: &str, t: &CpuTensor, rows: usize, cols: usize) -> Result<()> {
    if t.rows != rows || t.cols != cols {
        return Err(shape_err(
            op,
            format!("{what} is [{}, {}], expected [{rows}, {cols}]", t.rows, t.cols),
        ));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Activations = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type KvStore = CpuKv;
    type Step = CpuStep;
    type Graph = ();

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {}, {} matmul)",
            self.threads,
            self.isa.name(),
            self.precision.name()
        )
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn upload_linear(&self, parts: &[&WeightMatrix]) -> Result<CpuLinear> {
        CpuLinear::upload(parts)
    }

    fn upload_vector(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn alloc_activations(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CpuKv> {
        let n = shape
            .layer_elems()
            .checked_mul(shape.n_layers)
            .ok_or_else(|| shape_err("alloc_kv", format!("{shape:?} overflows")))?;
        Ok(CpuKv {
            shape,
            k: vec![f32::NAN; n],
            v: vec![f32::NAN; n],
        })
    }

    fn upload_step(&self, step: &StepInput) -> Result<CpuStep> {
        Ok(step.clone())
    }

    fn embed(&self, table: &CpuLinear, step: &CpuStep, out: &mut CpuTensor) -> Result<()> {
        check("embed", "out", out, step.rows(), table.cols)?;
        if table.input_order.is_some() {
            return Err(shape_err("embed", "an embedding table has no input order".into()));
        }
        if let Some(&t) = step.tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(Error::TokenOutOfRange {
                id: t,
                vocab: table.rows,
            });
        }
        self.pool.install(|| ops::embed(table, &step.tokens, &mut out.data));
        Ok(())
    }

    fn rmsnorm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32, out: &mut CpuTensor) -> Result<()> {
        check("rmsnorm", "x", x, x.rows, w.len())?;
        check("rmsnorm", "out", out, x.rows, w.len())?;
        self.pool.install(|| ops::rmsnorm(&x.data, w, eps, &mut out.data));
        Ok(())
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuLinear, out: &mut CpuTensor) -> Result<()> {
        check("matmul", "x", x, x.rows, w.cols)?;
        check("matmul", "out", out, x.rows, w.rows)?;
        self.pool
            .install(|| matmul::matmul(self.isa, self.precision, &x.data, x.rows, w, &mut out.data));
        Ok(())
    }

    fn rope(
        &self,
        qkv: &mut CpuTensor,
        layout: QkvLayout,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        half_split: bool,
        step: &CpuStep,
    ) -> Result<()> {
        check("rope", "qkv", qkv, step.rows(), layout.width())?;
        let half = layout.head_dim / 2;
        let max_pos = cos.len() / half.max(1);
        if cos.len() != sin.len() || cos.len() % half.max(1) != 0 {
            return Err(shape_err("rope", "cos/sin tables differ or are ragged".into()));
        }
        if let Some(&p) = step.positions.iter().find(|&&p| p as usize >= max_pos) {
            return Err(shape_err("rope", format!("position {p} beyond the table of {max_pos}")));
        }
        self.pool
            .install(|| ops::rope(&mut qkv.data, layout, cos, sin, half_split, &step.positions));
        Ok(())
    }

    fn kv_write(&self, kv: &mut CpuKv, layer: usize, qkv: &CpuTensor, layout: QkvLayout, step: &CpuStep) -> Result<()> {
        check("kv_write", "qkv", qkv, step.rows(), layout.width())?;
        let s = kv.shape;
        if layer >= s.n_layers || layout.n_kv_heads != s.n_kv_heads || layout.head_dim != s.head_dim {
            return Err(shape_err(
                "kv_write",
                format!("layer {layer} / {layout:?} vs store {s:?}"),
            ));
        }
        if let Some(&slot) = step.slots.iter().find(|&&slot| slot as usize >= s.n_slots()) {
            return Err(shape_err("kv_write", format!("slot {slot} of {}", s.n_slots())));
        }
        let kvw = layout.n_kv_heads * layout.head_dim;
        let base = layer * s.layer_elems();
        for (r, &slot) in step.slots.iter().enumerate() {
            let row = &qkv.data[r * qkv.cols..(r + 1) * qkv.cols];
            let dst = base + slot as usize * kvw;
            kv.k[dst..dst + kvw].copy_from_slice(&row[layout.k_offset()..layout.k_offset() + kvw]);
            kv.v[dst..dst + kvw].copy_from_slice(&row[layout.v_offset()..layout.v_offset() + kvw]);
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        kv: &CpuKv,
        layer: usize,
        layout: QkvLayout,
        step: &CpuStep,
        out: &mut CpuTensor,
    ) -> Result<()> {
        check("attention", "qkv", qkv, step.rows(), layout.width())?;
        check("attention", "out", out, step.rows(), layout.n_heads * layout.head_dim)?;
        let s = kv.shape;
        if layer >= s.n_layers || layout.n_kv_heads != s.n_kv_heads || layout.head_dim != s.head_dim {
            return Err(shape_err(
                "attention",
                format!("layer {layer} / {layout:?} vs store {s:?}"),
            ));
        }
        for r in 0..step.rows() {
            let pos = step.positions[r] as usize;
            let table = step
                .block_tables
                .get(step.row_seq[r] as usize)
                .ok_or_else(|| shape_err("attention", format!("row {r} has no block table")))?;
            if table.len() * s.block_size <= pos || table.iter().any(|&b| b as usize >= s.n_blocks) {
                return Err(shape_err(
                    "attention",
                    format!("row {r}: block table does not cover position {pos}"),
                ));
            }
        }
        step.validate_groups(s.block_size)?;
        self.pool
            .install(|| attention::attention(self.isa, &qkv.data, kv, layer, layout, step, &mut out.data))
            .map_err(|m| shape_err("attention", m))
    }

    fn silu_mul(&self, gate_up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        if gate_up.cols % 2 != 0 {
            return Err(shape_err("silu_mul", format!("gate_up has odd width {}", gate_up.cols)));
        }
        check("silu_mul", "out", out, gate_up.rows, gate_up.cols / 2)?;
        self.pool
            .install(|| ops::silu_mul(&gate_up.data, &mut out.data, out.cols));
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        check("add_assign", "y", y, x.rows, x.cols)?;
        self.pool.install(|| ops::add_assign(&mut x.data, &y.data));
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &Vec<f32>) -> Result<()> {
        if bias.len() != x.cols {
            return Err(shape_err(
                "add_bias",
                format!("bias of {} for {} columns", bias.len(), x.cols),
            ));
        }
        for row in x.data.chunks_exact_mut(bias.len().max(1)) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
        Ok(())
    }

    fn gather_logit_rows(&self, x: &CpuTensor, step: &CpuStep, out: &mut CpuTensor) -> Result<()> {
        check("gather_logit_rows", "out", out, step.logit_rows.len(), x.cols)?;
        for (i, &r) in step.logit_rows.iter().enumerate() {
            if r as usize >= x.rows {
                return Err(shape_err("gather_logit_rows", format!("row {r} of {}", x.rows)));
            }
            let src = &x.data[r as usize * x.cols..(r as usize + 1) * x.cols];
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(src);
        }
        Ok(())
    }

    fn copy_blocks(&self, kv: &mut CpuKv, copies: &[(u32, u32)]) -> Result<()> {
        let s = kv.shape;
        let be = kv.block_elems();
        for &(src, dst) in copies {
            if src as usize >= s.n_blocks || dst as usize >= s.n_blocks || src == dst {
                return Err(shape_err(
                    "copy_blocks",
                    format!("copy {src} → {dst} in a pool of {}", s.n_blocks),
                ));
            }
            for layer in 0..s.n_layers {
                let base = layer * s.layer_elems();
                let (from, to) = (base + src as usize * be, base + dst as usize * be);
                kv.k.copy_within(from..from + be, to);
                kv.v.copy_within(from..from + be, to);
            }
        }
        Ok(())
    }

    fn to_host(&self, x: &CpuTensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&x.data);
        Ok(())
    }
}
