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
                if let Err(e) = tick(&udc).await {
                    tracing::warn!(error = %e, "background round work failed");
                }
            }
        }
    }
}

/// One pass: expired localizations, due schedules, rounds past their
/// deadline, downlink records past their retention, (hourly) readings and
/// verdicts past theirs, and (every five minutes) the gauges kept from the
/// store.
pub async fn tick(udc: &Udc) -> Result<(), ServiceError> {
    while udc.expire_localizations(64).await? == 64 {}
    run_schedules(udc, now_ms()).await?;
    udc.close_due_rounds(now_ms()).await?;
    udc.store()
        .trim_downlink(now_ms().saturating_sub(DOWNLINK_RETENTION_MS))
        .await?;
    udc.trim_history(now_ms()).await?;
    udc.recount_gauges(now_ms()).await?;
    Ok(())
}

/// Opens a round for every schedule due at `now_ms` that this process
/// claims first. Returns the rounds opened as (group, round).
pub async fn run_schedules(udc: &Udc, now_ms: u64) -> Result<Vec<(u32, u64)>, ServiceError> {
    let mut opened = Vec::new();
    for s in udc.store().schedules().await? {
        if s.next_at_ms > now_ms {
            continue;
        }
        // Skip missed slots instead of opening a burst of rounds.
        let every = s.every_ms.max(1);
        let behind = (now_ms - s.next_at_ms) / every + 1;
        let next = s.next_at_ms.saturating_add(behind.saturating_mul(every));
        if !udc.store().claim_schedule(s.id, s.next_at_ms, next).await? {
            continue;
        }
        let purpose = match s.purpose {
            store::RoundPurpose::Auth => Purpose::Auth,
            store::RoundPurpose::Read => Purpose::Read(bytes::Bytes::new()),
        };
        // A scheduled round stays open for most of its period.
        let duration = every.saturating_mul(9) / 10;
        let round = udc
            .open_round(s.group, s.mode, purpose, Some(duration))
            .await?;
        tracing::info!(
            group = s.group,
            round,
            schedule = s.id,
            "scheduled round opened"
        );
        opened.push((s.group, round));
    }
    Ok(opened)
}

/// The wire mode named by a config/API string.
pub fn parse_mode(s: &str) -> Option<Mode> {
    match s {
        "psk" => Some(Mode::Psk),
        "psk-ecdhe" => Some(Mode::PskEcdhe),
        _ => None,
    }
}
