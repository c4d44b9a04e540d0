//! Throttling and lockout after failed verifications, as one pure policy that
//! both planes apply: data planes as attempts happen, the control plane when it
//! merges their reports.
//!
//! After `free_failures` consecutive failures a user's attempts are refused for a
//! backoff that doubles from `base`, capped at `max`. After `lock_after`
//! consecutive failures (NIST SP 800-63B §5.2.2 allows at most 100) the user is
//! locked until unlocked on the control plane. A success resets the count.

/// Why a throttle policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("free failures must be at least 1 and below the lockout threshold")]
    FreeFailures,
    #[error("lockout threshold must be between 1 and 100 failures")]
    LockAfter,
    #[error("base backoff must be at least 1 second and at most the maximum backoff")]
    Backoff,
}

/// Limits on failed attempts. Times are in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    free_failures: u32,
    base_secs: u64,
    max_secs: u64,
    lock_after: u32,
}

impl Default for ThrottlePolicy {
    /// 5 free failures, backoff from 30 s doubling to 15 min, lock at 100.
    fn default() -> Self {
        ThrottlePolicy {
            free_failures: 5,
            base_secs: 30,
            max_secs: 15 * 60,
            lock_after: 100,
        }
    }
}

impl ThrottlePolicy {
    pub fn try_new(
        free_failures: u32,
        base_secs: u64,
        max_secs: u64,
        lock_after: u32,
    ) -> Result<ThrottlePolicy, PolicyError> {
        if !(1..=100).contains(&lock_after) {
            return Err(PolicyError::LockAfter);
        }
        if free_failures == 0 || free_failures >= lock_after {
            return Err(PolicyError::FreeFailures);
        }
        if base_secs == 0 || base_secs > max_secs {
            return Err(PolicyError::Backoff);
        }
        Ok(ThrottlePolicy {
            free_failures,
            base_secs,
            max_secs,
            lock_after,
        })
    }

    pub fn free_failures(&self) -> u32 {
        self.free_failures
    }

    pub fn base_secs(&self) -> u64 {
        self.base_secs
    }

    pub fn max_secs(&self) -> u64 {
        self.max_secs
    }

    pub fn lock_after(&self) -> u32 {
        self.lock_after
    }

    /// The state after one more failure at `now`.
    pub fn fail(&self, state: &Throttle, now: u64) -> Throttle {
        let failures = state.failures.saturating_add(1);
        let locked = state.locked || failures >= self.lock_after;
        let throttled_until = if failures >= self.free_failures {
            let doublings = (failures - self.free_failures).min(32);
            let backoff = self
                .base_secs
                .saturating_mul(1u64 << doublings)
                .min(self.max_secs);
            Some(
                now.saturating_add(backoff)
                    .max(state.throttled_until.unwrap_or(0)),
            )
        } else {
            state.throttled_until
        };
        Throttle {
            failures,
            locked,
            throttled_until,
        }
    }
}

/// A user's failure state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Throttle {
    /// Consecutive failures.
    pub failures: u32,
    /// Locked until unlocked on the control plane.
    pub locked: bool,
    /// Unix time before which attempts are refused.
    pub throttled_until: Option<u64>,
}

/// Whether an attempt may be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Refused for `retry_after` more seconds.
    Throttled {
        retry_after: u64,
    },
    Locked,
}

impl Throttle {
    pub fn admission(&self, now: u64) -> Admission {
        if self.locked {
            return Admission::Locked;
        }
        match self.throttled_until {
            Some(until) if until > now => Admission::Throttled {
                retry_after: until - now,
            },
            _ => Admission::Allowed,
        }
    }

    /// A success resets everything but a lock, which only the control plane lifts.
    pub fn succeed(&self) -> Throttle {
        Throttle {
            failures: 0,
            locked: self.locked,
            throttled_until: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_fifth_failure_and_is_capped() {
        let policy = ThrottlePolicy::default();
        let mut state = Throttle::default();
        let now = 1_000;
        for _ in 0..4 {
            state = policy.fail(&state, now);
            assert_eq!(state.admission(now), Admission::Allowed);
        }
        let mut expected = 30;
        for _ in 0..10 {
            state = policy.fail(&state, now);
            assert_eq!(
                state.admission(now),
                Admission::Throttled {
                    retry_after: expected
                }
            );
            expected = (expected * 2).min(900);
        }
        assert_eq!(state.admission(now + 900), Admission::Allowed);
    }

    #[test]
    fn lock_after_the_threshold_survives_success() {
        let policy = ThrottlePolicy::try_new(5, 30, 900, 10).unwrap();
        let mut state = Throttle::default();
        for i in 0..10 {
            state = policy.fail(&state, 1_000 + i * 10_000);
        }
        assert_eq!(state.admission(u64::MAX), Admission::Locked);
        assert!(state.succeed().locked);
        assert_eq!(state.succeed().failures, 0);
    }

    #[test]
    fn success_resets_the_count() {
        let policy = ThrottlePolicy::default();
        let mut state = Throttle::default();
        for _ in 0..6 {
            state = policy.fail(&state, 0);
        }
        state = state.succeed();
        assert_eq!(state, Throttle::default());
        assert_eq!(policy.fail(&state, 0).admission(0), Admission::Allowed);
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert_eq!(
            ThrottlePolicy::try_new(0, 30, 900, 100),
            Err(PolicyError::FreeFailures)
        );
        assert_eq!(
            ThrottlePolicy::try_new(5, 30, 900, 101),
            Err(PolicyError::LockAfter)
        );
        assert_eq!(
            ThrottlePolicy::try_new(100, 30, 900, 100),
            Err(PolicyError::FreeFailures)
        );
        assert_eq!(
            ThrottlePolicy::try_new(5, 0, 900, 100),
            Err(PolicyError::Backoff)
        );
        assert_eq!(
            ThrottlePolicy::try_new(5, 1000, 900, 100),
            Err(PolicyError::Backoff)
        );
    }
}
