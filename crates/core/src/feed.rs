//! The feed protocol: the records the control plane publishes and data planes
//! apply, the lines of the snapshot and change streams, and the digest both
//! planes compute over the replicated state.
//!
//! These are wire types. Ids, parameters and bytes are kept in their wire form
//! (strings, base64) and each plane converts them explicitly into its own domain
//! types. The encoding is documented in `docs/feed.md`.
//!
//! The replicated state is a set of [`Entity`] values, each identified by its
//! [`EntityKey`]. A [`Change`] carries the full new state of every entity it
//! touches, or a tombstone, so applying it twice is the same as applying it once.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Bytes travel as standard base64 in JSON.
pub mod base64 {
    use data_encoding::BASE64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        BASE64
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A tenant, as data planes need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub name: String,
}

/// An API key that data planes accept: only its keyed hash travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant: String,
    #[serde(with = "base64")]
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
}

/// An active TOTP factor. The secret travels sealed, bound to tenant, user and
/// factor id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TotpRecord {
    pub id: String,
    pub tenant: String,
    pub user: String,
    pub algorithm: String,
    pub digits: u8,
    pub period: u32,
    #[serde(with = "base64")]
    pub sealed: Vec<u8>,
    /// The last time step accepted for this factor, if any (replay protection).
    pub last_step: Option<u64>,
}

/// A user's current set of backup codes, as keyed hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCodesRecord {
    pub tenant: String,
    pub user: String,
    /// Changes each time the set is regenerated, so a report about an old set is
    /// never applied to a new one.
    pub set_id: String,
    pub codes: Vec<BackupCodeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCodeEntry {
    #[serde(with = "base64")]
    pub hash: Vec<u8>,
    pub used: bool,
}

/// Runtime state of a user: failure count and locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserStateRecord {
    pub tenant: String,
    pub user: String,
    /// Consecutive failed verifications.
    pub failures: u32,
    /// Locked until unlocked on the control plane.
    pub locked: bool,
    /// Unix time in seconds before which attempts are refused, if throttled.
    pub throttled_until: Option<u64>,
}

/// One piece of replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entity {
    Tenant(TenantRecord),
    ApiKey(ApiKeyRecord),
    Totp(TotpRecord),
    BackupCodes(BackupCodesRecord),
    UserState(UserStateRecord),
}

/// What identifies an entity: a later record with the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntityKey {
    Tenant {
        id: String,
    },
    ApiKey {
        id: String,
    },
    /// Owner fields are part of a factor's key (they never change), so a node can
    /// find the factor to delete without an index from factor id to user.
    Totp {
        tenant: String,
        user: String,
        id: String,
    },
    BackupCodes {
        tenant: String,
        user: String,
    },
    UserState {
        tenant: String,
        user: String,
    },
}

impl Entity {
    pub fn key(&self) -> EntityKey {
        match self {
            Entity::Tenant(t) => EntityKey::Tenant { id: t.id.clone() },
            Entity::ApiKey(k) => EntityKey::ApiKey { id: k.id.clone() },
            Entity::Totp(f) => EntityKey::Totp {
                tenant: f.tenant.clone(),
                user: f.user.clone(),
                id: f.id.clone(),
            },
            Entity::BackupCodes(b) => EntityKey::BackupCodes {
                tenant: b.tenant.clone(),
                user: b.user.clone(),
            },
            Entity::UserState(u) => EntityKey::UserState {
                tenant: u.tenant.clone(),
                user: u.user.clone(),
            },
        }
    }

    /// The canonical bytes of this entity: what the digest hashes and what
    /// replicas may store. Field order is fixed by the type, so equal entities
    /// always give equal bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising these plain structs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One operation of a change: the new full state of an entity, or its removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Put { entity: Entity },
    Delete { key: EntityKey },
}

/// One committed transaction of the control plane, with its sequence number.
/// Applying it is idempotent; a replica applies all of its ops or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    /// Commit time in Unix milliseconds, for lag figures only.
    pub at_ms: u64,
    pub ops: Vec<Op>,
}

/// One line of `GET /v1/feed/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangeLine {
    Change(Change),
    /// Sent every few seconds: the stream is alive and the log's head is `head`.
    Heartbeat {
        head: u64,
    },
}

impl ChangeLine {
    /// Append the line of a change whose ops are given as their JSON array, the
    /// form the control plane stores them in: the JSON of `ChangeLine::Change`,
    /// without parsing the ops and serialising them again.
    pub fn write_change(seq: u64, at_ms: u64, ops_json: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"type":"change","seq":"#);
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(br#","at_ms":"#);
        out.extend_from_slice(at_ms.to_string().as_bytes());
        out.extend_from_slice(br#","ops":"#);
        out.extend_from_slice(ops_json.as_bytes());
        out.push(b'}');
    }
}

/// One line of `GET /v1/feed/snapshot`: a header, entities, then a trailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SnapshotLine {
    /// The snapshot holds the state as of `seq`; tail the changes after it.
    Begin {
        seq: u64,
    },
    Entity {
        entity: Entity,
    },
    /// `count` entities were sent, and their digest is `digest`.
    End {
        seq: u64,
        count: u64,
        digest: String,
    },
}

const ENTITY_LINE_START: &[u8] = br#"{"type":"entity","entity":"#;

impl SnapshotLine {
    /// Append the line of an entity given by its canonical bytes: the JSON of
    /// `SnapshotLine::Entity`, without serialising the entity again.
    pub fn write_entity_line(canonical: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(ENTITY_LINE_START);
        out.extend_from_slice(canonical);
        out.push(b'}');
    }

    /// The entity's bytes in a line written by [`SnapshotLine::write_entity_line`],
    /// or `None` for a line of another shape. They are the canonical bytes only
    /// if the writer sent them so; a snapshot's trailer digest checks that.
    pub fn entity_bytes(line: &[u8]) -> Option<&[u8]> {
        line.strip_prefix(ENTITY_LINE_START)?.strip_suffix(b"}")
    }
}

/// A runtime event produced on a data plane, reported to the control plane so it
/// reaches every other node through the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UsageEvent {
    /// A TOTP code for `step` was accepted: no step up to it may be used again.
    TotpAccepted {
        tenant: String,
        user: String,
        factor: String,
        step: u64,
    },
    /// Backup code `index` of set `set_id` was used.
    BackupCodeUsed {
        tenant: String,
        user: String,
        set_id: String,
        index: u32,
    },
    /// A verification failed at Unix time `at` (seconds).
    Failure {
        tenant: String,
        user: String,
        at: u64,
    },
    /// A verification succeeded: the failure count starts again.
    Success { tenant: String, user: String },
}

/// A usage event with its id in the reporting node's outbox. Ids only grow, so
/// the control plane skips events it has already merged and a retried report is
/// harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireEvent")]
pub struct NumberedEvent {
    pub id: u64,
    #[serde(flatten)]
    pub event: UsageEvent,
}

/// A numbered event as it is read: every field of every event type, flat.
/// Deriving `Deserialize` through `flatten` over the tagged enum buffered each
/// event twice before reading it, which was most of the cost of parsing a usage
/// report. Fields that the event's type does not have are ignored, as before.
#[derive(Deserialize)]
struct WireEvent {
    id: u64,
    #[serde(rename = "type")]
    kind: EventKind,
    tenant: String,
    user: String,
    factor: Option<String>,
    step: Option<u64>,
    set_id: Option<String>,
    index: Option<u32>,
    at: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    TotpAccepted,
    BackupCodeUsed,
    Failure,
    Success,
}

impl TryFrom<WireEvent> for NumberedEvent {
    type Error = String;

    fn try_from(wire: WireEvent) -> Result<NumberedEvent, String> {
        fn required<T>(value: Option<T>, field: &str) -> Result<T, String> {
            value.ok_or_else(|| format!("missing field `{field}`"))
        }
        let WireEvent {
            id,
            kind,
            tenant,
            user,
            ..
        } = wire;
        let event = match kind {
            EventKind::TotpAccepted => UsageEvent::TotpAccepted {
                tenant,
                user,
                factor: required(wire.factor, "factor")?,
                step: required(wire.step, "step")?,
            },
            EventKind::BackupCodeUsed => UsageEvent::BackupCodeUsed {
                tenant,
                user,
                set_id: required(wire.set_id, "set_id")?,
                index: required(wire.index, "index")?,
            },
            EventKind::Failure => UsageEvent::Failure {
                tenant,
                user,
                at: required(wire.at, "at")?,
            },
            EventKind::Success => UsageEvent::Success { tenant, user },
        };
        Ok(NumberedEvent { id, event })
    }
}

/// Body of `POST /v1/feed/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// The reporting node's id, stable across its restarts.
    pub node: String,
    pub events: Vec<NumberedEvent>,
}

/// Answer to a usage report: events up to `through` are merged, and every
/// change the merge published is at or before `seq`.
///
/// A failure that does not change what its user may do is merged without being
/// published; the user's state is published later, counting it, when one does.
/// `counted_from` is the first seq at which a published state counts the
/// events. A control plane that does not send it published every merge, and
/// `seq` stands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAck {
    pub through: u64,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_from: Option<u64>,
    /// Set when the report repeated events an earlier report merged (its answer
    /// was lost): those, up to `retried.through`, count from its own seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried: Option<RetriedMerge>,
}

/// The earlier merge of a retried report's first events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriedMerge {
    pub through: u64,
    pub counted_from: u64,
}

impl UsageAck {
    /// The first seq at which a published user state counts event `id` of the
    /// report.
    pub fn counted_from(&self, id: u64) -> u64 {
        match self.retried {
            Some(retried) if id <= retried.through => retried.counted_from,
            _ => self.counted_from.unwrap_or(self.seq),
        }
    }
}

/// Body of `POST /v1/feed/backup-code-use`: a data plane in strict mode asks the
/// control plane to mark a backup code used before it accepts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupCodeUse {
    pub tenant: String,
    pub user: String,
    pub set_id: String,
    pub index: u32,
}

/// Answer to a [`BackupCodeUse`]: `accepted` is false when the code was already
/// used (on any node) or its set was replaced. The result is in the log at or
/// before `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCodeUseAck {
    pub accepted: bool,
    pub seq: u64,
}

/// An order-independent digest of a set of entities: the sum modulo 2^256 of the
/// SHA-256 of each entity's canonical bytes. Adding the same set in any order gives
/// the same value, so two planes holding the same state agree without sorting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateDigest {
    limbs: [u64; 4],
    count: u64,
}

impl StateDigest {
    pub fn add(&mut self, entity: &Entity) {
        self.add_canonical(&entity.canonical_bytes());
    }

    /// Add an entity given by its canonical bytes.
    pub fn add_canonical(&mut self, bytes: &[u8]) {
        let hash = Sha256::digest(bytes);
        let mut carry = false;
        // Little-endian limbs of the big-endian hash.
        for (i, limb) in self.limbs.iter_mut().enumerate() {
            let start = 32 - (i + 1) * 8;
            let mut word = [0u8; 8];
            word.copy_from_slice(&hash[start..start + 8]);
            let (sum, c1) = limb.overflowing_add(u64::from_be_bytes(word));
            let (sum, c2) = sum.overflowing_add(u64::from(carry));
            *limb = sum;
            carry = c1 || c2;
        }
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Lowercase hex, most significant byte first.
    pub fn to_hex(&self) -> String {
        self.limbs
            .iter()
            .rev()
            .map(|l| format!("{l:016x}"))
            .collect()
    }
}

/// Reading the feed's tagged types with their tag first.
///
/// serde's derived code for an internally tagged enum accepts the tag anywhere
/// in the object, so it first buffers the whole object (every key and value,
/// allocated) and then reads the variant from that buffer; a change line holding
/// ops holding entities buffers each level again. The feed's producers write the
/// tag first (serde's serialiser does), so these types read the tag and then the
/// rest of the object straight into the variant. An object whose tag is not its
/// first field is refused.
mod tag_first {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::Deserialize;
    use serde::de::value::MapAccessDeserializer;
    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

    /// An internally tagged type: its tag field, and its value from the tag and
    /// the rest of the object.
    pub(super) trait Tagged<'de>: Sized {
        const TAG: &'static str;
        /// What the type is, for error messages: "an entity".
        const EXPECTING: &'static str;
        type Variant: Deserialize<'de>;

        fn read<A: MapAccess<'de>>(
            variant: Self::Variant,
            rest: MapAccessDeserializer<A>,
        ) -> Result<Self, A::Error>;
    }

    pub(super) fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Tagged<'de>,
    {
        d.deserialize_map(TaggedVisitor(PhantomData))
    }

    struct TaggedVisitor<T>(PhantomData<T>);

    impl<'de, T: Tagged<'de>> Visitor<'de> for TaggedVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(T::EXPECTING)
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
            if map.next_key_seed(FieldNamed(T::TAG))? != Some(true) {
                return Err(de::Error::custom(format_args!(
                    "expected `{}` as the first field of {}",
                    T::TAG,
                    T::EXPECTING
                )));
            }
            let variant = map.next_value()?;
            T::read(variant, MapAccessDeserializer::new(map))
        }
    }

    /// A field name, compared with one name without allocating.
    struct FieldNamed(&'static str);

    impl<'de> DeserializeSeed<'de> for FieldNamed {
        type Value = bool;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl Visitor<'_> for FieldNamed {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a field name")
        }

        fn visit_str<E: de::Error>(self, name: &str) -> Result<bool, E> {
            Ok(name == self.0)
        }
    }
}

/// The implementations of [`tag_first::Tagged`]: each tag's values, the fields
/// of struct variants, and how each variant reads the rest of its object.
mod tagged {
    use serde::Deserialize;
    use serde::de::value::MapAccessDeserializer;
    use serde::de::{Deserializer, MapAccess};

    use super::tag_first::{self, Tagged};
    use super::{Change, ChangeLine, Entity, EntityKey, Op, SnapshotLine};

    /// `Deserialize` through [`tag_first`] for each type implementing `Tagged`.
    macro_rules! deserialize_tag_first {
        ($($ty:ty),*) => {$(
            impl<'de> Deserialize<'de> for $ty {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    tag_first::deserialize(d)
                }
            }
        )*};
    }

    deserialize_tag_first!(Entity, Op, ChangeLine, SnapshotLine);

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum EntityType {
        Tenant,
        ApiKey,
        Totp,
        BackupCodes,
        UserState,
    }

    impl<'de> Tagged<'de> for Entity {
        const TAG: &'static str = "type";
        const EXPECTING: &'static str = "an entity";
        type Variant = EntityType;

        fn read<A: MapAccess<'de>>(
            variant: EntityType,
            rest: MapAccessDeserializer<A>,
        ) -> Result<Self, A::Error> {
            Ok(match variant {
                EntityType::Tenant => Entity::Tenant(Deserialize::deserialize(rest)?),
                EntityType::ApiKey => Entity::ApiKey(Deserialize::deserialize(rest)?),
                EntityType::Totp => Entity::Totp(Deserialize::deserialize(rest)?),
                EntityType::BackupCodes => Entity::BackupCodes(Deserialize::deserialize(rest)?),
                EntityType::UserState => Entity::UserState(Deserialize::deserialize(rest)?),
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum OpType {
        Put,
        Delete,
    }

    #[derive(Deserialize)]
    struct EntityField {
        entity: Entity,
    }

    #[derive(Deserialize)]
    struct KeyField {
        key: EntityKey,
    }

    impl<'de> Tagged<'de> for Op {
        const TAG: &'static str = "op";
        const EXPECTING: &'static str = "an op";
        type Variant = OpType;

        fn read<A: MapAccess<'de>>(
            variant: OpType,
            rest: MapAccessDeserializer<A>,
        ) -> Result<Self, A::Error> {
            Ok(match variant {
                OpType::Put => Op::Put {
                    entity: EntityField::deserialize(rest)?.entity,
                },
                OpType::Delete => Op::Delete {
                    key: KeyField::deserialize(rest)?.key,
                },
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum ChangeLineType {
        Change,
        Heartbeat,
    }

    #[derive(Deserialize)]
    struct HeadField {
        head: u64,
    }

    impl<'de> Tagged<'de> for ChangeLine {
        const TAG: &'static str = "type";
        const EXPECTING: &'static str = "a change line";
        type Variant = ChangeLineType;

        fn read<A: MapAccess<'de>>(
            variant: ChangeLineType,
            rest: MapAccessDeserializer<A>,
        ) -> Result<Self, A::Error> {
            Ok(match variant {
                ChangeLineType::Change => ChangeLine::Change(Change::deserialize(rest)?),
                ChangeLineType::Heartbeat => ChangeLine::Heartbeat {
                    head: HeadField::deserialize(rest)?.head,
                },
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub(super) enum SnapshotLineType {
        Begin,
        Entity,
        End,
    }

    #[derive(Deserialize)]
    struct SeqField {
        seq: u64,
    }

    #[derive(Deserialize)]
    struct EndFields {
        seq: u64,
        count: u64,
        digest: String,
    }

    impl<'de> Tagged<'de> for SnapshotLine {
        const TAG: &'static str = "type";
        const EXPECTING: &'static str = "a snapshot line";
        type Variant = SnapshotLineType;

        fn read<A: MapAccess<'de>>(
            variant: SnapshotLineType,
            rest: MapAccessDeserializer<A>,
        ) -> Result<Self, A::Error> {
            Ok(match variant {
                SnapshotLineType::Begin => SnapshotLine::Begin {
                    seq: SeqField::deserialize(rest)?.seq,
                },
                SnapshotLineType::Entity => SnapshotLine::Entity {
                    entity: EntityField::deserialize(rest)?.entity,
                },
                SnapshotLineType::End => {
                    let EndFields { seq, count, digest } = EndFields::deserialize(rest)?;
                    SnapshotLine::End { seq, count, digest }
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> Entity {
        Entity::Tenant(TenantRecord {
            id: id.into(),
            name: format!("name of {id}"),
        })
    }

    #[test]
    fn numbered_events_round_trip_and_read_their_own_fields_only() {
        let (tenant, user) = (String::from("tn_a"), String::from("alice"));
        let events = [
            UsageEvent::TotpAccepted {
                tenant: tenant.clone(),
                user: user.clone(),
                factor: "fa_1".into(),
                step: 56_666_666,
            },
            UsageEvent::BackupCodeUsed {
                tenant: tenant.clone(),
                user: user.clone(),
                set_id: "bs_1".into(),
                index: 7,
            },
            UsageEvent::Failure {
                tenant: tenant.clone(),
                user: user.clone(),
                at: 1_700_000_000,
            },
            UsageEvent::Success { tenant, user },
        ];
        for (id, event) in (1..).zip(events) {
            let numbered = NumberedEvent { id, event };
            let json = serde_json::to_string(&numbered).unwrap();
            let back: NumberedEvent = serde_json::from_str(&json).unwrap();
            assert_eq!(back, numbered, "{json}");
        }
        // Another type's field, or an unknown one, is ignored.
        let back: NumberedEvent = serde_json::from_str(
            r#"{"id":3,"type":"success","tenant":"t","user":"u","at":5,"later":true}"#,
        )
        .unwrap();
        assert_eq!(
            back.event,
            UsageEvent::Success {
                tenant: "t".into(),
                user: "u".into()
            }
        );
        // A field of the event's own type is required.
        let missing = serde_json::from_str::<NumberedEvent>(
            r#"{"id":3,"type":"totp_accepted","tenant":"t","user":"u","factor":"f"}"#,
        )
        .unwrap_err();
        assert!(
            missing.to_string().contains("missing field `step`"),
            "{missing}"
        );
        for bad in [
            r#"{"id":3,"type":"unlocked","tenant":"t","user":"u"}"#,
            r#"{"id":3,"type":"failure","user":"u","at":5}"#,
            r#"{"id":-1,"type":"failure","tenant":"t","user":"u","at":5}"#,
            r#"{"id":3,"type":"failure","tenant":"t","user":"u","at":"5"}"#,
        ] {
            assert!(serde_json::from_str::<NumberedEvent>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_ignores_order_and_sees_every_entity() {
        let entities: Vec<Entity> = (0..50).map(|i| tenant(&format!("tn_{i}"))).collect();
        let mut forward = StateDigest::default();
        entities.iter().for_each(|e| forward.add(e));
        let mut backward = StateDigest::default();
        entities.iter().rev().for_each(|e| backward.add(e));
        assert_eq!(forward, backward);
        assert_eq!(forward.count(), 50);
        assert_eq!(forward.to_hex().len(), 64);

        let mut missing_one = StateDigest::default();
        entities[1..].iter().for_each(|e| missing_one.add(e));
        assert_ne!(forward.to_hex(), missing_one.to_hex());

        let mut changed = StateDigest::default();
        entities[1..].iter().for_each(|e| changed.add(e));
        changed.add(&tenant("tn_other"));
        assert_ne!(forward.to_hex(), changed.to_hex());
    }

    #[test]
    fn lines_round_trip_through_json() {
        let change = ChangeLine::Change(Change {
            seq: 7,
            at_ms: 1_700_000_000_000,
            ops: vec![
                Op::Put {
                    entity: Entity::Totp(TotpRecord {
                        id: "fa_x".into(),
                        tenant: "tn_x".into(),
                        user: "alice".into(),
                        algorithm: "SHA1".into(),
                        digits: 6,
                        period: 30,
                        sealed: vec![1, 2, 3, 255],
                        last_step: Some(42),
                    }),
                },
                Op::Delete {
                    key: EntityKey::BackupCodes {
                        tenant: "tn_x".into(),
                        user: "bob".into(),
                    },
                },
            ],
        });
        let text = serde_json::to_string(&change).unwrap();
        assert!(text.contains(r#""sealed":"AQID/w==""#), "{text}");
        assert_eq!(serde_json::from_str::<ChangeLine>(&text).unwrap(), change);

        let end = SnapshotLine::End {
            seq: 3,
            count: 2,
            digest: "00".into(),
        };
        let text = serde_json::to_string(&end).unwrap();
        assert_eq!(serde_json::from_str::<SnapshotLine>(&text).unwrap(), end);

        for line in [
            SnapshotLine::Begin { seq: 9 },
            SnapshotLine::Entity {
                entity: tenant("tn_y"),
            },
        ] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(serde_json::from_str::<SnapshotLine>(&text).unwrap(), line);
        }
        let heartbeat = ChangeLine::Heartbeat { head: 11 };
        let text = serde_json::to_string(&heartbeat).unwrap();
        assert_eq!(
            serde_json::from_str::<ChangeLine>(&text).unwrap(),
            heartbeat
        );
    }

    #[test]
    fn every_entity_round_trips_and_is_tagged_first() {
        let entities = [
            tenant("tn_x"),
            Entity::ApiKey(ApiKeyRecord {
                id: "key_x".into(),
                tenant: "tn_x".into(),
                hash: vec![9; 32],
                scopes: vec!["verify".into()],
            }),
            Entity::BackupCodes(BackupCodesRecord {
                tenant: "tn_x".into(),
                user: "alice".into(),
                set_id: "bs_x".into(),
                codes: vec![BackupCodeEntry {
                    hash: vec![1; 32],
                    used: true,
                }],
            }),
            Entity::UserState(UserStateRecord {
                tenant: "tn_x".into(),
                user: "alice".into(),
                failures: 3,
                locked: false,
                throttled_until: Some(1_700_000_030),
            }),
        ];
        for entity in entities {
            let bytes = entity.canonical_bytes();
            assert!(bytes.starts_with(br#"{"type":""#), "{bytes:?}");
            assert_eq!(serde_json::from_slice::<Entity>(&bytes).unwrap(), entity);
            let mut line = Vec::new();
            SnapshotLine::write_entity_line(&bytes, &mut line);
            assert_eq!(SnapshotLine::entity_bytes(&line), Some(&bytes[..]));
            assert_eq!(
                line,
                serde_json::to_vec(&SnapshotLine::Entity { entity }).unwrap()
            );
        }
    }

    #[test]
    fn a_change_line_from_stored_ops_is_the_serialised_line() {
        let change = Change {
            seq: 42,
            at_ms: 1_700_000_000_123,
            ops: vec![
                Op::Put {
                    entity: Entity::UserState(UserStateRecord {
                        tenant: "tn_x".into(),
                        user: "al\"ice".into(),
                        failures: 1,
                        locked: false,
                        throttled_until: None,
                    }),
                },
                Op::Delete {
                    key: EntityKey::Tenant { id: "tn_y".into() },
                },
            ],
        };
        let ops_json = serde_json::to_string(&change.ops).unwrap();
        let mut line = Vec::new();
        ChangeLine::write_change(change.seq, change.at_ms, &ops_json, &mut line);
        assert_eq!(
            line,
            serde_json::to_vec(&ChangeLine::Change(change.clone())).unwrap()
        );
        assert_eq!(
            serde_json::from_slice::<ChangeLine>(&line).unwrap(),
            ChangeLine::Change(change)
        );
    }

    #[test]
    fn a_tag_after_other_fields_is_refused_with_a_clear_error() {
        let error = serde_json::from_str::<Entity>(r#"{"id":"tn_x","type":"tenant","name":"a"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("expected `type` as the first field of an entity"),
            "{error}"
        );
        let error = serde_json::from_str::<Op>(
            r#"{"entity":{"type":"tenant","id":"t","name":"a"},"op":"put"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("`op` as the first field of an op"),
            "{error}"
        );
        assert_eq!(
            SnapshotLine::entity_bytes(br#"{"type":"begin","seq":1}"#),
            None
        );
        let error = serde_json::from_str::<Entity>(r#"{"type":"robot","id":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown variant `robot`"), "{error}");
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "",
            "{}",
            r#"{"type":"change","seq":1}"#,
            r#"{"type":"entity","entity":{"type":"totp","id":"x"}}"#,
            r#"{"type":"heartbeat","head":-1}"#,
            r#"{"type":"change","seq":1,"at_ms":0,"ops":[{"op":"put","entity":{"type":"api_key","id":"k","tenant":"t","hash":"!!","scopes":[]}}]}"#,
            r#"{"type":"teleport","seq":1}"#,
            r#"{"type":"change","seq":1,"at_ms":0,"ops":[{"op":"move","key":{"type":"tenant","id":"t"}}]}"#,
            r#"{"type":"change","seq":1,"at_ms":0,"ops":[{"op":"put","entity":{"type":"user","id":"t"}}]}"#,
            r#"{"type":"change","seq":1,"at_ms":0,"ops":[{"op":"put","entity":{"type":"tenant","id":"t"}}]}"#,
            r#"{"type":"begin","seq":1,"seq":2}"#,
            r#"[{"type":"begin","seq":1}]"#,
        ] {
            assert!(serde_json::from_str::<ChangeLine>(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<SnapshotLine>(bad).is_err(), "{bad}");
        }
    }
}
