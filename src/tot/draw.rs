//! A tree of thoughts as one self-contained HTML page: a header with the question and the
//! decision, an inline SVG picture of the tree, a legend, and a table of every node. No external
//! scripts, fonts or styles, so the page opens anywhere, offline.
//!
//! Layout: top-down, one row per depth. Leaves take consecutive x slots in depth-first order of
//! `children` (the order thoughts were sampled), and an inner node is centred over its first and
//! last child, so subtrees never overlap and siblings keep their sampling order.
//!
//! Everything user-provided (stem, options, thoughts) is escaped; a thought may contain anything,
//! `</script>` included. The output depends only on the tree (no clocks, no hash maps).

use std::fmt::Write as _;
use std::path::Path;

use super::search::Vote;
use super::tree::{Node, NodeStatus, Tree};
use crate::error::{Error, Result};

// Geometry in SVG user units: each leaf gets one slot of `SLOT_W`; depths are `ROW_H` apart.
const SLOT_W: f32 = 84.0;
const ROW_H: f32 = 96.0;
const NODE_W: f32 = 68.0;
const NODE_H: f32 = 38.0;
const MARGIN: f32 = 24.0;
/// Colour of the chosen path (edges and node borders; `STYLE` uses the same); distinct from the
/// red→green scale.
const CHOSEN: &str = "#1f5fd6";
/// Fill of nodes without any score (the root, nodes still open).
const NO_SCORE: &str = "#c8c8c8";

/// Reads a trace (JSON of a `Tree`, as written by `qmtot tot --trace`), writes the page to `out`.
pub fn draw_file(trace: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(trace).map_err(|e| Error::io(trace, e))?;
    let tree: Tree = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{}: not a tree-of-thought trace: {e}", trace.display())))?;
    check(&tree).map_err(|m| Error::InvalidArgument(format!("{}: inconsistent tree: {m}", trace.display())))?;
    std::fs::write(out, render_html(&tree)).map_err(|e| Error::io(out, e))
}

/// Checks the invariants the drawing relies on (see `tree.rs`): ids match positions, parent and
/// children links agree, depths grow by one along every edge, and the decision's leaf exists.
/// Together these make the tree connected and acyclic, so drawing it cannot index out of range.
pub fn validate(tree: &Tree) -> Result<()> {
    check(tree).map_err(|m| Error::InvalidArgument(format!("inconsistent tree: {m}")))
}

fn check(tree: &Tree) -> std::result::Result<(), String> {
    let count = tree.nodes.len();
    let root = tree.nodes.first().ok_or("it has no nodes, not even the root")?;
    if root.parent.is_some() || root.depth != 0 {
        return Err("node 0 must be the root (no parent, depth 0)".into());
    }
    for (i, node) in tree.nodes.iter().enumerate() {
        if node.id != i {
            return Err(format!("nodes[{i}] has id {}", node.id));
        }
        match node.parent {
            None if i != Tree::ROOT => return Err(format!("node {i} has no parent but is not the root")),
            None => {}
            Some(p) if p >= count => return Err(format!("node {i} has parent {p}, but there are {count} nodes")),
            Some(p) => {
                let parent = &tree.nodes[p];
                if !parent.children.contains(&i) {
                    return Err(format!(
                        "node {i} names {p} as its parent, which does not list it as a child"
                    ));
                }
                // Depth strictly growing along parent links rules out cycles.
                if parent.depth.checked_add(1) != Some(node.depth) {
                    return Err(format!(
                        "node {i} has depth {}, its parent {p} depth {}",
                        node.depth, parent.depth
                    ));
                }
            }
        }
        for (k, &child) in node.children.iter().enumerate() {
            if child >= count {
                return Err(format!("node {i} has child {child}, but there are {count} nodes"));
            }
            if tree.nodes[child].parent != Some(i) {
                return Err(format!(
                    "node {i} lists child {child}, whose parent is {:?}",
                    tree.nodes[child].parent
                ));
            }
            if node.children[..k].contains(&child) {
                return Err(format!("node {i} lists child {child} twice"));
            }
        }
    }
    match tree.decision.as_ref().and_then(|d| d.leaf) {
        Some(leaf) if leaf >= count => Err(format!("the decision's leaf {leaf} does not exist")),
        _ => Ok(()),
    }
}

/// Horizontal position of every node in leaf slots (fractional for inner nodes), and how many
/// slots the picture needs.
fn layout(tree: &Tree) -> (Vec<f32>, usize) {
    // Pre-order DFS, iterative: a trace can be deep enough to overflow a recursive walk.
    let mut order = Vec::with_capacity(tree.nodes.len());
    let mut stack = vec![Tree::ROOT];
    while let Some(id) = stack.pop() {
        order.push(id);
        stack.extend(tree.nodes[id].children.iter().rev());
    }
    let mut x = vec![0.0; tree.nodes.len()];
    let mut slots = 0;
    for &id in &order {
        if tree.nodes[id].children.is_empty() {
            x[id] = slots as f32;
            slots += 1;
        }
    }
    // Reverse pre-order visits every child before its parent.
    for &id in order.iter().rev() {
        let children = &tree.nodes[id].children;
        if let (Some(&first), Some(&last)) = (children.first(), children.last()) {
            x[id] = (x[first] + x[last]) / 2.0;
        }
    }
    (x, slots)
}

/// The score that colours a node, in [0, 1]: the step value, else the path score, else
/// P(sufficient), else the most likely letter's probability; `None` if it has none.
fn score(node: &Node) -> Option<f32> {
    let best_letter = || {
        node.letters
            .as_ref()?
            .iter()
            .copied()
            .filter(|p| p.is_finite())
            .reduce(f32::max)
    };
    let score = node
        .value
        .map(|v| v.value)
        .or(node.path_score)
        .or(node.sufficient)
        .or_else(best_letter);
    score.filter(|s| s.is_finite()).map(|s| s.clamp(0.0, 1.0))
}

/// Red (0) → yellow (0.5) → green (1); grey without a score.
fn score_colour(score: Option<f32>) -> String {
    const RED: [f32; 3] = [224.0, 82.0, 72.0];
    const YELLOW: [f32; 3] = [246.0, 214.0, 92.0];
    const GREEN: [f32; 3] = [82.0, 176.0, 96.0];
    let Some(s) = score else { return NO_SCORE.into() };
    let (from, to, t) = if s < 0.5 {
        (RED, YELLOW, s * 2.0)
    } else {
        (YELLOW, GREEN, (s - 0.5) * 2.0)
    };
    let channel = |i: usize| (from[i] + (to[i] - from[i]) * t).round() as u8;
    format!("#{:02x}{:02x}{:02x}", channel(0), channel(1), channel(2))
}

/// HTML/XML escaping of `& < > " '`; control characters other than whitespace become U+FFFD,
/// since they are not allowed in XML and would break the SVG for some viewers.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Open => "open",
        NodeStatus::Evaluated => "evaluated",
        NodeStatus::Expanding => "expanding",
        NodeStatus::Expanded => "expanded",
        NodeStatus::Pruned => "pruned",
        NodeStatus::Leaf => "leaf",
    }
}

fn vote_name(vote: Vote) -> &'static str {
    match vote {
        Vote::Majority => "majority",
        Vote::Weighted => "weighted",
        Vote::Best => "best",
    }
}

/// Whole numbers (majority counts) without decimals, weights with three.
fn number(x: f32) -> String {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// One line per score the node has (plain text, unescaped); shared by the hover title and the table.
fn score_lines(tree: &Tree, node: &Node) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(v) = node.value {
        lines.push(format!(
            "value {:.3} (sure {:.3}, likely {:.3}, impossible {:.3})",
            v.value, v.sure, v.likely, v.impossible
        ));
    }
    if let Some(p) = node.sufficient {
        lines.push(format!("P(sufficient) {p:.3}"));
    }
    if let Some(letters) = &node.letters {
        // More probabilities than options would be a broken trace; name the extras '?'.
        let names = tree.letters().into_iter().chain(std::iter::repeat('?'));
        let parts: Vec<String> = names.zip(letters).map(|(l, p)| format!("{l} {p:.3}")).collect();
        lines.push(format!("letters {}", parts.join(", ")));
    }
    if let Some(p) = node.judge {
        lines.push(format!("judge {p:.3}"));
    }
    if let Some(p) = node.path_score {
        lines.push(format!("path score {p:.3}"));
    }
    if let Some(a) = node.answer {
        lines.push(format!("answer {a}{}", if node.forced { " (forced)" } else { "" }));
    }
    lines
}

/// The hover text of a node: where it is, its thought, its scores.
fn describe(tree: &Tree, node: &Node) -> String {
    let thought = match node.thought.as_str() {
        _ if node.id == Tree::ROOT => "(root: the question)",
        "" => "(no thought text)",
        text => text,
    };
    let mut lines = vec![
        format!("node {} · depth {} · {}", node.id, node.depth, status_name(node.status)),
        thought.to_string(),
    ];
    lines.extend(score_lines(tree, node));
    lines.push(format!("tokens {} · logprob {:.3}", node.tokens, node.logprob));
    lines.join("\n")
}

/// The inline SVG picture: edges first (chosen path last, so it lies on top), then nodes.
fn svg(tree: &Tree, chosen: &[bool]) -> String {
    let (x, slots) = layout(tree);
    let max_depth = tree.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
    let centre = |id: usize| {
        (
            MARGIN + SLOT_W * (x[id] + 0.5),
            MARGIN + NODE_H / 2.0 + ROW_H * tree.nodes[id].depth as f32,
        )
    };
    let width = 2.0 * MARGIN + SLOT_W * slots.max(1) as f32;
    let height = 2.0 * MARGIN + NODE_H + ROW_H * max_depth as f32;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );

    let mut edges: Vec<(bool, String)> = Vec::new();
    for child in tree.nodes.iter().skip(1) {
        let Some(parent) = child.parent else { continue };
        let ((px, py), (cx, cy)) = (centre(parent), centre(child.id));
        let (top, bottom) = (py + NODE_H / 2.0, cy - NODE_H / 2.0);
        let mid = (top + bottom) / 2.0;
        // The chosen path always contains both ends; `chosen` is per node.
        let on_path = chosen[parent] && chosen[child.id];
        let class = if on_path {
            "edge chosen"
        } else if child.status == NodeStatus::Pruned {
            "edge pruned"
        } else {
            "edge"
        };
        let path = format!(r#"<path class="{class}" d="M{px} {top} C{px} {mid} {cx} {mid} {cx} {bottom}"/>"#);
        edges.push((on_path, path));
    }
    edges.sort_by_key(|e| e.0); // stable: keeps id order within each group
    for (_, edge) in edges {
        let _ = writeln!(out, "{edge}");
    }

    for node in &tree.nodes {
        let (cx, cy) = centre(node.id);
        let mut classes = String::from("node");
        for (on, name) in [
            (node.status == NodeStatus::Leaf, " leaf"),
            (node.status == NodeStatus::Pruned, " pruned"),
            (node.forced, " forced"),
            (chosen[node.id], " on-path"),
        ] {
            if on {
                classes.push_str(name);
            }
        }
        let first = if node.id == Tree::ROOT {
            "root".to_string()
        } else {
            format!("d{}·#{}", node.depth, node.id)
        };
        let mut second = Vec::new();
        if let Some(a) = node.answer {
            second.push(format!("→{a}"));
        }
        if let Some(v) = node.value {
            second.push(format!("v{:.2}", v.value));
        }
        let _ = writeln!(
            out,
            r#"<g class="{classes}" id="n{}"><title>{}</title>"#,
            node.id,
            esc(&describe(tree, node))
        );
        let _ = writeln!(
            out,
            r#"<rect x="{}" y="{}" width="{NODE_W}" height="{NODE_H}" rx="8" fill="{}"/>"#,
            cx - NODE_W / 2.0,
            cy - NODE_H / 2.0,
            score_colour(score(node))
        );
        let _ = writeln!(out, r#"<text x="{cx}" y="{}">{}</text>"#, cy - 3.0, esc(&first));
        let _ = writeln!(
            out,
            r#"<text x="{cx}" y="{}">{}</text>"#,
            cy + 11.0,
            esc(&second.join(" "))
        );
        if node.forced {
            // A small badge in the top-right corner marks a forced answer.
            let (bx, by) = (cx + NODE_W / 2.0 - 2.0, cy - NODE_H / 2.0 + 2.0);
            let _ = writeln!(
                out,
                r#"<circle class="badge" cx="{bx}" cy="{by}" r="7"/><text class="badge" x="{bx}" y="{}">F</text>"#,
                by + 3.5
            );
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

const STYLE: &str = r#"body{font-family:system-ui,sans-serif;margin:1.2em;color:#1a1a1a}
.stem,td.thought,#panel{white-space:pre-wrap}.options{list-style:none;padding-left:1em}
.main{display:flex;gap:1em;align-items:flex-start}
.picture{overflow:auto;border:1px solid #ddd;max-width:75vw}
#panel{flex:1;min-width:14em;border:1px solid #ddd;padding:.6em;font-size:.85em;margin:0}
svg text{font-size:11px;text-anchor:middle;pointer-events:none}
.node{cursor:pointer}.node rect{stroke:#555;stroke-width:1}
.node.leaf rect{stroke-width:3}.node.forced rect{stroke:#7a3e9d}
.node.pruned{opacity:.45}.node.pruned rect{stroke-dasharray:4 3}
.node.on-path rect{stroke:#1f5fd6}
.badge{fill:#7a3e9d;stroke:none}text.badge{fill:#fff;font-size:9px;font-weight:bold}
.edge{fill:none;stroke:#888;stroke-width:1.5}.edge.pruned{stroke-dasharray:4 3;opacity:.5}
.edge.chosen{stroke:#1f5fd6;stroke-width:4}
.legend span{display:inline-block;margin-right:1.2em}.swatch{display:inline-block;width:1.4em;height:.9em;vertical-align:middle;border:1px solid #555;margin-right:.3em}
table{border-collapse:collapse;margin-top:1em;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top;text-align:left}
tr.on-path{background:#e6eefc}tr.pruned{color:#888}"#;

// Shows a clicked node's hover text in the side panel. It reads `<title>` via textContent, so
// the text is never parsed as HTML; no user data is written into the script itself.
const SCRIPT: &str = r#"document.querySelectorAll('g.node').forEach(function(g){g.addEventListener('click',function(){document.getElementById('panel').textContent=g.querySelector('title').textContent;});});"#;

/// The page for `tree`. A tree that fails [`validate`] gets the header and the error instead of
/// a picture, so this never panics.
pub fn render_html(tree: &Tree) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Tree of thoughts · {}</title>\n<style>{STYLE}</style></head><body>\n",
        esc(&tree.question_id)
    );
    let _ = writeln!(
        page,
        "<h1>Tree of thoughts · {}</h1>\n<p class=\"stem\">{}</p>\n<ul class=\"options\">",
        esc(&tree.question_id),
        esc(&tree.stem)
    );
    for (letter, text) in &tree.options {
        let _ = writeln!(page, "<li><b>{}.</b> {}</li>", esc(&letter.to_string()), esc(text));
    }
    page.push_str("</ul>\n");
    if let Some(gold) = tree.gold {
        let _ = writeln!(page, "<p>Gold answer: <b>{}</b></p>", esc(&gold.to_string()));
    }
    let _ = writeln!(page, "<p>{}</p>", decision_line(tree));
    if let Err(e) = validate(tree) {
        let _ = writeln!(
            page,
            "<p><b>Cannot draw this tree:</b> {}</p>\n</body></html>",
            esc(&e.to_string())
        );
        return page;
    }

    let mut chosen = vec![false; tree.nodes.len()];
    if let Some(leaf) = tree.decision.as_ref().and_then(|d| d.leaf) {
        for id in tree.path(leaf) {
            chosen[id] = true;
        }
    }
    page.push_str(&legend());
    let _ = write!(
        page,
        "<div class=\"main\"><div class=\"picture\">\n{}</div>\n<pre id=\"panel\">Hover a node for its thought and scores; click to show them here.</pre></div>\n",
        svg(tree, &chosen)
    );
    page.push_str("<table>\n<tr><th>id</th><th>parent</th><th>depth</th><th>status</th><th>answer</th><th>scores</th><th>tokens</th><th>logprob</th><th>thought</th></tr>\n");
    for node in &tree.nodes {
        let mut classes = vec![status_name(node.status)];
        if chosen[node.id] {
            classes.push("on-path");
        }
        let parent = node.parent.map_or(String::from("–"), |p| p.to_string());
        let answer = node.answer.map_or(String::new(), |a| {
            format!("{a}{}", if node.forced { " (forced)" } else { "" })
        });
        let scores: Vec<String> = score_lines(tree, node).iter().map(|l| esc(l)).collect();
        let _ = writeln!(
            page,
            "<tr class=\"{}\"><td>{}</td><td>{parent}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td class=\"thought\">{}</td></tr>",
            classes.join(" "),
            node.id,
            node.depth,
            status_name(node.status),
            esc(&answer),
            scores.join("<br>"),
            node.tokens,
            node.logprob,
            esc(&node.thought)
        );
    }
    let _ = write!(page, "</table>\n<script>{SCRIPT}</script>\n</body></html>\n");
    page
}

/// "Decision: B (majority vote: A 1, B 2) — correct", escaped.
fn decision_line(tree: &Tree) -> String {
    let Some(decision) = &tree.decision else {
        return "Decision: none (the search did not finish)".into();
    };
    let answer = decision.answer.map_or(String::from("none"), |a| a.to_string());
    let votes: Vec<String> = decision
        .votes
        .iter()
        .map(|(l, v)| format!("{l} {}", number(*v)))
        .collect();
    let verdict = match (decision.answer, tree.gold) {
        (Some(a), Some(g)) if a == g => "correct".to_string(),
        (Some(_), Some(g)) => format!("wrong (gold {g})"),
        (None, Some(_)) => "no answer".to_string(),
        (_, None) => "no gold answer to compare".to_string(),
    };
    esc(&format!(
        "Decision: {answer} ({} vote: {}) — {verdict}",
        vote_name(decision.vote),
        votes.join(", ")
    ))
}

/// Colour scale and marks, as a row of small samples.
fn legend() -> String {
    let mut out = String::from("<p class=\"legend\">");
    for s in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            out,
            "<span><i class=\"swatch\" style=\"background:{}\"></i>{s}</span>",
            score_colour(Some(s))
        );
    }
    let _ = writeln!(
        out,
        "<span><i class=\"swatch\" style=\"background:{NO_SCORE}\"></i>no score</span>\
         <span>colour: value, else path score, else P(sufficient), else best letter</span>\
         <span><i class=\"swatch\" style=\"border-style:dashed;opacity:.45\"></i>pruned</span>\
         <span><i class=\"swatch\" style=\"border-width:3px\"></i>leaf</span>\
         <span><b style=\"color:#7a3e9d\">F</b> forced answer</span>\
         <span><i class=\"swatch\" style=\"background:{CHOSEN};height:.3em\"></i>chosen path</span></p>"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tot::tree::{Decision, NodeId, StepValue};

    /// Root → three thoughts; the first has two answering children (one chosen), the second is
    /// pruned, the third is a forced leaf.
    fn sample() -> Tree {
        let options = vec![('A', "aspirin".to_string()), ('B', "beta blocker".to_string())];
        let mut tree = Tree::new("q1", "Which drug?", options, Some('B'));
        let first = tree.add_child(Tree::ROOT);
        let pruned = tree.add_child(Tree::ROOT);
        let forced = tree.add_child(Tree::ROOT);
        let leaf_a = tree.add_child(first);
        let leaf_b = tree.add_child(first);
        let value = |v| {
            Some(StepValue {
                sure: v,
                likely: 1.0 - v,
                impossible: 0.0,
                value: v,
            })
        };
        for (id, v) in [(first, 0.8), (pruned, 0.1), (forced, 0.5)] {
            tree.node_mut(id).value = value(v);
            tree.node_mut(id).thought = format!("step {id}");
        }
        tree.node_mut(first).status = NodeStatus::Expanded;
        tree.node_mut(pruned).status = NodeStatus::Pruned;
        for (id, answer, forced_answer) in [(leaf_a, 'A', false), (leaf_b, 'B', false), (forced, 'B', true)] {
            let node = tree.node_mut(id);
            node.status = NodeStatus::Leaf;
            node.answer = Some(answer);
            node.forced = forced_answer;
            node.letters = Some(vec![0.3, 0.7]);
        }
        tree.decision = Some(Decision {
            answer: Some('B'),
            vote: Vote::Majority,
            votes: vec![('A', 1.0), ('B', 2.0)],
            leaf: Some(leaf_b),
        });
        tree
    }

    fn chosen_leaf(tree: &Tree) -> NodeId {
        tree.decision.as_ref().and_then(|d| d.leaf).unwrap()
    }

    #[test]
    fn page_has_one_group_per_node_and_highlights_the_chosen_path() {
        let tree = sample();
        let page = render_html(&tree);
        assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"));
        assert_eq!(page.matches("<g class=\"node").count(), tree.nodes.len());
        // One hover title per node, plus the page's own.
        assert_eq!(page.matches("<title>").count(), tree.nodes.len() + 1);
        let path_len = tree.path(chosen_leaf(&tree)).len();
        assert_eq!(page.matches(r#"class="edge chosen""#).count(), path_len - 1);
        assert_eq!(page.matches(r#"class="edge"#).count(), tree.nodes.len() - 1);
        assert_eq!(page.matches("<tr class=").count(), tree.nodes.len());
        assert!(page.contains("edge pruned") && page.contains("node leaf forced") && page.contains(">F</text>"));
        assert!(page.contains("Decision: B (majority vote: A 1, B 2) — correct"));
        assert!(page.contains("letters A 0.300, B 0.700"));
        assert_eq!(
            page.matches("http").count(),
            1,
            "no external resources, only the SVG namespace"
        );
        assert!(!page.contains("src=") && !page.contains("href="));
        assert_eq!(page, render_html(&tree), "deterministic");
    }

    #[test]
    fn layout_gives_leaves_slots_in_order_and_centres_parents() {
        let tree = sample();
        let (x, slots) = layout(&tree);
        // Leaves in DFS order: 4, 5 (under 1), 2 (pruned, childless), 3.
        assert_eq!(slots, 4);
        assert_eq!((x[4], x[5], x[2], x[3]), (0.0, 1.0, 2.0, 3.0));
        assert_eq!(x[1], 0.5);
        assert_eq!(x[0], (0.5 + 3.0) / 2.0);
    }

    #[test]
    fn colours_follow_the_score() {
        assert_eq!(score_colour(Some(0.0)), "#e05248");
        assert_eq!(score_colour(Some(0.5)), "#f6d65c");
        assert_eq!(score_colour(Some(1.0)), "#52b060");
        assert_eq!(score_colour(None), NO_SCORE);
        let tree = sample();
        assert_eq!(score(tree.node(1)), Some(0.8), "value first");
        assert_eq!(score(tree.node(4)), Some(0.7), "best letter last");
        assert_eq!(score(tree.node(0)), None);
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let evil = "<script>alert(1)</script> & \"q\" 'x'";
        let mut tree = sample();
        tree.stem = evil.into();
        tree.question_id = evil.into();
        tree.options[0].1 = evil.into();
        tree.node_mut(4).thought = evil.into();
        let page = render_html(&tree);
        assert!(!page.contains("<script>alert"));
        assert!(!page.contains("& \"q\""));
        assert_eq!(
            page.matches("</script>").count(),
            1,
            "only the page's own script closes"
        );
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot; &#39;x&#39;"));
    }

    #[test]
    fn validate_rejects_inconsistent_trees() {
        assert!(validate(&sample()).is_ok());
        let broken: [fn(&mut Tree); 5] = [
            |t| t.node_mut(0).children.push(99),
            |t| t.node_mut(2).id = 7,
            |t| t.node_mut(4).parent = Some(2),
            |t| t.node_mut(5).depth = 5,
            |t| t.decision.as_mut().unwrap().leaf = Some(42),
        ];
        for (i, breaks) in broken.iter().enumerate() {
            let mut tree = sample();
            breaks(&mut tree);
            assert!(matches!(validate(&tree), Err(Error::InvalidArgument(_))), "case {i}");
            assert!(render_html(&tree).contains("Cannot draw this tree"), "case {i}");
        }
        let mut empty = sample();
        empty.nodes.clear();
        assert!(validate(&empty).is_err());
    }

    #[test]
    fn draw_file_reports_errors_and_writes_the_page() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tree.html");
        let missing = dir.path().join("missing.json");
        assert!(matches!(draw_file(&missing, &out), Err(Error::Io { .. })));

        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let mut dangling = sample();
        dangling.node_mut(1).children.push(99);
        for (name, text) in [
            ("text.json", "not json at all".to_string()),
            ("other.json", r#"{"a": 1}"#.to_string()),
            ("dangling.json", serde_json::to_string(&dangling).unwrap()),
        ] {
            let path = write(name, &text);
            match draw_file(&path, &out) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(name), "{m}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(!out.exists());

        let trace = write("good.json", &serde_json::to_string(&sample()).unwrap());
        draw_file(&trace, &out).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), render_html(&sample()));
    }
}
