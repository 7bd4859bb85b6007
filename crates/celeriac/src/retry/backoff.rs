//! Celery's `get_exponential_backoff_interval` (`celery/utils/time.py`), exactly:
//! `countdown = min(maximum, factor * 2**retries)`, then with full jitter a uniform integer in
//! `0..=countdown`.

use rand::Rng;

/// Exponential back-off settings, as `retry_backoff` / `retry_backoff_max` / `retry_jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// `retry_backoff`: `true` means 1, an integer N means N.
    pub factor: u64,
    /// `retry_backoff_max` in seconds (default 600).
    pub maximum: u64,
    /// `retry_jitter` (default true).
    pub jitter: bool,
}

impl Backoff {
    /// Back-off with Celery's defaults for everything but the factor.
    pub const fn new(factor: u64) -> Self {
        Backoff { factor, maximum: 600, jitter: true }
    }

    /// Seconds to wait before retry number `retries + 1`.
    pub fn countdown(&self, retries: u32) -> u64 {
        exponential_backoff_interval(self.factor, retries, self.maximum, self.jitter, &mut rand::rng())
    }
}

/// The countdown for `retries` previous retries; with `full_jitter`, drawn from `rng`.
pub fn exponential_backoff_interval(
    factor: u64,
    retries: u32,
    maximum: u64,
    full_jitter: bool,
    rng: &mut impl Rng,
) -> u64 {
    let growth = 1u64.checked_shl(retries).unwrap_or(u64::MAX);
    let countdown = factor.saturating_mul(growth).min(maximum);
    if full_jitter { rng.random_range(0..=countdown) } else { countdown }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_jitter_doubles_up_to_the_maximum() {
        let mut rng = rand::rng();
        let got: Vec<u64> = (0..12).map(|r| exponential_backoff_interval(1, r, 600, false, &mut rng)).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(exponential_backoff_interval(3, 200, 600, false, &mut rng), 600);
    }

    #[test]
    fn jitter_stays_within_zero_and_countdown_inclusive() {
        let mut rng = rand::rng();
        let samples: Vec<u64> = (0..2000).map(|_| exponential_backoff_interval(1, 2, 600, true, &mut rng)).collect();
        assert!(samples.iter().all(|&s| s <= 4));
        assert!(samples.contains(&0) && samples.contains(&4), "both ends are reachable");
    }
}
