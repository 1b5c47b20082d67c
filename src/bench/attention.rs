//! `qmtot bench kernels`, attention part: decode attention over long contexts, and cascade
//! (shared-prefix) against plain attention for sibling groups, at LLaMA-3.1-8B's attention
//! shape (32 query heads, 8 KV heads, head_dim 128) on one layer's paged K/V store.
//!
//! Method as for the matmul ([`super::kernels`]): the device's clock, warm-up calls, then
//! `reps` back-to-back calls per round, median per-call time of the rounds; K/V and queries
//! random (f16-rounded on CUDA). Decode GB/s counts the K/V
//! bytes a row must read (f16 on CUDA, f32 on the CPU); the store's blocks are scattered
//! through the pool as a long-running engine leaves them.

use crate::backend::{Backend, KvShape, QkvLayout, SharedPrefix, StepInput};
use crate::error::Result;

use super::kernels::{random_values, KernelBenchDevice};

/// LLaMA-3.1-8B's attention.
pub const LLAMA3_8B_ATTENTION: QkvLayout = QkvLayout {
    n_heads: 32,
    n_kv_heads: 8,
    head_dim: 128,
};

const BLOCK: usize = 16;

#[derive(Clone, Debug)]
pub struct DecodeRow {
    pub batch: usize,
    pub context: usize,
    pub seconds: f64,
    /// K/V bytes read per second (each row reads its whole context).
    pub kv_gbps: f64,
}

#[derive(Clone, Debug)]
pub struct CascadeRow {
    pub siblings: usize,
    pub prefix: usize,
    pub plain_seconds: f64,
    pub cascade_seconds: f64,
}

/// One attention layer set up on `b`: a K/V store written for `seqs` (block tables; a block
/// listed by several sequences is written once), and a step of one decode row per sequence
/// at `positions`.
struct Setup<B: Backend> {
    kv: B::KvStore,
    qkv: B::Activations,
    out: B::Activations,
}

/// Writes random K/V into every slot the tables cover (in steps of at most 4096 rows).
fn setup<B: KernelBenchDevice>(
    b: &B,
    layout: QkvLayout,
    tables: &[Vec<u32>],
    n_blocks: usize,
    rows: usize,
) -> Result<Setup<B>> {
    let shape = KvShape {
        n_layers: 1,
        n_blocks,
        block_size: BLOCK,
        n_kv_heads: layout.n_kv_heads,
        head_dim: layout.head_dim,
    };
    let mut kv = b.alloc_kv(shape)?;
    let mut blocks: Vec<u32> = tables.iter().flatten().copied().collect();
    blocks.sort_unstable();
    blocks.dedup();
    let slots: Vec<u32> = blocks
        .iter()
        .flat_map(|&blk| (0..BLOCK as u32).map(move |o| blk * BLOCK as u32 + o))
        .collect();
    // One block of random K/V rows, written again for every chunk of slots: generating fresh
    // values for a 16 × 32k-token store would take the host longer than the benchmark.
    const FILL: usize = 4096;
    let x = b.activations(FILL, layout.width(), &random_values(FILL * layout.width(), 50))?;
    for chunk in slots.chunks(FILL) {
        // A fill step: one row per slot, positions 0.. of a one-sequence table listing the
        // chunk's blocks (kv_write reads only slots, positions feed nothing here).
        let table: Vec<u32> = chunk.iter().step_by(BLOCK).map(|s| s / BLOCK as u32).collect();
        let fill = StepInput {
            tokens: vec![0; chunk.len()],
            positions: (0..chunk.len() as u32).collect(),
            slots: chunk.to_vec(),
            row_seq: vec![0; chunk.len()],
            block_tables: vec![table],
            ..Default::default()
        };
        let step = b.upload_step(&fill)?;
        if chunk.len() == FILL {
            b.kv_write(&mut kv, 0, &x, layout, &step)?;
        } else {
            let rows = chunk.len();
            let tail = b.activations(rows, layout.width(), &random_values(rows * layout.width(), 51))?;
            b.kv_write(&mut kv, 0, &tail, layout, &step)?;
        }
    }
    Ok(Setup {
        kv,
        qkv: b.activations(rows, layout.width(), &random_values(rows * layout.width(), 9))?,
        out: b.alloc_activations(rows, layout.n_heads * layout.head_dim)?,
    })
}

/// Decode step of one row per table, row `i` at position `positions[i]`.
fn decode_step(tables: Vec<Vec<u32>>, positions: &[usize], groups: Vec<SharedPrefix>) -> StepInput {
    let n = positions.len();
    StepInput {
        tokens: vec![0; n],
        positions: positions.iter().map(|&p| p as u32).collect(),
        slots: positions
            .iter()
            .zip(&tables)
            .map(|(&p, t)| t[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect(),
        row_seq: (0..n as u32).collect(),
        block_tables: tables,
        logit_rows: Vec::new(),
        groups,
    }
}

/// Median seconds of `reps` attention calls on `step` (after 3 warm-up calls).
fn time_attention<B: KernelBenchDevice>(
    b: &B,
    s: &mut Setup<B>,
    layout: QkvLayout,
    step: &StepInput,
    reps: usize,
) -> Result<f64> {
    let st = b.upload_step(step)?;
    b.per_call_time(3, reps, super::kernels::BENCH_ROUNDS, &mut || {
        b.attention(&s.qkv, &s.kv, 0, layout, &st, &mut s.out)
    })
}

/// Pool block `i` of `n`, scattered (a fixed odd stride through the pool).
fn scattered(i: usize, n: usize) -> u32 {
    ((i * 7919 + 13) % n) as u32
}

/// Decode attention: `batch` rows, each over its own `context` keys.
pub fn decode<B: KernelBenchDevice>(
    b: &B,
    layout: QkvLayout,
    batch: usize,
    context: usize,
    reps: usize,
) -> Result<DecodeRow> {
    let per_seq = context.div_ceil(BLOCK);
    let n_blocks = (batch * per_seq).max(1);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| (0..per_seq).map(|i| scattered(s * per_seq + i, n_blocks)).collect())
        .collect();
    let mut s = setup(b, layout, &tables, n_blocks, batch)?;
    let step = decode_step(tables, &vec![context - 1; batch], Vec::new());
    let seconds = time_attention(b, &mut s, layout, &step, reps)?;
    let elem = b.kv_element_bytes();
    let bytes = (batch * context * 2 * layout.n_kv_heads * layout.head_dim * elem) as f64;
    Ok(DecodeRow {
        batch,
        context,
        seconds,
        kv_gbps: bytes / seconds / 1e9,
    })
}

/// `siblings` decode rows that share a `prefix`-token prefix (whole blocks) and each have one
/// block of their own (16 generated tokens), with the sharing group (cascade) and without it.
pub fn cascade<B: KernelBenchDevice>(
    b: &B,
    layout: QkvLayout,
    siblings: usize,
    prefix: usize,
    reps: usize,
) -> Result<CascadeRow> {
    let shared = prefix.div_ceil(BLOCK);
    let n_blocks = shared + siblings;
    let lead: Vec<u32> = (0..shared).map(|i| scattered(i, n_blocks)).collect();
    let tables: Vec<Vec<u32>> = (0..siblings)
        .map(|k| {
            let mut t = lead.clone();
            t.push(scattered(shared + k, n_blocks));
            t
        })
        .collect();
    let mut s = setup(b, layout, &tables, n_blocks, siblings)?;
    let positions = vec![shared * BLOCK + BLOCK - 1; siblings];
    let group = SharedPrefix {
        seqs: (0..siblings as u32).collect(),
        blocks: shared as u32,
    };
    let plain = decode_step(tables.clone(), &positions, Vec::new());
    let grouped = decode_step(tables, &positions, vec![group]);
    Ok(CascadeRow {
        siblings,
        prefix: shared * BLOCK,
        plain_seconds: time_attention(b, &mut s, layout, &plain, reps)?,
        cascade_seconds: time_attention(b, &mut s, layout, &grouped, reps)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn the_attention_benchmarks_run_on_the_cpu() {
        let b = CpuBackend::new(1).unwrap();
        let layout = QkvLayout {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
        };
        let d = decode(&b, layout, 2, 100, 2).unwrap();
        assert!(d.seconds > 0.0 && d.kv_gbps.is_finite() && d.kv_gbps > 0.0);
        let c = cascade(&b, layout, 3, 40, 2).unwrap();
        assert_eq!(c.prefix, 48);
        assert!(c.plain_seconds > 0.0 && c.cascade_seconds > 0.0);
    }
}
