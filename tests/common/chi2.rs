//! Chi-square statistics for the sampling tests, shared by the host sampler's unit tests
//! (src/engine/sampler.rs includes this file) and the device sampling tests.

/// Chi-square critical value for `df` degrees of freedom at upper-tail normal quantile `z`
/// (Wilson–Hilferty; z = 3.72 is p = 1e-4).
pub fn chi2_critical(df: usize, z: f64) -> f64 {
    let (d, a) = (df as f64, 2.0 / (9.0 * df as f64));
    d * (1.0 - a + z * a.sqrt()).powi(3)
}

/// Goodness of fit of `counts` (by token id) to the normalized kept weights; bins expecting
/// fewer than 5 draws pooled. (statistic, degrees of freedom)
pub fn chi2_fit(counts: &[usize], kept: &[(u32, f64)]) -> (f64, usize) {
    let n = counts.iter().sum::<usize>() as f64;
    let total: f64 = kept.iter().map(|k| k.1).sum();
    let (mut stat, mut bins, mut pool) = (0.0, 0, (0.0, 0.0));
    for &(id, w) in kept {
        let (o, e) = (counts[id as usize] as f64, n * w / total);
        if e < 5.0 {
            pool = (pool.0 + o, pool.1 + e);
        } else {
            stat += (o - e).powi(2) / e;
            bins += 1;
        }
    }
    if pool.1 > 0.0 {
        stat += (pool.0 - pool.1).powi(2) / pool.1;
        bins += 1;
    }
    (stat, bins.max(2) - 1)
}

/// Two-sample chi-square of equal-size samples; bins with fewer than 10 draws pooled.
pub fn chi2_two_sample(a: &[usize], b: &[usize]) -> (f64, usize) {
    let (mut stat, mut bins, mut pool) = (0.0, 0, (0.0, 0.0));
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        if x + y < 10.0 {
            pool = (pool.0 + x, pool.1 + y);
        } else {
            stat += (x - y).powi(2) / (x + y);
            bins += 1;
        }
    }
    if pool.0 + pool.1 > 0.0 {
        stat += (pool.0 - pool.1).powi(2) / (pool.0 + pool.1);
        bins += 1;
    }
    (stat, bins.max(2) - 1)
}
