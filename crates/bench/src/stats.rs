//! Order statistics over measured durations.

use serde::Serialize;

/// Median, p90 and p99 of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// How many samples.
    pub n: usize,
    /// The median.
    pub median_us: f64,
    /// The 90th percentile.
    pub p90_us: f64,
    /// The 99th percentile.
    pub p99_us: f64,
}

/// The `q` quantile (0..=1) of sorted samples, by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

impl Summary {
    /// Summarises samples given in microseconds.
    pub fn of(samples_us: &[f64]) -> Self {
        let mut v = samples_us.to_vec();
        v.sort_by(f64::total_cmp);
        Self {
            n: v.len(),
            median_us: quantile(&v, 0.5),
            p90_us: quantile(&v, 0.9),
            p99_us: quantile(&v, 0.99),
        }
    }
}

/// The median of the pairwise ratios `a[i] / b[i]`: measured in the same round, each pair saw
/// the same machine state, so drift cancels out.
pub fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y > 0.0)
        .map(|(x, y)| x / y)
        .collect();
    median(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.median_us, s.p90_us, s.p99_us), (50.0, 90.0, 99.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_ratio(&[2.0, 3.0, 9.0], &[1.0, 3.0, 3.0]), 2.0);
        assert!(Summary::of(&[]).median_us.is_nan());
    }
}
