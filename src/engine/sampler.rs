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

use crate::error::{Error, Result};

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

/// `e^x` in f32 without a libm call, so that loops over a vocabulary vectorize: the sampler
/// and the log-probabilities walk 128k logits per row, and with libm's f64 `exp` a row took
/// 1.5 ms on the host — longer than a GPU decode step of 16 rows (H200, 2026-11-26).
/// Cody–Waite reduction `x = n·ln 2 + r` (|r| ≤ ln2/2) and the Taylor polynomial of `e^r` to
/// r⁷ (truncation below 1e-8 relative); about 3e-7 relative error in all, from f32 rounding.
/// `x < −87` gives 0 (the f32 exponent's end; −∞ included), NaN stays NaN.
#[inline]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0); // NaN stays NaN
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // n as an integer without a float → int conversion: t's mantissa holds it (ulp 1 there).
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let v = p * f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

/// `ln Σ e^l`: the maximum taken out, [`fast_exp`] per logit, f32 sums over chunks of 1024
/// (vectorized) added in f64.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = max_logit(logits);
    if max.is_infinite() {
        // All −∞ (or some +∞): the sum is not finite; keep the f64 definition's value.
        let m = max as f64;
        return m + logits.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
    }
    // 8 f32 lanes per chunk of 1024 (a sum the compiler may vectorize: it cannot reorder one
    // running f32 sum), chunks added in f64.
    let sum: f64 = logits
        .chunks(1024)
        .map(|c| {
            let mut lanes = [0f32; 8];
            let exact = c.chunks_exact(8);
            let tail: f32 = exact.remainder().iter().map(|&l| fast_exp(l - max)).sum();
            for e in exact {
                for (acc, &l) in lanes.iter_mut().zip(e) {
                    *acc += fast_exp(l - max);
                }
            }
            (lanes.iter().sum::<f32>() + tail) as f64
        })
        .sum();
    max as f64 + sum.ln()
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
    // A sorted list of at most k (logit, id): k is small (≤ MAX_TOP_LOGPROBS), the row long.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (best.len() == k && l <= best[k - 1].0) {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= l);
        best.insert(at, (l, i as u32));
        best.truncate(k);
    }
    let lse = log_sum_exp(logits);
    best.into_iter().map(|(l, i)| (i, (l as f64 - lse) as f32)).collect()
}

/// The largest non-NaN logit (−∞ for an empty or all-NaN row), over 8 lanes so that it
/// vectorizes.
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            // NaN compares false: never taken.
            *m = if l > *m { l } else { *m };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// Index of the largest logit (lowest index among ties; NaN never wins; an all-NaN row gives
/// its last index). Two passes that vectorize — the largest value over 8 lanes, then its first
/// position — since a vocabulary row is 128k logits and this runs for every greedy row.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_logit(logits);
    logits
        .iter()
        .position(|&l| l == max)
        .unwrap_or(logits.len().saturating_sub(1)) as u32
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
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let logprob = (logits[token as usize] as f64 - log_sum_exp(logits)) as f32;
        Sampled {
            token,
            logprob,
            top: top_logprobs(logits, self.params.top_logprobs),
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature as f64;
        if (p.top_k == 0 || p.top_k >= logits.len()) && p.top_p >= 1.0 && p.min_p <= 0.0 {
            return self.draw_tempered(logits, inv_t);
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        if idx.is_empty() {
            return 0;
        }
        // Most likely first; ties: lower id first.
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if p.top_k > 0 && p.top_k < idx.len() {
            idx.select_nth_unstable_by(p.top_k - 1, by_logit);
            idx.truncate(p.top_k);
        }
        // Only top-p needs the candidates in probability order (to find the nucleus); the walk
        // below is in id order either way, and without top-p a draw costs no sort of the
        // vocabulary (it ran every decode step).
        let nucleus = p.top_p < 1.0;
        if nucleus {
            idx.sort_unstable_by(by_logit);
        }
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        // Tempered weights relative to the most likely candidate (whose weight is 1).
        let mut weights: Vec<f64> = idx
            .iter()
            .map(|&i| fast_exp(((logits[i as usize] as f64 - max) * inv_t) as f32) as f64)
            .collect();
        // min-p: drop candidates less likely than min_p × the most likely.
        let floor = p.min_p as f64;
        if floor > 0.0 {
            weights.iter_mut().filter(|w| **w < floor).for_each(|w| *w = 0.0);
        }
        // top-p: the shortest most-likely-first prefix whose mass reaches top_p of the total.
        let mut keep = weights.len();
        if nucleus {
            let total: f64 = weights.iter().sum();
            let mut mass = 0.0;
            for (i, w) in weights.iter().enumerate() {
                mass += w;
                if mass >= p.top_p as f64 * total {
                    keep = i + 1;
                    break;
                }
            }
        }
        // The kept candidates walked in ascending id order, as the device draws them
        // (`draw_with_uniform`), so one stream draws the same token on every backend.
        let mut kept: Vec<(u32, f64)> = idx[..keep]
            .iter()
            .zip(&weights[..keep])
            .filter(|&(_, &w)| w > 0.0)
            .map(|(&i, &w)| (i, w))
            .collect();
        kept.sort_unstable_by_key(|&(i, _)| i);
        walk_in_id_order(kept.iter().copied(), self.rng.next_f64(), idx[0])
    }

    /// [`Sampler::draw`] for temperature alone (no top-k, top-p or min-p, the default of the
    /// server and the ToT runner): the same candidates (every non-NaN token, in id order), the
    /// same f32 weights and f64 sums in the same order, so the same token for the same stream;
    /// but the weights go into a per-thread buffer instead of an index and a weight vector
    /// allocated per draw (1.5 MB for a 128k row).
    fn draw_tempered(&mut self, logits: &[f32], inv_t: f64) -> u32 {
        thread_local! {
            static WEIGHTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let Some(first) = logits.iter().position(|l| !l.is_nan()) else {
            return 0;
        };
        // The largest non-NaN logit, as over the candidates.
        let max = max_logit(logits) as f64;
        WEIGHTS.with(|w| {
            let mut w = w.borrow_mut();
            w.clear();
            // A NaN logit weighs 0, which the sum and the walk below skip like a non-candidate.
            w.extend(logits.iter().map(|&l| {
                if l.is_nan() {
                    0.0
                } else {
                    fast_exp(((l as f64 - max) * inv_t) as f32)
                }
            }));
            let weights = w.iter().enumerate().map(|(id, &x)| (id as u32, x as f64));
            walk_in_id_order(weights, self.rng.next_f64(), first as u32)
        })
    }
}

/// The walk of a draw: `u ∈ [0, 1)` scaled by the total weight of `weights` ((id, weight ≥ 0)
/// in ascending id order), then the first id whose running weight passes it, zero weights
/// skipped; the last weighted id if rounding leaves none, `unweighted` if nothing weighs
/// anything. The same walk as [`draw_with_uniform`] (f64 sums in id order).
fn walk_in_id_order(weights: impl Iterator<Item = (u32, f64)> + Clone, u: f64, unweighted: u32) -> u32 {
    let mass: f64 = weights.clone().map(|(_, w)| w).sum();
    let mut u = u * mass;
    let mut last = unweighted;
    for (id, w) in weights.filter(|&(_, w)| w != 0.0) {
        if u < w {
            return id;
        }
        u -= w;
        last = id;
    }
    last
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
            let draws: Vec<(u32, u32)> = (0..300).map(|_| (a.draw(&logits), b.draw(&logits))).collect();
            assert!(draws.iter().all(|(x, y)| x == y), "T = {temperature}: {draws:?}");
            let distinct: std::collections::HashSet<u32> = draws.iter().map(|d| d.0).collect();
            assert!(distinct.len() > 50, "the draws spread over the vocabulary");
        }
    }

    #[test]
    fn fast_exp_is_within_a_millionth_of_exp_and_keeps_the_edges() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((fast_exp(x) as f64 - want) / want).abs());
        }
        // f32 rounding of the reduction and the polynomial: a few ulp (1 ulp = 6e-8).
        assert!(worst < 1e-6, "max relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert!(fast_exp(f32::NAN).is_nan());
        // The log-sum-exp built on it: within 1e-6 of the f64 definition on a vocabulary row.
        let row: Vec<f32> = (0..128_256).map(|i| ((i * 7919) % 2000) as f32 / 97.0 - 10.0).collect();
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = m + row.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
        assert!(
            (log_sum_exp(&row) - exact).abs() < 1e-6,
            "{} vs {exact}",
            log_sum_exp(&row)
        );
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
