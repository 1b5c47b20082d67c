//! Turns a plan into the backend's [`StepInput`]: rows, slots, block tables, the rows whose
//! logits come back, and the sharing groups for cascade attention.

use std::collections::HashMap;

use super::scheduler::Planned;
use super::sequence::{SeqId, Sequence, Task};
use crate::backend::{SharedPrefix, StepInput};

/// What a returned logits row is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogitUse {
    /// The next-token distribution of plan entry `entry` (its last pending token ran).
    Next { entry: usize },
    /// A candidate row: the logits at `position` of plan entry `entry` score the candidate's
    /// token at `position + 1`.
    Candidate { entry: usize, position: usize },
}

/// The step for `plan`; `cascade_min_blocks` enables sharing groups whose common prefix has
/// at least that many blocks.
pub(crate) fn build(
    plan: &[Planned],
    seqs: &HashMap<SeqId, Sequence>,
    block_size: usize,
    cascade_min_blocks: Option<usize>,
) -> (StepInput, Vec<LogitUse>) {
    let mut input = StepInput::default();
    let mut uses = Vec::new();
    for (entry, p) in plan.iter().enumerate() {
        let seq = &seqs[&p.seq];
        let row0 = input.tokens.len() as u32;
        let end = p.start + p.rows;
        input.tokens.extend_from_slice(&seq.tokens[p.start..end]);
        input.positions.extend(p.start as u32..end as u32);
        input.slots.extend_from_slice(&p.appended.slots);
        input.row_seq.extend(std::iter::repeat_n(entry as u32, p.rows));
        input.block_tables.push(seq.table.block_ids());
        match &seq.task {
            Task::Candidate(c) => {
                for position in p.start.max(c.base)..end {
                    input.logit_rows.push(row0 + (position - p.start) as u32);
                    uses.push(LogitUse::Candidate { entry, position });
                }
            }
            _ if end == seq.tokens.len() => {
                input.logit_rows.push(row0 + p.rows as u32 - 1);
                uses.push(LogitUse::Next { entry });
            }
            _ => {}
        }
    }
    if let Some(min_blocks) = cascade_min_blocks {
        let first_positions: Vec<usize> = plan.iter().map(|p| p.start).collect();
        input.groups = sharing_groups(&input.block_tables, &first_positions, block_size, min_blocks.max(1));
    }
    (input, uses)
}

/// Groups the step's sequences by their first physical block; a group's prefix is the blocks
/// all members share, cut so that it ends before every member's first row (a row must see
/// the whole prefix). Groups of one, or with fewer than `min_blocks` shared blocks, are left
/// to plain attention.
pub(crate) fn sharing_groups(
    tables: &[Vec<u32>],
    first_positions: &[usize],
    block_size: usize,
    min_blocks: usize,
) -> Vec<SharedPrefix> {
    let mut by_first: HashMap<u32, Vec<u32>> = HashMap::new();
    for (s, table) in tables.iter().enumerate() {
        if let Some(&b) = table.first() {
            by_first.entry(b).or_default().push(s as u32);
        }
    }
    let mut groups: Vec<SharedPrefix> = by_first
        .into_values()
        .filter(|members| members.len() > 1)
        .filter_map(|members| {
            let lead = &tables[members[0] as usize];
            let blocks = members
                .iter()
                .map(|&s| {
                    let t = &tables[s as usize];
                    let common = lead.iter().zip(t).take_while(|(a, b)| a == b).count();
                    common.min(first_positions[s as usize] / block_size)
                })
                .min()
                .unwrap_or(0);
            (blocks >= min_blocks).then_some(SharedPrefix {
                seqs: members,
                blocks: blocks as u32,
            })
        })
        .collect();
    groups.sort_by_key(|g| g.seqs[0]); // deterministic order
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_the_common_block_prefix_cut_before_each_members_rows() {
        let tables = vec![
            vec![7, 8, 9, 1], // sibling a
            vec![7, 8, 9, 2], // sibling b
            vec![7, 8, 3],    // sibling c: shares two blocks
            vec![5, 6],       // alone
            vec![4, 10, 11],  // d
            vec![4, 10, 12],  // e, whose first row is inside block 1
        ];
        let first = vec![60, 50, 40, 20, 40, 20];
        let g = sharing_groups(&tables, &first, 16, 1);
        assert_eq!(
            g,
            vec![
                SharedPrefix {
                    seqs: vec![0, 1, 2],
                    blocks: 2
                },
                SharedPrefix {
                    seqs: vec![4, 5],
                    blocks: 1
                },
            ]
        );
        assert_eq!(sharing_groups(&tables, &first, 16, 2).len(), 1, "min_blocks filters");
    }
}
