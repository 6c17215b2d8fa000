//! The member registry as the verifier sees it: who exists, which key
//! version they hold, which groups they belong to, whether they are revoked.
//!
//! Data flow: the UDC's store implements [`Registry`] (prefetching the ids of
//! a batch in one query through [`Registry::members`]); the verifier reads it
//! while screening batch entries and never writes it. Changes the verifier
//! decides (a key update issued, a new key version seen in use) come back as
//! outputs that the caller applies with the helpers on [`MemberRecord`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::kdf::FastDeriver;
use crate::protocol::keys::MemberKey;
use crate::protocol::wire::{GroupId, MemberId};

/// Whether a member may still authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// May authenticate in its groups.
    Active,
    /// Revoked: every response is set aside as [`Outcome::Revoked`](crate::protocol::wire::Outcome::Revoked).
    Revoked,
}

/// Where a member's root key `K_i` comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySource {
    /// `K_i(kv)` is derived from the master secret for every version.
    Derived,
    /// A vendor key, already passed through
    /// [`import_member_key`](crate::protocol::keys::import_member_key), for
    /// version `kv`. Versions above `kv` (issued by key updates) are derived
    /// from the master secret; versions below it are unknown.
    Imported {
        /// The version the imported key has.
        kv: u32,
        /// The imported key (never the raw vendor key).
        #[serde(with = "imported_key")]
        key: MemberKey,
    },
}

/// What V knows about one member.
///
/// Holds no secret for derived members; an imported key is zeroized on drop
/// and printed as `<redacted>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member.
    pub id: MemberId,
    /// Newest key version V has issued to the member.
    pub kv: u32,
    /// Oldest key version still accepted. Equal to `kv` except between a key
    /// update and the member's first response under the new version, when
    /// the member may not have received the update yet.
    pub min_kv: u32,
    /// Where `K_i` comes from.
    pub key: KeySource,
    /// Groups the member belongs to.
    pub groups: Vec<GroupId>,
    /// Active or revoked.
    pub status: MemberStatus,
}

impl MemberRecord {
    /// An active member whose keys derive from the master secret.
    pub fn derived(id: MemberId, kv: u32, groups: Vec<GroupId>) -> Self {
        Self {
            id,
            kv,
            min_kv: kv,
            key: KeySource::Derived,
            groups,
            status: MemberStatus::Active,
        }
    }

    /// An active member with an imported key for version `kv`.
    pub fn imported(id: MemberId, kv: u32, key: MemberKey, groups: Vec<GroupId>) -> Self {
        Self {
            id,
            kv,
            min_kv: kv,
            key: KeySource::Imported { kv, key },
            groups,
            status: MemberStatus::Active,
        }
    }

    /// Whether the member belongs to `group`.
    pub fn in_group(&self, group: GroupId) -> bool {
        self.groups.contains(&group)
    }

    /// Whether a response under version `kv` is acceptable.
    pub fn accepts_kv(&self, kv: u32) -> bool {
        (self.min_kv..=self.kv).contains(&kv)
    }

    /// `K_i` for version `kv`, or `None` when V cannot know it (a version
    /// below an imported key's).
    pub(crate) fn key_for(&self, kv: u32, deriver: &FastDeriver) -> Option<MemberKey> {
        match &self.key {
            KeySource::Imported { kv: ikv, key } if *ikv == kv => Some(key.clone()),
            KeySource::Imported { kv: ikv, .. } if kv < *ikv => None,
            _ => Some(deriver.member_key(self.id.0, kv)),
        }
    }

    /// The record after V issued a key update to `new_kv`: the old version
    /// stays accepted until the member is seen using the new one.
    pub fn after_key_update(&self, new_kv: u32) -> Self {
        Self {
            kv: new_kv,
            ..self.clone()
        }
    }

    /// The record after the member answered under `kv` (reported in a
    /// verdict's `kv_confirmed`): older versions are no longer accepted.
    pub fn after_kv_confirmed(&self, kv: u32) -> Self {
        Self {
            min_kv: kv.max(self.min_kv),
            ..self.clone()
        }
    }
}

/// Read access to the member registry.
///
/// The UDC implements this over its store; [`InMemoryRegistry`] serves tests
/// and simulations.
pub trait Registry {
    /// The record of one member, if it exists.
    fn member(&self, id: MemberId) -> Option<MemberRecord>;

    /// The records of many members, in the order of `ids` (a store fetches
    /// them in one query). `ids` are strictly increasing when they come from
    /// a batch.
    fn members(&self, ids: &[MemberId]) -> Vec<Option<MemberRecord>> {
        ids.iter().map(|&id| self.member(id)).collect()
    }
}

/// A registry held in memory.
#[derive(Clone, Debug, Default)]
pub struct InMemoryRegistry {
    members: BTreeMap<MemberId, MemberRecord>,
}

impl InMemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a record.
    pub fn insert(&mut self, record: MemberRecord) {
        self.members.insert(record.id, record);
    }

    /// The record of `id`, for changing it in place.
    pub fn get_mut(&mut self, id: MemberId) -> Option<&mut MemberRecord> {
        self.members.get_mut(&id)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Registry for InMemoryRegistry {
    fn member(&self, id: MemberId) -> Option<MemberRecord> {
        self.members.get(&id).cloned()
    }
}

/// Serde for an imported [`MemberKey`] as 32 raw bytes (the UDC seals rows
/// that hold it under the storage key).
mod imported_key {
    use serde::{Deserializer, Serializer};

    use crate::protocol::keys::MemberKey;
    use crate::protocol::verifier::state::secret_bytes;

    pub(super) fn serialize<S: Serializer>(k: &MemberKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(k.expose())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MemberKey, D::Error> {
        let secret = secret_bytes::deserialize::<D, 32>(d)?;
        Ok(MemberKey::from_bytes(*secret.expose()))
    }
}
