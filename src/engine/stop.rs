//! When generation stops: a token budget, stop tokens, and stop strings. Stop strings are
//! matched on the decoded text, across token boundaries; text that might be the start of a
//! stop string is held back from the stream until it is known not to be.

#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopConditions {
    pub max_new_tokens: usize,
    /// Ids that end generation (the model's eos / end-of-turn ids, plus any asked for).
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation; the output is cut before the first match.
    pub stop_strings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop token was sampled (it is part of the generated ids, not of the text).
    StopToken(u32),
    /// A stop string appeared in the text.
    StopString(String),
    /// The caller cancelled the request.
    Cancelled,
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FinishReason::Length => write!(f, "length"),
            FinishReason::StopToken(t) => write!(f, "stop token {t}"),
            FinishReason::StopString(s) => write!(f, "stop string {s:?}"),
            FinishReason::Cancelled => write!(f, "cancelled"),
        }
    }
}

/// Incremental stop-string matcher over streamed text.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released (could still begin a stop string).
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds new text. Returns the text safe to emit now and, if a stop string matched, which
    /// one (the text before it has then been returned and everything after is dropped).
    pub fn push(&mut self, text: &str) -> (String, Option<String>) {
        self.pending.push_str(text);
        // Earliest complete match wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, s)) = hit {
            let out = self.pending[..at].to_string();
            let s = s.clone();
            self.pending.clear();
            return (out, Some(s));
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (end, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..end]) {
                    keep = keep.max(end);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, None)
    }

    /// Releases whatever is held back (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_pieces_is_found_and_cut() {
        let mut m = StopMatcher::new(&["\n\nQuestion:".to_string()]);
        assert_eq!(m.push("The answer is B."), ("The answer is B.".into(), None));
        assert_eq!(m.push("\n\nQue"), (String::new(), None));
        assert_eq!(m.push("stion: next"), (String::new(), Some("\n\nQuestion:".into())));
    }

    #[test]
    fn held_back_text_is_released_when_it_stops_matching_or_at_the_end() {
        let mut m = StopMatcher::new(&["END".to_string()]);
        assert_eq!(m.push("abcE"), ("abc".into(), None));
        assert_eq!(m.push("N"), (String::new(), None));
        assert_eq!(m.push("x"), ("ENx".into(), None));
        assert_eq!(m.push("E"), (String::new(), None));
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(&["b".to_string(), "ab".to_string()]);
        assert_eq!(m.push("xxab"), ("xx".into(), Some("ab".into())));
    }
}
