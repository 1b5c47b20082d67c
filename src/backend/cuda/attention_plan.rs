//! Host plan of one step's attention on the CUDA backend: which kernel covers which keys of
//! which rows, and where each leaves its partial result (`kernels/attention.cu`).
//!
//! Row `r` (sequence `s`, position `p`) attends keys `0..=p`. The plan cuts them so that every
//! key of every row is covered by exactly one part, and `row_parts[r]` counts the row's parts:
//!
//! * **shared prefix** (cascade): for a sharing group ([`crate::backend::SharedPrefix`]) that
//!   the tile kernel's measured crossover ([`CascadeRule`]) admits, keys `0..P` of all the
//!   members' rows are `attention_tile` tasks — tiles of at most 64 (row, query head)
//!   queries × chunks of the prefix — so each prefix key is read once per tile instead of
//!   once per row. These are parts `0..` of every member row. Other groups are read as plain
//!   attention.
//! * **own keys** `from..=p` (`from` = the cascaded prefix length, else 0):
//!   * a sequence with one row in the step (a decode row) is an `attention_split` row, its keys
//!     cut into chunks of `split_chunk` (flash-decoding);
//!   * a sequence with several rows (a prefill chunk) is cut into tiles of consecutive rows,
//!     each an `attention_tile` task over keys `from..=max position of the tile`, with the
//!     causal mask per row, chunked like a prefix when the range is long.
//!
//! Chunk lengths follow from the step's shapes and the device's multiprocessor count only (so
//! a result never depends on timing), aiming at [`CTAS_PER_SM`] CTAs per multiprocessor.
//! Pure host code: its unit tests run the plan through an f32 model of the kernels and
//! compare with direct attention, without a GPU.

use crate::backend::StepInput;

/// Queries ((row, query head) pairs) per `attention_tile` task (`ATT_QUERIES`).
pub const TILE_QUERIES: usize = 64;
/// When a sharing group is read by cascade rather than as plain attention: its prefix has at
/// least `min_prefix` tokens, its rows hold at least `min_queries` (row, query head) queries
/// (or fill a tile's rows, when the GQA group does not divide [`TILE_QUERIES`]), and cascade saves at least `min_saved_keys` key reads (prefix × (rows − 1)). Below that
/// the saving does not pay for a tile's unused queries, the extra partials and the launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CascadeRule {
    pub min_prefix: usize,
    pub min_queries: usize,
    pub min_saved_keys: usize,
}

impl CascadeRule {
    /// Crossover of the SIMT tile kernel `attention_tile`, measured (`qmtot bench kernels
    /// --parts cascade`, H200, 2026-11-26, run 8c; one layer at LLaMA-3.1-8B heads), as
    /// cascade time / plain time speed-ups: 4 siblings (a quarter tile) lose at every prefix
    /// (0.69× over 2048 tokens, 0.63× over 32k); 16 siblings over 512 tokens 0.70× (7680 keys
    /// saved), over 2048 1.41× (30720); 64 over 128 1.00×, over 512 1.16× (32256), over 2048
    /// 1.44×.
    pub const SIMT_TILES: Self = Self {
        min_prefix: 512,
        min_queries: TILE_QUERIES,
        min_saved_keys: 30720,
    };
    /// Crossover of the tensor-core tile kernel `attention_tile_mma` (the default), measured
    /// the same way with every group cascaded (`QMTOT_CASCADE=always`; H100, 2026-11-26, run
    /// 10, two runs): 4 siblings over 128 tokens 0.59–0.71× (384 keys saved), over 512 0.70×
    /// (1536), over 2048 1.10× (6144), over 8192 1.98×; 16 siblings over 128 0.74–0.76×
    /// (1920), over 512 1.22× (7680), over 2048 2.54×; 64 over 128 1.16× (8064), over 512
    /// 2.04×. So a quarter tile of queries pays once enough keys are saved.
    pub const MMA_TILES: Self = Self {
        min_prefix: 128,
        min_queries: 1,
        min_saved_keys: 6144,
    };
    /// Every group of two or more rows (measuring: `QMTOT_CASCADE=always`).
    pub const ALWAYS: Self = Self {
        min_prefix: 1,
        min_queries: 1,
        min_saved_keys: 1,
    };

    fn admits(&self, prefix: usize, rows: usize, gqa: usize) -> bool {
        rows >= 2
            && prefix >= self.min_prefix
            && rows * gqa >= self.min_queries.min(TILE_QUERIES / gqa.max(1) * gqa)
            && prefix * (rows - 1) >= self.min_saved_keys
    }
}

/// CTAs per multiprocessor the chunking aims at.
pub const CTAS_PER_SM: usize = 2;
/// Bounds of a key chunk (multiples of the 32 keys a tile step stages).
const MIN_CHUNK: usize = 64;
const MAX_CHUNK: usize = 1024;
/// The shortest key chunk of a tile task by default (`QMTOT_TILE_CHUNK` overrides it, for
/// measuring). Measured with every group cascaded (`qmtot bench kernels --parts cascade`,
/// H100, 2026-11-26, run 10, `attention_tile_mma`): longer chunks mean fewer partials for the
/// merge but fewer CTAs, and the tile kernel is latency-bound, so fewer CTAs lose. 16 siblings
/// over 2048 tokens took 27.8 µs at 64, 26.4 at 128, 32.6 at 256 and 49.2 at 512; over 512
/// tokens 20.4, 23.8, 31.9 and 48.2; 4 siblings over 2048 tokens 23.1, 24.5, 31.2 and 47.4.
pub const MIN_TILE_CHUNK: usize = MIN_CHUNK;

/// What [`plan`] is tuned by, besides the step's shapes and the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Which sharing groups are read by cascade.
    pub cascade: CascadeRule,
    /// The shortest key chunk of a tile task (prefill tiles, cascade prefixes).
    pub min_tile_chunk: usize,
}

/// One `attention_tile` task: rows `task_rows[rows.0 .. rows.0 + rows.1]`, keys
/// `keys.0 .. keys.1` through block table `seq`, written to part `part` of every row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileTask {
    pub rows_offset: u32,
    pub n_rows: u32,
    pub seq: u32,
    pub key_start: u32,
    pub key_end: u32,
    pub part: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttentionPlan {
    /// `attention_split` rows: row, first own key, first part.
    pub split_rows: Vec<u32>,
    pub split_from: Vec<u32>,
    pub split_part0: Vec<u32>,
    /// Keys per split chunk, and the most chunks of any split row (the grid's z).
    pub split_chunk: usize,
    pub split_max_chunks: usize,
    pub tasks: Vec<TileTask>,
    pub task_rows: Vec<u32>,
    /// `[rows]` parts of each row; `n_parts` = their max (the partial buffers' stride).
    pub row_parts: Vec<u32>,
    pub n_parts: usize,
}

/// Chunk length that spreads `keys` keys (per KV head) over about `target` CTAs, at least
/// `min` (clamped to the chunk bounds).
fn chunk_for(keys: usize, n_kv_heads: usize, target: usize, min: usize) -> usize {
    (keys * n_kv_heads)
        .div_ceil(target.max(1))
        .next_multiple_of(32)
        .clamp(min.clamp(MIN_CHUNK, MAX_CHUNK), MAX_CHUNK)
}

/// What a plan is made for besides the step: the attention shape (GQA group `gqa` = n_heads /
/// n_kv_heads), the KV block size, the device's multiprocessors and the tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanContext {
    pub gqa: usize,
    pub n_kv_heads: usize,
    pub block_size: usize,
    pub n_sms: usize,
    pub options: PlanOptions,
}

impl PlanContext {
    /// CTAs a launch aims at.
    fn target(&self) -> usize {
        CTAS_PER_SM * self.n_sms.max(1)
    }

    /// Rows per attention tile: [`TILE_QUERIES`] (row, query head) queries.
    fn rows_per_tile(&self) -> usize {
        (TILE_QUERIES / self.gqa.max(1)).max(1)
    }
}

/// Each sequence's rows of `step`, in position order.
fn rows_by_sequence(step: &StepInput) -> Vec<Vec<u32>> {
    let mut seq_rows: Vec<Vec<u32>> = vec![Vec::new(); step.block_tables.len()];
    for r in 0..step.rows() {
        seq_rows[step.row_seq[r] as usize].push(r as u32);
    }
    for rs in &mut seq_rows {
        rs.sort_by_key(|&r| step.positions[r as usize]);
    }
    seq_rows
}

/// The cascaded shared prefixes of `step` into `p`: for each sharing group the rule admits,
/// tile tasks over its prefix for all its members' rows (parts `0..` of every member row).
/// Returns each sequence's first own key (its cascaded prefix length, else 0).
fn plan_prefixes(p: &mut AttentionPlan, step: &StepInput, seq_rows: &[Vec<u32>], ctx: &PlanContext) -> Vec<usize> {
    let mut from = vec![0usize; seq_rows.len()];
    for g in &step.groups {
        let prefix = g.blocks as usize * ctx.block_size;
        let members: Vec<u32> = g
            .seqs
            .iter()
            .flat_map(|&s| seq_rows[s as usize].iter().copied())
            .collect();
        if !ctx.options.cascade.admits(prefix, members.len(), ctx.gqa) {
            continue;
        }
        for &s in &g.seqs {
            from[s as usize] = prefix;
        }
        let tiles: Vec<&[u32]> = members.chunks(ctx.rows_per_tile()).collect();
        let chunk = chunk_for(
            prefix * tiles.len(),
            ctx.n_kv_heads,
            ctx.target(),
            ctx.options.min_tile_chunk,
        );
        // Any member's table reads the prefix (the group invariant).
        p.add_tasks(&tiles, g.seqs[0], 0, prefix, chunk);
    }
    from
}

/// Plans `step` (validated: rows' positions inside their tables, groups per
/// [`StepInput::validate_groups`]).
pub fn plan(step: &StepInput, ctx: &PlanContext) -> AttentionPlan {
    let (n_kv_heads, target, rows_per_tile) = (ctx.n_kv_heads, ctx.target(), ctx.rows_per_tile());
    let seq_rows = rows_by_sequence(step);
    let mut p = AttentionPlan {
        row_parts: vec![0; step.rows()],
        ..Default::default()
    };
    let from = plan_prefixes(&mut p, step, &seq_rows, ctx);

    // Own keys: split rows and prefill tiles. The split chunk is one length for the launch.
    let split_keys: usize = seq_rows
        .iter()
        .enumerate()
        .filter(|(_, rs)| rs.len() == 1)
        .map(|(s, rs)| step.positions[rs[0] as usize] as usize + 1 - from[s])
        .sum();
    p.split_chunk = chunk_for(split_keys, n_kv_heads, target, MIN_CHUNK);
    for (s, rs) in seq_rows.iter().enumerate() {
        match rs.as_slice() {
            [] => {}
            &[r] => {
                let keys = step.positions[r as usize] as usize + 1 - from[s];
                let chunks = keys.div_ceil(p.split_chunk);
                p.split_rows.push(r);
                p.split_from.push(from[s] as u32);
                p.split_part0.push(p.row_parts[r as usize]);
                p.row_parts[r as usize] += chunks as u32;
                p.split_max_chunks = p.split_max_chunks.max(chunks);
            }
            rs => {
                // One chunk length for the sequence's tiles, from the keys they read in all.
                let last = |tile: &[u32]| step.positions[*tile.last().expect("tiles are non-empty") as usize] as usize;
                let keys: usize = rs.chunks(rows_per_tile).map(|t| last(t) + 1 - from[s]).sum();
                let chunk = chunk_for(keys, n_kv_heads, target, ctx.options.min_tile_chunk);
                for tile in rs.chunks(rows_per_tile) {
                    p.add_tasks(&[tile], s as u32, from[s], last(tile) + 1, chunk);
                }
            }
        }
    }
    p.n_parts = p.row_parts.iter().copied().max().unwrap_or(0) as usize;
    p
}

/// The plan of a captured decode step (CUDA graphs; one row per sequence): the cascaded
/// prefixes as [`plan`] makes them, then every row an `attention_split` row over its own keys
/// in chunks of `chunk`, the grid sized for `max_chunks` and the partials for as many parts
/// after the longest cascaded prefix's. For the same rows and the same sharing groups (member
/// counts and prefix lengths) the [`LaunchShape`] is the same from step to step, so a graph
/// keeps its launch shapes and kernel arguments and only the plan's arrays are refilled.
/// Own keys must number at most `chunk·max_chunks`.
pub fn graph_plan(step: &StepInput, ctx: &PlanContext, chunk: usize, max_chunks: usize) -> AttentionPlan {
    let rows = step.rows();
    let seq_rows = rows_by_sequence(step);
    let mut p = AttentionPlan {
        row_parts: vec![0; rows],
        ..Default::default()
    };
    let from = plan_prefixes(&mut p, step, &seq_rows, ctx);
    let prefix_parts = p.row_parts.iter().copied().max().unwrap_or(0) as usize;
    p.split_chunk = chunk;
    p.split_max_chunks = max_chunks;
    for r in 0..rows {
        let s = step.row_seq[r] as usize;
        let own = step.positions[r] as usize + 1 - from[s];
        debug_assert!(own.div_ceil(chunk) <= max_chunks);
        p.split_rows.push(r as u32);
        p.split_from.push(from[s] as u32);
        p.split_part0.push(p.row_parts[r]);
        p.row_parts[r] += own.div_ceil(chunk) as u32;
    }
    p.n_parts = prefix_parts + max_chunks;
    p
}

/// What a launch of a plan's kernels fixes: grids, scalar arguments and the sizes of the
/// plan's device arrays. Plans with the same shape can replay one captured graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub split_rows: usize,
    pub split_chunk: usize,
    pub split_max_chunks: usize,
    pub tasks: usize,
    pub task_rows: usize,
    pub n_parts: usize,
}

impl AttentionPlan {
    pub fn launch_shape(&self) -> LaunchShape {
        LaunchShape {
            split_rows: self.split_rows.len(),
            split_chunk: self.split_chunk,
            split_max_chunks: self.split_max_chunks,
            tasks: self.tasks.len(),
            task_rows: self.task_rows.len(),
            n_parts: self.n_parts,
        }
    }

    /// Tasks for each tile of `tiles` × each `chunk` of keys `start..end` of table `seq`. Every
    /// row of a tile has the same part count so far (they share a sequence, or a group whose
    /// prefix parts come first), so chunk `c` is part `count + c` for all of them.
    fn add_tasks(&mut self, tiles: &[&[u32]], seq: u32, start: usize, end: usize, chunk: usize) {
        for tile in tiles {
            let rows_offset = self.task_rows.len() as u32;
            self.task_rows.extend_from_slice(tile);
            let part0 = self.row_parts[tile[0] as usize];
            let mut n = 0;
            for key_start in (start..end).step_by(chunk) {
                self.tasks.push(TileTask {
                    rows_offset,
                    n_rows: tile.len() as u32,
                    seq,
                    key_start: key_start as u32,
                    key_end: (key_start + chunk).min(end) as u32,
                    part: part0 + n,
                });
                n += 1;
            }
            for &r in tile.iter() {
                debug_assert_eq!(self.row_parts[r as usize], part0);
                self.row_parts[r as usize] += n;
            }
        }
    }

    /// The tasks as the kernel reads them: `[n_tasks, 6]` i32.
    pub fn task_words(&self) -> Vec<i32> {
        self.tasks
            .iter()
            .flat_map(|t| [t.rows_offset, t.n_rows, t.seq, t.key_start, t.key_end, t.part].map(|x| x as i32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SharedPrefix;

    /// A model of the three kernels in f32 over dense per-sequence K/V (`kv[s][p]` = (k, v),
    /// one KV head, `gqa` query heads): every part's (m, l, o) as the kernels define it, then
    /// the merge. Returns `[rows][gqa][hd]`.
    fn run_plan(
        plan: &AttentionPlan,
        step: &StepInput,
        q: &[Vec<Vec<f32>>],
        kv: &[Vec<(Vec<f32>, Vec<f32>)>],
        gqa: usize,
        hd: usize,
    ) -> Vec<Vec<Vec<f32>>> {
        let np = plan.n_parts;
        let rows = step.rows();
        // parts[r][g][part] = Some((m, l, o)) once written.
        let mut parts = vec![vec![vec![None::<(f32, f32, Vec<f32>)>; np]; gqa]; rows];
        let scale = 1.0 / (hd as f32).sqrt();
        let mut partial = |r: usize, g: usize, seq: usize, keys: std::ops::Range<usize>, part: usize| {
            let pos = step.positions[r] as usize;
            let scores: Vec<(f32, usize)> = keys
                .filter(|&k| k <= pos)
                .map(|k| {
                    (
                        q[r][g].iter().zip(&kv[seq][k].0).map(|(a, b)| a * b).sum::<f32>() * scale,
                        k,
                    )
                })
                .collect();
            let m = scores.iter().map(|s| s.0).fold(f32::NEG_INFINITY, f32::max);
            let (mut l, mut o) = (0.0, vec![0.0; hd]);
            for &(s, k) in &scores {
                let w = (s - m).exp();
                l += w;
                for (o, v) in o.iter_mut().zip(&kv[seq][k].1) {
                    *o += w * v;
                }
            }
            let slot = &mut parts[r][g][part];
            assert!(slot.is_none(), "row {r} head {g}: part {part} written twice");
            *slot = Some((m, l, o));
        };
        for i in 0..plan.split_rows.len() {
            let r = plan.split_rows[i] as usize;
            let (seq, pos) = (step.row_seq[r] as usize, step.positions[r] as usize);
            for c in 0..plan.split_max_chunks {
                let start = plan.split_from[i] as usize + c * plan.split_chunk;
                if start > pos {
                    continue; // the kernel returns before writing
                }
                let end = (start + plan.split_chunk).min(pos + 1);
                for g in 0..gqa {
                    partial(r, g, seq, start..end, plan.split_part0[i] as usize + c);
                }
            }
        }
        for t in &plan.tasks {
            assert!(
                t.n_rows as usize * gqa <= TILE_QUERIES && t.key_start < t.key_end,
                "{t:?}"
            );
            let tile = &plan.task_rows[t.rows_offset as usize..(t.rows_offset + t.n_rows) as usize];
            for &r in tile {
                for g in 0..gqa {
                    partial(
                        r as usize,
                        g,
                        t.seq as usize,
                        t.key_start as usize..t.key_end as usize,
                        t.part as usize,
                    );
                }
            }
        }
        (0..rows)
            .map(|r| {
                (0..gqa)
                    .map(|g| {
                        let own = &parts[r][g][..plan.row_parts[r] as usize];
                        let own: Vec<&(f32, f32, Vec<f32>)> = own
                            .iter()
                            .map(|p| p.as_ref().expect("a counted part is written"))
                            .collect();
                        let mx = own.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
                        let (mut num, mut den) = (vec![0.0; hd], 0.0);
                        for (m, l, o) in own.iter().map(|p| (p.0, p.1, &p.2)) {
                            if m == f32::NEG_INFINITY {
                                continue;
                            }
                            let c = (m - mx).exp();
                            den += c * l;
                            for (n, o) in num.iter_mut().zip(o) {
                                *n += c * o;
                            }
                        }
                        num.iter().map(|n| n / den).collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Deterministic values in (-1, 1).
    fn val(a: usize, b: usize, c: usize) -> f32 {
        let h = (a as u64 * 0x9E37_79B9 + b as u64 * 0x85EB_CA6B + c as u64 * 0xC2B2_AE35) % 2001;
        h as f32 / 1000.0 - 1.0
    }

    /// Builds a step: `seqs[s] = (rows' positions)`, tables over the sequences' own blocks
    /// except that group members share their first `blocks` blocks.
    fn step_for(seqs: &[Vec<u32>], groups: &[(Vec<u32>, u32)], bs: usize) -> StepInput {
        let mut step = StepInput::default();
        let mut next_block = 0u32;
        let mut tables: Vec<Vec<u32>> = Vec::new();
        for rows in seqs {
            let len = *rows.iter().max().unwrap() as usize + 1;
            tables.push((0..len.div_ceil(bs) as u32).map(|i| next_block + i).collect());
            next_block += len.div_ceil(bs) as u32;
        }
        for (members, blocks) in groups {
            let lead = tables[members[0] as usize].clone();
            for &s in &members[1..] {
                tables[s as usize][..*blocks as usize].copy_from_slice(&lead[..*blocks as usize]);
            }
            step.groups.push(SharedPrefix {
                seqs: members.clone(),
                blocks: *blocks,
            });
        }
        for (s, rows) in seqs.iter().enumerate() {
            for &p in rows {
                step.tokens.push(0);
                step.positions.push(p);
                step.row_seq.push(s as u32);
                step.slots.push(tables[s][p as usize / bs] * bs as u32 + p % bs as u32);
            }
        }
        step.block_tables = tables;
        step
    }

    /// K/V per sequence as its own table sees them (shared blocks hold the group lead's) and
    /// queries per row, deterministic.
    #[allow(clippy::type_complexity)]
    fn plan_inputs(
        step: &StepInput,
        gqa: usize,
        hd: usize,
    ) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<(Vec<f32>, Vec<f32>)>>, usize) {
        let bs = 16;
        let block_kv = |b: u32, off: usize| -> (Vec<f32>, Vec<f32>) {
            let k = (0..hd).map(|d| val(b as usize, off, d)).collect();
            let v = (0..hd).map(|d| val(b as usize + 7, off + 3, d)).collect();
            (k, v)
        };
        let kv = step
            .block_tables
            .iter()
            .map(|t| (0..t.len() * bs).map(|p| block_kv(t[p / bs], p % bs)).collect())
            .collect();
        let q = (0..step.rows())
            .map(|r| {
                (0..gqa)
                    .map(|g| (0..hd).map(|d| 2.0 * val(r + 11, g, d)).collect())
                    .collect()
            })
            .collect();
        (q, kv, hd)
    }

    /// `got` equals direct softmax attention of each row over `0..=pos`.
    fn assert_matches_direct(
        step: &StepInput,
        q: &[Vec<Vec<f32>>],
        kv: &[Vec<(Vec<f32>, Vec<f32>)>],
        got: &[Vec<Vec<f32>>],
        gqa: usize,
        hd: usize,
    ) {
        for r in 0..step.rows() {
            let (seq, pos) = (step.row_seq[r] as usize, step.positions[r] as usize);
            for g in 0..gqa {
                let s: Vec<f32> = (0..=pos)
                    .map(|k| q[r][g].iter().zip(&kv[seq][k].0).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt())
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let w: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f32 = w.iter().sum();
                for (d, &have) in got[r][g].iter().enumerate() {
                    let want: f32 = (0..=pos).map(|k| w[k] * kv[seq][k].1[d]).sum::<f32>() / l;
                    // f32 sums of ≤ 3000 terms in another order: ≪ 1e-5 on values ≤ 1.
                    assert!((have - want).abs() < 1e-5, "row {r} head {g} dim {d}: {have} vs {want}");
                }
            }
        }
    }

    /// KV heads 2, 16-token blocks, the default tile chunks.
    fn context(rule: &CascadeRule, gqa: usize, n_sms: usize) -> PlanContext {
        PlanContext {
            gqa,
            n_kv_heads: 2,
            block_size: 16,
            n_sms,
            options: PlanOptions {
                cascade: *rule,
                min_tile_chunk: MIN_TILE_CHUNK,
            },
        }
    }

    fn check(seqs: &[Vec<u32>], groups: &[(Vec<u32>, u32)], gqa: usize, n_sms: usize) -> AttentionPlan {
        check_with(&CascadeRule::SIMT_TILES, seqs, groups, gqa, n_sms)
    }

    fn check_with(
        rule: &CascadeRule,
        seqs: &[Vec<u32>],
        groups: &[(Vec<u32>, u32)],
        gqa: usize,
        n_sms: usize,
    ) -> AttentionPlan {
        let bs = 16;
        let step = step_for(seqs, groups, bs);
        step.validate_groups(bs).unwrap();
        let plan = plan(&step, &context(rule, gqa, n_sms));
        let (q, kv, hd) = plan_inputs(&step, gqa, 8);
        let got = run_plan(&plan, &step, &q, &kv, gqa, hd);
        assert_matches_direct(&step, &q, &kv, &got, gqa, hd);
        plan
    }

    #[test]
    fn a_graph_plan_covers_every_key_with_a_fixed_grid() {
        let step = step_for(
            &[vec![0], vec![255], vec![256], vec![1000], (0..3).collect()],
            &[(vec![1, 2], 8)],
            16,
        );
        let plan = graph_plan(&step, &context(&CascadeRule::SIMT_TILES, 1, 8), 256, 4);
        assert_eq!(plan.row_parts, [1, 1, 2, 4, 1, 1, 1]);
        assert_eq!((plan.split_max_chunks, plan.n_parts, plan.tasks.len()), (4, 4, 0));
        let (q, kv, hd) = plan_inputs(&step, 1, 8);
        let got = run_plan(&plan, &step, &q, &kv, 1, hd);
        assert_matches_direct(&step, &q, &kv, &got, 1, hd);
    }

    #[test]
    fn a_graph_plan_cascades_groups_in_a_shape_that_holds_from_step_to_step() {
        let ctx = context(&CascadeRule::MMA_TILES, 4, 8);
        // 16 siblings past a 1024-token prefix (64 blocks) and a sequence of its own, `t`
        // steps on.
        let step = |t: u32, prefix_blocks: u32| {
            let mut seqs: Vec<Vec<u32>> = (0..16).map(|i| vec![prefix_blocks * 16 + i % 3 + t]).collect();
            seqs.push(vec![700 + t]);
            step_for(&seqs, &[((0..16).collect(), prefix_blocks)], 16)
        };
        let (a, b) = (step(0, 64), step(5, 64));
        let (pa, pb) = (graph_plan(&a, &ctx, 64, 32), graph_plan(&b, &ctx, 64, 32));
        assert!(!pa.tasks.is_empty() && pa.split_from[..16].iter().all(|&f| f == 1024));
        assert_eq!(pa.launch_shape(), pb.launch_shape());
        assert_eq!(pa.n_parts, pa.split_part0[0] as usize + 32);
        for (s, p) in [(&a, &pa), (&b, &pb)] {
            let (q, kv, hd) = plan_inputs(s, 4, 8);
            let got = run_plan(p, s, &q, &kv, 4, hd);
            assert_matches_direct(s, &q, &kv, &got, 4, hd);
        }
        // The prefix chunks aim at a number of CTAs, so another prefix length often launches
        // the same way (its tasks are data); a group below the crossover is read as plain
        // attention, as in `plan`, and launches otherwise.
        let half = step(0, 32);
        let ph = graph_plan(&half, &ctx, 64, 32);
        assert_eq!(ph.launch_shape(), pa.launch_shape());
        let (q, kv, hd) = plan_inputs(&half, 4, 8);
        assert_matches_direct(&half, &q, &kv, &run_plan(&ph, &half, &q, &kv, 4, hd), 4, hd);
        let short = graph_plan(&step(0, 4), &ctx, 64, 32);
        assert!(short.tasks.is_empty() && short.split_from.iter().all(|&f| f == 0));
        assert_ne!(short.launch_shape(), pa.launch_shape());
    }

    #[test]
    fn decode_rows_split_their_keys_into_chunks() {
        // One decode row at 5000 keys on a 132-SM part: 5000·2/264 → 64-key chunks.
        let plan = check(&[vec![4999]], &[], 4, 132);
        assert_eq!(plan.split_rows, [0]);
        assert_eq!(plan.split_chunk, 64);
        assert_eq!(plan.split_max_chunks, 5000usize.div_ceil(64));
        assert!(plan.tasks.is_empty());
        // Many rows share one chunk length; short rows use fewer chunks.
        let plan = check(&[vec![3], vec![700], vec![2047], vec![0]], &[], 3, 4);
        assert_eq!(plan.split_rows.len(), 4);
        assert_eq!(plan.row_parts[3], 1);
    }

    #[test]
    fn prefill_rows_become_causal_tiles() {
        // 70 rows of one sequence after a 30-token cached prefix, GQA 3: tiles of 21 rows.
        let rows: Vec<u32> = (30..100).collect();
        let plan = check(&[rows, vec![40]], &[], 3, 2);
        assert!(plan.split_rows == [70]);
        let tiles: std::collections::BTreeSet<u32> = plan.tasks.iter().map(|t| t.rows_offset).collect();
        assert_eq!(tiles.len(), 70usize.div_ceil(21));
    }

    #[test]
    fn cascade_reads_the_shared_prefix_in_tiles_for_all_members() {
        // 16 siblings one token past a 1024-token prefix, and a prefilling member.
        let mut seqs: Vec<Vec<u32>> = (0..16).map(|i| vec![1024 + i % 3]).collect();
        seqs.push((1024..1052).collect());
        let members: Vec<u32> = (0..17).collect();
        let plan = check(&seqs, &[(members, 64)], 4, 8);
        let prefix_tasks = plan.tasks.iter().filter(|t| t.key_end <= 1024).count();
        assert!(prefix_tasks > 0);
        // Every member row's first parts are the prefix; own keys start at 1024.
        assert!(plan.split_from.iter().all(|&f| f == 1024));
        // A short prefix stays plain attention.
        let plan = check(&[vec![40], vec![41]], &[(vec![0, 1], 2)], 4, 8);
        assert!(plan.tasks.is_empty() && plan.split_from == [0, 0]);
        // A group with a single row is not worth a cascade either.
        let plan = check(&[vec![600]], &[(vec![0], 32)], 4, 8);
        assert!(plan.tasks.is_empty());
        // The measured crossover (GQA 4: tiles of 16 rows): 4 siblings stay plain even over
        // 8192 tokens (cascade measured 0.81×); 16 stay plain over 512 (0.70×) and cascade
        // over 2048 (1.41×); 64 cascade over 512 (1.16×).
        let siblings = |n: u32, p: u32| (0..n).map(|i| vec![p + i % 3]).collect::<Vec<_>>();
        let group = |n: u32, p: u32| vec![((0..n).collect::<Vec<u32>>(), p / 16)];
        for (n, p, cascade) in [(4, 8192, false), (16, 512, false), (16, 2048, true), (64, 512, true)] {
            let plan = check(&siblings(n, p), &group(n, p), 4, 8);
            assert_eq!(
                plan.split_from.iter().all(|&f| f == p),
                cascade,
                "{n} siblings over {p}"
            );
            assert_eq!(plan.tasks.is_empty(), !cascade, "{n} siblings over {p}");
        }
        // The tensor-core kernel's crossover (measured: 4 over 2048 1.10×, 16 over 128 0.75×,
        // 16 over 512 1.22×, 64 over 128 1.16×).
        for (n, p, cascade) in [
            (4, 512, false),
            (4, 2048, true),
            (16, 128, false),
            (16, 512, true),
            (64, 128, true),
        ] {
            let plan = check_with(&CascadeRule::MMA_TILES, &siblings(n, p), &group(n, p), 4, 8);
            assert_eq!(plan.tasks.is_empty(), !cascade, "mma: {n} siblings over {p}");
        }
        // Without a crossover every group of two or more rows is cascaded, however short.
        let plan = check_with(&CascadeRule::ALWAYS, &siblings(2, 20), &group(2, 16), 4, 8);
        assert!(plan.split_from == [16, 16] && !plan.tasks.is_empty());
        let plan = check_with(&CascadeRule::ALWAYS, &[vec![600]], &[(vec![0], 32)], 4, 8);
        assert!(plan.tasks.is_empty());
        // A GQA group that does not divide a tile: 21 rows of GQA 3 fill one (63 queries).
        for (rows, cascade) in [(21, true), (20, false)] {
            let plan = check(&siblings(rows, 2048), &group(rows, 2048), 3, 8);
            assert_eq!(plan.tasks.is_empty(), !cascade, "{rows} rows of GQA 3");
        }
    }

    #[test]
    fn mixed_steps_cover_every_key_once_at_odd_shapes() {
        for (gqa, sms) in [(1, 1), (3, 7), (8, 132)] {
            let seqs = vec![
                vec![300, 301, 302],           // a short prefill after a long prefix
                vec![299],                     // decode
                (512..576).collect(),          // long member prefill
                vec![513],                     // member decode
                vec![17],                      // short decode
                (0..33).collect::<Vec<u32>>(), // fresh prefill, odd length
            ];
            let plan = check(&seqs, &[(vec![2, 3], 32)], gqa, sms);
            // The member decode row reads its own keys only: the prefix went through cascade.
            assert!(plan.split_from.contains(&512), "{:?}", plan.split_from);
        }
    }
}
