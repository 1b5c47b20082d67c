//! CUDA graphs for the decode step: a step whose device data later steps overwrite in place,
//! the capture of the forward's launches, and their replay.
//!
//! A graph replays the same kernels with the same arguments and grids, so everything a
//! captured forward reads must stay at one address and every launch shape must be fixed:
//!
//! * the step's arrays (tokens, positions, slots, row → sequence, block tables padded to the
//!   capacity's `max_blocks`, logit rows) are allocated once and refilled by copies before each
//!   replay ([`CudaBackend::refill_graph_step`]);
//! * attention uses [`attention_plan::graph_plan`]: the cascaded prefixes of the step's
//!   sharing groups as tile tasks, then every row a flash-decoding split row over its own keys
//!   with chunks of [`graph_chunk`] keys and a grid sized for `max_context` (a chunk past a
//!   row's position exits at once); the plan's arrays are refilled before each replay, and a
//!   step whose plan would launch differently ([`attention_plan::LaunchShape`]: other sharing
//!   groups, another prefix length) does not fit;
//! * the activations live in the model's [`crate::model::llama::DecodeGraph`], and the
//!   temporaries an op allocates (matmul and attention partials) are allocated and freed inside
//!   the capture, which makes them the graph's own memory (stream-ordered allocation nodes).
//!
//! Anything else — another row, sequence or logit-row count, a position at or past
//! `max_context`, another launch shape of attention — does not fit, and the caller runs the
//! step uncaptured.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::attention_plan::{self, AttentionPlan, PlanContext};
use super::kernels::cuda_err;
use super::{i32s, padded_tables, CudaBackend, CudaStep};
use crate::backend::{QkvLayout, StepInput};
use crate::error::{Error, Result};

/// Most chunks of a captured step's split rows (the grid's z, and the partial buffers' parts).
const GRAPH_MAX_CHUNKS: usize = 64;

/// Keys per split chunk in a step captured for positions below `max_context`: one 64-key
/// shared-memory tile of `attention_split` (`SPLIT_KEYS`) while that keeps the grid within
/// [`GRAPH_MAX_CHUNKS`], so a short decode context still spreads over many CTAs (a chunk
/// past a row's position exits at once); longer capacities take longer chunks, so partials
/// stay at most 64 parts per (row, head).
pub fn graph_chunk(max_context: usize) -> usize {
    max_context.div_ceil(GRAPH_MAX_CHUNKS).next_multiple_of(64).max(64)
}

/// What a graph step holds room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct GraphShape {
    /// Positions stay below this.
    max_context: usize,
    /// Keys per split chunk ([`graph_chunk`]) and the chunks that cover `max_context`.
    chunk: usize,
    max_chunks: usize,
    /// What the attention plan was made for (refills plan the same way).
    context: PlanContext,
}

impl CudaBackend {
    /// A step for capture shaped like `input`, with room for positions below `max_context`,
    /// its attention planned for `layout`.
    pub(super) fn new_graph_step(&self, input: &StepInput, max_context: usize, layout: QkvLayout) -> Result<CudaStep> {
        let bs = 16;
        let max_blocks = max_context.div_ceil(bs).max(1);
        if let Some(&p) = input.positions.iter().find(|&&p| p as usize >= max_context) {
            return Err(Error::InvalidArgument(format!(
                "graph step: position {p} at or past its max_context {max_context}"
            )));
        }
        if let Some(t) = input.block_tables.iter().find(|t| t.len() > max_blocks) {
            return Err(Error::InvalidArgument(format!(
                "graph step: a block table of {} blocks for a max_context of {max_context}",
                t.len()
            )));
        }
        if layout.n_kv_heads == 0 || layout.n_heads % layout.n_kv_heads != 0 {
            return Err(Error::InvalidArgument(format!("graph step: {layout:?}")));
        }
        let mut step = self.upload_step_with(input, max_blocks)?;
        let chunk = graph_chunk(max_context);
        let gqa = layout.n_heads / layout.n_kv_heads;
        let shape = GraphShape {
            max_context,
            chunk,
            max_chunks: max_context.div_ceil(chunk),
            context: self.plan_context(gqa, layout.n_kv_heads),
        };
        let plan = attention_plan::graph_plan(input, &shape.context, shape.chunk, shape.max_chunks);
        let plan = self.upload_plan(plan)?;
        // Set before the capture, so no layer uploads a plan while it is recorded.
        let _ = step.attention.set(((gqa, layout.n_kv_heads), plan));
        step.graph = Some(shape);
        Ok(step)
    }

    /// Overwrites a graph step with `input` (same shapes); `Ok(false)` when it does not fit.
    pub(super) fn refill_graph_step(&self, step: &mut CudaStep, input: &StepInput) -> Result<bool> {
        let Some(shape) = step.graph else {
            return Ok(false);
        };
        let old = &step.host;
        let fits = input.rows() == old.rows()
            && input.block_tables.len() == old.block_tables.len()
            && input.logit_rows.len() == old.logit_rows.len()
            && input.block_tables.iter().all(|t| t.len() <= step.max_blocks)
            && input.positions.iter().all(|&p| (p as usize) < shape.max_context);
        if !fits {
            return Ok(false);
        }
        // Replays skip attention's host checks; the sharing groups the plan trusts are checked
        // here (the tables are by the model's `StepInput::validate`).
        input.validate_groups(shape.context.block_size)?;
        // The attention plan first: a step that attention would launch differently does not
        // fit, and nothing of the graph's data may change before that is known.
        let plan: AttentionPlan = attention_plan::graph_plan(input, &shape.context, shape.chunk, shape.max_chunks);
        let Some((_, dp)) = step.attention.get_mut() else {
            return Err(cuda_err("refill step", "a graph step without its attention plan"));
        };
        if plan.launch_shape() != dp.plan.launch_shape() {
            return Ok(false);
        }
        let copy = |src: &[i32], dst: &mut cudarc::driver::CudaSlice<i32>| {
            self.stream
                .memcpy_htod(src, dst)
                .map_err(|e| cuda_err("refill step", e))
        };
        // Only what changed (without groups, the row part counts alone); empty arrays hold one
        // unused element (`upload_plan`) and stay as they are.
        let old = &dp.plan;
        for (src, was, dst) in [
            (&plan.split_rows, &old.split_rows, &mut dp.split_rows),
            (&plan.split_from, &old.split_from, &mut dp.split_from),
            (&plan.split_part0, &old.split_part0, &mut dp.split_part0),
            (&plan.task_rows, &old.task_rows, &mut dp.task_rows),
            (&plan.row_parts, &old.row_parts, &mut dp.row_parts),
        ] {
            if !src.is_empty() && src != was {
                copy(&i32s(src), dst)?;
            }
        }
        if !plan.tasks.is_empty() && plan.tasks != old.tasks {
            copy(&plan.task_words(), &mut dp.tasks)?;
        }
        dp.plan = plan;
        copy(&i32s(&input.tokens), &mut step.tokens)?;
        copy(&i32s(&input.positions), &mut step.positions)?;
        copy(&i32s(&input.slots), &mut step.slots)?;
        copy(&i32s(&input.row_seq), &mut step.row_seq)?;
        copy(&padded_tables(input, step.max_blocks), &mut step.block_tables)?;
        if let Some(rows) = &mut step.logit_rows {
            copy(&i32s(&input.logit_rows), rows)?;
        }
        step.host = input.clone();
        // The new tables are checked again if attention runs outside the graph.
        step.attention_checked = std::sync::OnceLock::new();
        Ok(true)
    }

    /// Records what `f` launches on the backend's stream into an instantiated graph.
    pub(super) fn capture_graph(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err("begin capture", e))?;
        let recorded = f();
        // End the capture whatever `f` did, so the stream leaves capture mode.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        graph
            .map_err(|e| cuda_err("end capture", e))?
            .ok_or_else(|| cuda_err("end capture", "nothing was recorded"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_chunks_are_one_tile_until_the_grid_would_pass_64() {
        assert_eq!(graph_chunk(1), 64);
        assert_eq!(graph_chunk(2304), 64); // 36 chunks
        assert_eq!(graph_chunk(4096), 64); // 64 chunks
        assert_eq!(graph_chunk(4097), 128);
        assert_eq!(graph_chunk(32768), 512);
        for ctx in [1usize, 100, 4096, 4097, 10_000, 131_072] {
            assert!(ctx.div_ceil(graph_chunk(ctx)) <= GRAPH_MAX_CHUNKS, "{ctx}");
        }
    }
}
