//! The restart policy: jittered, capped exponential delays, reset after a stable period, and a
//! start-rate limit after which a producer is Fatal.
//!
//! [`RestartTracker`] is pure (times and random numbers are passed in), so the policy is
//! unit-tested without processes or sleeping.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

use super::spec::MAX_PERIOD;

/// At most `burst` failed starts within `interval` (at most
/// [`MAX_PERIOD`](super::MAX_PERIOD), 24 h); one more and the producer is Fatal.
///
/// A *failed start* is a process that ends (exits, is killed, or cannot be spawned) before it
/// reached Running. A producer that was Running and then exits or stalls is always restarted
/// (with backoff) and never becomes Fatal: a camera that drops its stream at night comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartLimit {
    /// How many failed starts are tolerated within `interval`.
    pub burst: u32,
    /// The sliding window.
    pub interval: Duration,
}

impl Default for StartLimit {
    /// 10 failed starts within 300 s: with the default delays (1 s doubling to 60 s), a
    /// producer that can never start is Fatal after about four minutes.
    fn default() -> Self {
        StartLimit {
            burst: 10,
            interval: Duration::from_secs(300),
        }
    }
}

/// When and how often a producer is restarted.
///
/// The n-th consecutive restart waits `min(initial × multiplier^(n-1), max) × j` (capped at
/// `max`), with `j` drawn uniformly from the jitter range, so that many producers that failed
/// together (a network cut) do not restart in lockstep. After a producer has been Running for
/// `stable_after`, the count starts again from the initial delay. See [`StartLimit`] for when
/// the supervisor gives up.
///
/// ```
/// use std::time::Duration;
/// use kvs_frames::producer::{RestartPolicy, StartLimit};
///
/// let policy = RestartPolicy::default()
///     .initial_delay(Duration::from_millis(500))
///     .max_delay(Duration::from_secs(20))
///     .jitter(1.0, 1.0) // no jitter
///     .start_limit(Some(StartLimit { burst: 5, interval: Duration::from_secs(60) }));
/// assert_eq!(policy.delay(1, 0.5), Duration::from_millis(500));
/// assert_eq!(policy.delay(3, 0.5), Duration::from_secs(2));
/// assert_eq!(policy.delay(30, 0.5), Duration::from_secs(20));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RestartPolicy {
    pub(crate) initial_delay: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max_delay: Duration,
    pub(crate) jitter: (f64, f64),
    pub(crate) stable_after: Duration,
    pub(crate) start_limit: Option<StartLimit>,
}

impl Default for RestartPolicy {
    /// 1 s doubling to at most 60 s, jitter ×0.8–1.2, stable after 60 s Running,
    /// [`StartLimit::default`].
    fn default() -> Self {
        RestartPolicy {
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: (0.8, 1.2),
            stable_after: Duration::from_secs(60),
            start_limit: Some(StartLimit::default()),
        }
    }
}

impl RestartPolicy {
    /// The delay before the first restart. Default 1 s. At most `max_delay`.
    #[must_use]
    pub fn initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// The factor between consecutive delays, ≥ 1. Default 2.
    #[must_use]
    pub fn multiplier(mut self, m: f64) -> Self {
        self.multiplier = m;
        self
    }

    /// The cap on the delay. Default 60 s. At most [`MAX_PERIOD`](super::MAX_PERIOD) (24 h).
    #[must_use]
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// The range of the random factor applied to each delay, `0 < low ≤ high`. Default
    /// 0.8–1.2; `(1.0, 1.0)` disables jitter.
    #[must_use]
    pub fn jitter(mut self, low: f64, high: f64) -> Self {
        self.jitter = (low, high);
        self
    }

    /// How long a producer must run for the delays to start again from the initial delay.
    /// Default 60 s. At most [`MAX_PERIOD`](super::MAX_PERIOD) (24 h).
    #[must_use]
    pub fn stable_after(mut self, d: Duration) -> Self {
        self.stable_after = d;
        self
    }

    /// The start-rate limit, or `None` to retry failed starts forever. Default
    /// [`StartLimit::default`].
    #[must_use]
    pub fn start_limit(mut self, limit: Option<StartLimit>) -> Self {
        self.start_limit = limit;
        self
    }

    /// The delay before restart number `attempt` (1-based) for a uniform random `unit` in
    /// `[0, 1)`.
    #[must_use]
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let (low, high) = self.jitter;
        let factor = low + (high - low) * unit.clamp(0.0, 1.0);
        // A restart never waits longer than `max_delay`, jitter included. The cap and factor
        // are bounded so that even an unvalidated policy (`Duration::MAX`) cannot overflow.
        let cap = self.max_delay.min(Duration::from_secs(u64::from(u32::MAX)));
        crate::backoff::exponential(
            self.initial_delay.min(cap),
            self.multiplier,
            cap,
            attempt,
            factor.clamp(0.0, 10.0),
        )
        .min(self.max_delay)
    }

    /// Checks the policy.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the option.
    pub fn validate(&self) -> Result<()> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(Error::invalid_config(
                "restart.multiplier",
                self.multiplier,
                "must be a finite number ≥ 1",
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err(Error::invalid_config(
                "restart.max_delay",
                format!("{:?}", self.max_delay),
                "must be at least the initial delay",
            ));
        }
        if self.max_delay > MAX_PERIOD {
            return Err(Error::invalid_config(
                "restart.max_delay",
                format!("{:?}", self.max_delay),
                "must be at most 24 h",
            ));
        }
        if self.stable_after > MAX_PERIOD {
            return Err(Error::invalid_config(
                "restart.stable_after",
                format!("{:?}", self.stable_after),
                "must be at most 24 h",
            ));
        }
        let (low, high) = self.jitter;
        if !(low.is_finite() && high.is_finite() && low > 0.0 && low <= high && high <= 10.0) {
            return Err(Error::invalid_config(
                "restart.jitter",
                format!("{low}..{high}"),
                "must satisfy 0 < low ≤ high ≤ 10",
            ));
        }
        if let Some(limit) = self.start_limit
            && (limit.burst == 0 || limit.interval.is_zero() || limit.interval > MAX_PERIOD)
        {
            return Err(Error::invalid_config(
                "restart.start_limit",
                format!("{} in {:?}", limit.burst, limit.interval),
                "burst and interval must be positive, the interval at most 24 h (or None for \
                 no limit)",
            ));
        }
        Ok(())
    }
}

/// What to do after a producer ended without being asked to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Decision {
    /// Restart after this delay (`attempt` is the 1-based consecutive restart number).
    Backoff { delay: Duration, attempt: u32 },
    /// Too many failed starts: give up.
    Fatal { failed_starts: usize },
}

/// The policy's memory: consecutive restarts and recent failed starts.
#[derive(Clone, Debug)]
pub(crate) struct RestartTracker {
    policy: RestartPolicy,
    attempts: u32,
    failed_starts: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker {
            policy,
            attempts: 0,
            failed_starts: VecDeque::new(),
        }
    }

    /// Records an unrequested end at `now` (`failed_start`: before Running) and decides.
    pub fn on_failure(&mut self, now: Instant, failed_start: bool, unit: f64) -> Decision {
        if failed_start {
            self.failed_starts.push_back(now);
        }
        if let Some(limit) = self.policy.start_limit {
            while self
                .failed_starts
                .front()
                .is_some_and(|&t| now.duration_since(t) > limit.interval)
            {
                self.failed_starts.pop_front();
            }
            if failed_start && self.failed_starts.len() >= limit.burst as usize {
                return Decision::Fatal {
                    failed_starts: self.failed_starts.len(),
                };
            }
        }
        self.attempts = self.attempts.saturating_add(1);
        Decision::Backoff {
            delay: self.policy.delay(self.attempts, unit),
            attempt: self.attempts,
        }
    }

    /// The producer has run for the stable period: delays start again from the initial one.
    pub fn on_stable(&mut self) {
        self.attempts = 0;
    }

    /// Forget everything (a manual restart).
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.failed_starts.clear();
    }

    /// Consecutive restarts since the last stable run.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Failed starts in the current window.
    pub fn failed_starts(&self) -> usize {
        self.failed_starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy::default()
            .initial_delay(Duration::from_secs(1))
            .max_delay(Duration::from_secs(10))
            .jitter(0.5, 1.5)
            .start_limit(Some(StartLimit {
                burst: 3,
                interval: Duration::from_secs(60),
            }))
    }

    #[test]
    fn delays_grow_cap_and_jitter() {
        let p = policy();
        assert_eq!(p.delay(1, 0.5), Duration::from_secs(1));
        assert_eq!(p.delay(2, 0.5), Duration::from_secs(2));
        assert_eq!(p.delay(4, 0.5), Duration::from_secs(8));
        assert_eq!(p.delay(5, 0.5), Duration::from_secs(10));
        assert_eq!(p.delay(u32::MAX, 0.5), Duration::from_secs(10));
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(p.delay(2, 1.0), Duration::from_secs(3));
        // Jitter never exceeds the cap.
        assert_eq!(p.delay(9, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn stable_run_resets_attempts() {
        let mut t = RestartTracker::new(policy());
        let now = Instant::now();
        for expected in [1, 2, 4] {
            match t.on_failure(now, false, 0.5) {
                Decision::Backoff { delay, .. } => {
                    assert_eq!(delay, Duration::from_secs(expected));
                }
                d => panic!("{d:?}"),
            }
        }
        t.on_stable();
        assert_eq!(
            t.on_failure(now, false, 0.5),
            Decision::Backoff {
                delay: Duration::from_secs(1),
                attempt: 1
            }
        );
    }

    #[test]
    fn failed_starts_in_window_are_fatal() {
        let mut t = RestartTracker::new(policy());
        let t0 = Instant::now();
        assert!(matches!(
            t.on_failure(t0, true, 0.5),
            Decision::Backoff { .. }
        ));
        assert!(matches!(
            t.on_failure(t0 + Duration::from_secs(10), true, 0.5),
            Decision::Backoff { .. }
        ));
        // Runtime failures (after Running) never count towards the limit.
        for i in 0..10 {
            assert!(matches!(
                t.on_failure(t0 + Duration::from_secs(11 + i), false, 0.5),
                Decision::Backoff { .. }
            ));
        }
        assert_eq!(
            t.on_failure(t0 + Duration::from_secs(30), true, 0.5),
            Decision::Fatal { failed_starts: 3 }
        );
    }

    #[test]
    fn old_failed_starts_leave_the_window() {
        let mut t = RestartTracker::new(policy());
        let t0 = Instant::now();
        t.on_failure(t0, true, 0.5);
        t.on_failure(t0 + Duration::from_secs(1), true, 0.5);
        // 61 s later the first two are out of the 60 s window.
        assert!(matches!(
            t.on_failure(t0 + Duration::from_secs(62), true, 0.5),
            Decision::Backoff { .. }
        ));
        assert_eq!(t.failed_starts(), 1);
        t.reset();
        assert_eq!((t.attempts(), t.failed_starts()), (0, 0));
    }

    #[test]
    fn no_limit_never_fatal() {
        let mut t = RestartTracker::new(policy().start_limit(None));
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(matches!(
                t.on_failure(t0, true, 0.5),
                Decision::Backoff { .. }
            ));
        }
    }

    #[test]
    fn validation() {
        assert!(RestartPolicy::default().validate().is_ok());
        let bad = [
            (
                RestartPolicy::default().multiplier(0.5),
                "restart.multiplier",
            ),
            (
                RestartPolicy::default().max_delay(Duration::from_millis(1)),
                "restart.max_delay",
            ),
            (RestartPolicy::default().jitter(1.2, 0.8), "restart.jitter"),
            (
                RestartPolicy::default().start_limit(Some(StartLimit {
                    burst: 0,
                    interval: Duration::from_secs(1),
                })),
                "restart.start_limit",
            ),
        ];
        let max = [
            (
                RestartPolicy::default()
                    .initial_delay(Duration::MAX)
                    .max_delay(Duration::MAX),
                "restart.max_delay",
            ),
            (
                RestartPolicy::default().initial_delay(Duration::MAX),
                "restart.max_delay",
            ),
            (
                RestartPolicy::default().stable_after(Duration::MAX),
                "restart.stable_after",
            ),
            (
                RestartPolicy::default().start_limit(Some(StartLimit {
                    burst: 1,
                    interval: Duration::MAX,
                })),
                "restart.start_limit",
            ),
        ];
        for (p, option) in bad.into_iter().chain(max) {
            assert_eq!(p.validate().unwrap_err().invalid_option(), Some(option));
            // Even unvalidated, a policy never panics computing a delay.
            for attempt in [1, 2, 64, u32::MAX] {
                for unit in [0.0, 0.5, 1.0, f64::NAN] {
                    let _ = p.delay(attempt, unit);
                }
            }
        }
        let huge = RestartPolicy::default()
            .initial_delay(Duration::MAX)
            .max_delay(Duration::MAX)
            .jitter(1e300, 1e300);
        let _ = huge.delay(u32::MAX, 1.0);
    }
}
