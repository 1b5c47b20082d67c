//! Passes over one row of logits (a vocabulary: 128k entries for LLaMA 3), written to
//! vectorize: the largest logit, its first position, log-sum-exp, and the tempered weights a
//! draw walks. The host samples every generated token of every sequence whose draw is not on
//! the device, so these run once per row per step: with scalar code a 128k row took 1.5-2 ms
//! at temperature 1 (x86-64, 2026-11-26), about as long as a whole batch-1 GPU decode step.
//!
//! Every pass keeps 8 independent f32 lanes and is compiled twice: for the baseline target and
//! with AVX2, picked at run time. The simple passes (maximum, position, sums) are loops the
//! compiler vectorizes; the exponential pass, which it would not, is written twice, as AVX2
//! intrinsics and as portable lanes. Both forms do the same IEEE operations in the same order
//! (no fused multiply-add anywhere), so a row gives the same bits on every machine.

use crate::backend::cpu::simd::hsum8;

/// Logits per chunk of a row: sums are f32 over a chunk's 8 lanes, f64 across chunks, so
/// rounding stays ~1e-7 relative however long the row.
pub const CHUNK: usize = 1024;

/// Defines `pub fn $name(..)` that runs `$body` compiled for AVX2 where the CPU has it, else for
/// the baseline target (see the module note: the same bits either way).
macro_rules! vectorized {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2, the only feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

// Constants of `fast_exp`: Cody–Waite reduction x = n·ln 2 + r with ln 2 split so that n·LN2_HI
// is exact, and ROUND = 1.5·2²³ (adding and subtracting it rounds to an integer).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND: f32 = 12_582_912.0;
const EXP_LO: f32 = -87.0; // below: e^x is 0 (the f32 exponent's end; −∞ included)
const EXP_HI: f32 = 88.0;
/// The Taylor coefficients of e^r, r⁰ to r⁷ (truncation below 1e-8 relative for |r| ≤ ln2/2).
const TAYLOR: [f32; 8] = [
    1.0,
    1.0,
    0.5,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
];

/// `e^x` in f32 without a libm call: about 3e-7 relative error, from f32 rounding. `x < −87`
/// gives 0, NaN stays NaN, `e^0` is exactly 1. The operations, in order, of the AVX2 form.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI); // NaN stays NaN (the AVX2 form's lane differs, unused)
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // n as an integer without a float → int conversion: t's mantissa holds it (ulp 1 there).
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = TAYLOR[7];
    for c in TAYLOR[..7].iter().rev() {
        p = c + r * p;
    }
    let v = p * f32::from_bits((n_bits.wrapping_add(127) << 23) as u32);
    if x < EXP_LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// The tempered weight of one logit: `e^((l − max)·inv_t)`, exactly 1 at `l == max` (so a row
/// whose maximum is ±∞ stays defined), 0 for NaN.
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    if l == max {
        1.0
    } else if l.is_nan() {
        0.0
    } else {
        fast_exp((l - max) * inv_t)
    }
}

/// The weights of one chunk of logits (into `w` when STORE) and their sum (f32 over 8 lanes
/// in the [`hsum8`] order, then the tail in order), and whether a logit is NaN.
#[inline(always)]
fn weigh_chunk_lanes<const STORE: bool>(l: &[f32], max: f32, inv_t: f32, w: &mut [f32]) -> (f32, bool) {
    let body = l.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    let mut nan = false;
    for (i, &x) in l.iter().enumerate() {
        let v = weight(x, max, inv_t);
        if STORE {
            w[i] = v;
        }
        nan |= x.is_nan();
        if i < body {
            lanes[i % 8] += v;
        }
    }
    let tail = l[body..].iter().fold(0f32, |s, &x| s + weight(x, max, inv_t));
    (hsum8(&lanes) + tail, nan)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`fast_exp`] of 8 lanes, the same operations.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let c = |v: f32| _mm256_set1_ps(v);
        // max/min return the second operand for a NaN lane, replaced at the end.
        let xc = _mm256_min_ps(_mm256_max_ps(x, c(EXP_LO)), c(EXP_HI));
        let t = _mm256_add_ps(_mm256_mul_ps(xc, c(std::f32::consts::LOG2_E)), c(ROUND));
        let n = _mm256_sub_ps(t, c(ROUND));
        let n_bits = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND.to_bits() as i32));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(n, c(LN2_HI))),
            _mm256_mul_ps(n, c(LN2_LO)),
        );
        let mut p = c(TAYLOR[7]);
        for k in (0..7).rev() {
            p = _mm256_add_ps(c(TAYLOR[k]), _mm256_mul_ps(r, p));
        }
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127)), 23));
        let v = _mm256_mul_ps(p, scale);
        let v = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(x, c(EXP_LO), _CMP_LT_OQ));
        _mm256_blendv_ps(v, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))
    }

    /// [`weigh_chunk_lanes`] in AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn weigh_chunk<const STORE: bool>(l: &[f32], max: f32, inv_t: f32, w: &mut [f32]) -> (f32, bool) {
        let body = l.len() / 8 * 8;
        let (vmax, vinv) = (_mm256_set1_ps(max), _mm256_set1_ps(inv_t));
        let mut lanes = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            let x = _mm256_loadu_ps(l.as_ptr().add(i));
            let e = exp8(_mm256_mul_ps(_mm256_sub_ps(x, vmax), vinv));
            let is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
            let e = _mm256_blendv_ps(e, _mm256_set1_ps(1.0), _mm256_cmp_ps(x, vmax, _CMP_EQ_OQ));
            let v = _mm256_blendv_ps(e, _mm256_setzero_ps(), is_nan);
            if STORE {
                _mm256_storeu_ps(w.as_mut_ptr().add(i), v);
            }
            lanes = _mm256_add_ps(lanes, v);
            nan = _mm256_or_ps(nan, is_nan);
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), lanes);
        let mut tail = 0f32;
        let mut tail_nan = false;
        for (i, &x) in l.iter().enumerate().skip(body) {
            let v = weight(x, max, inv_t);
            if STORE {
                w[i] = v;
            }
            tail += v;
            tail_nan |= x.is_nan();
        }
        (hsum8(&sums) + tail, tail_nan || _mm256_movemask_ps(nan) != 0)
    }
}

/// One chunk's weights (stored into `w` when STORE), their sum and whether a logit is NaN, in
/// AVX2 where the CPU has it; `w` is at least as long as `l` when STORE.
#[inline(always)]
fn weigh_chunk<const STORE: bool>(l: &[f32], max: f32, inv_t: f32, w: &mut [f32]) -> (f32, bool) {
    assert!(!STORE || w.len() >= l.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2; the stores stay within `w` (asserted above).
        return unsafe { avx2::weigh_chunk::<STORE>(l, max, inv_t, w) };
    }
    weigh_chunk_lanes::<STORE>(l, max, inv_t, w)
}

vectorized! {
    /// The largest non-NaN logit (−∞ for an empty or all-NaN row).
    pub fn max_logit(logits: &[f32]) -> f32 {
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
}

vectorized! {
    /// The first position of `value` in `logits` (`None` if absent): 8 comparisons at a time.
    pub fn position_of(logits: &[f32], value: f32) -> Option<usize> {
        let chunks = logits.chunks_exact(8);
        let tail_start = logits.len() - chunks.remainder().len();
        for (c, chunk) in chunks.enumerate() {
            if chunk.iter().fold(false, |any, &l| any | (l == value)) {
                return chunk.iter().position(|&l| l == value).map(|j| 8 * c + j);
            }
        }
        logits[tail_start..].iter().position(|&l| l == value).map(|j| tail_start + j)
    }
}

/// Index of the largest logit (lowest index among ties; NaN never wins; an all-NaN row gives
/// its last index).
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_logit(logits);
    position_of(logits, max).unwrap_or(logits.len().saturating_sub(1)) as u32
}

/// `Σ e^(l − max)` over the row for its finite maximum `max` (NaN if a logit is NaN): f32
/// lanes per [`CHUNK`], chunks added in f64: the mass [`tempered_weights`] gives at T = 1.
pub fn sum_exp(logits: &[f32], max: f32) -> f64 {
    let mut nan = false;
    let sum: f64 = logits
        .chunks(CHUNK)
        .map(|c| {
            let (s, n) = weigh_chunk::<false>(c, max, 1.0, &mut []);
            nan |= n;
            s as f64
        })
        .sum();
    if nan {
        f64::NAN
    } else {
        sum
    }
}

/// `ln Σ e^l`: the maximum taken out, [`fast_exp`] per logit (within ~1e-6 of the f64
/// definition on a vocabulary row).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    log_sum_exp_with_max(logits, max_logit(logits))
}

/// [`log_sum_exp`] given the row's [`max_logit`].
pub fn log_sum_exp_with_max(logits: &[f32], max: f32) -> f64 {
    if max.is_infinite() {
        // All −∞ (or some +∞): the sum is not finite; keep the f64 definition's value.
        let m = max as f64;
        return m + logits.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
    }
    max as f64 + sum_exp(logits, max).ln()
}

/// A row's tempered weights and their sums per [`CHUNK`], the input of [`TemperedRow::walk`].
#[derive(Clone, Debug, Default)]
pub struct TemperedRow {
    /// `w[i] = e^((l_i − max)/T)`: exactly 1 where `l_i == max` (so a row whose maximum is ±∞
    /// stays defined), 0 for NaN logits and for tokens a filter dropped.
    pub weights: Vec<f32>,
    /// Σ w over each chunk: f32 over 8 lanes, as f64.
    pub chunk_mass: Vec<f64>,
}

/// Fills `weights` with the tempered weights of `logits` (see [`TemperedRow::weights`]; `max`
/// the largest non-NaN logit, `inv_t` = 1/T) and `chunk_mass` with their sums. Returns whether
/// any logit is NaN.
pub fn tempered_weights(
    logits: &[f32],
    max: f32,
    inv_t: f32,
    weights: &mut Vec<f32>,
    chunk_mass: &mut Vec<f64>,
) -> bool {
    weights.clear();
    weights.resize(logits.len(), 0.0);
    chunk_mass.clear();
    let mut nan = false;
    for (lc, wc) in logits.chunks(CHUNK).zip(weights.chunks_mut(CHUNK)) {
        let (s, n) = weigh_chunk::<true>(lc, max, inv_t, wc);
        chunk_mass.push(s as f64);
        nan |= n;
    }
    nan
}

vectorized! {
    /// Σ w over each chunk of `weights` into `chunk_mass` (after a filter zeroed some), the
    /// same sums [`tempered_weights`] makes.
    pub fn chunk_sums(weights: &[f32], chunk_mass: &mut Vec<f64>) {
        chunk_mass.clear();
        for wc in weights.chunks(CHUNK) {
            let mut lanes = [0f32; 8];
            let (w8, wt) = wc.split_at(wc.len() / 8 * 8);
            for w in w8.chunks_exact(8) {
                for j in 0..8 {
                    lanes[j] += w[j];
                }
            }
            let tail: f32 = wt.iter().sum();
            chunk_mass.push((hsum8(&lanes) + tail) as f64);
        }
    }
}

vectorized! {
    /// min-p: zeroes the weights below `min_p` (weights are relative to the most likely
    /// token's 1).
    pub fn drop_below(min_p: f32, weights: &mut [f32]) {
        for w in weights.iter_mut() {
            *w = if *w < min_p { 0.0 } else { *w };
        }
    }
}

impl TemperedRow {
    /// Σ of every weight (f64 over the chunk sums, in order).
    pub fn mass(&self) -> f64 {
        self.chunk_mass.iter().sum()
    }

    /// The token a draw takes for `u ∈ [0, 1)`: `u` × the mass, then the first id (ascending)
    /// whose running weight passes it, zero weights skipped. Whole chunks are skipped by their
    /// sums, so a walk reads one chunk of weights, not the row. If rounding leaves nothing (the
    /// running sum inside a chunk falls short of its f32 sum), the last weighted id; if
    /// nothing weighs anything, `unweighted`.
    pub fn walk(&self, u: f64, unweighted: u32) -> u32 {
        let mut target = u * self.mass();
        let start = self.chunk_mass.iter().position(|&m| {
            if target < m {
                true
            } else {
                target -= m;
                false
            }
        });
        if let Some(c) = start {
            for (i, &w) in self.weights.iter().enumerate().skip(c * CHUNK) {
                if w == 0.0 {
                    continue;
                }
                if target < w as f64 {
                    return i as u32;
                }
                target -= w as f64;
            }
        }
        self.weights
            .iter()
            .rposition(|&w| w != 0.0)
            .map_or(unweighted, |i| i as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row with NaN, ±∞-free logits spread over [−6, 6), and a length that is not a multiple
    /// of the chunk or of 8.
    fn row(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                if i % 997 == 5 {
                    f32::NAN
                } else {
                    ((i * 7919) % 3001) as f32 / 250.0 - 6.0
                }
            })
            .collect()
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
    }

    #[test]
    fn log_sum_exp_is_within_a_millionth_of_the_f64_definition() {
        let row: Vec<f32> = (0..128_256).map(|i| ((i * 7919) % 2000) as f32 / 97.0 - 10.0).collect();
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exact = m + row.iter().map(|&l| (l as f64 - m).exp()).sum::<f64>().ln();
        let got = log_sum_exp(&row);
        assert!((got - exact).abs() < 1e-6, "{got} vs {exact}");
        // An infinite maximum leaves no finite log-sum-exp: the f64 definition's NaN.
        assert!(log_sum_exp(&[f32::NEG_INFINITY; 3]).is_nan());
        assert!(log_sum_exp(&[0.0, f32::INFINITY]).is_nan());
    }

    #[test]
    fn argmax_takes_the_first_largest_and_never_nan() {
        for n in [1, 7, 8, 9, 1000, 5003] {
            let mut r = row(n);
            let want = r
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .fold(
                    (0, f32::NEG_INFINITY),
                    |best, (i, &l)| if l > best.1 { (i, l) } else { best },
                )
                .0;
            assert_eq!(argmax(&r) as usize, want, "n = {n}");
            // A tie later in the row does not move it; an earlier tie does.
            let max = r[want];
            r.push(max);
            assert_eq!(argmax(&r) as usize, want);
            if want > 0 {
                r[0] = max;
                assert_eq!(argmax(&r), 0);
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 2.0, f32::NAN]), 1);
        assert_eq!(max_logit(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn tempered_weights_and_chunk_sums_match_their_definitions() {
        for n in [3, 1024, 5003, 128_256] {
            let logits = row(n);
            let max = max_logit(&logits);
            for t in [0.5f32, 1.0, 1.7] {
                let mut r = TemperedRow::default();
                tempered_weights(&logits, max, 1.0 / t, &mut r.weights, &mut r.chunk_mass);
                assert_eq!(r.weights.len(), n);
                assert_eq!(r.chunk_mass.len(), n.div_ceil(CHUNK));
                for (&l, &w) in logits.iter().zip(&r.weights) {
                    if l.is_nan() {
                        assert_eq!(w, 0.0);
                    } else {
                        let want = ((l as f64 - max as f64) / t as f64).exp();
                        assert!(((w as f64 - want) / want).abs() < 4e-6, "l {l}: {w} vs {want}");
                    }
                }
                for (c, &m) in r.chunk_mass.iter().enumerate() {
                    let exact: f64 = r.weights[c * CHUNK..((c + 1) * CHUNK).min(n)]
                        .iter()
                        .map(|&w| w as f64)
                        .sum();
                    assert!((m - exact).abs() <= 1e-6 * exact, "chunk {c}: {m} vs {exact}");
                }
                // chunk_sums recomputes exactly what the weights pass summed.
                let mut again = Vec::new();
                chunk_sums(&r.weights, &mut again);
                assert_eq!(again, r.chunk_mass);
            }
        }
        // ±∞ maxima: weight 1 at the maximum, so the row stays defined.
        let mut r = TemperedRow::default();
        let inf = [1.0, f32::INFINITY, f32::NAN, f32::INFINITY];
        tempered_weights(&inf, f32::INFINITY, 1.0, &mut r.weights, &mut r.chunk_mass);
        assert_eq!(r.weights, [0.0, 1.0, 0.0, 1.0]);
        let ninf = [f32::NEG_INFINITY; 3];
        tempered_weights(&ninf, f32::NEG_INFINITY, 1.0, &mut r.weights, &mut r.chunk_mass);
        assert_eq!(r.weights, [1.0; 3]);
    }

    #[test]
    fn the_avx2_and_portable_passes_give_the_same_bits() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx2") {
                eprintln!("no AVX2 on this CPU: only the portable form runs here");
                return;
            }
            let mut logits = row(5003);
            logits.extend([f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 80.0, -200.0, 1e-30, -1e30]);
            let max = max_logit(&logits);
            for (max, inv_t) in [(max, 1.0), (max, 1.7), (max, 0.25), (f32::INFINITY, 1.0), (3.0, 1e30)] {
                for c in logits.chunks(1000) {
                    let (mut a, mut b) = (vec![0f32; c.len()], vec![0f32; c.len()]);
                    let x = weigh_chunk_lanes::<true>(c, max, inv_t, &mut a);
                    // SAFETY: AVX2 present (checked above); `b` is as long as the chunk.
                    let y = unsafe { avx2::weigh_chunk::<true>(c, max, inv_t, &mut b) };
                    assert_eq!(x.0.to_bits(), y.0.to_bits(), "sum, max {max} 1/T {inv_t}");
                    assert_eq!(x.1, y.1);
                    let bits = |v: &[f32]| v.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "weights, max {max} 1/T {inv_t}");
                }
            }
        }
    }

    #[test]
    fn the_walk_equals_a_running_sum_over_the_whole_row() {
        // The reference: one f64 running sum over every weight in id order, against the target
        // u × (the chunked mass). The chunked walk must agree except where u lands within
        // rounding of a boundary: none of these.
        let logits = row(128_256);
        let mut r = TemperedRow::default();
        tempered_weights(&logits, max_logit(&logits), 1.0, &mut r.weights, &mut r.chunk_mass);
        let mass = r.mass();
        let mut rng = crate::engine::sampler::Rng::new(3);
        for _ in 0..500 {
            let u = rng.next_f64();
            let target = u * mass;
            let mut run = 0.0;
            let want = r
                .weights
                .iter()
                .position(|&w| {
                    run += w as f64;
                    target < run
                })
                .unwrap() as u32;
            assert_eq!(r.walk(u, 0), want, "u = {u}");
        }
        // The edges: u = 0 takes the first weighted id, u → 1 the last; nothing weighted gives
        // the fallback.
        r.weights[..10].fill(0.0);
        chunk_sums(&r.weights, &mut r.chunk_mass);
        assert_eq!(r.walk(0.0, 7), 10);
        let last = r.weights.iter().rposition(|&w| w != 0.0).unwrap() as u32;
        assert_eq!(r.walk(1.0 - f64::EPSILON / 2.0, 7), last);
        r.weights.fill(0.0);
        chunk_sums(&r.weights, &mut r.chunk_mass);
        assert_eq!(r.walk(0.5, 7), 7);
    }
}
