//! The in-memory index that verification reads: API keys by hash, and users with
//! their factors, backup codes and throttle state.
//!
//! Feed records are checked and converted into these domain types by [`prepare`]
//! before anything is applied, so a bad record refuses its whole batch. Runtime
//! state produced on this node (accepted steps, used codes, failures) is merged
//! with what the feed says: steps by max, used codes by union, and throttle events
//! by replaying this node's not-yet-published events over the feed's state.
//!
//! # Memory
//!
//! A node may hold millions of factors, so a user costs as little as it can. Users
//! live in a fixed number of shards, each a slab of [`User`] slots found through a
//! hash table of 4-byte slab indices. A slot is 40 bytes: the tenant as an
//! interned number, and one allocation holding the user id and every TOTP factor
//! with its sealed secret. Backup codes and throttle state, which most users do
//! not have, sit behind their own optional boxes. See BENCHMARKS.md for the
//! measured bytes per factor.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Mutex, MutexGuard, RwLock};

use hashbrown::HashTable;
use twofold_core::feed::{Entity, EntityKey, Op};
use twofold_core::ids::{Scope, UserId};
use twofold_core::otp::{Algorithm, Digits, Period, TotpParams};
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

/// A string key for a user, for maps outside the index (unknown users'
/// throttles): tenant and user joined by a NUL, which a user id cannot contain.
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

/// An active TOTP factor, as a feed record brings it.
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

/// `Pending::counted_from` of an event the control plane has not merged yet.
const NOT_MERGED: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Pending {
    id: u64,
    event: LocalEvent,
    /// The first seq whose published state counts this event, once the control
    /// plane has merged it; [`NOT_MERGED`] until then.
    counted_from: u64,
}

/// Throttle state, kept only for users that have any.
///
/// The control plane publishes a user's state only when it changes what the
/// user may do (a backoff starts or grows, a lock, a reset), not on every
/// failure it merges. So an event of this node stays pending, and counted
/// here, until a state published at or after its `counted_from` arrives.
#[derive(Debug, Clone, Default)]
struct ThrottleState {
    /// As last published by the control plane.
    feed: Throttle,
    /// The seq `feed` was published at: the change's, or the snapshot's or
    /// replica's when it was loaded with one.
    feed_seq: u64,
    /// This node's events not yet reflected in `feed`, oldest first.
    pending: Vec<Pending>,
}

/// A factor as stored in a user's record, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct FactorRef<'a> {
    pub id: &'a str,
    pub params: TotpParams,
    pub last_step: Option<u64>,
    pub sealed: &'a [u8],
}

/// One user's record: the user id and TOTP factors packed into one allocation.
///
/// Layout of `record`: the user id as `u16` length and bytes, then for each
/// factor: id (`u8` length, bytes), algorithm, digits, period (`u16`), last step
/// (`u64`, `u64::MAX` for none), sealed secret (`u16` length, bytes). Integers are
/// little-endian.
#[derive(Debug, Default)]
pub struct User {
    tenant: u32,
    /// The low half of the user's key hash (see [`table_hash`]). It fills what
    /// would be padding after `tenant`, and lets the table grow without reading
    /// the records or hashing again.
    hash: u32,
    record: Box<[u8]>,
    backup: Option<Box<BackupSet>>,
    throttle: Option<Box<ThrottleState>>,
}

const NO_STEP: u64 = u64::MAX;

fn algorithm_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::Sha1 => 1,
        Algorithm::Sha256 => 2,
        Algorithm::Sha512 => 3,
    }
}

fn algorithm_of(code: u8) -> Algorithm {
    match code {
        2 => Algorithm::Sha256,
        3 => Algorithm::Sha512,
        _ => Algorithm::Sha1,
    }
}

/// Reads a record written by [`encode`]; records are only ever built there, from
/// validated values, so the reads below stay in bounds.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let end = (self.at + n).min(self.bytes.len());
        let slice = &self.bytes[self.at.min(end)..end];
        self.at = end;
        slice
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        u16::from_le_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ])
    }

    fn u64(&mut self) -> u64 {
        let mut word = [0u8; 8];
        let b = self.take(8);
        word[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(word)
    }

    fn str(&mut self, len: usize) -> &'a str {
        std::str::from_utf8(self.take(len)).unwrap_or_default()
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }
}

fn encoded_len(f: &Factor) -> usize {
    15 + f.id.len() + f.sealed.as_bytes().len()
}

fn encode_factor(out: &mut Vec<u8>, f: &Factor) {
    out.push(f.id.len() as u8);
    out.extend_from_slice(f.id.as_bytes());
    out.push(algorithm_code(f.params.algorithm));
    out.push(f.params.digits.get());
    out.extend_from_slice(&(f.params.period.seconds() as u16).to_le_bytes());
    out.extend_from_slice(&f.last_step.unwrap_or(NO_STEP).to_le_bytes());
    let sealed = f.sealed.as_bytes();
    out.extend_from_slice(&(sealed.len() as u16).to_le_bytes());
    out.extend_from_slice(sealed);
}

fn encode(user: &str, factors: &[Factor]) -> Box<[u8]> {
    let mut out =
        Vec::with_capacity(2 + user.len() + factors.iter().map(encoded_len).sum::<usize>());
    out.extend_from_slice(&(user.len() as u16).to_le_bytes());
    out.extend_from_slice(user.as_bytes());
    for f in factors {
        encode_factor(&mut out, f);
    }
    out.into_boxed_slice()
}

/// The factors of a record, with the offset of each one's last step.
fn factors_of(record: &[u8]) -> impl Iterator<Item = (usize, FactorRef<'_>)> {
    let mut cursor = Cursor {
        bytes: record,
        at: 0,
    };
    let user_len = usize::from(cursor.u16());
    cursor.take(user_len);
    std::iter::from_fn(move || {
        if cursor.done() {
            return None;
        }
        let id_len = usize::from(cursor.u8());
        let id = cursor.str(id_len);
        let algorithm = algorithm_of(cursor.u8());
        let digits = Digits::try_new(cursor.u8()).unwrap_or_default();
        let period = Period::try_new(u32::from(cursor.u16())).unwrap_or_default();
        let step_at = cursor.at;
        let step = cursor.u64();
        let sealed_len = usize::from(cursor.u16());
        let sealed = cursor.take(sealed_len);
        Some((
            step_at,
            FactorRef {
                id,
                params: TotpParams {
                    algorithm,
                    digits,
                    period,
                },
                last_step: (step != NO_STEP).then_some(step),
                sealed,
            },
        ))
    })
}

impl User {
    fn user_id(&self) -> &str {
        let mut cursor = Cursor {
            bytes: &self.record,
            at: 0,
        };
        let len = usize::from(cursor.u16());
        cursor.str(len)
    }

    /// The user's active TOTP factors.
    pub fn factors(&self) -> impl Iterator<Item = FactorRef<'_>> {
        factors_of(&self.record).map(|(_, f)| f)
    }

    /// Record that factor `index` (in [`User::factors`] order) accepted `step`;
    /// the stored step only grows.
    pub fn accept_step(&mut self, index: usize, step: u64) {
        let Some((at, factor)) = factors_of(&self.record).nth(index) else {
            return;
        };
        if factor.last_step.is_none_or(|s| s < step) {
            self.record[at..at + 8].copy_from_slice(&step.to_le_bytes());
        }
    }

    pub fn backup_mut(&mut self) -> Option<&mut BackupSet> {
        self.backup.as_deref_mut()
    }

    pub fn backup(&self) -> Option<&BackupSet> {
        self.backup.as_deref()
    }

    /// The throttle state to enforce: the feed's, with this node's events that
    /// the feed does not count yet replayed on top.
    pub fn throttle(&mut self, policy: &ThrottlePolicy) -> Throttle {
        let Some(state) = self.throttle.as_deref_mut() else {
            return Throttle::default();
        };
        let feed_seq = state.feed_seq;
        state.pending.retain(|p| p.counted_from > feed_seq);
        state.pending.iter().fold(state.feed, |t, p| match p.event {
            LocalEvent::Failure { at } => policy.fail(&t, at),
            LocalEvent::Success => t.succeed(),
        })
    }

    /// Record an event of this node, numbered as in its outbox.
    pub fn push_event(&mut self, id: u64, event: LocalEvent) {
        self.throttle.get_or_insert_default().pending.push(Pending {
            id,
            event,
            counted_from: NOT_MERGED,
        });
    }

    /// The control plane merged event `id`: every state it publishes from seq
    /// `counted_from` on counts it.
    pub fn mark_counted(&mut self, id: u64, counted_from: u64) {
        if let Some(state) = self.throttle.as_deref_mut()
            && let Some(pending) = state.pending.iter_mut().find(|p| p.id == id)
        {
            pending.counted_from = counted_from;
        }
    }

    /// Forget an event pushed for an attempt that was then not recorded.
    pub fn forget_event(&mut self, id: u64) {
        if let Some(state) = self.throttle.as_deref_mut() {
            state.pending.retain(|p| p.id != id);
        }
    }

    fn has_factors(&self) -> bool {
        self.factors().next().is_some()
    }

    fn is_empty(&self) -> bool {
        !self.has_factors()
            && self.backup.is_none()
            && self
                .throttle
                .as_deref()
                .is_none_or(|t| t.feed == Throttle::default() && t.pending.is_empty())
    }

    fn owned_factors(&self) -> Vec<Factor> {
        self.factors()
            .filter_map(|f| {
                Some(Factor {
                    id: f.id.into(),
                    params: f.params,
                    sealed: Sealed::from_bytes(f.sealed).ok()?,
                    last_step: f.last_step,
                })
            })
            .collect()
    }

    fn set_factors(&mut self, factors: &[Factor]) {
        let user = self.user_id().to_owned();
        self.record = encode(&user, factors);
    }

    /// Keep what this node knows beyond the feed when the feed replaces a factor:
    /// steps only grow.
    fn merge_factor(&mut self, mut factor: Factor) {
        if !self.factors().any(|f| f.id == &*factor.id) {
            // A new factor (the common case, and every one of a bootstrap) is
            // appended without decoding the others.
            let mut record = Vec::with_capacity(self.record.len() + encoded_len(&factor));
            record.extend_from_slice(&self.record);
            encode_factor(&mut record, &factor);
            self.record = record.into_boxed_slice();
            return;
        }
        let mut factors = self.owned_factors();
        if let Some(old) = factors.iter_mut().find(|f| f.id == factor.id) {
            factor.last_step = factor.last_step.max(old.last_step);
            *old = factor;
        } else {
            factors.push(factor);
        }
        self.set_factors(&factors);
    }

    fn remove_factor(&mut self, id: &str) {
        let mut factors = self.owned_factors();
        factors.retain(|f| &*f.id != id);
        self.set_factors(&factors);
    }

    /// Used codes stay used while the set is the same.
    fn merge_backup(&mut self, mut set: BackupSet) {
        if let Some(old) = &self.backup
            && old.set_id == set.set_id
            && old.used.len() == set.used.len()
        {
            for (used, was) in set.used.iter_mut().zip(old.used.iter()) {
                *used |= *was;
            }
        }
        self.backup = Some(Box::new(set));
    }

    /// Mark the codes `old` used here as used in this user's set, if it is the
    /// same set. A replaced or deleted set is never brought back.
    fn adopt_used_codes(&mut self, old: &BackupSet) {
        if let Some(set) = self.backup.as_deref_mut()
            && set.set_id == old.set_id
            && set.used.len() == old.used.len()
        {
            for (used, was) in set.used.iter_mut().zip(old.used.iter()) {
                *used |= *was;
            }
        }
    }

    fn set_feed_throttle(&mut self, throttle: Throttle, seq: u64) {
        if throttle == Throttle::default() && self.throttle.is_none() {
            return;
        }
        let state = self.throttle.get_or_insert_default();
        state.feed = throttle;
        state.feed_seq = seq;
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
        tenant: Box<str>,
        user: Box<str>,
        factor: Factor,
    },
    DeleteTotp {
        tenant: Box<str>,
        user: Box<str>,
        id: Box<str>,
    },
    PutBackup {
        tenant: Box<str>,
        user: Box<str>,
        set: BackupSet,
    },
    DeleteBackup {
        tenant: Box<str>,
        user: Box<str>,
    },
    PutThrottle {
        tenant: Box<str>,
        user: Box<str>,
        throttle: Throttle,
        /// The seq this state was published at ([`Prepared::at`]).
        seq: u64,
    },
    DeleteThrottle {
        tenant: Box<str>,
        user: Box<str>,
    },
    /// Tenants are replicated for completeness; verification does not read them.
    Tenant,
}

/// Longest factor id or backup set id kept; the control plane makes 19 bytes.
const MAX_ID_LEN: usize = 64;

fn checked_owner(
    kind: &'static str,
    tenant: &str,
    user: &str,
) -> Result<(Box<str>, Box<str>), RecordError> {
    UserId::try_new(user).map_err(|e| invalid(kind, e.to_string()))?;
    if tenant.is_empty() || tenant.len() > MAX_ID_LEN || tenant.chars().any(char::is_control) {
        return Err(invalid(kind, "empty or malformed tenant"));
    }
    Ok((tenant.into(), user.into()))
}

fn checked_id(kind: &'static str, id: &str) -> Result<Box<str>, RecordError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) {
        return Err(invalid(kind, "empty or overlong id"));
    }
    Ok(id.into())
}

impl Prepared {
    /// This op as published at `seq`: a user's throttle state keeps the seq,
    /// to tell which of this node's events it already counts.
    pub fn at(mut self, at: u64) -> Prepared {
        if let Prepared::PutThrottle { seq, .. } = &mut self {
            *seq = at;
        }
        self
    }
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
            EntityKey::Totp { tenant, user, id } => {
                let (tenant, user) = checked_owner("totp", tenant, user)?;
                Prepared::DeleteTotp {
                    tenant,
                    user,
                    id: id.as_str().into(),
                }
            }
            EntityKey::BackupCodes { tenant, user } => {
                let (tenant, user) = checked_owner("backup_codes", tenant, user)?;
                Prepared::DeleteBackup { tenant, user }
            }
            EntityKey::UserState { tenant, user } => {
                let (tenant, user) = checked_owner("user_state", tenant, user)?;
                Prepared::DeleteThrottle { tenant, user }
            }
        }),
    }
}

/// Check one entity of a snapshot and convert it.
pub fn prepare_put(entity: &Entity) -> Result<Prepared, RecordError> {
    Ok(match entity {
        Entity::Tenant(t) => {
            checked_id("tenant", &t.id)?;
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
            Prepared::PutKey {
                hash,
                key: ApiKey {
                    id: checked_id("api_key", &k.id)?,
                    tenant: checked_id("api_key", &k.tenant)?,
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
            if sealed.as_bytes().len() > usize::from(u16::MAX) {
                return Err(invalid("totp", "sealed secret too long"));
            }
            let (tenant, user) = checked_owner("totp", &f.tenant, &f.user)?;
            Prepared::PutTotp {
                tenant,
                user,
                factor: Factor {
                    id: checked_id("totp", &f.id)?,
                    params,
                    sealed,
                    last_step: f.last_step.filter(|&s| s != NO_STEP),
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
            let (tenant, user) = checked_owner("backup_codes", &b.tenant, &b.user)?;
            Prepared::PutBackup {
                tenant,
                user,
                set: BackupSet {
                    set_id: checked_id("backup_codes", &b.set_id)?,
                    hashes: hashes.into_boxed_slice(),
                    used: b.codes.iter().map(|c| c.used).collect(),
                },
            }
        }
        Entity::UserState(u) => {
            let (tenant, user) = checked_owner("user_state", &u.tenant, &u.user)?;
            Prepared::PutThrottle {
                tenant,
                user,
                throttle: Throttle {
                    failures: u.failures,
                    locked: u.locked,
                    throttled_until: u.throttled_until,
                },
                seq: 0,
            }
        }
    })
}

/// Shards of the user table. Each is locked for the synchronous part of one
/// attempt (about a microsecond), so concurrent attempts on a user are
/// serialised and cannot slip past its failure count.
const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Shard {
    /// Slab indices, hashed by tenant and user id.
    table: HashTable<u32>,
    slab: Vec<User>,
    /// Vacant slots of `slab`.
    free: Vec<u32>,
}

impl Shard {
    fn find(&self, hash: u64, tenant: u32, user: &str) -> Option<usize> {
        let short = short_hash(hash);
        self.table
            .find(table_hash(short), |&i| {
                let slot = &self.slab[i as usize];
                slot.hash == short && slot.tenant == tenant && slot.user_id() == user
            })
            .map(|&i| i as usize)
    }

    fn insert(&mut self, hash: u64, mut user: User) -> usize {
        user.hash = short_hash(hash);
        let hash = table_hash(user.hash);
        let index = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = user;
                i as usize
            }
            None => {
                self.slab.push(user);
                self.slab.len() - 1
            }
        };
        let slab = &self.slab;
        self.table
            .insert_unique(hash, index as u32, |&i| table_hash(slab[i as usize].hash));
        index
    }

    fn remove(&mut self, hash: u64, index: usize) {
        if let Ok(entry) = self
            .table
            .find_entry(table_hash(short_hash(hash)), |&i| i as usize == index)
        {
            entry.remove();
            self.slab[index] = User::default();
            self.free.push(index as u32);
        }
    }

    fn shrink(&mut self) {
        // Vacant slots at the end can go; others stay on the free list.
        while self.slab.last().is_some_and(|u| u.record.is_empty())
            && let Some(last) = self
                .free
                .iter()
                .position(|&i| i as usize == self.slab.len() - 1)
        {
            self.free.swap_remove(last);
            self.slab.pop();
        }
        self.slab.shrink_to_fit();
        self.free.shrink_to_fit();
        let slab = &self.slab;
        self.table
            .shrink_to_fit(|&i| table_hash(slab[i as usize].hash));
    }
}

fn key_hash(hasher: &RandomState, tenant: u32, user: &str) -> u64 {
    let mut h = hasher.build_hasher();
    tenant.hash(&mut h);
    user.hash(&mut h);
    h.finish()
}

/// A shard's table hashes a user by the low half of its key hash, which the
/// user's slot keeps, spread over 64 bits: hashbrown places entries by the low
/// bits and tags them with the top 7, and a multiplication by an odd constant
/// mixes every bit into the top ones. The shard itself is chosen by bits 32 and
/// up of the key hash, which this leaves out.
/// The half of a key hash a user slot keeps and its table hashes by.
fn short_hash(key_hash: u64) -> u32 {
    key_hash as u32
}

fn table_hash(short: u32) -> u64 {
    u64::from(short).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// API keys that may verify, by hash, with the hash of each key id so a key is
/// replaced or deleted without scanning them all.
#[derive(Debug, Default)]
struct Keys {
    by_hash: HashMap<[u8; 32], ApiKey>,
    hash_of: HashMap<Box<str>, [u8; 32]>,
}

impl Keys {
    fn remove(&mut self, id: &str) {
        if let Some(hash) = self.hash_of.remove(id) {
            self.by_hash.remove(&hash);
        }
    }

    fn put(&mut self, hash: [u8; 32], key: ApiKey) {
        self.remove(&key.id);
        self.hash_of.insert(key.id.clone(), hash);
        self.by_hash.insert(hash, key);
    }
}

/// The index.
#[derive(Debug)]
pub struct Index {
    keys: RwLock<Keys>,
    /// Tenant ids, interned: a user slot keeps the number, not the string.
    tenants: RwLock<HashMap<Box<str>, u32>>,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            keys: RwLock::default(),
            tenants: RwLock::default(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic elsewhere does not make the maps inconsistent: every write is a
    // single insert or remove.
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // Every change to a shard completes before its lock is released, so a
    // poisoned shard is still consistent.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

impl Index {
    /// The key with this hash, if it may verify.
    pub fn key(&self, hash: &[u8; 32]) -> Option<ApiKey> {
        read(&self.keys).by_hash.get(hash).cloned()
    }

    fn tenant_number(&self, tenant: &str) -> Option<u32> {
        read(&self.tenants).get(tenant).copied()
    }

    fn intern(&self, tenant: &str) -> u32 {
        if let Some(n) = self.tenant_number(tenant) {
            return n;
        }
        let mut tenants = write(&self.tenants);
        let next = tenants.len() as u32;
        *tenants.entry(tenant.into()).or_insert(next)
    }

    fn shard_of(&self, hash: u64) -> &Mutex<Shard> {
        // Bits the shard's table does not use (see `table_hash`): choosing by
        // bits it uses would make every user of a shard share them, clustering
        // the buckets or making the tags useless.
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    /// Run `f` on a user, with the user's shard locked; `None` for a user the
    /// index does not know.
    pub fn with_user<R>(
        &self,
        tenant: &str,
        user: &str,
        f: impl FnOnce(&mut User) -> R,
    ) -> Option<R> {
        let tenant = self.tenant_number(tenant)?;
        let hash = key_hash(&self.hasher, tenant, user);
        let mut shard = lock(self.shard_of(hash));
        let index = shard.find(hash, tenant, user)?;
        Some(f(&mut shard.slab[index]))
    }

    /// Change a user, creating it if needed and dropping it once it holds
    /// nothing.
    fn update_user(&self, tenant: &str, user: &str, f: impl FnOnce(&mut User)) {
        let tenant = self.intern(tenant);
        let hash = key_hash(&self.hasher, tenant, user);
        let mut shard = lock(self.shard_of(hash));
        let index = match shard.find(hash, tenant, user) {
            Some(index) => index,
            None => {
                let fresh = User {
                    tenant,
                    record: encode(user, &[]),
                    ..User::default()
                };
                shard.insert(hash, fresh)
            }
        };
        f(&mut shard.slab[index]);
        if shard.slab[index].is_empty() {
            shard.remove(hash, index);
        }
    }

    pub fn user_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).table.len()).sum()
    }

    pub fn factor_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = lock(s);
                shard
                    .table
                    .iter()
                    .map(|&i| shard.slab[i as usize].factors().count())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Apply checked ops. Each op is applied on its own; the caller applies a
    /// batch only once every op in it has been prepared.
    pub fn apply(&self, ops: Vec<Prepared>) {
        for op in ops {
            match op {
                Prepared::Tenant => {}
                Prepared::PutKey { hash, key } => {
                    write(&self.keys).put(hash, key);
                }
                Prepared::DeleteKey { id } => write(&self.keys).remove(&id),
                Prepared::PutTotp {
                    tenant,
                    user,
                    factor,
                } => {
                    self.update_user(&tenant, &user, |u| u.merge_factor(factor));
                }
                Prepared::DeleteTotp { tenant, user, id } => {
                    self.update_user(&tenant, &user, |u| u.remove_factor(&id));
                }
                Prepared::PutBackup { tenant, user, set } => {
                    self.update_user(&tenant, &user, |u| u.merge_backup(set));
                }
                Prepared::DeleteBackup { tenant, user } => {
                    self.update_user(&tenant, &user, |u| u.backup = None);
                }
                Prepared::PutThrottle {
                    tenant,
                    user,
                    throttle,
                    seq,
                } => {
                    self.update_user(&tenant, &user, |u| u.set_feed_throttle(throttle, seq));
                }
                Prepared::DeleteThrottle { tenant, user } => {
                    self.update_user(&tenant, &user, |u| u.throttle = None);
                }
            }
        }
    }

    /// Give back memory left over from growing, once a bulk load is done.
    pub fn shrink(&self) {
        for shard in self.shards.iter() {
            lock(shard).shrink();
        }
    }

    /// Carry this node's runtime state from `old` into a freshly bootstrapped
    /// index: accepted steps, used codes and unpublished throttle events.
    pub fn adopt_local_state(&self, old: &Index) {
        let old_tenants: HashMap<u32, Box<str>> = read(&old.tenants)
            .iter()
            .map(|(t, &n)| (n, t.clone()))
            .collect();
        for shard in old.shards.iter() {
            let shard = lock(shard);
            for &i in shard.table.iter() {
                let old_user = &shard.slab[i as usize];
                let Some(tenant) = old_tenants.get(&old_user.tenant) else {
                    continue;
                };
                self.with_user(tenant, old_user.user_id(), |user| {
                    let steps: Vec<(Box<str>, Option<u64>)> = old_user
                        .factors()
                        .map(|f| (f.id.into(), f.last_step))
                        .collect();
                    let mine: Vec<Box<str>> = user.factors().map(|f| f.id.into()).collect();
                    for (index, id) in mine.iter().enumerate() {
                        if let Some((_, Some(step))) = steps.iter().find(|(old_id, _)| old_id == id)
                        {
                            user.accept_step(index, *step);
                        }
                    }
                    if let Some(old_set) = old_user.backup() {
                        user.adopt_used_codes(old_set);
                    }
                    if let Some(old_throttle) = old_user.throttle.as_deref()
                        && !old_throttle.pending.is_empty()
                    {
                        user.throttle.get_or_insert_default().pending =
                            old_throttle.pending.clone();
                    }
                });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use twofold_core::feed::{ApiKeyRecord, TotpRecord, UserStateRecord};

    use super::*;

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_user_slot_keeps_its_hash_in_what_was_padding() {
        // tenant and hash (8), the record (16), two optional boxes (8 each).
        assert_eq!(std::mem::size_of::<User>(), 40);
    }

    /// A sealed secret of the stored layout, for records that are never opened.
    pub(crate) fn sealed() -> Vec<u8> {
        let mut blob = vec![1, 0, 0, 0, 1];
        blob.extend([0u8; 24 + 16 + 20]);
        blob
    }

    fn totp_for(user: &str, id: &str, last_step: Option<u64>) -> Op {
        Op::Put {
            entity: Entity::Totp(TotpRecord {
                id: id.into(),
                tenant: "tn_a".into(),
                user: user.into(),
                algorithm: "SHA256".into(),
                digits: 8,
                period: 60,
                sealed: sealed(),
                last_step,
            }),
        }
    }

    fn totp(id: &str, last_step: Option<u64>) -> Op {
        totp_for("alice", id, last_step)
    }

    fn steps(index: &Index) -> Vec<Option<u64>> {
        index
            .with_user("tn_a", "alice", |u| {
                u.factors().map(|f| f.last_step).collect()
            })
            .unwrap_or_default()
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
    fn factors_round_trip_through_the_packed_record() {
        let index = Index::default();
        index.apply(vec![
            prepare(&totp("fa_1", None)).unwrap(),
            prepare(&totp("fa_2", Some(7))).unwrap(),
        ]);
        let got = index
            .with_user("tn_a", "alice", |u| {
                u.factors()
                    .map(|f| (f.id.to_owned(), f.params, f.last_step, f.sealed.to_vec()))
                    .collect::<Vec<_>>()
            })
            .unwrap();
        let params = TotpParams {
            algorithm: Algorithm::Sha256,
            digits: Digits::try_new(8).unwrap(),
            period: Period::try_new(60).unwrap(),
        };
        assert_eq!(
            got,
            vec![
                ("fa_1".to_owned(), params, None, sealed()),
                ("fa_2".to_owned(), params, Some(7), sealed())
            ]
        );
        assert!(index.with_user("tn_a", "bob", |_| ()).is_none());
        assert!(index.with_user("tn_b", "alice", |_| ()).is_none());
    }

    #[test]
    fn steps_only_grow_when_the_feed_replaces_a_factor() {
        let index = Index::default();
        index.apply(vec![prepare(&totp("fa_1", Some(10))).unwrap()]);
        index.with_user("tn_a", "alice", |u| u.accept_step(0, 20));
        index.apply(vec![prepare(&totp("fa_1", Some(15))).unwrap()]);
        assert_eq!(steps(&index), vec![Some(20)]);
        index.apply(vec![prepare(&totp("fa_1", Some(25))).unwrap()]);
        assert_eq!(steps(&index), vec![Some(25)]);
        index.with_user("tn_a", "alice", |u| u.accept_step(0, 3));
        assert_eq!(
            steps(&index),
            vec![Some(25)],
            "accepting an older step changes nothing"
        );
    }

    #[test]
    fn a_resealed_put_replaces_the_blob_but_keeps_the_step_accepted_here() {
        // After a key rotation the control plane publishes each factor again
        // with a new blob and the last step it knows, which may be behind what
        // this node accepted since: the code accepted here must stay used.
        let index = Index::default();
        index.apply(vec![prepare(&totp("fa_1", Some(10))).unwrap()]);
        index.with_user("tn_a", "alice", |u| u.accept_step(0, 20));
        let mut resealed = sealed();
        resealed[1..5].copy_from_slice(&[0, 0, 0, 2]);
        resealed[10] = 7;
        let Op::Put {
            entity: Entity::Totp(mut record),
        } = totp("fa_1", Some(10))
        else {
            unreachable!()
        };
        record.sealed = resealed.clone();
        let put = Op::Put {
            entity: Entity::Totp(record),
        };
        index.apply(vec![prepare(&put).unwrap()]);
        let (step, blob) = index
            .with_user("tn_a", "alice", |u| {
                let f = u.factors().next().unwrap();
                (f.last_step, f.sealed.to_vec())
            })
            .unwrap();
        assert_eq!(
            step,
            Some(20),
            "the step accepted here survives the re-seal"
        );
        assert_eq!(blob, resealed, "the new blob replaces the old one");
    }

    #[test]
    fn empty_users_leave_the_index_and_slots_are_reused() {
        let index = Index::default();
        for user in ["alice", "bob", "carol"] {
            index.apply(vec![prepare(&totp_for(user, "fa_1", None)).unwrap()]);
        }
        assert_eq!(index.user_count(), 3);
        index.apply(vec![
            prepare(&Op::Delete {
                key: EntityKey::Totp {
                    tenant: "tn_a".into(),
                    user: "bob".into(),
                    id: "fa_1".into(),
                },
            })
            .unwrap(),
        ]);
        assert_eq!(index.user_count(), 2);
        assert!(index.with_user("tn_a", "bob", |_| ()).is_none());
        index.apply(vec![prepare(&totp_for("dave", "fa_9", None)).unwrap()]);
        index.shrink();
        assert_eq!(index.user_count(), 3);
        assert_eq!(index.factor_count(), 3);
        for user in ["alice", "carol", "dave"] {
            assert!(index.with_user("tn_a", user, |_| ()).is_some(), "{user}");
        }
    }

    #[test]
    fn many_users_spread_over_shards_stay_findable() {
        let index = Index::default();
        let ops: Vec<Prepared> = (0..5000)
            .map(|i| prepare(&totp_for(&format!("user-{i}"), "fa_1", Some(i))).unwrap())
            .collect();
        index.apply(ops);
        index.shrink();
        assert_eq!(index.user_count(), 5000);
        for i in (0..5000).step_by(97) {
            let step = index.with_user("tn_a", &format!("user-{i}"), |u| {
                u.factors().next().and_then(|f| f.last_step)
            });
            assert_eq!(step, Some(Some(i)));
        }
    }

    #[test]
    fn pending_events_replay_over_the_feed_state_until_it_counts_them() {
        let policy = ThrottlePolicy::default();
        let throttled = |failures| Throttle {
            failures,
            locked: false,
            throttled_until: Some(130),
        };
        let mut user = User::default();
        for id in 1..=5 {
            user.push_event(id, LocalEvent::Failure { at: 100 });
        }
        assert_eq!(user.throttle(&policy).failures, 5);
        assert!(user.throttle(&policy).throttled_until.is_some());
        // Events 1..=3 were merged in the report answered with counted_from 11,
        // events 4 and 5 in the one answered with 12.
        for id in 1..=3 {
            user.mark_counted(id, 11);
        }
        for id in 4..=5 {
            user.mark_counted(id, 12);
        }
        // A state published at 10 counts none of them, whatever it says.
        user.set_feed_throttle(throttled(2), 10);
        assert_eq!(user.throttle(&policy).failures, 7);
        // At 11 it counts events 1..=3, merged with another node's 2 failures.
        user.set_feed_throttle(throttled(5), 11);
        assert_eq!(user.throttle(&policy).failures, 7);
        user.push_event(6, LocalEvent::Success);
        assert_eq!(user.throttle(&policy).failures, 0);
        user.forget_event(6);
        assert_eq!(user.throttle(&policy).failures, 7);
        // At 12 it counts all five.
        user.set_feed_throttle(throttled(7), 12);
        assert_eq!(user.throttle(&policy).failures, 7);
        // An event never merged stays counted here, whatever the feed says.
        user.push_event(7, LocalEvent::Failure { at: 100 });
        user.set_feed_throttle(throttled(7), 40);
        assert_eq!(user.throttle(&policy).failures, 8);
    }

    fn backup_op(set_id: &str, used: &[bool]) -> Prepared {
        Prepared::PutBackup {
            tenant: "tn_a".into(),
            user: "alice".into(),
            set: BackupSet {
                set_id: set_id.into(),
                hashes: vec![[0u8; 32]; used.len()].into_boxed_slice(),
                used: used.into(),
            },
        }
    }

    #[test]
    fn a_bootstrap_never_brings_back_a_replaced_backup_set() {
        let old = Index::default();
        old.apply(vec![
            prepare(&totp("fa_1", None)).unwrap(),
            backup_op("set_old", &[true, false]),
        ]);
        let fresh = Index::default();
        fresh.apply(vec![
            prepare(&totp("fa_1", None)).unwrap(),
            backup_op("set_new", &[false, false]),
        ]);
        fresh.adopt_local_state(&old);
        let set = fresh.with_user("tn_a", "alice", |u| {
            u.backup().map(|b| (b.set_id.to_string(), b.used.to_vec()))
        });
        assert_eq!(set, Some(Some(("set_new".to_owned(), vec![false, false]))));

        // A user whose set was deleted gets none back.
        let without = Index::default();
        without.apply(vec![prepare(&totp("fa_1", None)).unwrap()]);
        without.adopt_local_state(&old);
        assert_eq!(
            without.with_user("tn_a", "alice", |u| u.backup().is_some()),
            Some(false)
        );

        // The same set keeps the codes used here.
        let same = Index::default();
        same.apply(vec![
            prepare(&totp("fa_1", None)).unwrap(),
            backup_op("set_old", &[false, false]),
        ]);
        same.adopt_local_state(&old);
        let used = same.with_user("tn_a", "alice", |u| u.backup().map(|b| b.used.to_vec()));
        assert_eq!(used, Some(Some(vec![true, false])));
    }

    #[test]
    fn keys_are_replaced_and_deleted_by_id() {
        let index = Index::default();
        let key = |id: &str| ApiKey {
            id: id.into(),
            tenant: "tn_a".into(),
        };
        index.apply(vec![
            Prepared::PutKey {
                hash: [1; 32],
                key: key("key_a"),
            },
            Prepared::PutKey {
                hash: [2; 32],
                key: key("key_b"),
            },
            Prepared::PutKey {
                hash: [3; 32],
                key: key("key_a"),
            },
        ]);
        assert_eq!(
            index.key(&[1; 32]),
            None,
            "the old hash of a replaced key is gone"
        );
        assert_eq!(index.key(&[3; 32]), Some(key("key_a")));
        index.apply(vec![Prepared::DeleteKey { id: "key_a".into() }]);
        assert_eq!(index.key(&[3; 32]), None);
        assert_eq!(index.key(&[2; 32]), Some(key("key_b")));
    }

    #[test]
    fn local_state_survives_a_bootstrap_swap() {
        let old = Index::default();
        old.apply(vec![prepare(&totp("fa_1", Some(10))).unwrap()]);
        old.with_user("tn_a", "alice", |u| {
            u.accept_step(0, 30);
            u.push_event(9, LocalEvent::Failure { at: 5 });
        });
        let fresh = Index::default();
        fresh.apply(vec![prepare(&totp("fa_1", Some(12))).unwrap()]);
        fresh.adopt_local_state(&old);
        assert_eq!(steps(&fresh), vec![Some(30)]);
        let failures = fresh.with_user("tn_a", "alice", |u| {
            u.throttle(&ThrottlePolicy::default()).failures
        });
        assert_eq!(failures, Some(1));
    }
}
