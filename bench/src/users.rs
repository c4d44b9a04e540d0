//! The seeded users and what the benchmark has done to them: a ledger that
//! keeps every verify run within Twofold's rules instead of turning them off.
//!
//! - Throttling stays on: five consecutive failures throttle a user, so the
//!   reject path gives each user at most [`MAX_FAILURES`] wrong codes, round-robin
//!   over all users, and stops (reporting it) when every user has used them up.
//!   An accepted code resets the user's count, as it does on the server.
//! - Replay protection stays on: a step accepted once is refused after, so the
//!   accept path uses each user at most once per time step.
//!
//! Codes are precomputed per step for every user before a run, so the load
//! generator spends no HMACs on the hot path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::totp;

/// Wrong codes a user gets, at most, before an accepted code resets the count.
pub const MAX_FAILURES: u8 = 4;

/// The user id of user `i`.
pub fn user_name(i: usize) -> String {
    format!("u{i:07}")
}

/// Users with an active TOTP factor whose secrets the benchmark knows.
#[derive(Debug)]
pub struct Users {
    names: Vec<String>,
    secrets: Vec<[u8; 20]>,
    /// Failures the server has counted (or may have counted) per user.
    failures: Vec<AtomicU8>,
    /// Last step accepted per user; 0 for none.
    last_step: Vec<AtomicU64>,
    reject_cursor: AtomicUsize,
    accept_cursor: AtomicUsize,
    /// Step → every user's code at that step.
    codes: RwLock<BTreeMap<u64, Arc<Vec<u32>>>>,
}

impl Users {
    /// Users `0..secrets.len()`, each with `last_step` accepted already (the
    /// activation step), or none.
    pub fn new(secrets: Vec<[u8; 20]>, last_steps: Vec<u64>) -> Users {
        let n = secrets.len();
        Users {
            names: (0..n).map(user_name).collect(),
            secrets,
            failures: (0..n).map(|_| AtomicU8::new(0)).collect(),
            last_step: last_steps.into_iter().map(AtomicU64::new).collect(),
            reject_cursor: AtomicUsize::new(0),
            accept_cursor: AtomicUsize::new(0),
            codes: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Compute every user's codes for the steps a run starting at `step` may
    /// need (one behind to three ahead), and forget older ones.
    pub fn prepare(&self, step: u64) {
        let wanted: Vec<u64> = (step.saturating_sub(1)..=step + 3).collect();
        let missing: Vec<u64> = {
            let codes = self.codes.read().unwrap_or_else(|p| p.into_inner());
            wanted
                .iter()
                .copied()
                .filter(|s| !codes.contains_key(s))
                .collect()
        };
        let computed: Vec<(u64, Arc<Vec<u32>>)> = missing
            .into_iter()
            .map(|s| {
                let all = self.secrets.iter().map(|k| totp::code(k, s)).collect();
                (s, Arc::new(all))
            })
            .collect();
        let mut codes = self.codes.write().unwrap_or_else(|p| p.into_inner());
        codes.extend(computed);
        codes.retain(|s, _| *s + 1 >= step);
    }

    /// User `i`'s code at `step`, precomputed if it can be.
    pub fn code(&self, i: usize, step: u64) -> u32 {
        let codes = self.codes.read().unwrap_or_else(|p| p.into_inner());
        match codes.get(&step) {
            Some(all) => all[i],
            None => totp::code(&self.secrets[i], step),
        }
    }

    /// The next user that may take one more wrong code, and a code that is
    /// wrong for it around `step`. `None` once every user has had its share.
    pub fn next_reject(&self, step: u64) -> Option<(usize, u32)> {
        let n = self.len();
        for _ in 0..n {
            let i = self.reject_cursor.fetch_add(1, Ordering::Relaxed) % n;
            let took = self.failures[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                (f < MAX_FAILURES).then_some(f + 1)
            });
            if took.is_ok() {
                // The server may be one step ahead of us at a boundary.
                let window: Vec<u32> = (step.saturating_sub(1)..=step + 2)
                    .map(|s| self.code(i, s))
                    .collect();
                return Some((i, totp::wrong_code(&window)));
            }
        }
        None
    }

    /// The next user whose factor has not accepted `step` yet, and its code for
    /// `step`. `None` when every user was used in this step.
    pub fn next_accept(&self, step: u64) -> Option<(usize, u32)> {
        let n = self.len();
        for _ in 0..n {
            let i = self.accept_cursor.fetch_add(1, Ordering::Relaxed) % n;
            // A user at the failure limit would be refused; leave it out.
            if self.failures[i].load(Ordering::Relaxed) > MAX_FAILURES {
                continue;
            }
            let took = self.last_step[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                (l < step).then_some(step)
            });
            if took.is_ok() {
                return Some((i, self.code(i, step)));
            }
        }
        None
    }

    /// The server accepted a code of user `i`: its failure count is reset.
    pub fn accepted(&self, i: usize) {
        self.failures[i].store(0, Ordering::Relaxed);
    }

    /// The server refused a code of user `i` that should have passed.
    pub fn refused(&self, i: usize) {
        let _ = self.failures[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
            Some(f.saturating_add(1))
        });
    }

    /// The latest step any user was accepted at (or activated at), 0 for none.
    pub fn last_accepted_step(&self) -> u64 {
        self.last_step
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Wrong codes the reject path may still send.
    pub fn reject_budget(&self) -> u64 {
        self.failures
            .iter()
            .map(|f| u64::from(MAX_FAILURES.saturating_sub(f.load(Ordering::Relaxed))))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: usize) -> Users {
        let secrets = (0..n).map(|i| [i as u8; 20]).collect();
        Users::new(secrets, vec![0; n])
    }

    #[test]
    fn each_user_gets_at_most_four_wrong_codes_until_accepted() {
        let users = users(3);
        users.prepare(1000);
        let mut seen = [0u8; 3];
        while let Some((i, code)) = users.next_reject(1000) {
            seen[i] += 1;
            for s in 999..=1002 {
                assert_ne!(code, users.code(i, s));
            }
        }
        assert_eq!(seen, [MAX_FAILURES; 3]);
        assert_eq!(users.reject_budget(), 0);
        users.accepted(1);
        assert_eq!(users.next_reject(1000).map(|(i, _)| i), Some(1));
    }

    #[test]
    fn each_user_is_accepted_once_per_step() {
        let users = users(2);
        let first = users.next_accept(7).unwrap();
        let second = users.next_accept(7).unwrap();
        assert_ne!(first.0, second.0);
        assert_eq!(first.1, totp::code(&[first.0 as u8; 20], 7));
        assert!(users.next_accept(7).is_none());
        assert!(users.next_accept(8).is_some());
    }
}
