//! The in-memory index that verification reads: API keys by hash, and users with
//! their factors, backup codes and throttle state.
//!
//! Feed records are checked and converted into these domain types by [`prepare`]
//! before anything is applied, so a bad record refuses its whole batch. Runtime
//! state produced on this node (accepted steps, used codes, failures) is merged
//! with what the feed says: steps by max, used codes by union, and throttle events
//! by replaying this node's not-yet-published events over the feed's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use twofold_core::feed::{Entity, EntityKey, Op};
use twofold_core::ids::{Scope, UserId};
use twofold_core::otp::{Digits, Period, TotpParams};
use twofold_core::seal::Sealed;
use twofold_core::throttle::{Throttle, ThrottlePolicy};

/// Why a feed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} record: {reason}")]
pub struct RecordError {
    kind: &'static str,
    reason: String,
}

fn invalid(kind: &'static str, reason: impl Into<String>) -> RecordError {
    RecordError {
        kind,
        reason: reason.into(),
    }
}

/// The key of a user in the index: tenant and user joined by a NUL, which a user
/// id cannot contain.
pub fn user_key(tenant: &str, user: &str) -> Box<str> {
    let mut key = String::with_capacity(tenant.len() + 1 + user.len());
    key.push_str(tenant);
    key.push('\0');
    key.push_str(user);
    key.into_boxed_str()
}

/// A key that may verify for `tenant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Box<str>,
    pub tenant: Box<str>,
}

/// An active TOTP factor.
#[derive(Debug, Clone)]
pub struct Factor {
    pub id: Box<str>,
    pub params: TotpParams,
    pub sealed: Sealed,
    /// The last step accepted anywhere this node knows of.
    pub last_step: Option<u64>,
}

/// A user's current backup codes.
#[derive(Debug, Clone)]
pub struct BackupSet {
    pub set_id: Box<str>,
    pub hashes: Box<[[u8; 32]]>,
    pub used: Box<[bool]>,
}

/// A throttle event of this node that the feed may not reflect yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalEvent {
    Failure { at: u64 },
    Success,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    id: u64,
    event: LocalEvent,
}

/// Everything verification needs about one user.
#[derive(Debug, Default)]
pub struct User {
    pub factors: Vec<Factor>,
    pub backup: Option<BackupSet>,
    /// The throttle state as last published by the control plane.
    feed_throttle: Throttle,
    /// This node's events not yet reflected in `feed_throttle`, oldest first.
    pending: Vec<Pending>,
}

impl User {
    /// The throttle state to enforce: the feed's, with this node's events that
    /// the feed has not caught up with replayed on top.
    pub fn throttle(&mut self, covered_through: u64, policy: &ThrottlePolicy) -> Throttle {
        self.pending.retain(|p| p.id > covered_through);
        self.pending
            .iter()
            .fold(self.feed_throttle, |state, p| match p.event {
                LocalEvent::Failure { at } => policy.fail(&state, at),
                LocalEvent::Success => state.succeed(),
            })
    }

    /// Record an event of this node, numbered as in its outbox.
    pub fn push_event(&mut self, id: u64, event: LocalEvent) {
        self.pending.push(Pending { id, event });
    }

    /// Forget an event pushed for an attempt that was then not recorded.
    pub fn forget_event(&mut self, id: u64) {
        self.pending.retain(|p| p.id != id);
    }

    fn is_empty(&self) -> bool {
        self.factors.is_empty()
            && self.backup.is_none()
            && self.feed_throttle == Throttle::default()
            && self.pending.is_empty()
    }

    /// Keep what this node knows beyond the feed when the feed replaces a factor
    /// or code set: steps only grow and used codes stay used.
    fn merge_factor(&mut self, mut factor: Factor) {
        if let Some(old) = self.factors.iter_mut().find(|f| f.id == factor.id) {
            factor.last_step = factor.last_step.max(old.last_step);
            *old = factor;
        } else {
            self.factors.push(factor);
        }
    }

    fn merge_backup(&mut self, mut set: BackupSet) {
        if let Some(old) = &self.backup
            && old.set_id == set.set_id
            && old.used.len() == set.used.len()
        {
            for (used, was) in set.used.iter_mut().zip(old.used.iter()) {
                *used |= *was;
            }
        }
        self.backup = Some(set);
    }
}

/// A feed op checked and converted into domain types.
#[derive(Debug, Clone)]
pub enum Prepared {
    PutKey {
        hash: [u8; 32],
        key: ApiKey,
    },
    DeleteKey {
        id: Box<str>,
    },
    PutTotp {
        user: Box<str>,
        factor: Factor,
    },
    DeleteTotp {
        user: Box<str>,
        id: Box<str>,
    },
    PutBackup {
        user: Box<str>,
        set: BackupSet,
    },
    DeleteBackup {
        user: Box<str>,
    },
    PutThrottle {
        user: Box<str>,
        throttle: Throttle,
    },
    DeleteThrottle {
        user: Box<str>,
    },
    /// Tenants are replicated for completeness; verification does not read them.
    Tenant,
}

fn checked_user(kind: &'static str, tenant: &str, user: &str) -> Result<Box<str>, RecordError> {
    UserId::try_new(user).map_err(|e| invalid(kind, e.to_string()))?;
    if tenant.is_empty() || tenant.contains('\0') {
        return Err(invalid(kind, "empty or malformed tenant"));
    }
    Ok(user_key(tenant, user))
}

/// Check one feed op and convert it, without touching the index.
pub fn prepare(op: &Op) -> Result<Prepared, RecordError> {
    match op {
        Op::Put { entity } => prepare_put(entity),
        Op::Delete { key } => Ok(match key {
            EntityKey::Tenant { .. } => Prepared::Tenant,
            EntityKey::ApiKey { id } => Prepared::DeleteKey {
                id: id.as_str().into(),
            },
            EntityKey::Totp { tenant, user, id } => Prepared::DeleteTotp {
                user: checked_user("totp", tenant, user)?,
                id: id.as_str().into(),
            },
            EntityKey::BackupCodes { tenant, user } => Prepared::DeleteBackup {
                user: checked_user("backup_codes", tenant, user)?,
            },
            EntityKey::UserState { tenant, user } => Prepared::DeleteThrottle {
                user: checked_user("user_state", tenant, user)?,
            },
        }),
    }
}

fn prepare_put(entity: &Entity) -> Result<Prepared, RecordError> {
    Ok(match entity {
        Entity::Tenant(t) => {
            if t.id.is_empty() {
                return Err(invalid("tenant", "empty id"));
            }
            Prepared::Tenant
        }
        Entity::ApiKey(k) => {
            let hash: [u8; 32] = k
                .hash
                .as_slice()
                .try_into()
                .map_err(|_| invalid("api_key", "hash is not 32 bytes"))?;
            if !k.scopes.iter().any(|s| s == Scope::Verify.as_str()) {
                return Err(invalid("api_key", "key cannot verify"));
            }
            if k.id.is_empty() || k.tenant.is_empty() {
                return Err(invalid("api_key", "empty id or tenant"));
            }
            Prepared::PutKey {
                hash,
                key: ApiKey {
                    id: k.id.as_str().into(),
                    tenant: k.tenant.as_str().into(),
                },
            }
        }
        Entity::Totp(f) => {
            let bad = |e: twofold_core::otp::ParamError| invalid("totp", e.to_string());
            let params = TotpParams {
                algorithm: f.algorithm.parse().map_err(bad)?,
                digits: Digits::try_new(f.digits).map_err(bad)?,
                period: Period::try_new(f.period).map_err(bad)?,
            };
            let sealed =
                Sealed::from_bytes(&f.sealed).map_err(|e| invalid("totp", e.to_string()))?;
            if f.id.is_empty() {
                return Err(invalid("totp", "empty id"));
            }
            Prepared::PutTotp {
                user: checked_user("totp", &f.tenant, &f.user)?,
                factor: Factor {
                    id: f.id.as_str().into(),
                    params,
                    sealed,
                    last_step: f.last_step,
                },
            }
        }
        Entity::BackupCodes(b) => {
            let hashes = b
                .codes
                .iter()
                .map(|c| c.hash.as_slice().try_into())
                .collect::<Result<Vec<[u8; 32]>, _>>()
                .map_err(|_| invalid("backup_codes", "hash is not 32 bytes"))?;
            if hashes.len() > 64 {
                return Err(invalid("backup_codes", "more than 64 codes"));
            }
            Prepared::PutBackup {
                user: checked_user("backup_codes", &b.tenant, &b.user)?,
                set: BackupSet {
                    set_id: b.set_id.as_str().into(),
                    hashes: hashes.into_boxed_slice(),
                    used: b.codes.iter().map(|c| c.used).collect(),
                },
            }
        }
        Entity::UserState(u) => Prepared::PutThrottle {
            user: checked_user("user_state", &u.tenant, &u.user)?,
            throttle: Throttle {
                failures: u.failures,
                locked: u.locked,
                throttled_until: u.throttled_until,
            },
        },
    })
}

/// The index. Maps are behind read-write locks taken briefly; each user has its
/// own mutex, held for the whole of an attempt so concurrent attempts on one user
/// cannot slip past the failure count.
#[derive(Debug, Default)]
pub struct Index {
    keys: RwLock<HashMap<[u8; 32], ApiKey>>,
    users: RwLock<HashMap<Box<str>, Arc<Mutex<User>>>>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic elsewhere does not make the maps inconsistent: every write is a
    // single insert or remove.
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Lock a user, even if a panic poisoned the mutex: the state is still valid.
pub fn lock(user: &Mutex<User>) -> MutexGuard<'_, User> {
    user.lock().unwrap_or_else(|p| p.into_inner())
}

impl Index {
    /// The key with this hash, if it may verify.
    pub fn key(&self, hash: &[u8; 32]) -> Option<ApiKey> {
        read(&self.keys).get(hash).cloned()
    }

    pub fn user(&self, key: &str) -> Option<Arc<Mutex<User>>> {
        read(&self.users).get(key).cloned()
    }

    pub fn user_count(&self) -> usize {
        read(&self.users).len()
    }

    pub fn factor_count(&self) -> usize {
        read(&self.users)
            .values()
            .map(|u| lock(u).factors.len())
            .sum()
    }

    fn with_user(&self, key: Box<str>, f: impl FnOnce(&mut User)) {
        let existing = self.user(&key);
        let user = match existing {
            Some(user) => user,
            None => write(&self.users).entry(key.clone()).or_default().clone(),
        };
        let mut guard = lock(&user);
        f(&mut guard);
        if guard.is_empty() {
            drop(guard);
            let mut users = write(&self.users);
            // Check again under the map lock: an attempt may have added state.
            if users.get(&key).is_some_and(|u| lock(u).is_empty()) {
                users.remove(&key);
            }
        }
    }

    /// Apply checked ops. Each op is applied on its own; the caller applies a
    /// batch only once every op in it has been prepared.
    pub fn apply(&self, ops: Vec<Prepared>) {
        for op in ops {
            match op {
                Prepared::Tenant => {}
                Prepared::PutKey { hash, key } => {
                    let mut keys = write(&self.keys);
                    keys.retain(|_, k| k.id != key.id);
                    keys.insert(hash, key);
                }
                Prepared::DeleteKey { id } => write(&self.keys).retain(|_, k| k.id != id),
                Prepared::PutTotp { user, factor } => {
                    self.with_user(user, |u| u.merge_factor(factor))
                }
                Prepared::DeleteTotp { user, id } => {
                    self.with_user(user, |u| u.factors.retain(|f| f.id != id))
                }
                Prepared::PutBackup { user, set } => self.with_user(user, |u| u.merge_backup(set)),
                Prepared::DeleteBackup { user } => self.with_user(user, |u| u.backup = None),
                Prepared::PutThrottle { user, throttle } => {
                    self.with_user(user, |u| u.feed_throttle = throttle)
                }
                Prepared::DeleteThrottle { user } => self.with_user(user, |u| {
                    u.feed_throttle = Throttle::default();
                    u.pending.clear();
                }),
            }
        }
    }

    /// Carry this node's runtime state from `old` into a freshly bootstrapped
    /// index: accepted steps, used codes and unpublished throttle events.
    pub fn adopt_local_state(&self, old: &Index) {
        let old_users: Vec<(Box<str>, Arc<Mutex<User>>)> = read(&old.users)
            .iter()
            .map(|(k, u)| (k.clone(), u.clone()))
            .collect();
        for (key, old_user) in old_users {
            let Some(user) = self.user(&key) else {
                continue;
            };
            let old_user = lock(&old_user);
            let mut user = lock(&user);
            for old_factor in &old_user.factors {
                if let Some(f) = user.factors.iter_mut().find(|f| f.id == old_factor.id) {
                    f.last_step = f.last_step.max(old_factor.last_step);
                }
            }
            if let Some(old_set) = &old_user.backup {
                user.merge_backup(old_set.clone());
            }
            user.pending = old_user.pending.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use twofold_core::feed::{ApiKeyRecord, TotpRecord, UserStateRecord};

    use super::*;

    fn sealed() -> Vec<u8> {
        let mut blob = vec![1, 0, 0, 0, 1];
        blob.extend([0u8; 24 + 16 + 20]);
        blob
    }

    fn totp(id: &str, last_step: Option<u64>) -> Op {
        Op::Put {
            entity: Entity::Totp(TotpRecord {
                id: id.into(),
                tenant: "tn_a".into(),
                user: "alice".into(),
                algorithm: "SHA1".into(),
                digits: 6,
                period: 30,
                sealed: sealed(),
                last_step,
            }),
        }
    }

    #[test]
    fn bad_records_are_refused() {
        let mut op = totp("fa_1", None);
        if let Op::Put {
            entity: Entity::Totp(f),
        } = &mut op
        {
            f.digits = 9;
        }
        assert!(prepare(&op).is_err());
        let key = Op::Put {
            entity: Entity::ApiKey(ApiKeyRecord {
                id: "key_1".into(),
                tenant: "tn_a".into(),
                hash: vec![0; 31],
                scopes: vec!["verify".into()],
            }),
        };
        assert!(prepare(&key).is_err());
        let state = Op::Put {
            entity: Entity::UserState(UserStateRecord {
                tenant: "tn_a".into(),
                user: "bad\nuser".into(),
                failures: 0,
                locked: false,
                throttled_until: None,
            }),
        };
        assert!(prepare(&state).is_err());
    }

    #[test]
    fn steps_only_grow_when_the_feed_replaces_a_factor() {
        let index = Index::default();
        index.apply(vec![prepare(&totp("fa_1", Some(10))).unwrap()]);
        let user = index.user(&user_key("tn_a", "alice")).unwrap();
        lock(&user).factors[0].last_step = Some(20);
        index.apply(vec![prepare(&totp("fa_1", Some(15))).unwrap()]);
        assert_eq!(lock(&user).factors[0].last_step, Some(20));
        index.apply(vec![prepare(&totp("fa_1", Some(25))).unwrap()]);
        assert_eq!(lock(&user).factors[0].last_step, Some(25));
    }

    #[test]
    fn empty_users_leave_the_index() {
        let index = Index::default();
        index.apply(vec![prepare(&totp("fa_1", None)).unwrap()]);
        assert_eq!(index.user_count(), 1);
        index.apply(vec![
            prepare(&Op::Delete {
                key: EntityKey::Totp {
                    tenant: "tn_a".into(),
                    user: "alice".into(),
                    id: "fa_1".into(),
                },
            })
            .unwrap(),
        ]);
        assert_eq!(index.user_count(), 0);
    }

    #[test]
    fn pending_events_replay_over_the_feed_state_until_covered() {
        let policy = ThrottlePolicy::default();
        let mut user = User::default();
        for id in 1..=5 {
            user.push_event(id, LocalEvent::Failure { at: 100 });
        }
        assert_eq!(user.throttle(0, &policy).failures, 5);
        assert!(user.throttle(0, &policy).throttled_until.is_some());
        // The feed now holds events 1..=3 merged with another node's 2 failures.
        user.feed_throttle = Throttle {
            failures: 5,
            locked: false,
            throttled_until: Some(130),
        };
        assert_eq!(user.throttle(3, &policy).failures, 7);
        user.push_event(6, LocalEvent::Success);
        assert_eq!(user.throttle(3, &policy).failures, 0);
    }
}
