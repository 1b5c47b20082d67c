//! From leaves to one answer: each leaf's path score, and the vote over the leaves.
//!
//! * path score = mean of the available evidence: the judge's P(yes) for the leaf's path and
//!   the mean step value along the path (1 when neither was computed);
//! * a leaf's weight = path score × P(its letter);
//! * `Majority`: one vote per leaf, ties broken by the letters' probability mass summed over
//!   the leaves, then by option order; `Weighted`: the weights summed per letter; `Best`: the
//!   letter of the heaviest leaf.

use super::search::Vote;
use super::tree::{Decision, NodeId, Tree};

/// The path score of `leaf` (see the module doc).
pub fn path_score(tree: &Tree, leaf: NodeId) -> f32 {
    let values: Vec<f32> = tree
        .path(leaf)
        .iter()
        .filter_map(|&n| tree.node(n).value.map(|v| v.value))
        .collect();
    let mut parts = Vec::new();
    if let Some(j) = tree.node(leaf).judge {
        parts.push(j);
    }
    if !values.is_empty() {
        parts.push(values.iter().sum::<f32>() / values.len() as f32);
    }
    if parts.is_empty() {
        1.0
    } else {
        parts.iter().sum::<f32>() / parts.len() as f32
    }
}

/// Aggregates the leaves' answers by `vote`.
pub fn decide(tree: &Tree, vote: Vote) -> Decision {
    let letters = tree.letters();
    let mut votes: Vec<(char, f32)> = letters.iter().map(|&l| (l, 0.0)).collect();
    let mut mass = vec![0.0f32; letters.len()];
    // (leaf, letter index, weight = path score × P(letter))
    let mut scored: Vec<(NodeId, usize, f32)> = Vec::new();
    for leaf in tree.leaves() {
        let (Some(answer), Some(p)) = (leaf.answer, leaf.letters.as_ref()) else {
            continue;
        };
        let Some(i) = letters.iter().position(|&l| l == answer) else {
            continue;
        };
        for (m, q) in mass.iter_mut().zip(p) {
            *m += q;
        }
        let weight = leaf.path_score.unwrap_or(1.0) * p[i];
        scored.push((leaf.id, i, weight));
        votes[i].1 += match vote {
            Vote::Majority => 1.0,
            Vote::Weighted | Vote::Best => weight,
        };
    }
    let heaviest = |of: &mut dyn Iterator<Item = (usize, f32)>| {
        of.fold(None::<(usize, f32)>, |best, (x, w)| match best {
            Some((_, b)) if b >= w => best,
            _ => Some((x, w)),
        })
        .map(|(x, _)| x)
    };
    let winner = match vote {
        Vote::Best => heaviest(&mut scored.iter().map(|&(_, i, w)| (i, w))),
        _ => (0..letters.len())
            .filter(|&i| votes[i].1 > 0.0)
            .fold(None::<usize>, |best, i| match best {
                Some(b) if (votes[b].1, mass[b]) >= (votes[i].1, mass[i]) => best,
                _ => Some(i),
            }),
    };
    let leaf = winner.and_then(|w| heaviest(&mut scored.iter().filter(|s| s.1 == w).map(|&(n, _, s)| (n, s))));
    Decision {
        answer: winner.map(|i| letters[i]),
        vote,
        votes,
        leaf,
    }
}
