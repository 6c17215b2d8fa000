//! Rounds over time: the background task that closes rounds at their
//! deadline, runs the recurring-round scheduler, and finalizes
//! localizations whose tag reply never came.
//!
//! ```text
//! admin_api --open_round--> service --challenge--> downlink queues (fan-out to subscribers)
//! background (every second) --> expired localizations | due schedules | past-deadline rounds
//! ```
//!
//! Schedules live in the store and are claimed by compare-and-set, so
//! several UDC processes on one PostgreSQL store open each round once.

use std::sync::Arc;
use std::time::Duration;

use super::service::{ServiceError, Udc, now_ms};
use crate::protocol::wire::{Mode, Purpose};
use crate::udc::store::{self, Store as _};

/// How often the background task looks for work.
pub const TICK: Duration = Duration::from_secs(1);

/// How long downlink records are kept for gateways to fetch.
pub const DOWNLINK_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

/// Runs [`tick`] every [`TICK`] until `shutdown` completes.
pub async fn background(udc: Arc<Udc>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = every.tick() => {
                // Each failing step is logged by `tick` itself.
                let _ = tick(&udc).await;
            }
        }
    }
}

/// One pass: expired localizations, rounds past their deadline, due
/// schedules, (hourly) downlink records, readings and verdicts past their
/// retention, and (every five minutes) the gauges kept from the store.
///
/// The pass runs every second on every UDC process, busy or idle, so it
/// asks the store what is due in one read ([`store::Store::due_work`]; on
/// SQLite one read transaction) and calls the store again only for work
/// that is there (before session 25: four store calls a second, one of
/// them a write; with the readiness probe about 2 ms of CPU a second on an
/// idle UDC, now about 1.2). Should that read fail, the pass asks the
/// three questions apart, as before, so one row the read cannot decode
/// (a damaged schedule, say) does not keep rounds from closing.
///
/// Rounds close before schedules run: closing drops this process's cached
/// state of every round not in the list it read, which a round a schedule
/// opens in this pass is not.
///
/// Each step runs whatever the others did: a failing step (a store
/// hiccup, a schedule whose round cannot be opened) is logged and does not
/// keep rounds from closing or history from being trimmed. Returns the
/// first error, after every step has run.
pub async fn tick(udc: &Udc) -> Result<(), ServiceError> {
    let mut first: Option<ServiceError> = None;
    let mut note = |step: &'static str, r: Result<(), ServiceError>| {
        if let Err(e) = r {
            tracing::warn!(step, error = %e, "background round work failed");
            first.get_or_insert(e);
        }
    };
    let now = now_ms();
    let expire = async {
        while udc.expire_localizations(64).await? == 64 {}
        Ok(())
    };
    match udc.store().due_work(now).await {
        Ok(due) => {
            if due.localizations {
                note("localizations", expire.await);
            }
            note(
                "close rounds",
                udc.close_due_rounds_of(due.open_rounds, now)
                    .await
                    .map(drop),
            );
            note(
                "schedules",
                run_due_schedules(udc, due.schedules, now).await.map(drop),
            );
        }
        Err(e) => {
            note("due work", Err(e.into()));
            note("localizations", expire.await);
            note("close rounds", udc.close_due_rounds(now).await.map(drop));
            note("schedules", run_schedules(udc, now).await.map(drop));
        }
    }
    note("trim history", udc.trim_history(now_ms()).await.map(drop));
    note("gauges", udc.recount_gauges(now_ms()).await.map(drop));
    first.map_or(Ok(()), Err)
}

/// Opens a round for every schedule due at `now_ms` that this process
/// claims first. Returns the rounds opened as (group, round).
///
/// A schedule whose round cannot be opened is logged and skipped (its
/// slot is claimed, so it is tried again at its next period): it does not
/// keep the other schedules from running. The error returned is the
/// failure to list the schedules.
pub async fn run_schedules(udc: &Udc, now_ms: u64) -> Result<Vec<(u32, u64)>, ServiceError> {
    let schedules = udc.store().schedules().await?;
    run_due_schedules(udc, schedules, now_ms).await
}

/// [`run_schedules`] on `schedules` as read from the store (those not due
/// at `now_ms` are skipped).
async fn run_due_schedules(
    udc: &Udc,
    schedules: Vec<store::ScheduleRow>,
    now_ms: u64,
) -> Result<Vec<(u32, u64)>, ServiceError> {
    let mut opened = Vec::new();
    for s in schedules {
        if s.next_at_ms > now_ms {
            continue;
        }
        match run_schedule(udc, &s, now_ms).await {
            Ok(Some(round)) => opened.push((s.group, round)),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                schedule = s.id,
                group = s.group,
                error = %e,
                "scheduled round not opened; next try at the next period"
            ),
        }
    }
    Ok(opened)
}

/// Times a scheduled round is tried again after a conflict.
const SCHEDULE_RETRIES: u32 = 3;

/// Opens schedule `s`'s round, claiming its due slot in the same write;
/// `None` when another process claimed it first. If the round cannot be
/// opened (after [`SCHEDULE_RETRIES`] for conflicts), the slot is claimed
/// on its own so that a broken schedule is tried again one period on, not
/// at every tick; a crash before either write leaves the slot due.
async fn run_schedule(
    udc: &Udc,
    s: &store::ScheduleRow,
    now_ms: u64,
) -> Result<Option<u64>, ServiceError> {
    // Skip missed slots instead of opening a burst of rounds.
    let every = s.every_ms.max(1);
    let behind = (now_ms - s.next_at_ms) / every + 1;
    let next = s.next_at_ms.saturating_add(behind.saturating_mul(every));
    let claim = store::ScheduleClaim {
        id: s.id,
        expected_next_ms: s.next_at_ms,
        next_ms: next,
    };
    let purpose = match s.purpose {
        store::RoundPurpose::Auth => Purpose::Auth,
        store::RoundPurpose::Read => Purpose::Read(bytes::Bytes::from(s.read_request.clone())),
    };
    // A scheduled round stays open for most of its period.
    let duration = every.saturating_mul(9) / 10;
    // A transient conflict (another process changed the group between
    // this one's read and write) is retried at once, not left to skip the
    // period.
    let mut attempt = 0;
    let round = loop {
        match udc
            .open_scheduled_round(s.group, s.mode, purpose.clone(), Some(duration), claim)
            .await
        {
            Err(ServiceError::Busy(why)) if attempt < SCHEDULE_RETRIES => {
                attempt += 1;
                tracing::debug!(schedule = s.id, group = s.group, %why, "scheduled round busy; again");
            }
            Ok(Some(round)) => break round,
            Ok(None) => return Ok(None),
            Err(e) => {
                // Spend the slot (unless another process did): the next
                // try is one period on. The round's error is the one
                // returned; a failure to spend the slot is only logged
                // (the slot stays due and is tried at the next tick).
                if let Err(claim) = udc.store().claim_schedule(s.id, s.next_at_ms, next).await {
                    tracing::warn!(schedule = s.id, error = %claim, "could not spend a failed schedule's slot");
                }
                return Err(e);
            }
        }
    };
    tracing::info!(
        group = s.group,
        round,
        schedule = s.id,
        "scheduled round opened"
    );
    Ok(Some(round))
}

/// The wire mode named by a config/API string.
pub fn parse_mode(s: &str) -> Option<Mode> {
    match s {
        "psk" => Some(Mode::Psk),
        "psk-ecdhe" => Some(Mode::PskEcdhe),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{SecretUrl, UdcConfig};
    use crate::udc::keys_cmd::{self, files};
    use crate::udc::store::{GroupRow, RoundPurpose, ScheduleRow, Sealed};

    /// A UDC over a fresh SQLite store and fresh keys in `dir`.
    async fn udc(dir: &Path) -> Arc<Udc> {
        let keys = dir.join("keys");
        keys_cmd::init(&keys).unwrap();
        crate::udc::build(&config(dir)).await.unwrap()
    }

    /// The configuration of [`udc`] in `dir` (keys made already).
    fn config(dir: &Path) -> UdcConfig {
        let keys = dir.join("keys");
        UdcConfig {
            store_url: SecretUrl::new(format!("sqlite://{}", dir.join("udc.sqlite3").display())),
            master_secret_file: keys.join(files::MASTER),
            storage_key_file: keys.join(files::STORAGE),
            signing_key_file: keys.join(files::SIGNING),
            key_cert_file: keys.join(files::SIGNING_CERT),
            ..UdcConfig::default()
        }
    }

    /// Another process on the same store changes the group between the
    /// scheduled opening's read and its write: the write conflicts (busy),
    /// and the schedule tries again at once instead of skipping its period.
    #[tokio::test]
    async fn a_scheduled_round_that_conflicts_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = udc(dir.path()).await;
        let b = crate::udc::build(&config(dir.path())).await.unwrap();
        a.open_round(8, Mode::Psk, Purpose::Auth, Some(60_000))
            .await
            .unwrap();
        schedule(&a, 8).await;
        a.before_next_round_write(async move {
            b.open_round(8, Mode::Psk, Purpose::Auth, Some(60_000))
                .await
                .unwrap();
        });
        let opened = run_schedules(&a, now_ms()).await.unwrap();
        assert_eq!(opened, [(8, 3)], "b opened round 2 in between");
    }

    /// The slot is claimed by the write that opens the round, not before
    /// it: a process that stops between the two no longer skips the
    /// period. Two processes run the same due schedule at once (b runs it
    /// whole between a's read and a's write): b opens the round, a's
    /// claim then fails inside its write and a opens nothing. (Claimed
    /// before the opening, b found the slot spent by a and opened nothing.)
    #[tokio::test]
    async fn a_due_schedule_is_claimed_by_the_write_that_opens_its_round() {
        let dir = tempfile::tempdir().unwrap();
        let a = udc(dir.path()).await;
        let b = crate::udc::build(&config(dir.path())).await.unwrap();
        let id = schedule(&a, 8).await;
        let now = now_ms();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let b2 = b.clone();
        a.before_next_round_write(async move {
            let _ = tx.send(run_schedules(&b2, now).await.unwrap());
        });
        assert_eq!(run_schedules(&a, now).await.unwrap(), []);
        assert_eq!(rx.await.unwrap(), [(8, 1)]);
        assert!(a.store().round(8, 2).await.unwrap().is_none());
        let s = b.store().schedules().await.unwrap();
        let s = s.iter().find(|s| s.id == id).unwrap();
        assert!(s.next_at_ms > now, "{s:?}");
    }

    /// Group `group` exists but its sealed state cannot be opened (as if
    /// sealed under another storage key): every round for it fails.
    async fn unopenable_group(udc: &Udc, group: u32) {
        udc.store()
            .insert_group(GroupRow {
                group,
                epoch: 1,
                next_round: 1,
                seq: 0,
                config_hash: [0; 32],
                state: Sealed::new(vec![0x5a; 64]),
                version: 1,
            })
            .await
            .unwrap();
    }

    async fn schedule(udc: &Udc, group: u32) -> u64 {
        udc.store()
            .insert_schedule(ScheduleRow {
                id: 0,
                group,
                every_ms: 3_600_000,
                mode: Mode::Psk,
                purpose: RoundPurpose::Auth,
                read_request: Vec::new(),
                next_at_ms: 0,
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_schedule_that_cannot_open_its_round_does_not_stop_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let udc = udc(dir.path()).await;
        unopenable_group(&udc, 7).await;
        let broken = schedule(&udc, 7).await;
        schedule(&udc, 8).await;
        let now = now_ms();
        let opened = run_schedules(&udc, now).await.unwrap();
        assert_eq!(opened, [(8, 1)]);
        // The broken schedule's slot is spent: it is tried again one period
        // on, not every second.
        let broken = udc
            .store()
            .schedules()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.id == broken)
            .unwrap();
        assert!(broken.next_at_ms > now, "{broken:?}");
        assert_eq!(run_schedules(&udc, now).await.unwrap(), []);
    }

    #[tokio::test]
    async fn a_scheduled_read_round_carries_its_read_request() {
        let dir = tempfile::tempdir().unwrap();
        let udc = udc(dir.path()).await;
        udc.subscribe("gw-1", vec![8]).await.unwrap();
        let request = b"obis 1.8.0".to_vec();
        udc.store()
            .insert_schedule(ScheduleRow {
                id: 0,
                group: 8,
                every_ms: 3_600_000,
                mode: Mode::PskEcdhe,
                purpose: RoundPurpose::Read,
                read_request: request.clone(),
                next_at_ms: 0,
            })
            .await
            .unwrap();
        let opened = run_schedules(&udc, now_ms()).await.unwrap();
        assert_eq!(opened, [(8, 1)]);
        // The challenge the subscribed gateway gets asks the members for it.
        let recs = udc.store().read_downlink("gw-1", 0, 10).await.unwrap();
        assert_eq!(recs.len(), 1, "{recs:?}");
        let ch = crate::protocol::wire::Challenge::decode(&bytes::Bytes::from(
            recs[0].record.message.clone(),
        ))
        .unwrap();
        assert_eq!((ch.group.0, ch.round), (8, 1));
        assert_eq!(ch.purpose, Purpose::Read(bytes::Bytes::from(request)));
        let row = udc.store().round(8, 1).await.unwrap().unwrap();
        assert_eq!(row.purpose, RoundPurpose::Read);
        assert_eq!(row.challenge, recs[0].record.message);
    }

    /// Downlink records past their retention go with the hourly history
    /// trim (not every second): a record queued now is kept until
    /// [`DOWNLINK_RETENTION_MS`] has passed, and the trim runs at most once
    /// an hour.
    #[tokio::test]
    async fn downlink_past_its_retention_goes_with_the_hourly_trim() {
        let dir = tempfile::tempdir().unwrap();
        let udc = udc(dir.path()).await;
        udc.subscribe("gw-1", vec![8]).await.unwrap();
        udc.open_round(8, Mode::Psk, Purpose::Auth, Some(60_000))
            .await
            .unwrap();
        let queued = |udc: Arc<Udc>| async move {
            udc.store()
                .read_downlink("gw-1", 0, 10)
                .await
                .unwrap()
                .len()
        };
        assert_eq!(queued(udc.clone()).await, 1);
        let now = now_ms();
        let trim = |at: u64| {
            let udc = udc.clone();
            async move { udc.trim_history(at).await.unwrap().map(|t| t.downlink) }
        };
        assert_eq!(trim(now).await, Some(0), "queued just now");
        assert_eq!(trim(now + 1_000).await, None, "hourly");
        assert_eq!(trim(now + 3_600_000).await, Some(0), "retention not passed");
        assert_eq!(queued(udc.clone()).await, 1);
        assert_eq!(trim(now + DOWNLINK_RETENTION_MS + 7_200_000).await, Some(1));
        assert_eq!(queued(udc.clone()).await, 0);
    }

    /// [`udc`] in `dir` with group 8's round open past its deadline (due
    /// to close at the next pass): the UDC and the round.
    async fn udc_with_a_due_round(dir: &Path) -> (Arc<Udc>, u64) {
        let udc = udc(dir).await;
        let round = udc
            .open_round(8, Mode::Psk, Purpose::Auth, Some(0))
            .await
            .unwrap();
        (udc, round)
    }

    /// A schedule row the store cannot decode fails the pass's one read
    /// of what is due; the pass then asks apart, as before, and the round
    /// past its deadline still closes.
    #[tokio::test]
    async fn a_damaged_schedule_row_does_not_keep_due_rounds_open() {
        let dir = tempfile::tempdir().unwrap();
        let (udc, round) = udc_with_a_due_round(dir.path()).await;
        let db = rusqlite::Connection::open(dir.path().join("udc.sqlite3")).unwrap();
        db.execute(
            "INSERT INTO schedules (grp, every_ms, mode, purpose, next_at_ms) \
             VALUES (9, 60000, 99, 0, 0)",
            [],
        )
        .unwrap();
        drop(db);
        // The damage is reported (the schedules fail the second read too).
        assert!(tick(&udc).await.is_err());
        let row = udc.store().round(8, round).await.unwrap().unwrap();
        assert_eq!(row.status, store::RoundStatus::Closed);
    }

    #[tokio::test]
    async fn a_failing_schedule_does_not_keep_due_rounds_open() {
        let dir = tempfile::tempdir().unwrap();
        let (udc, round) = udc_with_a_due_round(dir.path()).await;
        unopenable_group(&udc, 7).await;
        schedule(&udc, 7).await;
        schedule(&udc, 9).await;
        tick(&udc).await.unwrap();
        let row = udc.store().round(8, round).await.unwrap().unwrap();
        assert_eq!(row.status, store::RoundStatus::Closed);
        let opened = udc.store().round(9, 1).await.unwrap().unwrap();
        assert_eq!(
            opened.status,
            store::RoundStatus::Open,
            "the good schedule ran"
        );
        // The round the schedule opened stays in this process's cache (the
        // pass closed rounds before it ran the schedules).
        assert!(udc.cached_rounds().await.contains(&(9, 1)));
    }
}
