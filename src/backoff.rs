//! Jittered exponential backoff with injectable randomness.
//!
//! The delay after the `n`-th consecutive failure (n = 1, 2, …) is
//! `min(initial × multiplier^(n-1), max) × jitter`, with `jitter` drawn uniformly from
//! `[jitter_min, jitter_max]` (0.8–1.2 by default, so that many readers that fail together do not
//! retry together). `max_consecutive_errors` bounds how many failures in a row are retried; by
//! default there is no bound (a live camera may come back after any outage), so giving up is an
//! explicit opt-in.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Where the jitter factor comes from.
#[derive(Clone)]
pub enum Jitter {
    /// Uniform in `[min, max]` from a random generator (seeded from the OS unless
    /// [`Jitter::seeded`] is used).
    Uniform {
        /// Smallest factor.
        min: f64,
        /// Largest factor.
        max: f64,
        /// The generator (shared by clones of the policy).
        rng: Arc<Mutex<rand::rngs::StdRng>>,
    },
    /// Always this factor (1.0 = no jitter): deterministic delays for tests.
    Fixed(f64),
}

impl Jitter {
    /// Uniform jitter in `[min, max]` seeded from the operating system.
    pub fn uniform(min: f64, max: f64) -> Self {
        Jitter::Uniform {
            min,
            max,
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::from_os_rng())),
        }
    }

    /// Uniform jitter in `[min, max]` from a generator seeded with `seed` (repeatable).
    pub fn seeded(min: f64, max: f64, seed: u64) -> Self {
        Jitter::Uniform {
            min,
            max,
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
        }
    }

    fn factor(&self) -> f64 {
        match self {
            Jitter::Fixed(f) => *f,
            Jitter::Uniform { min, max, rng } => {
                if max <= min {
                    *min
                } else {
                    rng.lock().random_range(*min..=*max)
                }
            }
        }
    }

    fn bounds(&self) -> (f64, f64) {
        match self {
            Jitter::Fixed(f) => (*f, *f),
            Jitter::Uniform { min, max, .. } => (*min, *max),
        }
    }
}

impl fmt::Debug for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Jitter::Fixed(x) => write!(f, "Fixed({x})"),
            Jitter::Uniform { min, max, .. } => write!(f, "Uniform({min}..={max})"),
        }
    }
}

/// A backoff policy. Defaults: initial 5 s, ×2, cap 60 s, jitter 0.8–1.2, no limit on consecutive
/// errors (set [`max_consecutive_errors`](Self::max_consecutive_errors) to give up after N).
#[derive(Clone, Debug)]
pub struct BackoffPolicy {
    /// Delay after the first failure (before jitter).
    pub initial: Duration,
    /// Growth factor per further failure (≥ 1).
    pub multiplier: f64,
    /// Largest delay (before jitter).
    pub max: Duration,
    /// Jitter factor source.
    pub jitter: Jitter,
    /// Failures in a row after which the caller should give up; `None` retries forever.
    pub max_consecutive_errors: Option<u32>,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_secs(5),
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter: Jitter::uniform(0.8, 1.2),
            max_consecutive_errors: None,
        }
    }
}

impl BackoffPolicy {
    /// Sets the first delay.
    #[must_use]
    pub fn initial(mut self, initial: Duration) -> Self {
        self.initial = initial;
        self
    }
    /// Sets the growth factor.
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }
    /// Sets the cap.
    #[must_use]
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }
    /// Sets the jitter source.
    #[must_use]
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }
    /// Sets the limit of consecutive errors (`None`: unlimited).
    #[must_use]
    pub fn max_consecutive_errors(mut self, max: Option<u32>) -> Self {
        self.max_consecutive_errors = max;
        self
    }

    /// Checks the policy; `prefix` names the option in errors (e.g. `backoff`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if self.initial.is_zero() || self.initial > Duration::from_secs(3600) {
            return Err(Error::invalid_config(
                &format!("{prefix}.initial"),
                format!("{:?}", self.initial),
                "must be more than 0 and at most 1 h",
            ));
        }
        if !(self.multiplier.is_finite() && (1.0..=10.0).contains(&self.multiplier)) {
            return Err(Error::invalid_config(
                &format!("{prefix}.multiplier"),
                self.multiplier,
                "must be between 1 and 10",
            ));
        }
        if self.max < self.initial || self.max > Duration::from_secs(24 * 3600) {
            return Err(Error::invalid_config(
                &format!("{prefix}.max"),
                format!("{:?}", self.max),
                "must be at least `initial` and at most 24 h",
            ));
        }
        let (min, max) = self.jitter.bounds();
        if !(min.is_finite() && max.is_finite() && min > 0.0 && min <= max && max <= 10.0) {
            return Err(Error::invalid_config(
                &format!("{prefix}.jitter"),
                format!("{min}..={max}"),
                "factors must satisfy 0 < min <= max <= 10",
            ));
        }
        if self.max_consecutive_errors == Some(0) {
            return Err(Error::invalid_config(
                &format!("{prefix}.max_consecutive_errors"),
                0,
                "must be at least 1 (or None for unlimited)",
            ));
        }
        Ok(())
    }

    /// The delay after the `failures`-th consecutive failure (1-based), jitter applied.
    pub fn delay(&self, failures: u32) -> Duration {
        exponential(
            self.initial,
            self.multiplier,
            self.max,
            failures,
            self.jitter.factor(),
        )
    }

    /// Whether `failures` consecutive failures exhaust the policy.
    pub fn exhausted(&self, failures: u32) -> bool {
        self.max_consecutive_errors
            .is_some_and(|max| failures >= max)
    }
}

/// `min(initial × multiplier^(failures − 1), max) × factor`: the delay after the `failures`-th
/// consecutive failure (1-based), for every backoff of the crate (reconnects, KVS call retries,
/// producer restarts). Never negative, never NaN.
pub(crate) fn exponential(
    initial: Duration,
    multiplier: f64,
    max: Duration,
    failures: u32,
    factor: f64,
) -> Duration {
    let exponent = i32::try_from(failures.saturating_sub(1).min(64)).unwrap_or(64);
    let base = (initial.as_secs_f64() * multiplier.powi(exponent)).min(max.as_secs_f64());
    let secs = base * factor;
    if secs.is_finite() && secs > 0.0 {
        Duration::from_secs_f64(secs)
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps_without_jitter() {
        let p = BackoffPolicy::default().jitter(Jitter::Fixed(1.0));
        let delays: Vec<u64> = (1..=6).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert!(!p.exhausted(1_000_000), "no limit by default");
        let limited = p.clone().max_consecutive_errors(Some(10));
        assert!(!limited.exhausted(9));
        assert!(limited.exhausted(10));
    }

    #[test]
    fn jitter_stays_in_bounds_and_is_repeatable_with_a_seed() {
        let p = BackoffPolicy::default().jitter(Jitter::seeded(0.8, 1.2, 7));
        let a: Vec<Duration> = (1..=50).map(|_| p.delay(1)).collect();
        assert!(a.iter().all(|d| (4.0..=6.0).contains(&d.as_secs_f64())));
        assert!(a.windows(2).any(|w| w[0] != w[1]), "jitter varies");
        let q = BackoffPolicy::default().jitter(Jitter::seeded(0.8, 1.2, 7));
        let b: Vec<Duration> = (1..=50).map(|_| q.delay(1)).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn invalid_policies_name_the_option() {
        let bad = [
            BackoffPolicy::default().initial(Duration::ZERO),
            BackoffPolicy::default().multiplier(0.5),
            BackoffPolicy::default().max(Duration::from_secs(1)),
            BackoffPolicy::default().jitter(Jitter::Fixed(0.0)),
            BackoffPolicy::default().max_consecutive_errors(Some(0)),
        ];
        let names = [
            "initial",
            "multiplier",
            "max",
            "jitter",
            "max_consecutive_errors",
        ];
        for (policy, name) in bad.iter().zip(names) {
            let err = policy.validate("backoff").unwrap_err();
            assert_eq!(
                err.invalid_option(),
                Some(format!("backoff.{name}").as_str())
            );
        }
        assert!(BackoffPolicy::default().validate("backoff").is_ok());
    }
}
