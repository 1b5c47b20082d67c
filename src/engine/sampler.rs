//! Token sampling: greedy, temperature, top-k, top-p, min-p, from a seeded generator so runs
//! are reproducible; log-probabilities of the sampled token and of given candidates.
//!
//! Reported log-probabilities are those of the model's own distribution (log-softmax of the
//! raw logits, temperature 1, no filtering), as OpenAI-style APIs report them; the filters
//! only decide which token is drawn.
//!
//! The CUDA backend samples on the device (`kernels/sampling.cu`); [`kept_weights`] and
//! [`draw_with_uniform`] are its semantics as pure host code, the oracle its GPU tests compare
//! against. [`Sampler`] walks the same kept tokens in the same ascending id order with the same
//! `u` ([`Sampler::next_uniform`]), so a seed draws the same tokens on either backend, up to
//! rounding (f32 weights here and on the device, f64 in the oracle) moving a boundary.

use super::vocab::{
    chunk_sums, drop_below, log_sum_exp, log_sum_exp_with_max, max_logit, position_of, tempered_weights, TemperedRow,
};
use crate::error::{Error, Result};

pub use super::vocab::argmax;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax; ties go to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
    pub seed: u64,
    /// Also report the `top_logprobs` most likely tokens at each step (OpenAI's `logprobs`
    /// alternatives); 0 = none. Reporting only: it never changes which token is drawn.
    pub top_logprobs: usize,
}

/// Most alternatives reported per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature {} must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad(format!(
                "top_logprobs {} must be at most {MAX_TOP_LOGPROBS}",
                self.top_logprobs
            ));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and stable across versions of qmtot
/// and its dependencies (so a seed means the same stream forever).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log p(token) under the model's distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first
    /// (empty unless asked).
    pub top: Vec<(u32, f32)>,
}

/// `log_softmax(logits)` computed stably in f64 accumulation.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// log p(c) for each candidate token `c` (for evaluators and letter-likelihood baselines).
pub fn candidate_logprobs(logits: &[f32], candidates: &[u32]) -> Result<Vec<f32>> {
    let lse = log_sum_exp(logits);
    candidates
        .iter()
        .map(|&c| {
            logits
                .get(c as usize)
                .map(|&l| (l as f64 - lse) as f32)
                .ok_or(Error::TokenOutOfRange {
                    id: c,
                    vocab: logits.len(),
                })
        })
        .collect()
}

/// The `k` most likely tokens of one row of logits with their log-probabilities, most likely
/// first; ties go to the lower id, NaN logits are never chosen.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    top_logprobs_with_lse(logits, k, log_sum_exp(logits))
}

/// The tokens a draw can return and their tempered weights, in ascending id order: the device
/// sampler's semantics (`kernels/sampling.cu`), which give the same distribution as
/// [`Sampler`]. Temperature 0: the [`argmax`] alone. Otherwise, over the non-NaN tokens ordered
/// most likely first (`total_cmp`, so −0 below +0; ties by lower id): top-k keeps the first k;
/// the weight is `exp((l − max) / T)` relative to the most likely token (exactly 1 where
/// `l == max`, so rows whose maximum is ±inf stay defined where `Sampler` gives NaN weights);
/// min-p drops weights below `min_p`; top-p keeps the shortest first-in-order prefix whose
/// mass reaches `top_p` × the mass left; tokens of weight 0 are dropped. Empty when every
/// logit is NaN.
///
/// Weights here are f64; the device's are f32 (relative error ≤ ~4e-6 at |l − max|/T ≤ 20;
/// see the kernel's precision note), so kept sets agree except when a weight lies that close
/// to `min_p` or a top-p prefix mass that close to its target.
pub fn kept_weights(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    if idx.is_empty() {
        return Vec::new();
    }
    if params.temperature == 0.0 {
        return vec![(argmax(logits), 1.0)];
    }
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    idx.sort_unstable_by(by_logit);
    if params.top_k > 0 && params.top_k < idx.len() {
        idx.truncate(params.top_k);
    }
    let max = logits[idx[0] as usize];
    // The same arithmetic as `Sampler`'s weights (f64, times 1/T).
    let inv_t = 1.0 / params.temperature as f64;
    let weight = |l: f32| {
        if l == max {
            1.0
        } else {
            ((l as f64 - max as f64) * inv_t).exp()
        }
    };
    let mut kept: Vec<(u32, f64)> = idx
        .iter()
        .map(|&i| (i, weight(logits[i as usize])))
        .filter(|&(_, w)| w >= params.min_p as f64)
        .collect();
    if params.top_p < 1.0 {
        let target = params.top_p as f64 * kept.iter().map(|k| k.1).sum::<f64>();
        let mut mass = 0.0;
        let keep = kept.iter().position(|&(_, w)| {
            mass += w;
            mass >= target
        });
        kept.truncate(keep.map_or(kept.len(), |i| i + 1));
    }
    kept.retain(|&(_, w)| w > 0.0);
    kept.sort_unstable_by_key(|&(i, _)| i);
    kept
}

/// The token the device sampler draws for uniform `u ∈ [0, 1)`: walking [`kept_weights`] in
/// ascending id order, the first whose cumulative weight exceeds `u` × the kept mass (the last
/// kept token if rounding leaves none). Token 0 when every logit is NaN (the host [`argmax`]
/// then gives the last id; neither means anything).
pub fn draw_with_uniform(logits: &[f32], params: &SamplingParams, u: f64) -> u32 {
    let kept = kept_weights(logits, params);
    let target = u * kept.iter().map(|k| k.1).sum::<f64>();
    let mut cumulative = 0.0;
    for &(id, w) in &kept {
        cumulative += w;
        if target < cumulative {
            return id;
        }
    }
    kept.last().map_or(0, |k| k.0)
}

/// A sampler for one sequence: its parameters and its own random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The uniform `u ∈ [0, 1)` that a device draw consumes ([`draw_with_uniform`]): the next
    /// value of the same stream [`Sampler::sample`] draws from, so a seed means the same
    /// randomness on both backends. At temperature 0 nothing is drawn (as `sample` draws
    /// nothing) and 0 is returned.
    pub fn next_uniform(&mut self) -> f64 {
        if self.params.temperature == 0.0 {
            0.0
        } else {
            self.rng.next_f64()
        }
    }

    /// Draws the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Sampled {
        let max = max_logit(logits);
        let (token, lse) = if self.params.temperature == 0.0 {
            // The argmax, from the maximum already taken.
            let at = position_of(logits, max).unwrap_or(logits.len().saturating_sub(1));
            (at as u32, None)
        } else {
            self.draw(logits, max)
        };
        let lse = lse.unwrap_or_else(|| log_sum_exp_with_max(logits, max));
        Sampled {
            token,
            logprob: (logits[token as usize] as f64 - lse) as f32,
            top: top_logprobs_with_lse(logits, self.params.top_logprobs, lse),
        }
    }

    /// Draws at temperature T > 0: [`weigh_kept`] into this thread's row buffer, then the walk
    /// over the kept tokens in ascending id order, as the device draws ([`draw_with_uniform`]).
    /// Also returns the row's log-sum-exp when it came for free.
    fn draw(&mut self, logits: &[f32], max: f32) -> (u32, Option<f64>) {
        thread_local! {
            // One row's weights per thread (0.5 MB of f32 at 128k), kept between draws rather
            // than allocated per draw.
            static ROW: std::cell::RefCell<TemperedRow> = std::cell::RefCell::new(TemperedRow::default());
        }
        ROW.with(|row| {
            let mut row = row.borrow_mut();
            let lse = weigh_kept(logits, max, &self.params, &mut row);
            // Token 0 when every logit is NaN (nothing weighs anything), as on the device.
            (row.walk(self.rng.next_f64(), 0), lse)
        })
    }
}

/// The weights a draw at temperature T > 0 walks, into `row`: the tempered weights of the
/// whole row in one vectorized pass (`max` its largest non-NaN logit), then top-k, min-p and
/// top-p, in that order, zero what they drop ([`kept_weights`]'s filters). Returns the row's
/// log-sum-exp when it came for free: at T = 1 with no NaN logit the unfiltered weights are
/// `e^(l − max)`, the same sums [`log_sum_exp`] makes.
fn weigh_kept(logits: &[f32], max: f32, p: &SamplingParams, row: &mut TemperedRow) -> Option<f64> {
    let inv_t = 1.0 / p.temperature;
    let has_nan = tempered_weights(logits, max, inv_t, &mut row.weights, &mut row.chunk_mass);
    let lse = (inv_t == 1.0 && !has_nan && max.is_finite()).then(|| max as f64 + row.mass().ln());
    let top_k = p.top_k > 0 && p.top_k < logits.len();
    if top_k {
        keep_only(
            most_likely(logits, p.top_k).into_iter().map(|(_, i)| i),
            &mut row.weights,
        );
    }
    if p.min_p > 0.0 {
        drop_below(p.min_p, &mut row.weights);
    }
    if top_k || p.min_p > 0.0 {
        chunk_sums(&row.weights, &mut row.chunk_mass);
    }
    if p.top_p < 1.0 {
        keep_nucleus(logits, max, p.temperature, p.top_p, row);
    }
    lse
}

/// The `k` most likely non-NaN tokens (logit, id), most likely first in `f32::total_cmp`
/// order, ties to the lower id (fewer when the row has fewer non-NaN logits).
///
/// Without reading the row twice: the k-th largest of the maxima of blocks of 64 logits, τ,
/// bounds the k-th largest logit from below (k blocks hold a logit ≥ τ), so the k most likely
/// all lie, at or above τ, in blocks whose maximum reaches τ; only those few logits are sorted.
/// With more than one block per k the whole row is the candidate set.
fn most_likely(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    const BLOCK: usize = 64;
    if k == 0 {
        return Vec::new();
    }
    let maxima: Vec<f32> = logits.chunks(BLOCK).map(max_logit).collect();
    let mut candidates: Vec<(f32, u32)> = if k < maxima.len() {
        let mut sorted = maxima.clone();
        let (_, &mut tau, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        maxima
            .iter()
            .enumerate()
            .filter(|&(_, &m)| m >= tau)
            .flat_map(|(b, _)| {
                let start = b * BLOCK;
                logits[start..(start + BLOCK).min(logits.len())]
                    .iter()
                    .enumerate()
                    .filter(move |&(_, &l)| l >= tau)
                    .map(move |(j, &l)| (l, (start + j) as u32))
            })
            .collect()
    } else {
        logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (l, i as u32))
            .collect()
    };
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, by_likelihood);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(by_likelihood);
    candidates
}

/// The `k` most likely tokens with their log-probabilities, given the row's log-sum-exp.
fn top_logprobs_with_lse(logits: &[f32], k: usize, lse: f64) -> Vec<(u32, f32)> {
    most_likely(logits, k)
        .into_iter()
        .map(|(l, i)| (i, (l as f64 - lse) as f32))
        .collect()
}

/// Zeroes every weight but those of `kept`.
fn keep_only(kept: impl Iterator<Item = u32>, weights: &mut [f32]) {
    let saved: Vec<(u32, f32)> = kept.map(|i| (i, weights[i as usize])).collect();
    weights.fill(0.0);
    for (i, w) in saved {
        weights[i as usize] = w;
    }
}

/// Most likely first (`f32::total_cmp` on the logit), ties to the lower id.
fn by_likelihood(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// top-p: keeps the shortest most-likely-first prefix of the weighted tokens (logit order,
/// ties to the lower id) whose mass reaches `top_p` × the row's mass, zeroing the rest, and
/// recomputes the chunk sums. The candidates are the tokens within a logit distance `d·T` of
/// the maximum (weights above e^−d), for the smallest `d` of a ladder whose tokens hold enough
/// mass; [`nucleus_length`] then finds the prefix without sorting them all.
fn keep_nucleus(logits: &[f32], max: f32, temperature: f32, top_p: f32, row: &mut TemperedRow) {
    let target = top_p as f64 * row.mass();
    for d in [5.0f32, 12.0, 24.0, f32::INFINITY] {
        let floor = if d.is_finite() {
            max - d * temperature
        } else {
            f32::NEG_INFINITY
        };
        let mut near: Vec<(f32, u32)> = logits
            .iter()
            .zip(&row.weights)
            .enumerate()
            .filter(|&(_, (&l, &w))| w != 0.0 && l >= floor)
            .map(|(i, (&l, _))| (l, i as u32))
            .collect();
        let Some(keep) = nucleus_length(&mut near, &row.weights, target) else {
            if d.is_finite() {
                continue; // not enough mass this close to the maximum
            }
            return; // rounding: the whole row is the prefix
        };
        keep_only(near[..keep].iter().map(|&(_, i)| i), &mut row.weights);
        chunk_sums(&row.weights, &mut row.chunk_mass);
        return;
    }
}

/// The length of the shortest prefix of `near` in [`by_likelihood`] order whose weights
/// (`weights[id]`) sum to at least `target` (`None` if all of them fall short), leaving that
/// prefix in `near[..length]`. Halving by selection rather than sorting: each round places the
/// median of the undecided range, sums the more likely half, and keeps the half the prefix
/// ends in, so the work is about two passes over `near` (a flat row's nucleus is most of the
/// vocabulary). The last few are sorted and walked; masses are f64 sums, the prefix's in order.
fn nucleus_length(near: &mut [(f32, u32)], weights: &[f32], target: f64) -> Option<usize> {
    let mass = |part: &[(f32, u32)]| part.iter().map(|&(_, i)| weights[i as usize] as f64).sum::<f64>();
    // near[..lo] are in the prefix (mass `before`), near[hi..] are not; the end lies between.
    let (mut lo, mut hi, mut before) = (0, near.len(), 0.0);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        near[lo..hi].select_nth_unstable_by(mid - lo, by_likelihood);
        let upper = mass(&near[lo..=mid]);
        if before + upper >= target {
            hi = mid + 1;
        } else {
            before += upper;
            lo = mid + 1;
        }
    }
    near[lo..hi].sort_unstable_by(by_likelihood);
    for (j, &(_, i)) in near.iter().enumerate().take(hi).skip(lo) {
        before += weights[i as usize] as f64;
        if before >= target {
            return Some(j + 1);
        }
    }
    None
}

// The same chi-square statistics as the device sampling tests, from one file.
#[cfg(test)]
#[path = "../../tests/common/chi2.rs"]
mod chi2;

#[cfg(test)]
mod tests {
    use super::*;

    /// The temperature-only fast path draws the token the general path draws from the same
    /// stream: a min-p floor far below every weight sends the general path through the same
    /// candidates and weights without taking the fast path. NaN logits included.
    #[test]
    fn the_temperature_only_draw_equals_the_general_draw() {
        let mut rng = Rng::new(11);
        let logits: Vec<f32> = (0..5000)
            .map(|i| {
                if i % 997 == 3 {
                    f32::NAN
                } else {
                    (rng.next_f64() * 10.0 - 5.0) as f32
                }
            })
            .collect();
        for temperature in [0.3, 1.0, 1.7] {
            let fast = SamplingParams {
                temperature,
                seed: 9,
                ..SamplingParams::default()
            };
            let general = SamplingParams {
                min_p: 1e-30,
                ..fast.clone()
            };
            let (mut a, mut b) = (Sampler::new(fast).unwrap(), Sampler::new(general).unwrap());
            let max = max_logit(&logits);
            let draws: Vec<(u32, u32)> = (0..300)
                .map(|_| (a.draw(&logits, max).0, b.draw(&logits, max).0))
                .collect();
            assert!(draws.iter().all(|(x, y)| x == y), "T = {temperature}: {draws:?}");
            let distinct: std::collections::HashSet<u32> = draws.iter().map(|d| d.0).collect();
            assert!(distinct.len() > 50, "the draws spread over the vocabulary");
        }
    }

    use super::chi2::{chi2_critical, chi2_fit, chi2_two_sample};

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            top_logprobs: 0,
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let logits = [1.0, 3.0, 2.0, 3.0];
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        let out = s.sample(&logits);
        assert_eq!(out.token, 1);
        let lp = log_softmax(&logits);
        assert!((out.logprob - lp[1]).abs() < 1e-6);
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed)).unwrap();
            (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_support() {
        // Probabilities ≈ [0.64, 0.24, 0.09, 0.03] at temperature 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let support = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            let mut seen = [false; 4];
            for _ in 0..4000 {
                seen[s.sample(&logits).token as usize] = true;
            }
            seen
        };
        assert_eq!(support(params(1.0, 0, 1.0, 0.0, 1)), [true; 4]);
        assert_eq!(support(params(1.0, 2, 1.0, 0.0, 1)), [true, true, false, false]);
        assert_eq!(support(params(1.0, 0, 0.8, 0.0, 1)), [true, true, false, false]);
        assert_eq!(support(params(1.0, 0, 1.0, 0.3, 1)), [true, true, false, false]);
        assert_eq!(support(params(1.0, 1, 1.0, 0.0, 1)), [true, false, false, false]);
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_distribution() {
        let logits = [1.0f32, 0.0];
        let mut s = Sampler::new(params(0.5, 0, 1.0, 0.0, 3)).unwrap();
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits).token == 0).count() as f64 / n as f64;
        let want = 1.0 / (1.0 + (-2.0f64).exp()); // softmax([2, 0])[0]
        assert!((ones - want).abs() < 0.015, "{ones} vs {want}");
    }

    #[test]
    fn candidate_logprobs_match_log_softmax_and_reject_bad_ids() {
        let logits = [0.5f32, -1.0, 2.0];
        let lp = log_softmax(&logits);
        let c = candidate_logprobs(&logits, &[2, 0]).unwrap();
        assert!((c[0] - lp[2]).abs() < 1e-6 && (c[1] - lp[0]).abs() < 1e-6);
        assert!(matches!(
            candidate_logprobs(&logits, &[3]),
            Err(Error::TokenOutOfRange { id: 3, vocab: 3 })
        ));
    }

    #[test]
    fn top_logprobs_are_the_k_largest_in_order_with_ties_to_the_lower_id() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, -2.0, 1.0];
        let lp = log_softmax(&logits);
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 5]);
        for &(id, l) in &top {
            assert_eq!(l.to_bits(), lp[id as usize].to_bits(), "the same value as log_softmax");
        }
        assert!(top_logprobs(&logits, 0).is_empty());
        assert_eq!(top_logprobs(&logits, 10).len(), 6, "every token, no more");
        // A NaN logit is never ranked.
        let poisoned = [f32::NAN, 1.0, 2.0];
        let ids: Vec<u32> = top_logprobs(&poisoned, 3).iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![2, 1]);
        // The sampler reports them without changing what it draws.
        let mut plain = Sampler::new(params(1.0, 0, 1.0, 0.0, 9)).unwrap();
        let mut with = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..params(1.0, 0, 1.0, 0.0, 9)
        })
        .unwrap();
        for _ in 0..50 {
            let (a, b) = (plain.sample(&logits), with.sample(&logits));
            assert_eq!((a.token, a.logprob), (b.token, b.logprob));
            assert!(a.top.is_empty());
            assert_eq!(b.top, top_logprobs(&logits, 2));
        }
        let too_many = SamplingParams {
            top_logprobs: MAX_TOP_LOGPROBS + 1,
            ..Default::default()
        };
        assert!(Sampler::new(too_many).is_err());
    }

    fn ids(kept: &[(u32, f64)]) -> Vec<u32> {
        kept.iter().map(|k| k.0).collect()
    }

    #[test]
    fn device_semantics_keep_the_filtered_sets_with_ties_by_lower_id() {
        // Probabilities ≈ [0.64, 0.24, 0.09, 0.03] at temperature 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let kept = |t, k, p, m| ids(&kept_weights(&logits, &params(t, k, p, m, 0)));
        assert_eq!(kept(1.0, 0, 1.0, 0.0), vec![0, 1, 2, 3]);
        assert_eq!(kept(1.0, 2, 1.0, 0.0), vec![0, 1]);
        assert_eq!(kept(1.0, 0, 0.8, 0.0), vec![0, 1]);
        assert_eq!(kept(1.0, 0, 0.6, 0.0), vec![0]);
        assert_eq!(kept(1.0, 0, 1.0, 0.3), vec![0, 1]);
        assert_eq!(kept(0.0, 2, 0.5, 0.5), vec![0], "greedy ignores the filters");
        // Weights are relative to the most likely token: min-p 1 keeps the maxima only.
        let w = kept_weights(&logits, &params(0.5, 0, 1.0, 0.0, 0));
        assert_eq!(w[0].1, 1.0);
        assert!((w[1].1 - (-2.0f64).exp()).abs() < 1e-15);
        // Top-k keeps exactly k: ties at the k-th value go to the lower ids.
        let tied = [1.0f32, 2.0, 2.0, 2.0, 0.0, 2.0];
        let kept = |k, p| ids(&kept_weights(&tied, &params(1.0, k, p, 0.0, 0)));
        assert_eq!(kept(1, 1.0), vec![1]);
        assert_eq!(kept(2, 1.0), vec![1, 2]);
        assert_eq!(kept(3, 1.0), vec![1, 2, 3]);
        assert_eq!(kept(5, 1.0), vec![0, 1, 2, 3, 5]);
        // Top-p over equal weights: the shortest lowest-id prefix reaching top_p of the mass.
        let flat = [0.5f32; 8];
        let kept = |p| ids(&kept_weights(&flat, &params(1.0, 0, p, 0.0, 0)));
        assert_eq!(kept(0.25), vec![0, 1]);
        assert_eq!(kept(0.26), vec![0, 1, 2]);
        assert_eq!(kept(0.1), vec![0]);
        // Combined: top-k, then min-p, then top-p over what is left.
        let k_then_p = ids(&kept_weights(&tied, &params(1.0, 3, 0.5, 0.0, 0)));
        assert_eq!(k_then_p, vec![1, 2], "half of three equal weights needs two");
        // total_cmp: +0 ranks above −0 for top-k, while greedy (float comparison) ties them.
        let zeros = [-0.0f32, 0.0, -1.0];
        assert_eq!(ids(&kept_weights(&zeros, &params(1.0, 1, 1.0, 0.0, 0))), vec![1]);
        assert_eq!(ids(&kept_weights(&zeros, &params(0.0, 0, 1.0, 0.0, 0))), vec![0]);
    }

    #[test]
    fn device_semantics_never_draw_nan_and_define_degenerate_rows() {
        let logits = [f32::NAN, 1.0, f32::NAN, 0.5, f32::NAN];
        for p in [
            params(1.0, 0, 1.0, 0.0, 0),
            params(2.0, 1, 1.0, 0.0, 0),
            params(1.0, 0, 0.9, 0.1, 0),
        ] {
            for i in 0..1000 {
                let t = draw_with_uniform(&logits, &p, i as f64 / 1000.0);
                assert!(t == 1 || t == 3, "drew {t} with {p:?}");
            }
        }
        assert_eq!(draw_with_uniform(&logits, &params(0.0, 0, 1.0, 0.0, 0), 0.3), 1);
        let all_nan = [f32::NAN; 3];
        assert!(kept_weights(&all_nan, &params(1.0, 0, 1.0, 0.0, 0)).is_empty());
        assert_eq!(draw_with_uniform(&all_nan, &params(1.0, 0, 1.0, 0.0, 0), 0.5), 0);
        // An infinite maximum takes all the weight; an all −inf row is uniform.
        let inf = [0.0f32, f32::INFINITY, 3.0, f32::INFINITY];
        assert_eq!(
            kept_weights(&inf, &params(1.0, 0, 1.0, 0.0, 0)),
            vec![(1, 1.0), (3, 1.0)]
        );
        let neg = [f32::NEG_INFINITY; 3];
        assert_eq!(ids(&kept_weights(&neg, &params(1.0, 0, 1.0, 0.0, 0))), vec![0, 1, 2]);
        // u = 0 draws the first kept id, u → 1 the last.
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let p = params(1.0, 3, 1.0, 0.0, 0);
        assert_eq!(draw_with_uniform(&logits, &p, 0.0), 1);
        assert_eq!(draw_with_uniform(&logits, &p, 1.0 - f64::EPSILON / 2.0), 3);
    }

    #[test]
    fn device_semantics_equal_the_sampler_token_for_token() {
        // Both walk the kept candidates in id order: same seed, same tokens, with or without
        // top-k, top-p and min-p.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 * 6.0 - 3.0)
            .collect();
        for p in [
            params(1.0, 0, 1.0, 0.0, 11),
            params(0.5, 0, 1.0, 0.2, 12),
            params(0.0, 0, 1.0, 0.0, 13),
            params(1.0, 40, 1.0, 0.0, 14),
            params(0.8, 0, 0.9, 0.0, 15),
            params(1.2, 100, 0.7, 0.05, 16),
        ] {
            let (mut host, mut device) = (Sampler::new(p.clone()).unwrap(), Sampler::new(p.clone()).unwrap());
            for _ in 0..2000 {
                let u = device.next_uniform();
                assert_eq!(host.sample(&logits).token, draw_with_uniform(&logits, &p, u), "{p:?}");
            }
        }
    }

    /// A vocabulary-sized row on 40 levels (ties everywhere), NaN sprinkled, ±0 both present.
    fn tied_row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 4099 {
                17 => f32::NAN,
                18 => -0.0,
                19 => 0.0,
                _ => ((i * 7919) % 40) as f32 * 0.3 - 6.0,
            })
            .collect()
    }

    #[test]
    fn most_likely_equals_sorting_the_row() {
        for n in [5, 64, 65, 1000, 20_011] {
            let row = tied_row(n);
            let mut all: Vec<(f32, u32)> = row
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| (l, i as u32))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for k in [1, 2, 7, 40, 64, 200, 313, 5000, n + 3] {
                let got = most_likely(&row, k);
                let want = &all[..k.min(all.len())];
                assert_eq!(got.len(), want.len(), "n {n} k {k}");
                assert!(
                    got.iter()
                        .zip(want)
                        .all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1 == b.1),
                    "n {n} k {k}"
                );
            }
        }
    }

    #[test]
    fn the_sampler_keeps_the_oracle_tokens_on_a_vocabulary_row() {
        // The host's filters (block-bounded top-k, ladder-bounded nucleus, f32 weights) keep
        // exactly the tokens of `kept_weights` (the device's semantics), with ties at every
        // level, on a row long enough for every shortcut to be taken.
        let row = tied_row(128_256);
        let max = max_logit(&row);
        for p in [
            params(1.0, 40, 1.0, 0.0, 0),
            params(0.7, 1000, 1.0, 0.0, 0),
            params(1.0, 0, 1.0, 0.3, 0),
            params(0.5, 0, 0.8, 0.0, 0),
            params(2.0, 0, 0.95, 0.0, 0),
            params(1.3, 3000, 0.6, 0.01, 0),
        ] {
            let mut r = TemperedRow::default();
            weigh_kept(&row, max, &p, &mut r);
            let host: Vec<u32> = (0..row.len() as u32)
                .filter(|&i| r.weights[i as usize] != 0.0)
                .collect();
            let oracle: Vec<u32> = kept_weights(&row, &p).iter().map(|k| k.0).collect();
            assert_eq!(host.len(), oracle.len(), "{p:?}");
            assert!(host == oracle, "{p:?}");
            // The chunk sums are those of the kept weights.
            let mut sums = Vec::new();
            chunk_sums(&r.weights, &mut sums);
            assert_eq!(sums, r.chunk_mass, "{p:?}");
        }
    }

    #[test]
    fn device_semantics_draw_from_the_sampler_distribution() {
        // 40 tokens on 13 levels: ties inside and at the edges of every filter.
        let logits: Vec<f32> = (0..40).map(|i| ((i * 7919) % 13) as f32 * 0.35 - 2.0).collect();
        let n = 20000;
        for (t, k, p, m) in [
            (1.0, 0, 1.0, 0.0),
            (1.0, 10, 1.0, 0.0),
            (0.8, 0, 0.7, 0.0),
            (1.3, 0, 1.0, 0.1),
            (0.9, 25, 0.9, 0.02),
        ] {
            let p = params(t, k, p, m, 21);
            let kept = kept_weights(&logits, &p);
            let mut rng = Rng::new(5);
            let mut device = vec![0usize; logits.len()];
            for _ in 0..n {
                device[draw_with_uniform(&logits, &p, rng.next_f64()) as usize] += 1;
            }
            let mut sampler = Sampler::new(p.clone()).unwrap();
            let mut host = vec![0usize; logits.len()];
            for _ in 0..n {
                host[sampler.sample(&logits).token as usize] += 1;
            }
            for (id, &c) in device.iter().enumerate() {
                assert!(
                    c == 0 || kept.iter().any(|k| k.0 == id as u32),
                    "{p:?}: drew {id}, not kept"
                );
            }
            for (what, (stat, df)) in [
                ("fit", chi2_fit(&device, &kept)),
                ("vs Sampler", chi2_two_sample(&device, &host)),
            ] {
                assert!(
                    stat < chi2_critical(df, 3.72),
                    "{p:?} {what}: chi² {stat:.1} with {df} df"
                );
            }
        }
    }

    #[test]
    fn invalid_parameters_are_errors() {
        assert!(Sampler::new(params(-1.0, 0, 1.0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5, 0.0, 0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.0, 1.5, 0)).is_err());
    }
}
