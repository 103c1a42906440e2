//! [`Backoff`]: the one delay policy for trying again — the broker reconnect loops
//! (`retouch-amqp`) and job retries (the engine).
//!
//! The delay before retry `n` (from 0) is `initial · 2ⁿ`, capped at `max`, then scaled by a
//! random factor drawn from the jitter range, so that a fleet that failed together (a broker
//! restart, an S3 brown-out) does not come back in step. The cap applies before the jitter: a
//! range reaching above 1 can exceed `max` by that factor.
//!
//! The random factor comes from the standard library's per-process random hash keys
//! ([`std::hash::RandomState`]): not cryptographic, only enough to spread a fleet, and it keeps
//! this crate free of runtime dependencies.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Capped exponential backoff with optional jitter. Use [`delay`](Self::delay) when the caller
/// counts the attempts itself (a job's delivery count), or [`next_delay`](Self::next_delay) and
/// [`reset`](Self::reset) for a loop that counts its consecutive failures here.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// The delay before the first retry (`n = 0`).
    initial: Duration,
    /// Cap of the delay before jitter.
    max: Duration,
    /// Lowest random factor applied to the capped delay.
    jitter_low: f64,
    /// Highest random factor applied to the capped delay.
    jitter_high: f64,
    /// Consecutive failures counted by [`next_delay`](Self::next_delay) since the last
    /// [`reset`](Self::reset).
    failures: u32,
}

impl Backoff {
    /// `initial · 2ⁿ` capped at `max`, without jitter (a `max` below `initial` caps every
    /// delay at `max`).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, jitter_low: 1.0, jitter_high: 1.0, failures: 0 }
    }

    /// Scales every delay by a random factor in `[low, high]`: e.g. `(0.5, 1.0)` for "up to
    /// 50 % shorter", `(0.8, 1.2)` for ±20 %. Negative or non-finite bounds count as 0, and
    /// `high` below `low` as `low`.
    #[must_use]
    pub fn with_jitter(mut self, low: f64, high: f64) -> Self {
        let clean = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
        self.jitter_low = clean(low);
        self.jitter_high = clean(high).max(self.jitter_low);
        self
    }

    /// The delay before retry `n` (from 0) without jitter: `initial · 2ⁿ`, capped at `max`.
    pub fn base(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `n` (from 0): [`base`](Self::base) scaled by a random factor
    /// within the jitter range.
    pub fn delay(&self, n: u32) -> Duration {
        self.delay_at(n, unit_random())
    }

    /// [`delay`](Self::delay) with the random draw given: `unit` in `[0, 1]` picks the factor
    /// from the bottom to the top of the jitter range (values outside are clamped). For tests
    /// and for callers with their own randomness.
    pub fn delay_at(&self, n: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.0 };
        let factor = self.jitter_low + (self.jitter_high - self.jitter_low) * unit;
        self.base(n).mul_f64(factor)
    }

    /// The delay after one more consecutive failure: the first call gives
    /// [`delay(0)`](Self::delay), the next `delay(1)`, and so on until [`reset`](Self::reset).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to the initial delay, after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A uniform draw from `[0, 1)`: 53 bits of a SipHash under fresh random keys (each
/// `RandomState::new()` on a thread uses the next keys of a randomly seeded sequence).
fn unit_random() -> f64 {
    let bits = RandomState::new().hash_one(0u8);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_initial_up_to_the_cap() {
        let b = Backoff::new(500 * MS, 30_000 * MS);
        let bases: Vec<u128> = (0..9).map(|n| b.base(n).as_millis()).collect();
        assert_eq!(bases, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(b.base(u32::MAX), 30_000 * MS, "huge exponents saturate at the cap");
        assert_eq!(b.delay(3), 4000 * MS, "no jitter unless asked");
        assert_eq!(Backoff::new(500 * MS, 100 * MS).base(0), 100 * MS);
    }

    #[test]
    fn jitter_scales_within_its_range_after_the_cap() {
        let b = Backoff::new(10 * MS, 40 * MS).with_jitter(0.8, 1.2);
        assert_eq!(b.delay_at(0, 0.0), 8 * MS);
        assert_eq!(b.delay_at(0, 1.0), 12 * MS);
        assert_eq!(b.delay_at(5, 1.0), 48 * MS, "the cap applies before the jitter");
        assert_eq!(b.delay_at(5, 7.0), 48 * MS, "draws are clamped into [0, 1]");
        for n in 0..8 {
            let d = b.delay(n);
            assert!(d >= b.base(n).mul_f64(0.8) && d <= b.base(n).mul_f64(1.2), "{n}: {d:?}");
        }
        let inverted = Backoff::new(10 * MS, 40 * MS).with_jitter(1.0, 0.5);
        assert_eq!((inverted.delay_at(0, 0.0), inverted.delay_at(0, 1.0)), (10 * MS, 10 * MS));
    }

    #[test]
    fn draws_differ() {
        let draws: std::collections::BTreeSet<u64> = (0..64).map(|_| unit_random().to_bits()).collect();
        assert!(draws.len() > 60, "{} distinct draws of 64", draws.len());
        assert!((0..1000).map(|_| unit_random()).all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn counts_failures_until_reset() {
        let mut b = Backoff::new(500 * MS, 30_000 * MS).with_jitter(0.5, 1.0);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= 250 * MS && delays[0] <= 500 * MS, "{:?}", delays[0]);
        assert!(delays[3] >= 2000 * MS && delays[3] <= 4000 * MS, "{:?}", delays[3]);
        assert!(delays[11] >= 15_000 * MS && delays[11] <= 30_000 * MS, "{:?}", delays[11]);
        b.reset();
        assert!(b.next_delay() <= 500 * MS);
    }
}
