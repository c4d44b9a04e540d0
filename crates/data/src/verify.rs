//! One verification attempt against a user's state: throttle admission, TOTP with
//! replay protection, single-use backup codes, and the usage events it produces.
//!
//! An unknown user, a user without factors, a wrong code and a replayed code all
//! give the same [`Outcome::Invalid`] for about the same work: unknown users are
//! checked against a dummy factor and dummy codes, and are throttled like others.

use std::collections::HashMap;
use std::sync::Mutex;

use twofold_core::backup;
use twofold_core::feed::UsageEvent;
use twofold_core::otp::{self, Algorithm, Skew, TotpParams, Verdict};
use twofold_core::seal::{Binding, Keyring, Sealed};
use twofold_core::secret::Secret;
use twofold_core::throttle::{Admission, Throttle, ThrottlePolicy};

use crate::index::{LocalEvent, User};

/// Unknown users whose failures are counted, at most; past it the count starts
/// over, which bounds memory under a flood of made-up user ids.
const MAX_PHANTOMS: usize = 100_000;

/// Which kind of factor matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorKind {
    Totp,
    Backup,
}

impl FactorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FactorKind::Totp => "totp",
            FactorKind::Backup => "backup",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Valid { kind: FactorKind, factor_id: String },
    Invalid,
    Throttled { retry_after: u64 },
    Locked,
}

/// What an attempt asks for.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub tenant: &'a str,
    pub user: &'a str,
    pub code: &'a str,
    /// Unix time in seconds.
    pub now: u64,
}

/// The verifier: keys, limits and the dummy factor for unknown users.
#[derive(Debug)]
pub struct Verifier {
    keyring: Keyring,
    skew: Skew,
    policy: ThrottlePolicy,
    dummy_sealed: Sealed,
    dummy_hashes: Vec<[u8; 32]>,
    phantoms: Mutex<HashMap<Box<str>, Throttle>>,
}

const DUMMY_BINDING: Binding<'static> = Binding {
    tenant: "",
    user: "",
    factor: "",
};

impl Verifier {
    pub fn new(keyring: Keyring, skew: Skew, policy: ThrottlePolicy) -> Result<Verifier, String> {
        let secret = Secret::generate(Algorithm::Sha1).map_err(|e| e.to_string())?;
        let dummy_sealed = keyring
            .seal_secret(&secret, &DUMMY_BINDING)
            .map_err(|e| e.to_string())?;
        let codes = backup::BackupCodes::generate().map_err(|e| e.to_string())?;
        let dummy_hashes = codes.hashes(keyring.hash_key());
        Ok(Verifier {
            keyring,
            skew,
            policy,
            dummy_sealed,
            dummy_hashes,
            phantoms: Mutex::new(HashMap::new()),
        })
    }

    /// Attempt to verify for a known user, whose lock the caller holds. Returns the
    /// outcome and the usage events to record; `next_id` numbers them.
    pub fn attempt(
        &self,
        user: &mut User,
        attempt: Attempt<'_>,
        next_id: &mut dyn FnMut() -> u64,
    ) -> (Outcome, Vec<(u64, UsageEvent)>) {
        let throttle = user.throttle(&self.policy);
        match throttle.admission(attempt.now) {
            Admission::Locked => return (Outcome::Locked, Vec::new()),
            Admission::Throttled { retry_after } => {
                return (Outcome::Throttled { retry_after }, Vec::new());
            }
            Admission::Allowed => {}
        }
        let mut events = Vec::new();
        let matched = self
            .match_totp(user, attempt)
            .or_else(|| self.match_backup(user, attempt));
        let outcome = match matched {
            Some((kind, factor_id, event)) => {
                events.push((next_id(), event));
                if throttle.failures > 0 {
                    let id = next_id();
                    user.push_event(id, LocalEvent::Success);
                    events.push((
                        id,
                        UsageEvent::Success {
                            tenant: attempt.tenant.to_owned(),
                            user: attempt.user.to_owned(),
                        },
                    ));
                }
                Outcome::Valid { kind, factor_id }
            }
            None => {
                let id = next_id();
                user.push_event(id, LocalEvent::Failure { at: attempt.now });
                events.push((
                    id,
                    UsageEvent::Failure {
                        tenant: attempt.tenant.to_owned(),
                        user: attempt.user.to_owned(),
                        at: attempt.now,
                    },
                ));
                Outcome::Invalid
            }
        };
        (outcome, events)
    }

    fn match_totp(
        &self,
        user: &mut User,
        attempt: Attempt<'_>,
    ) -> Option<(FactorKind, String, UsageEvent)> {
        let mut matched = None;
        for (index, factor) in user.factors().enumerate() {
            let binding = Binding {
                tenant: attempt.tenant,
                user: attempt.user,
                factor: factor.id,
            };
            let opened = Sealed::from_bytes(factor.sealed)
                .and_then(|sealed| self.keyring.open_secret(&sealed, &binding));
            let secret = match opened {
                Ok(secret) => secret,
                Err(e) => {
                    tracing::error!(factor = %factor.id, error = %e, "cannot open a factor's secret");
                    continue;
                }
            };
            let verdict = otp::verify_totp(
                &secret,
                attempt.code,
                attempt.now,
                factor.params,
                self.skew,
                factor.last_step,
            );
            if let Verdict::Valid { step } = verdict {
                matched = Some((index, factor.id.to_owned(), step));
                break;
            }
        }
        let (index, id, step) = matched?;
        user.accept_step(index, step);
        let event = UsageEvent::TotpAccepted {
            tenant: attempt.tenant.to_owned(),
            user: attempt.user.to_owned(),
            factor: id.clone(),
            step,
        };
        Some((FactorKind::Totp, id, event))
    }

    fn match_backup(
        &self,
        user: &mut User,
        attempt: Attempt<'_>,
    ) -> Option<(FactorKind, String, UsageEvent)> {
        let set = user.backup_mut()?;
        let index = backup::find_match(self.keyring.hash_key(), attempt.code, &set.hashes)?;
        let used = set.used.get_mut(index)?;
        if *used {
            return None;
        }
        *used = true;
        let event = UsageEvent::BackupCodeUsed {
            tenant: attempt.tenant.to_owned(),
            user: attempt.user.to_owned(),
            set_id: set.set_id.to_string(),
            index: index as u32,
        };
        Some((FactorKind::Backup, set.set_id.to_string(), event))
    }

    /// An attempt for a user the replica does not know: the same work as a wrong
    /// code, and the same throttling, but nothing is reported.
    pub fn attempt_unknown(&self, user_key: &str, attempt: Attempt<'_>) -> Outcome {
        let mut phantoms = self.phantoms.lock().unwrap_or_else(|p| p.into_inner());
        let throttle = phantoms.get(user_key).copied().unwrap_or_default();
        match throttle.admission(attempt.now) {
            Admission::Locked => return Outcome::Locked,
            Admission::Throttled { retry_after } => return Outcome::Throttled { retry_after },
            Admission::Allowed => {}
        }
        if let Ok(secret) = self.keyring.open_secret(&self.dummy_sealed, &DUMMY_BINDING) {
            let _ = otp::verify_totp(
                &secret,
                attempt.code,
                attempt.now,
                TotpParams::default(),
                self.skew,
                None,
            );
        }
        let _ = backup::find_match(self.keyring.hash_key(), attempt.code, &self.dummy_hashes);
        if phantoms.len() >= MAX_PHANTOMS {
            phantoms.clear();
        }
        phantoms.insert(user_key.into(), self.policy.fail(&throttle, attempt.now));
        Outcome::Invalid
    }
}

#[cfg(test)]
mod tests {
    use twofold_core::seal::MasterKey;

    use super::*;
    use crate::index::{BackupSet, Factor, Index, Prepared};

    const TENANT: &str = "tn_a";
    const USER: &str = "alice";

    /// A verifier and an index holding alice with one TOTP factor and backup
    /// codes.
    fn setup() -> (Verifier, Index, Secret, Vec<String>) {
        let keyring = Keyring::new(MasterKey::generate().unwrap());
        let secret = Secret::generate(Algorithm::Sha1).unwrap();
        let sealed = keyring
            .seal_secret(
                &secret,
                &Binding {
                    tenant: TENANT,
                    user: USER,
                    factor: "fa_1",
                },
            )
            .unwrap();
        let codes = backup::BackupCodes::generate().unwrap();
        let index = Index::default();
        index.apply(vec![
            Prepared::PutTotp {
                tenant: TENANT.into(),
                user: USER.into(),
                factor: Factor {
                    id: "fa_1".into(),
                    params: TotpParams::default(),
                    sealed,
                    last_step: None,
                },
            },
            Prepared::PutBackup {
                tenant: TENANT.into(),
                user: USER.into(),
                set: BackupSet {
                    set_id: "fa_set".into(),
                    hashes: codes.hashes(keyring.hash_key()).into_boxed_slice(),
                    used: vec![false; 10].into_boxed_slice(),
                },
            },
        ]);
        let plain = codes
            .as_slice()
            .iter()
            .map(|c| c.expose().to_owned())
            .collect();
        let verifier = Verifier::new(keyring, Skew::default(), ThrottlePolicy::default()).unwrap();
        (verifier, index, secret, plain)
    }

    /// One attempt on alice.
    fn run(
        v: &Verifier,
        index: &Index,
        code: &str,
        now: u64,
        ids: &mut dyn FnMut() -> u64,
    ) -> (Outcome, Vec<(u64, UsageEvent)>) {
        index
            .with_user(TENANT, USER, |user| {
                v.attempt(user, attempt(code, now), ids)
            })
            .unwrap()
    }

    fn attempt(code: &str, now: u64) -> Attempt<'_> {
        Attempt {
            tenant: TENANT,
            user: USER,
            code,
            now,
        }
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn a_code_is_accepted_once_even_with_other_spacing() {
        let (v, index, secret, _) = setup();
        let now = 1_700_000_000;
        let code = otp::totp(&secret, now, TotpParams::default());
        let mut ids = counter();
        let (outcome, events) = run(&v, &index, &code, now, &mut ids);
        assert_eq!(
            outcome,
            Outcome::Valid {
                kind: FactorKind::Totp,
                factor_id: "fa_1".into()
            }
        );
        assert!(matches!(events[0].1, UsageEvent::TotpAccepted { step, .. } if step == now / 30));
        let spaced = format!(" {} {} ", &code[..3], &code[3..]);
        assert_eq!(run(&v, &index, &spaced, now, &mut ids).0, Outcome::Invalid);
    }

    #[test]
    fn backup_codes_are_single_use_and_normalised() {
        let (v, index, _, codes) = setup();
        let mut ids = counter();
        let typed = codes[3].to_uppercase().replace('-', " ");
        assert!(matches!(
            run(&v, &index, &typed, 1000, &mut ids).0,
            Outcome::Valid {
                kind: FactorKind::Backup,
                ..
            }
        ));
        assert_eq!(
            run(&v, &index, &codes[3], 1000, &mut ids).0,
            Outcome::Invalid
        );
        assert_eq!(
            index.with_user(TENANT, USER, |u| u.backup().unwrap().used[3]),
            Some(true)
        );
    }

    #[test]
    fn failures_throttle_then_success_resets() {
        let (v, index, secret, _) = setup();
        let mut ids = counter();
        let now = 1_700_000_000;
        for _ in 0..5 {
            assert_eq!(run(&v, &index, "000000", now, &mut ids).0, Outcome::Invalid);
        }
        assert_eq!(
            run(&v, &index, "000000", now, &mut ids).0,
            Outcome::Throttled { retry_after: 30 }
        );
        let later = now + 31;
        let code = otp::totp(&secret, later, TotpParams::default());
        let (outcome, events) = run(&v, &index, &code, later, &mut ids);
        assert!(matches!(outcome, Outcome::Valid { .. }));
        assert!(
            events
                .iter()
                .any(|(_, e)| matches!(e, UsageEvent::Success { .. }))
        );
        assert_eq!(
            index.with_user(TENANT, USER, |u| u
                .throttle(&ThrottlePolicy::default())
                .failures),
            Some(0)
        );
    }

    #[test]
    fn unknown_users_are_answered_and_throttled_like_known_ones() {
        let (v, _, _, _) = setup();
        for _ in 0..5 {
            assert_eq!(
                v.attempt_unknown("tn_a\0bob", attempt("123456", 50)),
                Outcome::Invalid
            );
        }
        assert_eq!(
            v.attempt_unknown("tn_a\0bob", attempt("123456", 50)),
            Outcome::Throttled { retry_after: 30 }
        );
    }
}
