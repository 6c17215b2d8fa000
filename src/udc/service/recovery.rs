//! Recovery after the store was restored from a backup (docs/udc.md,
//! "Restoring a backup"; docs/protocol.md, "Recovery of V").
//!
//! ```text
//! dapgw udc recover --restored-from-backup (offline, no UDC running)
//!   --> Udc::recover_after_restore --recovery_reads--> Store
//!         raise + seal every group, open a psk-ecdhe round in each
//!   --> ONE Store::recover transaction
//! ```
//!
//! Runs offline, before any UDC process serves the restored store: a
//! running process holds caches (registry, session slots, round states)
//! of the store it read, which the recovery makes stale.

use super::*;
use crate::protocol::verifier::UsageError;
use crate::protocol::verifier::state::RESTORE_OFFSET;
use crate::udc::store::{RecoveryReads, RecoveryWrite};

/// What [`Udc::recover_after_restore`] did (printed by `dapgw udc recover`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Groups whose stored round, epoch and seq rose by 2^32.
    pub groups_raised: usize,
    /// Groups named by a member, subscription or schedule but without
    /// state, created above the new floor.
    pub groups_created: usize,
    /// (member, group) session slots emptied.
    pub sessions_dropped: u64,
    /// Open rounds closed.
    pub rounds_closed: usize,
    /// Gateway queues whose downlink head rose by 2^32.
    pub gateways_raised: u64,
    /// Members named by `--revoke` marked revoked (they were active in
    /// the restored store); the recovery rounds set them aside as
    /// `Revoked`.
    pub members_revoked: u64,
    /// Members named by `--revoke` the restored store does not hold
    /// (added after the backup: add them again only if they should be).
    pub revoke_not_found: Vec<u64>,
    /// The new recovery floor: groups and gateway queues first used from
    /// now on start above it.
    pub floor: u64,
    /// Recoveries run on this store's line of history, this one included.
    pub recoveries: u64,
    /// When the recovery before this one ran, as the restored store
    /// records it (`None`: never). A backup older than a recovery made
    /// since needs one more run per such recovery (docs/udc.md).
    pub previous_recovery_ms: Option<u64>,
    /// The newest time the restored store records anything at: about when
    /// the backup was taken. Revocations and key updates made after it are
    /// undone by the restore and must be made again. When nothing is
    /// recorded after the previous recovery's own rows (the recovery runs
    /// again on the same restored store), the value that recovery stored.
    pub newest_record_ms: Option<u64>,
    /// The psk-ecdhe auth round opened in each group.
    pub rounds_opened: Vec<OpenedRound>,
}

/// A round the recovery opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OpenedRound {
    /// The group.
    pub group: u32,
    /// Its round number.
    pub round: u64,
    /// When it closes (unix ms).
    pub closes_at_ms: u64,
}

/// Why the recovery wrote nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// A counter cannot rise by 2^32 without passing `u64::MAX`.
    /// Saturating would repeat values members or gateways hold, so the
    /// store cannot be recovered in place.
    #[error(
        "the {0} cannot rise by 2^32 without passing 2^64; nothing was written. The store \
         cannot be recovered in place: retire the named group id (move its members to a new \
         group) or start a new store"
    )]
    CounterExhausted(String),
    /// Something changed the store between the recovery's read and its
    /// write: a UDC process (or another recovery) is running on it.
    #[error(
        "the {0} changed while the recovery ran; nothing was written. Stop every UDC process \
         on this store, then run the recovery again"
    )]
    StoreChanged(&'static str),
    /// Reading, sealing or writing failed; nothing was written.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<StoreError> for RecoverError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::StoreChanged(what),
            StoreError::Locked(_) => Self::StoreChanged("store (locked by another process)"),
            StoreError::CounterExhausted(what) => Self::CounterExhausted(what.to_owned()),
            e => Self::Service(e.into()),
        }
    }
}

/// `e` from the verifier about `group`.
fn group_err(group: u32, e: UsageError) -> RecoverError {
    match e {
        UsageError::CounterExhausted => {
            RecoverError::CounterExhausted(format!("round, epoch or message seq of group {group}"))
        }
        e => RecoverError::Service(ServiceError::Internal(format!("group {group}: {e}"))),
    }
}

impl Udc {
    /// Recovery after the store was restored from a backup: in one store
    /// transaction, every group's round, epoch and message seq rise by
    /// [`RESTORE_OFFSET`] (2^32) with a fresh group key; every group named
    /// by a member, subscription or schedule but without state is created
    /// above the new floor; the floor rises by 2^32 (groups and gateway
    /// queues first used after the backup have no row to raise, so
    /// whatever starts from now on starts above it); every open round is
    /// closed; every session slot is emptied; every gateway's downlink
    /// head and the registry version rise by 2^32; and a psk-ecdhe auth
    /// round open for `round_duration_ms` is queued in every group, after
    /// any cursor a gateway holds.
    ///
    /// Run it with no UDC process serving the store (`dapgw udc recover`
    /// opens the store itself). If it fails, nothing was written; if it
    /// is interrupted, the store is as restored: run it again.
    ///
    /// `revoke`: members revoked after the backup (the restore made them
    /// active again), marked revoked in the same transaction, before the
    /// recovery rounds are queued, so that those rounds set them aside
    /// (no rekey: no session survives and every group key is fresh).
    pub async fn recover_after_restore(
        &self,
        round_duration_ms: u64,
        revoke: Vec<u64>,
    ) -> Result<Recovery, RecoverError> {
        let _guard = self.lock.lock().await;
        let reads: RecoveryReads = self.store.recovery_reads().await?;
        let floor = reads
            .state
            .floor
            .checked_add(RESTORE_OFFSET)
            .ok_or_else(|| RecoverError::CounterExhausted("recovery floor".into()))?;
        let now = now_ms();
        let closes_at_ms = now.saturating_add(round_duration_ms);
        let mut write = BatchWrite {
            now_ms: now,
            closed_rounds: reads
                .open_rounds
                .iter()
                .map(|r| (r.group, r.round))
                .collect(),
            ..BatchWrite::default()
        };
        let mut rounds_opened = Vec::new();
        let mut new_groups = Vec::with_capacity(reads.named_without_row.len());
        for row in &reads.groups {
            let mut state: GroupState = self.open(&aad::group(row.group), &row.state)?;
            state
                .after_restore(&mut rng())
                .map_err(|e| group_err(row.group, e))?;
            rounds_opened.push(self.recovery_round(&mut state, closes_at_ms, &mut write)?);
            write.groups.push(self.group_row(&state, row.version)?);
        }
        for &group in &reads.named_without_row {
            let mut state = GroupState::starting_above(GroupId(group), floor, &mut rng())
                .map_err(|e| group_err(group, e))?;
            rounds_opened.push(self.recovery_round(&mut state, closes_at_ms, &mut write)?);
            new_groups.push(self.group_row(&state, 1)?);
        }
        // A second run on the same restored store finds the first run's
        // own rows newest (stamped at its time): report the time it found.
        let newest_record_ms = match (reads.newest_record_ms, reads.state.recovered_at_ms) {
            (Some(t), Some(at)) if t <= at => reads.state.newest_record_ms,
            (t, _) => t,
        };
        let applied = self
            .store
            .recover(RecoveryWrite {
                floor_before: reads.state.floor,
                floor,
                raise_by: RESTORE_OFFSET,
                new_groups,
                revoke,
                newest_record_ms,
                batch: write,
            })
            .await?;
        // This process's copies of what the recovery changed (it is
        // offline, but a `Udc` used afterwards must not serve them).
        self.rounds.lock().await.clear();
        *self
            .registry_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = RegistryCache::default();
        self.slot_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clear();
        self.metrics.sessions_active.set(0);
        let report = Recovery {
            groups_raised: reads.groups.len(),
            groups_created: reads.named_without_row.len(),
            sessions_dropped: applied.sessions_dropped,
            rounds_closed: reads.open_rounds.len(),
            gateways_raised: applied.gateways_raised,
            members_revoked: applied.members_revoked,
            revoke_not_found: applied.revoke_not_found,
            floor,
            recoveries: reads.state.recoveries.saturating_add(1),
            previous_recovery_ms: reads.state.recovered_at_ms,
            newest_record_ms,
            rounds_opened,
        };
        tracing::warn!(
            groups_raised = report.groups_raised,
            groups_created = report.groups_created,
            sessions_dropped = report.sessions_dropped,
            rounds_closed = report.rounds_closed,
            gateways_raised = report.gateways_raised,
            members_revoked = report.members_revoked,
            floor = report.floor,
            "recovered after a restore: counters raised, sessions dropped, psk-ecdhe rounds queued"
        );
        Ok(report)
    }

    /// Opens the recovery's psk-ecdhe auth round of `state`'s group into
    /// `write` (its row and its challenge for every subscribed gateway).
    fn recovery_round(
        &self,
        state: &mut GroupState,
        closes_at_ms: u64,
        write: &mut BatchWrite,
    ) -> Result<OpenedRound, RecoverError> {
        let group = state.group.0;
        let (round, challenge) = self
            .verifier
            .open_round(
                state,
                Mode::PskEcdhe,
                Purpose::Auth,
                Some(closes_at_ms / 1000),
                &mut rng(),
            )
            .map_err(|e| group_err(group, e))?;
        write.new_rounds.push(RoundRow {
            group,
            round: round.round,
            opened_at_ms: write.now_ms,
            closes_at_ms: Some(closes_at_ms),
            mode: Mode::PskEcdhe,
            purpose: store::RoundPurpose::Auth,
            challenge: challenge.to_vec(),
            state: self.seal(&aad::round(group, round.round), &round)?,
            status: RoundStatus::Open,
        });
        write.downlink.push(DownlinkPush {
            target: DownlinkTarget::Subscribers,
            records: vec![DownlinkRecord {
                audience: Audience::Group,
                group,
                message: challenge.to_vec(),
            }],
        });
        Ok(OpenedRound {
            group,
            round: round.round,
            closes_at_ms,
        })
    }
}
