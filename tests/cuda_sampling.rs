//! On-device sampling (`CudaBackend::sample_rows`, kernels/sampling.cu) against its host oracle
//! (`sampler::draw_with_uniform` / `kept_weights`), the host `Sampler` and the host
//! log-probabilities. Without a GPU the device tests print a notice and pass, except with
//! `REQUIRE_GPU=1` (the GPU bundle's run.sh), where a missing GPU fails them. The host-only
//! tests check that the cases the device tests use are sound (margins, statistics).
//!
//! Tolerances, and why:
//! - Token ids of greedy rows, top-n lists and kept sets: exact (integer keys, exact ties).
//! - Log-probabilities: atol 5e-6 + rtol 5e-7. The device adds f32 `expf(l − max)` terms in f64
//!   (expf ≤ 2 ulp; the f32 subtraction ≤ 2⁻²⁴·|l − max| relative), the host adds f64 terms:
//!   ≤ ~1e-6 apart for these logits, plus one f32 rounding of the result (≤ 2.4e-7·|lp|
//!   relative on each side). A missing or extra token moves the log-sum-exp by ≥ ~1e-4 here.
//! - Drawn tokens vs the oracle: equal, except where the device's f32 weights (relative error
//!   ≤ ~4e-6 at |l − max|/T ≤ 20, see kernels/sampling.cu) move a boundary. A different token is
//!   accepted only if, for the given parameters or for min_p or top_p moved by a relative
//!   `TOL` = 2e-5 (a weight that close to min-p, a top-p prefix mass that close to its
//!   target), it is the oracle token's neighbour in the kept list (ascending id) and `u` lies
//!   within `TOL` of the cumulative fraction between them. Such draws are counted and must
//!   stay under 1%. The tie and distribution cases keep every weight and top-p prefix mass at
//!   least `MARGIN` = 1e-4 (relative) from the thresholds (checked by a host-only test), so
//!   there the kept set itself must be exact.
//! - Distributions: chi-square at p = 1e-4 (Wilson–Hilferty critical value), bins expecting
//!   < 5 draws pooled; the same u streams pass with the oracle's draws (host-only test), so a
//!   failure on the GPU is the device's.

mod common;

use qmtot::backend::cuda::sampling::{DeviceSample, RowSampling};
use qmtot::backend::cuda::CudaBackend;
use qmtot::engine::sampler::{
    argmax, candidate_logprobs, draw_with_uniform, kept_weights, log_softmax, top_logprobs, Rng, Sampler,
    SamplingParams,
};

use common::chi2::{chi2_critical, chi2_fit, chi2_two_sample};
use common::{assert_close, gpu, rand_values};

const TOL: f64 = 2e-5;
const MARGIN: f64 = 1e-4;
const LP_ATOL: f32 = 5e-6;
const LP_RTOL: f32 = 5e-7;

fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        ..Default::default()
    }
}

/// One row's request, owned (a `RowSampling` borrows it).
#[derive(Clone)]
struct Req {
    params: SamplingParams,
    u: f64,
    candidates: Vec<u32>,
}

fn req(params: &SamplingParams, u: f64) -> Req {
    Req {
        params: params.clone(),
        u,
        candidates: Vec::new(),
    }
}

/// Samples `logits` (`[reqs.len(), vocab]`) on the device, one request per row.
fn sample(g: &CudaBackend, vocab: usize, logits: &[f32], reqs: &[Req]) -> Vec<DeviceSample> {
    let t = g.upload_logits(reqs.len(), vocab, logits).unwrap();
    sample_rows(g, &t, reqs).unwrap()
}

/// `CudaBackend::sample_rows` of already uploaded logits, one request per row.
fn sample_rows(
    g: &CudaBackend,
    logits: &qmtot::backend::cuda::CudaTensor,
    reqs: &[Req],
) -> qmtot::Result<Vec<DeviceSample>> {
    let rows: Vec<RowSampling> = reqs
        .iter()
        .map(|r| RowSampling {
            params: &r.params,
            uniform: r.u,
            candidates: &r.candidates,
        })
        .collect();
    g.sample_rows(logits, &rows)
}

/// Whether `got` is the oracle's draw for `u` under `p`, or its neighbour in the kept list
/// (ascending id) with `u` within `TOL` of the cumulative fraction between them.
fn draw_within_rounding(logits: &[f32], p: &SamplingParams, u: f64, got: u32) -> bool {
    let want = draw_with_uniform(logits, p, u);
    if got == want {
        return true;
    }
    let kept = kept_weights(logits, p);
    let at = |id: u32| kept.iter().position(|k| k.0 == id);
    let (Some(jw), Some(jg)) = (at(want), at(got)) else {
        return false;
    };
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let boundary = kept[..=jw.min(jg)].iter().map(|k| k.1).sum::<f64>() / total;
    jw.abs_diff(jg) == 1 && (boundary - u).abs() <= TOL
}

/// Whether the device's `got` is the oracle's draw for `u` (`Ok(true)`), or a token that f32
/// rounding explains (`Ok(false)`, see the module doc); otherwise what is wrong.
fn check_draw(logits: &[f32], p: &SamplingParams, u: f64, got: u32) -> Result<bool, String> {
    let want = draw_with_uniform(logits, p, u);
    if got == want {
        return Ok(true);
    }
    let scaled = |x: f32, f: f64| (x as f64 * f) as f32;
    let mut near = vec![p.clone()];
    for f in [1.0 - TOL, 1.0 + TOL] {
        if p.min_p > 0.0 {
            near.push(SamplingParams {
                min_p: scaled(p.min_p, f).min(1.0),
                ..p.clone()
            });
        }
        if p.top_p < 1.0 {
            near.push(SamplingParams {
                top_p: scaled(p.top_p, f).min(1.0),
                ..p.clone()
            });
        }
    }
    if near.iter().any(|q| draw_within_rounding(logits, q, u, got)) {
        Ok(false)
    } else {
        Err(format!("drew {got}, the oracle {want} (u {u}, {p:?})"))
    }
}

/// How far (relative) the row's weights are from min-p and its top-p prefix masses from the
/// top-p target: the kept set is the same under f32 weights when this exceeds ~1e-5.
fn kept_set_margin(logits: &[f32], p: &SamplingParams) -> f64 {
    let mut margin = f64::INFINITY;
    if p.temperature == 0.0 {
        return margin;
    }
    let unfiltered = SamplingParams {
        min_p: 0.0,
        top_p: 1.0,
        ..p.clone()
    };
    let mut weights: Vec<f64> = kept_weights(logits, &unfiltered).iter().map(|k| k.1).collect();
    if p.min_p > 0.0 {
        let m = p.min_p as f64;
        margin = weights.iter().map(|w| (w - m).abs() / m).fold(margin, f64::min);
        weights.retain(|&w| w >= m);
    }
    if p.top_p < 1.0 {
        // Most likely first (equal weights are interchangeable for the prefix masses).
        weights.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = weights.iter().sum();
        let target = p.top_p as f64 * total;
        let mut mass = 0.0;
        for w in weights {
            mass += w;
            margin = margin.min((mass - target).abs() / total);
        }
    }
    margin
}

// ---- the cases -------------------------------------------------------------------------------

/// Settings for the token-for-token comparison: plain, each filter, combined, a cold and a hot
/// temperature.
fn oracle_settings() -> Vec<SamplingParams> {
    vec![
        params(1.0, 0, 1.0, 0.0),
        params(0.7, 40, 1.0, 0.0),
        params(1.0, 0, 0.9, 0.0),
        params(1.3, 0, 1.0, 0.05),
        params(0.8, 300, 0.95, 0.01),
        params(0.25, 0, 0.5, 0.0),
        params(2.0, 1000, 0.99, 0.001),
    ]
}

/// `rows` rows of `vocab` logits for the oracle comparison: uniform in [−4, 4), every other row
/// quantized to steps of 0.25 (many ties at every filter's cut), and u from a seeded stream.
fn oracle_rows(vocab: usize, rows: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
    let mut x = rand_values(vocab * rows, seed, 4.0);
    for (r, row) in x.chunks_mut(vocab).enumerate() {
        if r % 2 == 1 {
            row.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0);
        }
    }
    let mut rng = Rng::new(seed + 1);
    (x, (0..rows).map(|_| rng.next_f64()).collect())
}

/// A 40-token row on 13 levels (ties inside and at the edges of every filter) and the settings
/// the distribution tests draw it with.
fn distribution_case() -> (Vec<f32>, Vec<SamplingParams>) {
    let logits: Vec<f32> = (0..40).map(|i| ((i * 7919) % 13) as f32 * 0.35 - 2.0).collect();
    let settings = vec![
        params(1.0, 0, 1.0, 0.0),
        params(1.0, 10, 1.0, 0.0),
        params(0.8, 0, 0.7, 0.0),
        params(1.3, 0, 1.0, 0.1),
        params(0.9, 25, 0.9, 0.02),
    ];
    (logits, settings)
}

const DRAWS: usize = 20000;

/// `DRAWS` uniforms of the stream the distribution tests use for setting `s`.
fn distribution_uniforms(s: usize) -> Vec<f64> {
    let mut rng = Rng::new(100 + s as u64);
    (0..DRAWS).map(|_| rng.next_f64()).collect()
}

/// Whether `draws` (token ids) fit the kept distribution and the host `Sampler`'s draws: `None`
/// if they do, else what is wrong.
fn distribution_error(what: &str, logits: &[f32], p: &SamplingParams, draws: &[u32]) -> Option<String> {
    let kept = kept_weights(logits, p);
    let mut counts = vec![0usize; logits.len()];
    for &t in draws {
        if !kept.iter().any(|k| k.0 == t) {
            return Some(format!("{what} {p:?}: drew {t}, not kept"));
        }
        counts[t as usize] += 1;
    }
    // The host sampler, on an independent stream.
    let mut sampler = Sampler::new(SamplingParams { seed: 7, ..p.clone() }).unwrap();
    let mut host = vec![0usize; logits.len()];
    for _ in 0..draws.len() {
        host[sampler.sample(logits).token as usize] += 1;
    }
    for (test, (stat, df)) in [
        ("fit to the kept weights", chi2_fit(&counts, &kept)),
        ("two-sample vs Sampler", chi2_two_sample(&counts, &host)),
    ] {
        let limit = chi2_critical(df, 3.72);
        eprintln!("{what} {p:?} {test}: chi² {stat:.1} (limit {limit:.1}, {df} df)");
        if stat >= limit {
            return Some(format!("{what} {p:?} {test}: chi² {stat:.1} ≥ {limit:.1} with {df} df"));
        }
    }
    None
}

// ---- host-only checks of the cases -----------------------------------------------------------

#[test]
fn the_cases_are_sound_without_a_gpu() {
    // Where kept sets must be exact, they are decided far from float rounding.
    let (logits, settings) = tie_case();
    for p in &settings {
        let m = kept_set_margin(&logits, p);
        assert!(m > MARGIN, "{p:?}: kept-set margin {m:e}");
    }
    // The draw check accepts the oracle and rejects a token far from it.
    let p = &settings[3];
    for i in 0..100 {
        let u = i as f64 / 100.0;
        let want = draw_with_uniform(&logits, p, u);
        assert_eq!(check_draw(&logits, p, u, want), Ok(true));
        assert!(check_draw(&logits, p, u, (want + 17) % 64).is_err());
        assert!(check_draw(&logits, p, u, 0).is_err(), "id 0 is not kept");
    }
    let (logits, settings) = distribution_case();
    for (s, p) in settings.iter().enumerate() {
        let m = kept_set_margin(&logits, p);
        assert!(m > MARGIN, "{p:?}: kept-set margin {m:e}");
        // The oracle passes the same statistics with the same uniforms.
        let draws: Vec<u32> = distribution_uniforms(s)
            .iter()
            .map(|&u| draw_with_uniform(&logits, p, u))
            .collect();
        assert_eq!(distribution_error("oracle", &logits, p, &draws), None);
    }
    // A slightly wrong distribution fails them: draws at temperature 1 judged as 1.1.
    let draws: Vec<u32> = distribution_uniforms(0)
        .iter()
        .map(|&u| draw_with_uniform(&logits, &settings[0], u))
        .collect();
    let hotter = params(1.1, 0, 1.0, 0.0);
    assert!(distribution_error("T 1 as 1.1", &logits, &hotter, &draws).is_some());
}

// ---- device tests ----------------------------------------------------------------------------

#[test]
fn greedy_is_the_host_argmax_with_ties_nan_and_signed_zeros() {
    let Some(g) = gpu() else { return };
    let greedy = params(0.0, 0, 1.0, 0.0);
    for vocab in [7usize, 1000, 49152, 128256] {
        let rows = 6;
        let mut x = rand_values(rows * vocab, vocab as u64, 4.0);
        {
            // Row 1: the maximum again at a lower and at a higher id.
            let r = &mut x[vocab..2 * vocab];
            let m = r[argmax(r) as usize];
            r[vocab / 3] = m;
            r[vocab - 1] = m;
        }
        {
            // Row 2: NaN first and where the maximum was.
            let r = &mut x[2 * vocab..3 * vocab];
            r[0] = f32::NAN;
            let m = argmax(r) as usize;
            r[m] = f32::NAN;
        }
        {
            // Row 3: the maximum is zero, −0 at a lower id than +0 (they compare equal).
            let r = &mut x[3 * vocab..4 * vocab];
            r.iter_mut().for_each(|v| *v = -v.abs() - 0.5);
            r[vocab / 4] = -0.0;
            r[vocab / 2] = 0.0;
        }
        // Row 4: every logit NaN (the device gives 0; the host argmax gives the last id).
        x[4 * vocab..5 * vocab].fill(f32::NAN);
        // Row 5: every logit −inf (all tie: id 0).
        x[5 * vocab..].fill(f32::NEG_INFINITY);
        let reqs = vec![req(&greedy, 0.5); rows];
        let out = sample(&g, vocab, &x, &reqs);
        for (r, (row, o)) in x.chunks(vocab).zip(&out).enumerate() {
            let want = if r == 4 { 0 } else { argmax(row) };
            assert_eq!(o.token, want, "vocab {vocab} row {r}");
            if matches!(r, 0 | 1 | 3) {
                let lp = log_softmax(row);
                assert_close(
                    &format!("greedy logprob vocab {vocab} row {r}"),
                    &[o.logprob],
                    &[lp[want as usize]],
                    LP_ATOL,
                    LP_RTOL,
                );
            } else {
                assert!(
                    o.logprob.is_nan(),
                    "vocab {vocab} row {r}: a row with NaN or only −inf has no logprob (as on the host)"
                );
            }
        }
        assert_eq!(out[3].token as usize, vocab / 4, "−0 and +0 tie: the lower id");
    }
}

/// Rows for the log-probability test: plain, tied top values (row 3), a NaN (row 4).
fn logprob_case(vocab: usize) -> (Vec<f32>, Vec<Req>) {
    let rows = 5;
    let mut x = rand_values(rows * vocab, 40 + vocab as u64, 5.0);
    {
        // Row 3: the top value five more times (the top list orders equal values by id).
        let r = &mut x[3 * vocab..4 * vocab];
        let m = r[argmax(r) as usize];
        for i in [9, vocab / 2, 3, vocab - 2, 1000] {
            r[i] = m;
        }
    }
    // Row 4: NaN logits are never listed; every log-probability is NaN, as on the host.
    x[4 * vocab + 11] = f32::NAN;
    let v = vocab as u32;
    let reqs = [
        (params(0.0, 0, 1.0, 0.0), 0, vec![]),
        (params(1.0, 0, 1.0, 0.0), 1, vec![0, v - 1]),
        (params(0.7, 50, 0.9, 0.0), 5, vec![3, 3, 17, v / 2]),
        (params(1.5, 0, 1.0, 0.05), 20, vec![9]),
        (params(1.0, 0, 1.0, 0.0), 20, vec![11, 12]),
    ];
    let reqs = reqs
        .into_iter()
        .enumerate()
        .map(|(r, (p, top, candidates))| Req {
            params: SamplingParams { top_logprobs: top, ..p },
            u: (r as f64 + 0.5) / rows as f64,
            candidates,
        })
        .collect();
    (x, reqs)
}

#[test]
fn logprobs_candidates_and_top_n_match_the_host() {
    let Some(g) = gpu() else { return };
    for vocab in [49152usize, 128256] {
        let (x, reqs) = logprob_case(vocab);
        let out = sample(&g, vocab, &x, &reqs);
        for (r, ((row, rq), o)) in x.chunks(vocab).zip(&reqs).zip(&out).enumerate() {
            let what = format!("vocab {vocab} row {r}");
            let top = top_logprobs(row, rq.params.top_logprobs);
            let ids = |t: &[(u32, f32)]| t.iter().map(|e| e.0).collect::<Vec<_>>();
            assert_eq!(ids(&o.top), ids(&top), "{what}: top ids");
            assert_eq!(o.candidate_logprobs.len(), rq.candidates.len(), "{what}");
            check_draw(row, &rq.params, rq.u, o.token).unwrap_or_else(|e| panic!("{what}: {e}"));
            if r == 4 {
                assert!(
                    o.logprob.is_nan() && o.candidate_logprobs.iter().all(|l| l.is_nan()),
                    "{what}"
                );
                assert!(o.top.iter().all(|t| t.1.is_nan()), "{what}");
                assert!(!o.top.iter().any(|t| t.0 == 11), "{what}: NaN listed");
                continue;
            }
            let lp = log_softmax(row);
            assert_close(
                &format!("{what} token"),
                &[o.logprob],
                &[lp[o.token as usize]],
                LP_ATOL,
                LP_RTOL,
            );
            let want = candidate_logprobs(row, &rq.candidates).unwrap();
            assert_close(
                &format!("{what} candidates"),
                &o.candidate_logprobs,
                &want,
                LP_ATOL,
                LP_RTOL,
            );
            let (got, want): (Vec<f32>, Vec<f32>) = o.top.iter().zip(&top).map(|(a, b)| (a.1, b.1)).unzip();
            assert_close(&format!("{what} top"), &got, &want, LP_ATOL, LP_RTOL);
        }
        // Row 3 lists its equal maxima (the original and the five copies) first, by ascending id.
        let tied: Vec<u32> = out[3]
            .top
            .iter()
            .take_while(|t| t.1 == out[3].top[0].1)
            .map(|t| t.0)
            .collect();
        assert!(tied.len() >= 5 && tied.windows(2).all(|w| w[0] < w[1]), "{tied:?}");
    }
}

#[test]
fn a_fixed_uniform_reproduces() {
    let Some(g) = gpu() else { return };
    let vocab = 32000;
    let (x, us) = oracle_rows(vocab, 16, 9);
    let settings = oracle_settings();
    let reqs: Vec<Req> = us
        .iter()
        .enumerate()
        .map(|(r, &u)| Req {
            params: SamplingParams {
                top_logprobs: 3,
                ..settings[r % settings.len()].clone()
            },
            u,
            candidates: vec![r as u32, 5],
        })
        .collect();
    let first = sample(&g, vocab, &x, &reqs);
    for _ in 0..3 {
        assert_eq!(sample(&g, vocab, &x, &reqs), first, "same logits and u, same results");
    }
}

#[test]
fn device_tokens_equal_the_host_oracle_for_many_uniforms() {
    let Some(g) = gpu() else { return };
    for (vocab, rows, seed) in [(4099usize, 64usize, 1u64), (128256, 4, 2)] {
        let (x, _) = oracle_rows(vocab, rows, seed);
        for p in oracle_settings() {
            // Every row many times: 32 uniforms per row in one launch.
            let per_row = 32;
            let mut rng = Rng::new(seed * 1000 + p.top_k as u64);
            let mut logits = Vec::with_capacity(x.len() * per_row);
            let mut reqs = Vec::new();
            for row in x.chunks(vocab) {
                for _ in 0..per_row {
                    logits.extend_from_slice(row);
                    reqs.push(req(&p, rng.next_f64()));
                }
            }
            let out = sample(&g, vocab, &logits, &reqs);
            let mut near = 0;
            for (i, (o, rq)) in out.iter().zip(&reqs).enumerate() {
                let row = &x[(i / per_row) * vocab..(i / per_row + 1) * vocab];
                match check_draw(row, &p, rq.u, o.token) {
                    Ok(true) => {}
                    Ok(false) => near += 1,
                    Err(e) => panic!("vocab {vocab} {p:?} draw {i}: {e}"),
                }
            }
            eprintln!(
                "vocab {vocab} {p:?}: {near} of {} draws at a rounding boundary",
                reqs.len()
            );
            assert!(near * 100 <= reqs.len(), "too many boundary cases: {near}");
        }
    }
}

/// Eight levels, each on 8 ids spread over the row, and settings whose cuts fall inside a tie
/// group.
fn tie_case() -> (Vec<f32>, Vec<SamplingParams>) {
    let logits: Vec<f32> = (0..64).map(|i| ((i * 5) % 8) as f32 * 0.5).collect();
    let settings = vec![
        params(1.0, 3, 1.0, 0.0),
        params(1.0, 12, 1.0, 0.0),
        params(1.0, 0, 0.3, 0.0),
        params(1.0, 0, 0.55, 0.0),
        params(1.0, 11, 0.8, 0.0),
        params(1.0, 0, 1.0, 0.6),
    ];
    (logits, settings)
}

#[test]
fn ties_at_the_top_k_and_top_p_cuts_go_to_the_lower_ids() {
    let Some(g) = gpu() else { return };
    let (logits, settings) = tie_case();
    let vocab = logits.len();
    let n = 4096;
    for p in settings {
        // u on a grid: every kept token (probability > 1/20 here) is drawn.
        let reqs: Vec<Req> = (0..n).map(|i| req(&p, (i as f64 + 0.5) / n as f64)).collect();
        let x: Vec<f32> = logits.iter().copied().cycle().take(n * vocab).collect();
        let out = sample(&g, vocab, &x, &reqs);
        let mut drawn: Vec<u32> = out.iter().map(|o| o.token).collect();
        for (o, rq) in out.iter().zip(&reqs) {
            assert!(
                draw_within_rounding(&logits, &p, rq.u, o.token),
                "{p:?}: u {} drew {}",
                rq.u,
                o.token
            );
        }
        drawn.sort_unstable();
        drawn.dedup();
        let kept: Vec<u32> = kept_weights(&logits, &p).iter().map(|k| k.0).collect();
        assert_eq!(drawn, kept, "{p:?}: the drawn set is the kept set");
    }
}

#[test]
fn device_draws_follow_the_sampler_distribution() {
    let Some(g) = gpu() else { return };
    let (logits, settings) = distribution_case();
    let vocab = logits.len();
    // One launch per setting: DRAWS rows of the same logits, each with its own u.
    let x: Vec<f32> = logits.iter().copied().cycle().take(DRAWS * vocab).collect();
    for (s, p) in settings.iter().enumerate() {
        let reqs: Vec<Req> = distribution_uniforms(s).into_iter().map(|u| req(p, u)).collect();
        let draws: Vec<u32> = sample(&g, vocab, &x, &reqs).iter().map(|o| o.token).collect();
        assert_eq!(distribution_error("device", &logits, p, &draws), None);
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let Some(g) = gpu() else { return };
    let vocab = 10;
    let x = rand_values(2 * vocab, 3, 1.0);
    let logits = g.upload_logits(2, vocab, &x).unwrap();
    let ok = params(1.0, 0, 1.0, 0.0);
    let row = |p: &SamplingParams, u: f64, c: &'static [u32]| Req {
        params: p.clone(),
        u,
        candidates: c.to_vec(),
    };
    let run = |t: &qmtot::backend::cuda::CudaTensor, reqs: &[Req]| sample_rows(&g, t, reqs);
    let good = row(&ok, 0.5, &[]);
    assert_eq!(run(&logits, &[good.clone(), good.clone()]).unwrap().len(), 2);
    let backend = |r: qmtot::Result<Vec<DeviceSample>>, what: &str| {
        assert!(
            matches!(r, Err(qmtot::Error::Backend { backend: "cuda", .. })),
            "{what}: {r:?}"
        );
    };
    let invalid = |r: qmtot::Result<Vec<DeviceSample>>, what: &str| {
        assert!(matches!(r, Err(qmtot::Error::InvalidArgument(_))), "{what}: {r:?}");
    };
    // Shapes and dtype.
    backend(run(&logits, std::slice::from_ref(&good)), "one request for two rows");
    let f16 = g.upload_activations(2, vocab, &x).unwrap();
    backend(run(&f16, &[good.clone(), good.clone()]), "f16 logits");
    let empty = g.upload_logits(1, 0, &[]).unwrap();
    backend(run(&empty, std::slice::from_ref(&good)), "vocabulary 0");
    assert!(run(&g.upload_logits(0, vocab, &[]).unwrap(), &[]).unwrap().is_empty());
    // Parameters.
    let bad_row = |r: Req| [good.clone(), r];
    match run(&logits, &bad_row(row(&ok, 0.5, &[3, 10]))) {
        Err(qmtot::Error::TokenOutOfRange { id: 10, vocab: 10 }) => {}
        other => panic!("candidate out of range: {other:?}"),
    }
    let many = SamplingParams {
        top_logprobs: 21,
        ..ok.clone()
    };
    invalid(run(&logits, &bad_row(row(&many, 0.5, &[]))), "top_logprobs 21");
    invalid(
        run(&logits, &bad_row(row(&params(-1.0, 0, 1.0, 0.0), 0.5, &[]))),
        "temperature −1",
    );
    invalid(
        run(&logits, &bad_row(row(&params(f32::NAN, 0, 1.0, 0.0), 0.5, &[]))),
        "temperature NaN",
    );
    invalid(
        run(&logits, &bad_row(row(&params(1.0, 0, 0.0, 0.0), 0.5, &[]))),
        "top_p 0",
    );
    invalid(
        run(&logits, &bad_row(row(&params(1.0, 0, 1.0, 1.5), 0.5, &[]))),
        "min_p 1.5",
    );
    for u in [1.0, -0.1, f64::NAN] {
        invalid(run(&logits, &bad_row(row(&ok, u, &[]))), &format!("uniform {u}"));
    }
}
