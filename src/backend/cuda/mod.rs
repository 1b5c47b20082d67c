//! CUDA backend: the [`Backend`] ops as NVRTC-compiled kernels (`kernels/*.cu`) launched
//! through cudarc on one device and one stream.
//!
//! Precision: activations and K/V in f16, accumulation in f32, logits in f32 (DESIGN
//! "Precision"). Weights are uploaded once, repacked into the tensor-core fragment layout of
//! `kernels/int4_matmul.cu` ([`fragments`]): INT4 parts keep the canonical nibbles, with the
//! f16 scales and f32 mins as f32 quads (exact); INT8 and dense parts become f16 matrices;
//! stacked parts of one format are fused into one matrix (`fuse_parts`). See
//! `kernels/int4_matmul.cu` for the layout, partitioning and pipeline (split-K partials are
//! added by each output tile's last block, found by arrival counters in `matmul_counters`).
//! Two pairs of forward ops are one kernel each here: the residual add and the RMSNorm that
//! reads it ([`Backend::add_rmsnorm`]), RoPE and the K/V write ([`Backend::rope_kv_write`]).
//!
//! Status: compiled and resource-checked on machines without a GPU (tests/kernel_build.rs);
//! the GPU tests against the CPU backend (tests/cuda.rs) skip without a device and pass on an
//! H200 (bench/results/2026-11-26-h200/). `--device` still defaults to the CPU.
//!
//! libcuda is loaded dynamically: [`CudaBackend::new`] checks that it is present before any
//! driver call (cudarc panics otherwise) and returns a typed error when it is not.

pub mod attention_plan;
mod bench;
pub mod fragments;
mod graph;
pub mod kernel_cache;
mod kernels;
pub mod matmul_variant;
pub mod nvrtc;
pub mod sampling;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;

pub use kernels::arch_for;
use kernels::{cuda_err, Kernels};

use super::{Backend, KvShape, QkvLayout, RowDraw, StepInput};
use crate::engine::sampler::Sampled;
use crate::error::{Error, Result};
use crate::quant::{Int4Matrix, WeightMatrix};
use attention_plan::{CascadeRule, PlanContext, PlanOptions};
use kernel_cache::KernelCache;
use matmul_variant::{
    batch_tiles, matmul_kernel, MatmulVariant, Pipeline, MATMUL_TILES, MATMUL_VARIANTS, VARIANT_GROUP,
};

/// Whether the CUDA driver library can be loaded at all.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Device storage of an activation: f16, or f32 for logits.
pub enum DevBuf {
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
}

/// Activations `[rows, cols]` on the device.
pub struct CudaTensor {
    pub rows: usize,
    pub cols: usize,
    buf: DevBuf,
}

impl CudaTensor {
    fn f16(&self, op: &str) -> Result<&CudaSlice<f16>> {
        match &self.buf {
            DevBuf::F16(b) => Ok(b),
            DevBuf::F32(_) => Err(shape_err(op, "expected f16 activations, got f32".into())),
        }
    }

    fn f16_mut(&mut self, op: &str) -> Result<&mut CudaSlice<f16>> {
        match &mut self.buf {
            DevBuf::F16(b) => Ok(b),
            DevBuf::F32(_) => Err(shape_err(op, "expected f16 activations, got f32".into())),
        }
    }
}

/// One uploaded weight part, in the fragment layout ([`fragments`]; rows padded to 16 and
/// inputs to `kp`, a multiple of 64).
pub enum CudaWeight {
    /// `qweight [rows/16, kp/64, 32, 4]` u32, `scale_min [rows/16, kp/group, 8, 4]` f32.
    Int4 {
        rows: usize,
        cols: usize,
        kp: usize,
        group: usize,
        qweight: CudaSlice<u32>,
        scale_min: CudaSlice<f32>,
    },
    /// `[rows/16, kp/16, 32, 8]` f16 (INT8 and dense parts, dequantized).
    F16 {
        rows: usize,
        cols: usize,
        kp: usize,
        data: CudaSlice<f16>,
    },
}

impl CudaWeight {
    fn rows(&self) -> usize {
        match self {
            CudaWeight::Int4 { rows, .. } | CudaWeight::F16 { rows, .. } => *rows,
        }
    }
}

/// A linear layer: parts stacked along the output dimension.
pub struct CudaLinear {
    rows: usize,
    cols: usize,
    parts: Vec<(usize, CudaWeight)>,
    /// `[cols]` u32: stored column `j` reads input `order[j]` (GPTQ act-order).
    input_order: Option<CudaSlice<u32>>,
}

pub struct CudaVector {
    data: CudaSlice<f32>,
    len: usize,
}

/// Paged K/V: `[n_layers, 2 (K, V), n_slots, n_kv_heads·head_dim]` f16.
pub struct CudaKv {
    shape: KvShape,
    store: CudaSlice<f16>,
}

impl CudaKv {
    /// Elements of one K or V plane of a layer, `[n_slots, n_kv_heads·head_dim]`.
    fn plane(&self) -> usize {
        self.shape.n_slots() * self.shape.n_kv_heads * self.shape.head_dim
    }

    /// Layer `layer`'s K plane then V plane in `store`: split the slice at [`CudaKv::plane`].
    fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        2 * layer * self.plane()..2 * (layer + 1) * self.plane()
    }
}

/// A step's index data on the device (i32), plus the host copy for checks.
pub struct CudaStep {
    host: StepInput,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    row_seq: CudaSlice<i32>,
    /// `[n_seqs, max_blocks]`, padded with 0.
    block_tables: CudaSlice<i32>,
    max_blocks: usize,
    logit_rows: Option<CudaSlice<i32>>,
    /// The attention plan for this step, made by the first layer's `attention` (a graph
    /// step's before the capture) and reused by the others, keyed by the GQA group and KV
    /// heads it was made for.
    attention: std::sync::OnceLock<((usize, usize), DevicePlan)>,
    /// The K/V store shape the host data was checked against for attention (block tables
    /// cover every row and stay in the pool, sharing groups valid): checked by the first
    /// layer, not again by the others.
    attention_checked: std::sync::OnceLock<KvShape>,
    /// Set on a step made for capture (`graph_step`): what later steps must fit.
    graph: Option<graph::GraphShape>,
}

/// An [`attention_plan::AttentionPlan`] on the device (i32 arrays; empty ones hold one unused
/// element, since a kernel argument needs an allocation).
struct DevicePlan {
    plan: attention_plan::AttentionPlan,
    split_rows: CudaSlice<i32>,
    split_from: CudaSlice<i32>,
    split_part0: CudaSlice<i32>,
    tasks: CudaSlice<i32>,
    task_rows: CudaSlice<i32>,
    row_parts: CudaSlice<i32>,
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    device_name: String,
    arch: String,
    /// Multiprocessors: the attention plan sizes its chunks by them.
    n_sms: usize,
    /// Resident blocks per multiprocessor of each matmul entry point, by name (the occupancy
    /// the driver reports at its shared memory).
    matmul_blocks_per_sm: std::collections::HashMap<String, usize>,
    /// The INT4 g128 pipeline variant in use for each batch width of `MATMUL_TILES`: 0 for the
    /// default entry point, else 1 + its index in `MATMUL_VARIANTS`.
    matmul_variant: [std::sync::atomic::AtomicUsize; 4],
    /// Attention tiles (prefill, cascade prefixes) on tensor cores (`attention_tile_mma`, the
    /// default) or on the SIMT kernel `attention_tile` (`QMTOT_ATTENTION_TILE=simt`).
    mma_attention_tiles: std::sync::atomic::AtomicBool,
    /// Cascade every sharing group of two or more rows, whatever the tile kernel's measured
    /// crossover says (`QMTOT_CASCADE=always`; for measuring the crossover).
    cascade_always: std::sync::atomic::AtomicBool,
    /// The shortest key chunk of an attention tile task (`QMTOT_TILE_CHUNK`, a measuring knob;
    /// `attention_plan::MIN_TILE_CHUNK` by default).
    min_tile_chunk: std::sync::atomic::AtomicUsize,
    /// `[MATMUL_COUNTERS]` u32 split-K arrival counters, zero between launches: every launch
    /// on the one stream uses them from index 0, and each tile's last block resets its own.
    matmul_counters: CudaSlice<u32>,
}

fn shape_err(op: &str, reason: String) -> Error {
    Error::Backend {
        backend: "cuda",
        reason: format!("{op}: {reason}"),
    }
}

/// `[n_seqs, max_blocks]` i32 block tables, padded with 0 (at least one element).
fn padded_tables(step: &StepInput, max_blocks: usize) -> Vec<i32> {
    let mut tables = vec![0i32; step.block_tables.len().max(1) * max_blocks];
    for (s, t) in step.block_tables.iter().enumerate() {
        for (i, &b) in t.iter().enumerate() {
            tables[s * max_blocks + i] = b as i32;
        }
    }
    tables
}

/// A two-way switch in the environment variable `name`: true when it says `other`, false when
/// it is unset, empty or says `default`; anything else is an error.
fn env_switch(name: &str, default: &str, other: &str) -> Result<bool> {
    match std::env::var(name) {
        Err(_) => Ok(false),
        Ok(v) if v.is_empty() || v == default => Ok(false),
        Ok(v) if v == other => Ok(true),
        Ok(v) => Err(Error::InvalidArgument(format!(
            "{name}={v}: {default} (the default) or {other}"
        ))),
    }
}

fn i32s(v: &[u32]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

/// The output view of a matmul launch, in the output's dtype.
enum MatmulOut<'a> {
    F16(cudarc::driver::CudaViewMut<'a, f16>),
    F32(cudarc::driver::CudaViewMut<'a, f32>),
}

/// Threads per block of the row-wise kernels.
const ROW_BLOCK: u32 = 256;
/// Threads per RMSNorm block: a 4096-wide decode row is one 16-byte chunk per thread.
const NORM_BLOCK: u32 = 512;
/// K-slices of the matmul kernels are multiples of this (`SLICE_K` in kernels/int4_matmul.cu).
const MATMUL_STAGE: usize = 256;
/// Output rows per matmul block (4 warps × 16).
const MATMUL_BLOCK_ROWS: usize = 64;
/// The split-K cost model's fixed cost of a block, in slice granules: its first weights' trip
/// from memory and its first activation chunk, before its pipeline streams.
const MATMUL_BLOCK_OVERHEAD: usize = 2;
/// Split-K arrival counters: a launch with more output tiles (column blocks × batch tiles, a
/// long prefill through the lm_head) runs unsplit, which needs none.
const MATMUL_COUNTERS: usize = 1 << 16;

/// Split-K for a matmul of `blocks` output blocks over `stages` slice granules, with `slots`
/// blocks resident at once and at most `max_splits` splits: the count that minimizes waves ×
/// (granules per split + a block's fixed cost, one granule more when split: the partials'
/// round trip and the arrival count); the fewest splits among equals.
fn matmul_splits(blocks: usize, stages: usize, slots: usize, max_splits: usize) -> usize {
    (1..=max_splits.clamp(1, stages.max(1)))
        .min_by_key(|&s| {
            let fixed = MATMUL_BLOCK_OVERHEAD + usize::from(s > 1);
            (blocks * s).div_ceil(slots.max(1)) * (stages.div_ceil(s) + fixed)
        })
        .unwrap_or(1)
}

/// What a norm checks: `out` is `x`'s shape and the weight is one row wide.
fn check_norm(op: &str, x: &CudaTensor, w: &CudaVector, out: &CudaTensor) -> Result<()> {
    check(op, "out", out, x.rows, x.cols)?;
    if w.len != x.cols {
        return Err(shape_err(op, format!("weight of {} for width {}", w.len, x.cols)));
    }
    Ok(())
}

/// What `rope` checks: `qkv` is the step's `[rows, layout.width()]`, the cos/sin tables are
/// `[max_pos, head_dim/2]` and every position is inside them.
fn check_rope(
    op: &str,
    qkv: &CudaTensor,
    layout: QkvLayout,
    cos: &CudaVector,
    sin: &CudaVector,
    step: &CudaStep,
) -> Result<()> {
    check(op, "qkv", qkv, step.host.rows(), layout.width())?;
    let half = (layout.head_dim / 2).max(1);
    let max_pos = cos.len / half;
    if cos.len != sin.len || cos.len % half != 0 {
        return Err(shape_err(op, "cos/sin tables differ or are ragged".into()));
    }
    if let Some(&p) = step.host.positions.iter().find(|&&p| p as usize >= max_pos) {
        return Err(shape_err(op, format!("position {p} beyond the table of {max_pos}")));
    }
    Ok(())
}

/// What `kv_write` checks: `qkv` is the step's `[rows, layout.width()]`, `layer` and the
/// layout's K/V heads match the store, and every slot is inside it.
fn check_kv_write(
    op: &str,
    kv: &CudaKv,
    layer: usize,
    qkv: &CudaTensor,
    layout: QkvLayout,
    step: &CudaStep,
) -> Result<()> {
    check(op, "qkv", qkv, step.host.rows(), layout.width())?;
    let s = kv.shape;
    if layer >= s.n_layers || layout.n_kv_heads != s.n_kv_heads || layout.head_dim != s.head_dim {
        return Err(shape_err(op, format!("layer {layer} / {layout:?} vs store {s:?}")));
    }
    if let Some(&slot) = step.host.slots.iter().find(|&&x| x as usize >= s.n_slots()) {
        return Err(shape_err(op, format!("slot {slot} outside the store")));
    }
    Ok(())
}

fn grid(x: usize, y: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x.max(1) as u32, y.max(1) as u32, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or takes from the disk cache) every kernel for its
    /// architecture and loads them.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(cuda_err(
                "driver",
                "libcuda not found (no NVIDIA driver on this machine)",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err(&format!("device {ordinal}"), e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let arch = arch_for(major, minor);
        let device_name = ctx.name().map_err(|e| cuda_err("device name", e))?;
        let n_sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("multiprocessor count", e))?
            .max(1) as usize;
        // One stream does all the work, so cudarc's per-buffer events (for ordering across
        // streams) would only add an event record per kernel argument, and they are not
        // allowed inside a graph capture.
        // SAFETY: no buffer of this context is used from another stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let kernels = Kernels::load(&ctx, &arch, &KernelCache::new(KernelCache::default_dir()))?;
        // The matmul kernels take more than the default 48 KB of dynamic shared memory.
        let mut matmul_blocks_per_sm = std::collections::HashMap::new();
        let defaults = MATMUL_TILES.into_iter().flat_map(|nt| {
            let groups = crate::quant::INT4_GROUP_SIZES.map(Some);
            groups.into_iter().chain([None]).map(move |group| {
                (
                    matmul_kernel(nt, group),
                    Pipeline::default_for(nt).smem_bytes(nt, group),
                )
            })
        });
        let variants = MATMUL_VARIANTS
            .iter()
            .map(|v| (v.kernel_name(), v.pipeline.smem_bytes(v.nt, Some(VARIANT_GROUP))));
        for (name, bytes) in defaults.chain(variants) {
            let f = kernels.get(&name)?;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| cuda_err(&format!("{name}: {bytes} bytes of shared memory"), e))?;
            let blocks = f
                .occupancy_max_active_blocks_per_multiprocessor(128, bytes, None)
                .map_err(|e| cuda_err(&format!("{name}: occupancy"), e))?;
            matmul_blocks_per_sm.insert(name, (blocks as usize).max(1));
        }
        let matmul_counters = stream
            .alloc_zeros::<u32>(MATMUL_COUNTERS)
            .map_err(|e| cuda_err("alloc", e))?;
        let backend = Self {
            ctx,
            stream,
            kernels,
            device_name,
            arch,
            n_sms,
            matmul_blocks_per_sm,
            matmul_variant: Default::default(),
            mma_attention_tiles: std::sync::atomic::AtomicBool::new(true),
            cascade_always: Default::default(),
            min_tile_chunk: std::sync::atomic::AtomicUsize::new(attention_plan::MIN_TILE_CHUNK),
            matmul_counters,
        };
        // Measuring knobs: the SIMT attention tile kernel, and cascade without a crossover.
        if env_switch("QMTOT_ATTENTION_TILE", "mma", "simt")? {
            backend.use_mma_attention_tiles(false);
        }
        if env_switch("QMTOT_CASCADE", "crossover", "always")? {
            backend.use_cascade_always(true);
        }
        if let Ok(chunk) = std::env::var("QMTOT_TILE_CHUNK") {
            let chunk = chunk
                .parse::<usize>()
                .ok()
                .filter(|&c| c > 0)
                .ok_or_else(|| Error::InvalidArgument(format!("QMTOT_TILE_CHUNK={chunk}: a key count")))?;
            backend
                .min_tile_chunk
                .store(chunk, std::sync::atomic::Ordering::Relaxed);
        }
        // A measuring knob: pipeline variants of the INT4 g128 matmul (see `matmul_variant`).
        if let Ok(spec) = std::env::var("QMTOT_MATMUL_VARIANTS") {
            backend.use_matmul_variants(&MatmulVariant::parse_list(&spec)?)?;
        }
        Ok(backend)
    }

    /// Runs INT4 g128 matmuls of each variant's batch width through that variant instead of the
    /// default entry point (the other widths go back to their defaults). For measuring
    /// (`qmtot bench kernels --matmul-variants`): every variant computes the same sums. A
    /// variant that is not compiled (not in `MATMUL_VARIANTS`) is an error and changes nothing.
    pub fn use_matmul_variants(&self, variants: &[MatmulVariant]) -> Result<()> {
        use std::sync::atomic::Ordering;
        let index = |v: &MatmulVariant| {
            MATMUL_VARIANTS
                .iter()
                .position(|c| c == v)
                .ok_or_else(|| Error::InvalidArgument(format!("{v:?} is not a compiled matmul variant")))
        };
        let chosen = variants.iter().map(index).collect::<Result<Vec<usize>>>()?;
        for (slot, nt) in self.matmul_variant.iter().zip(MATMUL_TILES) {
            let i = chosen.iter().find(|&&i| MATMUL_VARIANTS[i].nt == nt);
            slot.store(i.map_or(0, |i| i + 1), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Runs attention tiles (prefill and cascade prefixes) through the tensor-core kernel
    /// `attention_tile_mma` (`on`, the default) or the SIMT kernel `attention_tile`: the same
    /// tasks and partials, so the same results up to f32 summation order and the f16 rounding
    /// of the softmax weights. `QMTOT_ATTENTION_TILE=simt` turns it off when the backend starts.
    pub fn use_mma_attention_tiles(&self, on: bool) {
        self.mma_attention_tiles.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn mma_attention_tiles(&self) -> bool {
        self.mma_attention_tiles.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cascades every sharing group of two or more rows (`on`) instead of those that the tile
    /// kernel's measured crossover admits (the default). For measuring that crossover; the
    /// results are the same either way. `QMTOT_CASCADE=always` turns it on when the backend
    /// starts.
    pub fn use_cascade_always(&self, on: bool) {
        self.cascade_always.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// How steps' attention is tuned: which sharing groups are read by cascade (the tile
    /// kernel's crossover, or every group), and the tile tasks' shortest key chunk.
    fn plan_options(&self) -> PlanOptions {
        use std::sync::atomic::Ordering;
        let cascade = if self.cascade_always.load(Ordering::Relaxed) {
            CascadeRule::ALWAYS
        } else if self.mma_attention_tiles() {
            CascadeRule::MMA_TILES
        } else {
            CascadeRule::SIMT_TILES
        };
        PlanOptions {
            cascade,
            min_tile_chunk: self.min_tile_chunk.load(Ordering::Relaxed),
        }
    }

    /// What steps' attention is planned for: GQA group `gqa` over `n_kv` KV heads, 16-token
    /// blocks, this device and [`CudaBackend::plan_options`].
    fn plan_context(&self, gqa: usize, n_kv: usize) -> PlanContext {
        PlanContext {
            gqa,
            n_kv_heads: n_kv,
            block_size: 16,
            n_sms: self.n_sms,
            options: self.plan_options(),
        }
    }

    /// The variants in use ([`CudaBackend::use_matmul_variants`]).
    pub fn matmul_variants_in_use(&self) -> Vec<MatmulVariant> {
        MATMUL_TILES
            .into_iter()
            .filter_map(|nt| self.variant_in_use(nt))
            .collect()
    }

    /// The variant in use for batch width `nt` (`None`: the default entry point).
    fn variant_in_use(&self, nt: usize) -> Option<MatmulVariant> {
        let slot = MATMUL_TILES.iter().position(|&t| t == nt)?;
        let i = self.matmul_variant[slot].load(std::sync::atomic::Ordering::Relaxed);
        i.checked_sub(1).map(|i| MATMUL_VARIANTS[i])
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// f16 activations `[rows, cols]` from host values (tests and benchmarks; the forward
    /// makes its own through `embed`).
    pub fn upload_activations(&self, rows: usize, cols: usize, values: &[f32]) -> Result<CudaTensor> {
        if values.len() != rows * cols {
            return Err(shape_err(
                "upload_activations",
                format!("{} values for [{rows}, {cols}]", values.len()),
            ));
        }
        let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        Ok(CudaTensor {
            rows,
            cols,
            buf: DevBuf::F16(self.upload(&halves)?),
        })
    }

    /// The whole K/V store as f32, `[n_layers, 2 (K, V), n_slots, n_kv_heads·head_dim]` (for
    /// tests: the CPU backend's store is host memory already).
    pub fn kv_to_host(&self, kv: &CudaKv) -> Result<Vec<f32>> {
        let halves = self.stream.clone_dtoh(&kv.store).map_err(|e| cuda_err("download", e))?;
        Ok(halves.iter().map(|h| h.to_f32()).collect())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(|e| cuda_err("upload", e))
    }

    fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(n.max(1)).map_err(|e| cuda_err("alloc", e))
    }

    /// Uninitialized f32 scratch of `n` elements (at least one), for partial results that
    /// their kernels write before anything reads them (each caller says why).
    fn scratch_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: f32 has no invalid bit patterns; callers read only what kernels wrote.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.map_err(|e| cuda_err("alloc", e))
    }

    fn upload_part(&self, w: &WeightMatrix) -> Result<CudaWeight> {
        let (rows, cols) = (w.rows(), w.cols());
        if cols % 32 != 0 {
            return Err(shape_err(
                "upload_linear",
                format!("{cols} inputs: the kernels need a multiple of 32"),
            ));
        }
        let f16_part = |m: &crate::quant::F16Matrix| -> Result<CudaWeight> {
            let (data, kp) = fragments::f16_fragments(m);
            Ok(CudaWeight::F16 {
                rows,
                cols,
                kp,
                data: self.upload(&data)?,
            })
        };
        match w {
            WeightMatrix::Int4(m) => {
                let f = fragments::int4_fragments(m);
                Ok(CudaWeight::Int4 {
                    rows,
                    cols,
                    kp: f.kp,
                    group: m.group,
                    qweight: self.upload(&f.qweight)?,
                    scale_min: self.upload(&f.scale_min)?,
                })
            }
            WeightMatrix::F16(m) => f16_part(m),
            other => {
                let mut row = vec![0f32; cols];
                let mut data = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    other.dequant_row(r, &mut row);
                    data.extend(row.iter().map(|&v| f16::from_f32(v)));
                }
                f16_part(&crate::quant::F16Matrix::new(rows, cols, data)?)
            }
        }
    }

    /// A step's device data with block tables padded to `max_blocks` per sequence.
    fn upload_step_with(&self, step: &StepInput, max_blocks: usize) -> Result<CudaStep> {
        let tables = padded_tables(step, max_blocks);
        Ok(CudaStep {
            host: step.clone(),
            tokens: self.upload(&i32s(&step.tokens))?,
            positions: self.upload(&i32s(&step.positions))?,
            slots: self.upload(&i32s(&step.slots))?,
            row_seq: self.upload(&i32s(&step.row_seq))?,
            block_tables: self.upload(&tables)?,
            max_blocks,
            logit_rows: if step.logit_rows.is_empty() {
                None
            } else {
                Some(self.upload(&i32s(&step.logit_rows))?)
            },
            attention: std::sync::OnceLock::new(),
            attention_checked: std::sync::OnceLock::new(),
            graph: None,
        })
    }

    fn upload_plan(&self, plan: attention_plan::AttentionPlan) -> Result<DevicePlan> {
        let ints = |v: &[u32]| self.upload(&i32s(if v.is_empty() { &[0] } else { v }));
        let words = plan.task_words();
        Ok(DevicePlan {
            split_rows: ints(&plan.split_rows)?,
            split_from: ints(&plan.split_from)?,
            split_part0: ints(&plan.split_part0)?,
            tasks: self.upload(if words.is_empty() { &[0] } else { &words[..] })?,
            task_rows: ints(&plan.task_rows)?,
            row_parts: ints(&plan.row_parts)?,
            plan,
        })
    }

    /// The step's attention plan on the device, made once per step (by its first layer).
    fn attention_plan<'s>(&self, step: &'s CudaStep, gqa: usize, n_kv: usize) -> Result<&'s DevicePlan> {
        if step.attention.get().is_none() {
            let dp = self.upload_plan(attention_plan::plan(&step.host, &self.plan_context(gqa, n_kv)))?;
            let _ = step.attention.set(((gqa, n_kv), dp));
        }
        match step.attention.get() {
            Some((key, dp)) if *key == (gqa, n_kv) => Ok(dp),
            _ => Err(shape_err(
                "attention",
                format!("one step serves one attention shape; this one was planned for another than GQA {gqa} × {n_kv} KV heads"),
            )),
        }
    }

    /// `out[.., col0 .. col0+n] = x · Wᵀ` for one part `(col0, W[n, k])`, all of x's rows in
    /// one launch (blocks along z take 8·NT rows each).
    fn matmul_part(
        &self,
        x: &CudaSlice<f16>,
        m: usize,
        (col0, w): (usize, &CudaWeight),
        k: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let n = w.rows();
        // INT4 group size (None: f16) and padded inputs.
        let (kp, weight_bytes, group) = match w {
            CudaWeight::Int4 { kp, group, .. } => (*kp, n * kp / 2, Some(*group)),
            CudaWeight::F16 { kp, .. } => (*kp, n * kp * 2, None),
        };
        let nt = batch_tiles(m);
        let z = m.div_ceil(8 * nt);
        // Split-K: the wave model of `matmul_splits` over the entry point's resident blocks,
        // with partials ([S, m, n] f32, written and read once, mostly in L2) kept under the
        // weight bytes.
        let stages = kp.div_ceil(MATMUL_STAGE);
        let blocks = n.div_ceil(MATMUL_BLOCK_ROWS) * z;
        // The default entry point, or the pipeline variant in use for this width (INT4 g128).
        let variant = match group {
            Some(VARIANT_GROUP) => self.variant_in_use(nt),
            _ => None,
        };
        let (name, pipeline) = match variant {
            Some(v) => (v.kernel_name(), v.pipeline),
            None => (matmul_kernel(nt, group), Pipeline::default_for(nt)),
        };
        let f = self.kernels.get(&name)?;
        let slots = self.matmul_blocks_per_sm.get(&name).copied().unwrap_or(1) * self.n_sms;
        let by_traffic = (weight_bytes / (4 * m * n)).max(1);
        let splits = if blocks <= MATMUL_COUNTERS {
            matmul_splits(blocks, stages, slots, by_traffic)
        } else {
            1
        };
        let slice = stages.div_ceil(splits) * MATMUL_STAGE;
        let splits = kp.div_ceil(slice);
        // Not zeroed: the matmul blocks write every (split, row, column) their tile's last
        // block reads; one slice writes out directly and needs none.
        let partial = self.scratch_f32(if splits > 1 { splits * m * n } else { 1 })?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(MATMUL_BLOCK_ROWS) as u32, splits as u32, z as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: pipeline.smem_bytes(nt, group) as u32,
        };
        let (m_i, n_i, k_i, kp_i, slice_i) = (m as i32, n as i32, k as i32, kp as i32, slice as i32);
        let ldo_i = out.cols as i32;
        let null = 0u64;
        let mut launch = self.stream.launch_builder(f);
        launch.arg(x);
        match w {
            CudaWeight::Int4 { qweight, scale_min, .. } => launch.arg(qweight).arg(scale_min),
            CudaWeight::F16 { data, .. } => launch.arg(data),
        };
        launch.arg(&partial);
        // The output columns col0..col0 + n of rows 0..m, in out's dtype (the other pointer null).
        let mut view = match &mut out.buf {
            DevBuf::F16(o) => MatmulOut::F16(o.slice_mut(col0..)),
            DevBuf::F32(o) => MatmulOut::F32(o.slice_mut(col0..)),
        };
        match &mut view {
            MatmulOut::F16(v) => launch.arg(v).arg(&null),
            MatmulOut::F32(v) => launch.arg(&null).arg(v),
        };
        launch
            .arg(&ldo_i)
            .arg(&self.matmul_counters)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&k_i)
            .arg(&kp_i)
            .arg(&slice_i);
        // SAFETY: shapes checked by `matmul`; the kernel reads x[m, k] and W[n, kp] in its
        // fragment layout, writes partial[splits, m, n] (splits > 1) and out's rows 0..m,
        // columns col0..col0 + n (the view), and uses counters[z · ceil(n / 64)] ≤
        // MATMUL_COUNTERS (splits > 1 only when blocks ≤ MATMUL_COUNTERS).
        unsafe { launch.launch(cfg) }.map_err(|e| cuda_err(&name, e))?;
        Ok(())
    }
}

/// Parts stacked along the output dimension, with every run of consecutive parts that one
/// kernel launch can serve merged into one matrix: INT4 parts of one group size and input
/// order, or f16 parts, where every part but the run's last has a multiple of 16 rows (so the
/// merged fragment layout's row blocks are the parts' own). A fused Q|K|V or gate|up is then
/// one matmul launch instead of three or two. Other parts stay as they are.
fn fuse_parts<'a>(parts: &[&'a WeightMatrix]) -> Result<Vec<std::borrow::Cow<'a, WeightMatrix>>> {
    use std::borrow::Cow;
    let mut out: Vec<Cow<'a, WeightMatrix>> = Vec::with_capacity(parts.len());
    for &p in parts {
        match out.last().map(|prev| join_parts(prev, p)).transpose()?.flatten() {
            Some(m) => *out.last_mut().expect("joined to the last part") = Cow::Owned(m),
            None => out.push(Cow::Borrowed(p)),
        }
    }
    Ok(out)
}

/// `a` stacked over `b` as one matrix, when one launch can serve both (see [`fuse_parts`]).
fn join_parts(a: &WeightMatrix, b: &WeightMatrix) -> Result<Option<WeightMatrix>> {
    if a.rows() % fragments::BLOCK_ROWS != 0 || a.cols() != b.cols() {
        return Ok(None);
    }
    Ok(match (a, b) {
        (WeightMatrix::Int4(a), WeightMatrix::Int4(b)) if a.group == b.group && a.input_order == b.input_order => {
            let mut m = Int4Matrix::new(
                a.rows + b.rows,
                a.cols,
                a.group,
                [&a.packed[..], &b.packed[..]].concat(),
                [&a.scales[..], &b.scales[..]].concat(),
                [&a.mins[..], &b.mins[..]].concat(),
            )?;
            m.input_order = a.input_order.clone();
            Some(WeightMatrix::Int4(m))
        }
        (WeightMatrix::F16(a), WeightMatrix::F16(b)) => Some(WeightMatrix::F16(crate::quant::F16Matrix::new(
            a.rows + b.rows,
            a.cols,
            [&a.data[..], &b.data[..]].concat(),
        )?)),
        _ => None,
    })
}

/// What attention needs of a step's host data before any kernel reads K/V through it: every
/// row's block table covers its position inside a pool of `s.n_blocks`, and the sharing groups
/// are valid ([`StepInput::validate_groups`]).
fn check_attention_tables(step: &StepInput, s: KvShape) -> Result<()> {
    for (r, &pos) in step.positions.iter().enumerate() {
        let table = step
            .block_tables
            .get(step.row_seq[r] as usize)
            .ok_or_else(|| shape_err("attention", format!("row {r} has no block table")))?;
        if table.len() * s.block_size <= pos as usize || table.iter().any(|&b| b as usize >= s.n_blocks) {
            return Err(shape_err(
                "attention",
                format!("row {r}: block table does not cover position {pos}"),
            ));
        }
    }
    step.validate_groups(s.block_size)
}

fn check(op: &str, what: &str, t: &CudaTensor, rows: usize, cols: usize) -> Result<()> {
    if t.rows != rows || t.cols != cols {
        return Err(shape_err(
            op,
            format!("{what} is [{}, {}], expected [{rows}, {cols}]", t.rows, t.cols),
        ));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Activations = CudaTensor;
    type Linear = CudaLinear;
    type Vector = CudaVector;
    type KvStore = CudaKv;
    type Step = CudaStep;
    type Graph = cudarc::driver::CudaGraph;

    fn name(&self) -> String {
        let variants: Vec<String> = self.matmul_variants_in_use().iter().map(|v| v.label()).collect();
        let variants = if variants.is_empty() {
            String::new()
        } else {
            format!(", matmul variants {}", variants.join(","))
        };
        let tiles = if self.mma_attention_tiles() {
            ""
        } else {
            ", simt attention tiles"
        };
        let options = self.plan_options();
        let cascade = if options.cascade == CascadeRule::ALWAYS {
            ", cascade always".to_string()
        } else {
            String::new()
        };
        let chunk = if options.min_tile_chunk == attention_plan::MIN_TILE_CHUNK {
            String::new()
        } else {
            format!(", tile chunks ≥ {}", options.min_tile_chunk)
        };
        format!(
            "cuda ({}, {}{variants}{tiles}{cascade}{chunk})",
            self.device_name, self.arch
        )
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    fn upload_linear(&self, parts: &[&WeightMatrix]) -> Result<CudaLinear> {
        let fused = fuse_parts(parts)?;
        let fused: Vec<&WeightMatrix> = fused.iter().map(|p| p.as_ref()).collect();
        let stacked = super::stack_parts(&fused, |p| self.upload_part(p))?;
        let input_order = match &stacked.input_order {
            Some(o) => Some(self.upload(o)?),
            None => None,
        };
        Ok(CudaLinear {
            rows: stacked.rows,
            cols: stacked.cols,
            parts: stacked.parts,
            input_order,
        })
    }

    fn upload_vector(&self, v: &[f32]) -> Result<CudaVector> {
        Ok(CudaVector {
            data: self.upload(v)?,
            len: v.len(),
        })
    }

    fn alloc_activations(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            buf: DevBuf::F16(self.zeros(rows * cols)?),
        })
    }

    fn alloc_logits(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            buf: DevBuf::F32(self.zeros(rows * cols)?),
        })
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CudaKv> {
        let n = 2 * shape.n_layers * shape.n_slots() * shape.n_kv_heads * shape.head_dim;
        let mut store = self.zeros::<f16>(n)?;
        let f = self.kernels.get("fill_f16")?;
        let (n_u, nan) = (n, f32::NAN);
        // SAFETY: writes n elements of store.
        unsafe {
            self.stream
                .launch_builder(f)
                .arg(&mut store)
                .arg(&n_u)
                .arg(&nan)
                .launch(grid(n.div_ceil(256), 1, 256))
        }
        .map_err(|e| cuda_err("fill_f16", e))?;
        Ok(CudaKv { shape, store })
    }

    fn upload_step(&self, step: &StepInput) -> Result<CudaStep> {
        let max_blocks = step.block_tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        self.upload_step_with(step, max_blocks)
    }

    fn embed(&self, table: &CudaLinear, step: &CudaStep, out: &mut CudaTensor) -> Result<()> {
        let rows = step.host.rows();
        check("embed", "out", out, rows, table.cols)?;
        if let Some(&t) = step.host.tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(Error::TokenOutOfRange {
                id: t,
                vocab: table.rows,
            });
        }
        let [(_, part)] = table.parts.as_slice() else {
            return Err(shape_err("embed", "the table must be a single part".into()));
        };
        if table.input_order.is_some() {
            return Err(shape_err("embed", "an embedding table has no input order".into()));
        }
        let d = table.cols as i32;
        let o = out.f16_mut("embed")?;
        let cfg = grid(rows, 1, ROW_BLOCK);
        // SAFETY: tokens checked < vocab; writes out[rows, d].
        match part {
            CudaWeight::Int4 {
                kp,
                group,
                qweight,
                scale_min,
                ..
            } => {
                let (kp, g) = (*kp as i32, *group as i32);
                unsafe {
                    self.stream
                        .launch_builder(self.kernels.get("embed_int4_f16")?)
                        .arg(qweight)
                        .arg(scale_min)
                        .arg(&step.tokens)
                        .arg(o)
                        .arg(&d)
                        .arg(&kp)
                        .arg(&g)
                        .launch(cfg)
                }
            }
            CudaWeight::F16 { kp, data, .. } => {
                let kp = *kp as i32;
                unsafe {
                    self.stream
                        .launch_builder(self.kernels.get("embed_f16")?)
                        .arg(data)
                        .arg(&step.tokens)
                        .arg(o)
                        .arg(&d)
                        .arg(&kp)
                        .launch(cfg)
                }
            }
        }
        .map_err(|e| cuda_err("embed", e))?;
        Ok(())
    }

    fn rmsnorm(&self, x: &CudaTensor, w: &CudaVector, eps: f32, out: &mut CudaTensor) -> Result<()> {
        check_norm("rmsnorm", x, w, out)?;
        let (d, null) = (x.cols as i32, 0u64);
        let xs = x.f16("rmsnorm")?;
        let o = out.f16_mut("rmsnorm")?;
        // SAFETY: add = null, so x is only read; writes out[rows, d].
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("rmsnorm_residual_f16")?)
                .arg(xs)
                .arg(&null)
                .arg(&w.data)
                .arg(o)
                .arg(&d)
                .arg(&eps)
                .launch(grid(x.rows, 1, NORM_BLOCK))
        }
        .map_err(|e| cuda_err("rmsnorm", e))?;
        Ok(())
    }

    fn add_rmsnorm(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check("add_rmsnorm", "y", y, x.rows, x.cols)?;
        check_norm("add_rmsnorm", x, w, out)?;
        let (rows, d) = (x.rows, x.cols as i32);
        // SAFETY: shapes checked; x[rows, d] updated in place, writes out[rows, d].
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("rmsnorm_residual_f16")?)
                .arg(x.f16_mut("add_rmsnorm")?)
                .arg(y.f16("add_rmsnorm")?)
                .arg(&w.data)
                .arg(out.f16_mut("add_rmsnorm")?)
                .arg(&d)
                .arg(&eps)
                .launch(grid(rows, 1, NORM_BLOCK))
        }
        .map_err(|e| cuda_err("add_rmsnorm", e))?;
        Ok(())
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) -> Result<()> {
        if x.cols != w.cols {
            return Err(shape_err(
                "matmul",
                format!("x has {} columns, W has {} inputs", x.cols, w.cols),
            ));
        }
        check("matmul", "out", out, x.rows, w.rows)?;
        let gathered;
        let xs = match &w.input_order {
            None => x.f16("matmul")?,
            Some(order) => {
                let mut g = self.zeros::<f16>(x.rows * x.cols)?;
                let k = x.cols as i32;
                // SAFETY: x and g are [rows, k] f16, order [k] u32 < k (checked at upload).
                unsafe {
                    self.stream
                        .launch_builder(self.kernels.get("gather_cols_f16")?)
                        .arg(x.f16("matmul")?)
                        .arg(order)
                        .arg(&mut g)
                        .arg(&k)
                        .launch(grid(x.rows, 1, ROW_BLOCK))
                }
                .map_err(|e| cuda_err("gather_cols", e))?;
                gathered = g;
                &gathered
            }
        };
        for (col0, part) in &w.parts {
            self.matmul_part(xs, x.rows, (*col0, part), w.cols, out)?;
        }
        Ok(())
    }

    fn rope(
        &self,
        qkv: &mut CudaTensor,
        layout: QkvLayout,
        cos: &CudaVector,
        sin: &CudaVector,
        half_split: bool,
        step: &CudaStep,
    ) -> Result<()> {
        check_rope("rope", qkv, layout, cos, sin, step)?;
        let (h, kv, hd, hs) = (
            layout.n_heads as i32,
            layout.n_kv_heads as i32,
            layout.head_dim as i32,
            half_split as i32,
        );
        let rows = qkv.rows;
        // One thread per rotated (head, pair).
        let pairs = (layout.n_heads + layout.n_kv_heads) * (layout.head_dim / 2).max(1);
        let q = qkv.f16_mut("rope")?;
        // SAFETY: positions checked against the tables; rotates Q and K heads in place.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("rope_f16")?)
                .arg(q)
                .arg(&step.positions)
                .arg(&cos.data)
                .arg(&sin.data)
                .arg(&h)
                .arg(&kv)
                .arg(&hd)
                .arg(&hs)
                .launch(grid(rows, pairs.div_ceil(128), 128))
        }
        .map_err(|e| cuda_err("rope", e))?;
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        qkv: &CudaTensor,
        layout: QkvLayout,
        step: &CudaStep,
    ) -> Result<()> {
        check_kv_write("kv_write", kv, layer, qkv, layout, step)?;
        let (h, n_kv, hd) = (layout.n_heads as i32, layout.n_kv_heads as i32, layout.head_dim as i32);
        let (range, plane) = (kv.layer_range(layer), kv.plane());
        let mut layer_kv = kv.store.slice_mut(range);
        let (mut k, mut v) = layer_kv.split_at_mut(plane);
        // SAFETY: slots checked; writes one [n_kv·hd] row of K and V per row.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("kv_write_f16")?)
                .arg(qkv.f16("kv_write")?)
                .arg(&step.slots)
                .arg(&mut k)
                .arg(&mut v)
                .arg(&h)
                .arg(&n_kv)
                .arg(&hd)
                .launch(grid(qkv.rows, 1, 128))
        }
        .map_err(|e| cuda_err("kv_write", e))?;
        Ok(())
    }

    fn rope_kv_write(
        &self,
        qkv: &mut CudaTensor,
        layout: QkvLayout,
        cos: &CudaVector,
        sin: &CudaVector,
        half_split: bool,
        kv: &mut CudaKv,
        layer: usize,
        step: &CudaStep,
    ) -> Result<()> {
        check_rope("rope_kv_write", qkv, layout, cos, sin, step)?;
        check_kv_write("rope_kv_write", kv, layer, qkv, layout, step)?;
        let (h, n_kv, hd, hs) = (
            layout.n_heads as i32,
            layout.n_kv_heads as i32,
            layout.head_dim as i32,
            half_split as i32,
        );
        let rows = qkv.rows;
        // One thread per (head, pair) of every head: Q and K rotated, K and V written.
        let pairs = (layout.n_heads + 2 * layout.n_kv_heads) * (layout.head_dim / 2).max(1);
        let (range, plane) = (kv.layer_range(layer), kv.plane());
        let mut layer_kv = kv.store.slice_mut(range);
        let (mut k, mut v) = layer_kv.split_at_mut(plane);
        // SAFETY: positions checked against the tables and slots against the store; rotates Q
        // and K heads in place and writes one [n_kv·hd] row of K and V per row.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("rope_kv_write_f16")?)
                .arg(qkv.f16_mut("rope_kv_write")?)
                .arg(&step.positions)
                .arg(&step.slots)
                .arg(&cos.data)
                .arg(&sin.data)
                .arg(&mut k)
                .arg(&mut v)
                .arg(&h)
                .arg(&n_kv)
                .arg(&hd)
                .arg(&hs)
                .launch(grid(rows, pairs.div_ceil(128), 128))
        }
        .map_err(|e| cuda_err("rope_kv_write", e))?;
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        kv: &CudaKv,
        layer: usize,
        layout: QkvLayout,
        step: &CudaStep,
        out: &mut CudaTensor,
    ) -> Result<()> {
        check("attention", "qkv", qkv, step.host.rows(), layout.width())?;
        check(
            "attention",
            "out",
            out,
            step.host.rows(),
            layout.n_heads * layout.head_dim,
        )?;
        let s = kv.shape;
        if layer >= s.n_layers || layout.n_kv_heads != s.n_kv_heads || layout.head_dim != s.head_dim {
            return Err(shape_err(
                "attention",
                format!("layer {layer} / {layout:?} vs store {s:?}"),
            ));
        }
        if step.attention_checked.get() != Some(&s) {
            check_attention_tables(&step.host, s)?;
            let _ = step.attention_checked.set(s);
        }
        if s.block_size != 16 {
            return Err(shape_err(
                "attention",
                format!(
                    "the kernels are built for 16-token blocks; the store has {}",
                    s.block_size
                ),
            ));
        }
        let (n_heads, n_kv, hd) = (layout.n_heads, layout.n_kv_heads, layout.head_dim);
        let group = n_heads / n_kv.max(1);
        let mma_tiles = self.mma_attention_tiles();
        let kernel = |op: &str| {
            let name = match op {
                "merge" => format!("attention_merge_hd{hd}_f16"),
                "tile" if mma_tiles => format!("attention_tile_mma_hd{hd}_g{group}_f16"),
                _ => format!("attention_{op}_hd{hd}_g{group}_f16"),
            };
            self.kernels.get(&name).map_err(|_| {
                shape_err(
                    "attention",
                    format!("no kernel for head_dim {hd} and GQA group {group} ({n_heads} heads, {n_kv} KV heads)"),
                )
            })
        };
        let (split, tile, merge) = (kernel("split")?, kernel("tile")?, kernel("merge")?);
        if n_heads % n_kv != 0 {
            return Err(shape_err("attention", format!("{n_heads} heads over {n_kv} KV heads")));
        }
        let dp = self.attention_plan(step, group, n_kv)?;
        let plan = &dp.plan;
        let rows = qkv.rows;
        // Partials [rows, n_heads, n_parts, 2 | hd] f32 (see kernels/attention.cu).
        let np = plan.n_parts;
        // Not zeroed: the merge reads only the parts a kernel wrote (row_parts), and a graph
        // step's partials (sized for its longest context) would cost a large memset per layer.
        let mut part_ml = self.scratch_f32(rows * n_heads * np * 2)?;
        let mut part_o = self.scratch_f32(rows * n_heads * np * hd)?;
        let (k, v) = kv.store.slice(kv.layer_range(layer)).split_at(kv.plane());
        let (n_kv_i, mb, np_i) = (n_kv as i32, step.max_blocks as i32, np as i32);
        let x = qkv.f16("attention")?;
        if !plan.split_rows.is_empty() {
            let chunk = plan.split_chunk as i32;
            let cfg = LaunchConfig {
                grid_dim: (plan.split_rows.len() as u32, n_kv as u32, plan.split_max_chunks as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the plan covers positions inside each row's checked block table and
            // writes parts < n_parts of rows < rows.
            unsafe {
                self.stream
                    .launch_builder(split)
                    .arg(x)
                    .arg(&k)
                    .arg(&v)
                    .arg(&step.block_tables)
                    .arg(&step.row_seq)
                    .arg(&step.positions)
                    .arg(&dp.split_rows)
                    .arg(&dp.split_from)
                    .arg(&dp.split_part0)
                    .arg(&mut part_ml)
                    .arg(&mut part_o)
                    .arg(&n_kv_i)
                    .arg(&mb)
                    .arg(&chunk)
                    .arg(&np_i)
                    .launch(cfg)
            }
            .map_err(|e| cuda_err("attention_split", e))?;
        }
        if !plan.tasks.is_empty() {
            // SAFETY: as above; every task's keys lie inside its sequence's table.
            unsafe {
                self.stream
                    .launch_builder(tile)
                    .arg(x)
                    .arg(&k)
                    .arg(&v)
                    .arg(&step.block_tables)
                    .arg(&step.positions)
                    .arg(&dp.tasks)
                    .arg(&dp.task_rows)
                    .arg(&mut part_ml)
                    .arg(&mut part_o)
                    .arg(&n_kv_i)
                    .arg(&mb)
                    .arg(&np_i)
                    .launch(grid(plan.tasks.len(), n_kv, if mma_tiles { 128 } else { 256 }))
            }
            .map_err(|e| cuda_err("attention_tile", e))?;
        }
        let n_heads_i = n_heads as i32;
        // SAFETY: every row has row_parts[row] ≥ 1 written parts; writes out[rows, n_heads·hd].
        unsafe {
            self.stream
                .launch_builder(merge)
                .arg(&part_ml)
                .arg(&part_o)
                .arg(&dp.row_parts)
                .arg(out.f16_mut("attention")?)
                .arg(&n_heads_i)
                .arg(&np_i)
                .launch(grid(rows, n_heads, hd as u32))
        }
        .map_err(|e| cuda_err("attention_merge", e))?;
        Ok(())
    }

    fn silu_mul(&self, gate_up: &CudaTensor, out: &mut CudaTensor) -> Result<()> {
        if gate_up.cols % 2 != 0 {
            return Err(shape_err("silu_mul", format!("gate_up has odd width {}", gate_up.cols)));
        }
        check("silu_mul", "out", out, gate_up.rows, gate_up.cols / 2)?;
        let f = (out.cols) as i32;
        let rows = out.rows;
        // Blocks per row: each thread computes 8 outputs.
        let chunks = out.cols.div_ceil(8 * ROW_BLOCK as usize);
        // SAFETY: shapes checked.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("silu_mul_f16")?)
                .arg(gate_up.f16("silu_mul")?)
                .arg(out.f16_mut("silu_mul")?)
                .arg(&f)
                .launch(grid(rows, chunks, ROW_BLOCK))
        }
        .map_err(|e| cuda_err("silu_mul", e))?;
        Ok(())
    }

    fn add_bias(&self, x: &mut CudaTensor, bias: &CudaVector) -> Result<()> {
        if bias.len != x.cols {
            return Err(shape_err(
                "add_bias",
                format!("bias of {} for {} columns", bias.len, x.cols),
            ));
        }
        let (rows, n) = (x.rows, x.cols as i32);
        // SAFETY: x [rows, n] f16, bias [n] f32 (checked).
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("add_bias_f16")?)
                .arg(x.f16_mut("add_bias")?)
                .arg(&bias.data)
                .arg(&n)
                .launch(grid(rows, 1, ROW_BLOCK))
        }
        .map_err(|e| cuda_err("add_bias", e))?;
        Ok(())
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        check("add_assign", "y", y, x.rows, x.cols)?;
        let n = x.rows * x.cols;
        let n_i = n as i32;
        // SAFETY: shapes checked.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("add_f16")?)
                .arg(x.f16_mut("add_assign")?)
                .arg(y.f16("add_assign")?)
                .arg(&n_i)
                .launch(grid(n.div_ceil(256), 1, 256))
        }
        .map_err(|e| cuda_err("add_assign", e))?;
        Ok(())
    }

    fn gather_logit_rows(&self, x: &CudaTensor, step: &CudaStep, out: &mut CudaTensor) -> Result<()> {
        let r = step.host.logit_rows.len();
        check("gather_logit_rows", "out", out, r, x.cols)?;
        if let Some(&bad) = step.host.logit_rows.iter().find(|&&i| i as usize >= x.rows) {
            return Err(shape_err("gather_logit_rows", format!("row {bad} of {}", x.rows)));
        }
        let Some(rows) = &step.logit_rows else {
            return Ok(());
        };
        let d = x.cols as i32;
        // SAFETY: rows checked.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("gather_rows_f16")?)
                .arg(x.f16("gather_logit_rows")?)
                .arg(rows)
                .arg(out.f16_mut("gather_logit_rows")?)
                .arg(&d)
                .launch(grid(r, 1, ROW_BLOCK))
        }
        .map_err(|e| cuda_err("gather_logit_rows", e))?;
        Ok(())
    }

    fn copy_blocks(&self, kv: &mut CudaKv, copies: &[(u32, u32)]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let s = kv.shape;
        if let Some(&(a, b)) = copies
            .iter()
            .find(|&&(a, b)| a as usize >= s.n_blocks || b as usize >= s.n_blocks || a == b)
        {
            return Err(shape_err(
                "copy_blocks",
                format!("copy {a} → {b} in a pool of {}", s.n_blocks),
            ));
        }
        let block_elems = s.block_size * s.n_kv_heads * s.head_dim;
        if block_elems % 8 != 0 {
            return Err(shape_err(
                "copy_blocks",
                format!("{block_elems} values per block: need a multiple of 8"),
            ));
        }
        let pairs: Vec<i32> = copies.iter().flat_map(|&(a, b)| [a as i32, b as i32]).collect();
        let pairs = self.upload(&pairs)?;
        let (nb, be) = (s.n_blocks as i32, block_elems as i32);
        // SAFETY: ids checked; every (layer, K/V) plane copies whole blocks.
        unsafe {
            self.stream
                .launch_builder(self.kernels.get("copy_blocks_f16")?)
                .arg(&mut kv.store)
                .arg(&pairs)
                .arg(&nb)
                .arg(&be)
                .launch(grid(copies.len(), 2 * s.n_layers, 256))
        }
        .map_err(|e| cuda_err("copy_blocks", e))?;
        Ok(())
    }

    fn graph_step(&self, input: &StepInput, max_context: usize, layout: QkvLayout) -> Result<Option<CudaStep>> {
        self.new_graph_step(input, max_context, layout).map(Some)
    }

    fn refill_step(&self, step: &mut CudaStep, input: &StepInput) -> Result<bool> {
        self.refill_graph_step(step, input)
    }

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        self.capture_graph(f).map(Some)
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        graph.launch().map_err(|e| cuda_err("graph launch", e))
    }

    fn draws_on_device(&self) -> bool {
        true
    }

    fn draw_rows(&self, logits: &CudaTensor, draws: &[RowDraw]) -> Result<Option<Vec<Sampled>>> {
        let rows: Vec<sampling::RowSampling> = draws
            .iter()
            .map(|d| sampling::RowSampling {
                params: d.params,
                uniform: d.uniform,
                candidates: &[],
            })
            .collect();
        let drawn = self.sample_rows(logits, &rows)?;
        Ok(Some(
            drawn
                .into_iter()
                .map(|d| Sampled {
                    token: d.token,
                    logprob: d.logprob,
                    top: d.top,
                })
                .collect(),
        ))
    }

    fn profile_region(&self, on: bool) -> Result<()> {
        // The profiler API acts on the calling thread's current context.
        self.ctx.bind_to_thread().map_err(|e| cuda_err("profiler", e))?;
        match on {
            true => cudarc::driver::profiler_start(),
            false => cudarc::driver::profiler_stop(),
        }
        .map_err(|e| cuda_err("profiler", e))
    }

    fn to_host(&self, x: &CudaTensor, out: &mut Vec<f32>) -> Result<()> {
        let n = x.rows * x.cols;
        out.clear();
        match &x.buf {
            DevBuf::F16(b) => {
                let v = self.stream.clone_dtoh(b).map_err(|e| cuda_err("to_host", e))?;
                out.extend(v[..n].iter().map(|h| h.to_f32()));
            }
            DevBuf::F32(b) => {
                // Straight into `out` (logits: 16 rows of a 128k vocabulary are 8 MB, which a
                // temporary would allocate and copy once more).
                out.resize(n, 0.0);
                self.stream
                    .memcpy_dtoh(&b.slice(..n), out.as_mut_slice())
                    .map_err(|e| cuda_err("to_host", e))?;
            }
        }
        Ok(())
    }
}

// The context must outlive every buffer: they hold their own `Arc`s to it, and `ctx` is kept
// here so the backend's device stays current for the thread that uses it.
impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.ctx.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int4(rows: usize, cols: usize, group: usize, seed: usize) -> WeightMatrix {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        WeightMatrix::Int4(Int4Matrix::quantize_rtn(rows, cols, group, &values).unwrap())
    }

    fn dequant(w: &WeightMatrix) -> Vec<f32> {
        let mut all = vec![0f32; w.rows() * w.cols()];
        for (r, row) in all.chunks_mut(w.cols()).enumerate() {
            w.dequant_row(r, row);
        }
        all
    }

    /// Q|K|V-like parts of one format merge into one matrix with the same rows; a part after
    /// one whose rows are not a multiple of 16, or of another group size, starts a new run.
    #[test]
    fn fuse_parts_merges_runs_that_one_launch_can_serve() {
        let (q, k, v) = (int4(32, 128, 64, 1), int4(16, 128, 64, 2), int4(5, 128, 64, 3));
        let fused = fuse_parts(&[&q, &k, &v]).unwrap();
        assert_eq!(fused.len(), 1);
        assert_eq!(fused[0].rows(), 53);
        let want: Vec<f32> = [dequant(&q), dequant(&k), dequant(&v)].concat();
        assert_eq!(dequant(&fused[0]), want);

        let (odd, other_group) = (int4(5, 128, 64, 4), int4(16, 128, 32, 5));
        let parts = fuse_parts(&[&odd, &q, &other_group, &k]).unwrap();
        let rows: Vec<usize> = parts.iter().map(|p| p.rows()).collect();
        assert_eq!(rows, [5, 32, 16, 16]);
        assert!(parts.iter().all(|p| matches!(p, std::borrow::Cow::Borrowed(_))));
    }

    /// Split-K fills one wave for a small matrix and avoids a nearly empty second wave.
    #[test]
    fn matmul_splits_trade_waves_against_per_split_cost() {
        // 4096 × 4096 at M = 1 on 132 SMs × 3 blocks: 64 blocks over 16 granules.
        assert_eq!(matmul_splits(64, 16, 396, 1 << 20), 6);
        // 28672 × 4096: 448 blocks; one split would leave a second wave of 52 blocks.
        assert_eq!(matmul_splits(448, 16, 396, 1 << 20), 2);
        // The partial-traffic cap wins.
        assert_eq!(matmul_splits(64, 16, 396, 2), 2);
        assert_eq!(matmul_splits(1, 1, 396, 8), 1);
    }
}
