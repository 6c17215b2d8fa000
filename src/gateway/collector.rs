//! The collector: the one task that owns the gateway's [`Aggregator`],
//! between the member-facing server and the upstream client.
//!
//! ```text
//! server --append--> [spool] --(message, entry id)--> collector --seal_batch--> [spool] --notify--> upstream
//! upstream --challenge--> collector.expect (round opens with the attached members)
//! ```
//!
//! The server stores a member's message in the spool first, then hands the
//! decoded message and its entry id here; the aggregator's handle for each
//! entry is its spool id, so a batch names exactly the stored entries it
//! holds. The driver loop is quinn-style: feed inputs, cut due batches
//! ([`Aggregator::poll_batch`]), seal them in the spool, and sleep until
//! [`Aggregator::poll_timeout`] with tokio's clock (so tests can pause it).
//!
//! Sealing does not stall the loop: a cut batch's seal is queued in the
//! spool (seals queued together commit in one group, in order) and the
//! driver keeps taking members' entries until the commit is reported;
//! entries stay in `pending` until then. Batch ids are reserved in the
//! spool a block at a time. If a seal fails, its batch is sealed again
//! later with the same id and bytes, and the seals queued after it fail
//! too (each is chained to its predecessor, [`Spool::queue_seal_batch`])
//! and are sealed again after it: batches reach the UDC in the order they
//! were cut, which is the order the UDC must judge a member's uplinks in.
//!
//! An entry the aggregator refuses (a round that is not open, a conflicting
//! re-send) or absorbs as a re-send of an entry the spool no longer holds is
//! discarded from the spool again before the member gets its answer, so the
//! spool holds only entries that are on their way into a batch. After a
//! restart the collector rebuilds the aggregator from the spool's unbatched
//! entries ([`Aggregator::restore`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Attached;
use super::spool::{EntryId, OpenRoundRow, Queued, Spool, SpoolError};
use crate::protocol::aggregator::{
    Aggregator, AggregatorConfig, BatchIdSource, BatchTrigger, CollectError, Collected, ReadyBatch,
    RoundSpec, SpooledEntry, UsageError,
};
use crate::protocol::wire::{BatchKind, GroupId, MemberId, Message, Mode, Response, Uplink};
use crate::telemetry::{GatewayMetrics, GatewayRoundOutcome};

/// Inputs queued for the collector before submitters wait (backpressure).
const INPUT_QUEUE: usize = 4096;

/// Most queued inputs handled before the driver cuts due batches.
const DRAIN_MAX: usize = 256;

/// Batch ids reserved in the spool with one write.
const BATCH_ID_BLOCK: u64 = 64;

/// First wait before retrying a failed seal; doubles up to [`SEAL_RETRY_MAX`].
const SEAL_RETRY_MIN: Duration = Duration::from_millis(50);
const SEAL_RETRY_MAX: Duration = Duration::from_secs(5);

/// How the collector batches.
#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// Chunk size, size cap, linger and memory bounds of the aggregator.
    pub aggregator: AggregatorConfig,
    /// How long a round stays open after its challenge was relayed
    /// (`DAPGW_ROUND_DEADLINE_MS`).
    pub round_deadline: Duration,
}

/// A member's message, decoded by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberMessage {
    /// A response to a challenge (0x02).
    Response(Response),
    /// An uplink in a session (0x03).
    Uplink(Uplink),
}

impl MemberMessage {
    /// Decodes a Response or an Uplink; any other message type is
    /// [`DecodeError::WrongType`](crate::protocol::codec::DecodeError::WrongType).
    pub fn decode(bytes: &bytes::Bytes) -> Result<Self, crate::protocol::codec::DecodeError> {
        match Message::decode(bytes)? {
            Message::Response(r) => Ok(MemberMessage::Response(r)),
            Message::Uplink(u) => Ok(MemberMessage::Uplink(u)),
            other => Err(crate::protocol::codec::DecodeError::WrongType(
                other.message_type().code(),
            )),
        }
    }

    /// The sending member.
    pub fn member(&self) -> MemberId {
        match self {
            MemberMessage::Response(r) => r.id,
            MemberMessage::Uplink(u) => u.id,
        }
    }
}

/// Why a submitted entry was not collected.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The aggregator refused it (the entry was discarded from the spool).
    #[error(transparent)]
    Refused(#[from] CollectError),
    /// The collector has stopped (the gateway is shutting down).
    #[error("the collector has stopped")]
    Stopped,
    /// The spool's copy this submission was given (a byte-identical
    /// earlier one) was discarded meanwhile, its message refused: nothing
    /// is stored for it, and the member must send it again.
    #[error("the stored copy was discarded meanwhile; send it again")]
    Discarded,
}

/// What the collector did, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CollectorEvent {
    /// A batch was cut and sealed in the spool.
    Sealed {
        /// Its batch id.
        batch_id: u64,
        /// Responses or uplinks.
        kind: BatchKind,
        /// Its group.
        group: GroupId,
        /// Its round (response batches).
        round: Option<u64>,
        /// The spool entries in it, in batch order.
        entries: Vec<EntryId>,
        /// Why it was cut.
        trigger: BatchTrigger,
        /// Members missing from the round it closes.
        missing: Vec<MemberId>,
        /// When it was cut (tokio's clock, so a paused clock shows exact
        /// deadlines).
        cut_at: Instant,
    },
    /// A round reached its deadline with nothing left to send.
    RoundClosed {
        /// The group.
        group: GroupId,
        /// The round.
        round: u64,
        /// Members that never answered.
        missing: Vec<MemberId>,
        /// When it closed.
        at: Instant,
    },
}

type Reply<T> = oneshot::Sender<T>;

enum Input {
    Collect {
        msg: MemberMessage,
        entry: EntryId,
        /// When the message reached the gateway (see
        /// [`CollectorHandle::collect_since`]).
        arrived: Instant,
        reply: Reply<Result<Collected, SubmitError>>,
    },
    Expect {
        group: GroupId,
        round: u64,
        mode: Mode,
        not_after: Option<u64>,
        reply: Reply<Result<(), UsageError>>,
    },
    Flush(Reply<()>),
    Stop(Reply<()>),
}

/// Sends inputs to the collector task; cheap to clone.
#[derive(Clone, Debug)]
pub struct CollectorHandle {
    tx: mpsc::Sender<Input>,
}

impl CollectorHandle {
    /// Collects a message already stored in the spool as `entry`, as if it
    /// arrived now. On `Ok` the member may be told it is accepted.
    pub async fn collect(
        &self,
        msg: MemberMessage,
        entry: EntryId,
    ) -> Result<Collected, SubmitError> {
        self.collect_since(msg, entry, Instant::now()).await
    }

    /// [`Self::collect`] for a message that reached the gateway at
    /// `arrived` (before its spool append). An uplink's linger counts from
    /// then, not from the commit: the time spent making it durable is
    /// part of the linger instead of added to it (a batch's first uplink
    /// reaches the UDC `DAPGW_BATCH_LINGER_MS` after it arrived, plus
    /// sealing and upload), up to half the linger (past that, the batch
    /// still lingers half a linger after the uplink is collected, so an
    /// overloaded spool does not make every collect cut a tiny batch). A
    /// response's round handling is unchanged (its deadline is judged when
    /// it is collected).
    pub async fn collect_since(
        &self,
        msg: MemberMessage,
        entry: EntryId,
        arrived: Instant,
    ) -> Result<Collected, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Collect {
                msg,
                entry,
                arrived,
                reply,
            })
            .await
            .map_err(|_| SubmitError::Stopped)?;
        rx.await.map_err(|_| SubmitError::Stopped)?
    }

    /// Opens round `(group, round)` (its challenge is being relayed), with
    /// the members attached to the group now and the configured deadline,
    /// or an earlier one when the challenge's `not_after` (Unix seconds)
    /// comes sooner ([`round_window`]). A round already closed is refused
    /// with [`UsageError::RoundClosed`].
    pub async fn expect(
        &self,
        group: GroupId,
        round: u64,
        mode: Mode,
        not_after: Option<u64>,
    ) -> Result<(), ExpectError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Expect {
                group,
                round,
                mode,
                not_after,
                reply,
            })
            .await
            .map_err(|_| ExpectError::Stopped)?;
        rx.await
            .map_err(|_| ExpectError::Stopped)?
            .map_err(ExpectError::Usage)
    }
}

/// Why a round could not be opened.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[non_exhaustive]
pub enum ExpectError {
    /// The aggregator refused it (closed round, other mode, too many).
    #[error(transparent)]
    Usage(UsageError),
    /// The collector has stopped.
    #[error("the collector has stopped")]
    Stopped,
}

/// The running collector task.
#[derive(Debug)]
pub struct Collector {
    handle: CollectorHandle,
    task: JoinHandle<()>,
}

impl Collector {
    /// Rebuilds the aggregator from the spool's unbatched entries and starts
    /// the task. `sealed` is notified after every sealed batch; `events`, if
    /// given, receives a [`CollectorEvent`] for each.
    pub async fn start(
        spool: Spool,
        config: CollectorConfig,
        attached: Arc<Attached>,
        metrics: GatewayMetrics,
        sealed: Arc<Notify>,
        events: Option<mpsc::UnboundedSender<CollectorEvent>>,
    ) -> Result<Collector, SpoolError> {
        let (agg, pending, restored) = restore(&spool, &config, &attached).await?;
        let rounds = restored
            .into_iter()
            .map(|(key, deadline)| {
                (
                    key,
                    OpenRound {
                        deadline,
                        missing: 0,
                        counted: false,
                    },
                )
            })
            .collect();
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let task = Task {
            agg,
            spool,
            config,
            attached,
            metrics,
            sealed,
            events,
            pending,
            discarded: Discarded::default(),
            rounds,
            ids: 0..0,
            sealing: VecDeque::new(),
            unsealed: VecDeque::new(),
            seal_retry: SEAL_RETRY_MIN,
            retry_at: None,
        };
        let task = tokio::spawn(task.run(rx));
        Ok(Collector {
            handle: CollectorHandle { tx },
            task,
        })
    }

    /// A handle for submitters.
    pub fn handle(&self) -> CollectorHandle {
        self.handle.clone()
    }

    /// Cuts every entry held into batches now (deadlines and lingers are
    /// treated as passed) and seals them in the spool; for the drain.
    pub async fn flush(&self) -> Result<(), SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.handle
            .tx
            .send(Input::Flush(reply))
            .await
            .map_err(|_| SubmitError::Stopped)?;
        rx.await.map_err(|_| SubmitError::Stopped)
    }

    /// Stops the task after the inputs queued before this call.
    pub async fn stop(self) {
        let (reply, rx) = oneshot::channel();
        if self.handle.tx.send(Input::Stop(reply)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// How long before a challenge's `not_after` the gateway cuts the round's
/// batch: time for its seal, its upload and its judgement before the UDC
/// closes the round (for a round shorter than twice this, half the time
/// left is kept instead).
pub const NOT_AFTER_MARGIN: Duration = Duration::from_secs(2);

/// The shortest wait [`round_window`] gives a round with a `not_after`:
/// a round that closes (by this gateway's clock) sooner, or has closed,
/// still takes the answers of its first second, so a clock running ahead
/// of the UDC's costs at most the later answers of short rounds.
pub const MIN_ROUND_WINDOW: Duration = Duration::from_secs(1);

/// How long a round opened at `unix_now_ms` waits for its members: the
/// configured deadline (`DAPGW_ROUND_DEADLINE_MS`), or less when the
/// challenge's `not_after` (Unix seconds, the UDC's close of the round,
/// rounded down) comes sooner: the time left less [`NOT_AFTER_MARGIN`],
/// or half the time left when that is longer, and never less than
/// [`MIN_ROUND_WINDOW`]. A batch cut at the configured deadline would reach
/// the UDC after the round closed and have every entry refused as late
/// (`round_not_open`), all 16,384 of them at the default batch cap. A
/// round whose members all answer goes out at once either way.
pub fn round_window(configured: Duration, not_after: Option<u64>, unix_now_ms: u64) -> Duration {
    let Some(not_after) = not_after else {
        return configured;
    };
    let margin = u64::try_from(NOT_AFTER_MARGIN.as_millis()).unwrap_or(u64::MAX);
    let left = not_after.saturating_mul(1000).saturating_sub(unix_now_ms);
    let wait = Duration::from_millis(left.saturating_sub(margin).max(left / 2));
    configured.min(wait.max(MIN_ROUND_WINDOW))
}

/// A restored round: its key and deadline.
type RestoredRound = ((GroupId, u64), std::time::Instant);

/// Rebuilds the aggregator from the rounds the spool recorded as open (with
/// the members attached to their groups now and what is left of their
/// deadline) and the entries it holds outside any batch (a response of a
/// round not recorded goes out at once). Returns it with the set of entry
/// ids it holds and the rounds it reopened.
async fn restore(
    spool: &Spool,
    collector: &CollectorConfig,
    attached: &Attached,
) -> Result<(Aggregator<EntryId>, HashSet<EntryId>, Vec<RestoredRound>), SpoolError> {
    let config = &collector.aggregator;
    let now_ms = super::unix_ms();
    let now = Instant::now().into_std();
    let mut specs = Vec::new();
    for r in spool.open_rounds(now_ms).await? {
        let Some(mode) = Mode::from_code(r.mode) else {
            tracing::warn!(
                group = r.group,
                round = r.round,
                "recorded round has an unknown mode; skipped"
            );
            continue;
        };
        // What is left of the recorded deadline, but never more than a
        // whole round's: a wall clock that stepped back since the round
        // was recorded (an NTP step, a box booting without a real-time
        // clock) must not hold its acknowledged responses that much longer.
        let left = Duration::from_millis(r.deadline_ms.saturating_sub(now_ms));
        let deadline = now + left.min(collector.round_deadline);
        specs.push(RoundSpec {
            group: GroupId(r.group),
            round: r.round,
            mode,
            members: attached.members_of(r.group),
            deadline,
        });
    }
    let reopened: Vec<RestoredRound> = specs
        .iter()
        .map(|s| ((s.group, s.round), s.deadline))
        .collect();
    if !reopened.is_empty() {
        tracing::info!(
            rounds = reopened.len(),
            "reopened the rounds recorded in the spool"
        );
    }
    let mut entries = Vec::new();
    let mut corrupt = Vec::new();
    let streams = spool.unbatched_streams().await?;
    for stream in &streams {
        for e in spool.unbatched(*stream).await? {
            match MemberMessage::decode(&e.bytes) {
                Ok(MemberMessage::Response(r)) => entries.push((SpooledEntry::Response(r), e.id)),
                Ok(MemberMessage::Uplink(u)) => entries.push((SpooledEntry::Uplink(u), e.id)),
                Err(err) => {
                    tracing::error!(entry = %e.id, error = %err, "spooled entry does not decode; discarding it");
                    corrupt.push(e.id);
                }
            }
        }
    }
    // Everything acknowledged must fit: raise the memory bounds for the
    // restored backlog rather than refuse part of it.
    let mut restore_config = config.clone();
    restore_config.max_held_entries = config.max_held_entries.saturating_add(entries.len());
    restore_config.max_collectors = config
        .max_collectors
        .saturating_add(streams.len())
        .saturating_add(specs.len());
    let pending: HashSet<EntryId> = entries.iter().map(|(_, id)| *id).collect();
    let (agg, refused) = Aggregator::restore(restore_config, specs, entries, now)
        .map_err(|_| SpoolError::Invalid("aggregator configuration refused at restore"))?;
    let mut pending = pending;
    for (err, id) in refused {
        tracing::error!(entry = %id, error = %err, "spooled entry conflicts with another; discarding it");
        pending.remove(&id);
        corrupt.push(id);
    }
    for id in corrupt {
        spool.discard_unbatched(id).await?;
    }
    if !pending.is_empty() {
        tracing::info!(
            entries = pending.len(),
            "restored unbatched entries from the spool"
        );
    }
    Ok((agg, pending, reopened))
}

/// Hands the aggregator batch ids reserved in the spool beforehand (the
/// spool persists ids before handing them out, a block at a time; the
/// aggregator asks synchronously, at most once per `poll_batch`).
struct Reserved<'a>(&'a mut std::ops::Range<u64>);

impl BatchIdSource for Reserved<'_> {
    fn next_batch_id(&mut self) -> u64 {
        // Never empty when asked; 0 would be refused by the aggregator's
        // monotonic check rather than sent.
        self.0.next().unwrap_or(0)
    }
}

/// A cut batch whose seal is queued in the spool.
struct Sealing {
    batch: ReadyBatch<EntryId>,
    cut_at: Instant,
    done: Queued<()>,
}

/// A round opened by [`CollectorHandle::expect`], tracked for metrics.
struct OpenRound {
    deadline: std::time::Instant,
    missing: usize,
    /// Already counted in `dapgw_rounds_total` (complete, when every
    /// expected member's answer went into a batch before the deadline).
    counted: bool,
}

struct Task {
    agg: Aggregator<EntryId>,
    spool: Spool,
    config: CollectorConfig,
    attached: Arc<Attached>,
    metrics: GatewayMetrics,
    sealed: Arc<Notify>,
    events: Option<mpsc::UnboundedSender<CollectorEvent>>,
    /// Entry ids held by the aggregator or cut but not yet sealed: an entry
    /// id outside this set that the aggregator refuses is the spool's copy
    /// of a refused message, and is discarded.
    pending: HashSet<EntryId>,
    /// Entry ids discarded lately (a refused message's spool copy), so that
    /// a byte-identical submission that was handed the same id before the
    /// discard is not acknowledged for a row that is gone.
    discarded: Discarded,
    /// Rounds opened here, until their deadline (for `dapgw_rounds_total`).
    rounds: HashMap<(GroupId, u64), OpenRound>,
    /// Batch ids reserved in the spool, for the next cuts.
    ids: std::ops::Range<u64>,
    /// Seals queued in the spool, oldest first; their entries stay in
    /// `pending` until the seal has committed.
    sealing: VecDeque<Sealing>,
    /// Batches cut but not sealed (the spool failed); retried in order.
    unsealed: VecDeque<(ReadyBatch<EntryId>, Instant)>,
    seal_retry: Duration,
    retry_at: Option<Instant>,
}

/// The last [`Discarded::KEPT`] entry ids discarded, oldest forgotten
/// first. Entry ids are never reused, and a re-send reaches the collector
/// right after its append, so a short memory is enough.
#[derive(Default)]
struct Discarded {
    ids: HashSet<EntryId>,
    order: VecDeque<EntryId>,
    /// Ids whose discard failed (a disk error): the row is still stored,
    /// so they leave `ids` at the next lookup, and an identical re-send
    /// (handed that row) is collected again instead of being told to
    /// resend until a restart. Filled by the tasks that await the
    /// discards' commits.
    failed: Arc<std::sync::Mutex<Vec<EntryId>>>,
}

impl Discarded {
    const KEPT: usize = 65_536;

    fn insert(&mut self, id: EntryId) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > Self::KEPT
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }

    fn contains(&mut self, id: EntryId) -> bool {
        let failed = std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()));
        if !failed.is_empty() {
            // Out of `order` too: a copy left there would later pop the
            // id out of `ids` early if it is discarded again (rare: only
            // on disk errors, so the scan is cheap).
            for f in &failed {
                self.ids.remove(f);
            }
            self.order.retain(|x| !failed.contains(x));
        }
        self.ids.contains(&id)
    }

    /// Where a failed discard is reported.
    fn failures(&self) -> Arc<std::sync::Mutex<Vec<EntryId>>> {
        Arc::clone(&self.failed)
    }
}

/// What woke the collector's driver loop.
enum Wake {
    Input(Option<Input>),
    Timer,
    Sealed(Result<(), SpoolError>),
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        loop {
            let wake = [
                self.agg.poll_timeout().map(Instant::from_std),
                self.retry_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let idle = self.sealing.is_empty();
            let event = {
                // Seals complete in the order they were queued: only the
                // oldest is awaited.
                let oldest = self.sealing.front_mut().map(|s| &mut s.done);
                tokio::select! {
                    biased;
                    res = async {
                        match oldest {
                            Some(done) => done.await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Sealed(res),
                    input = rx.recv() => Wake::Input(input),
                    // While a seal is in flight its completion drives the
                    // loop (and due timers are handled right after it), so
                    // a paused test clock never jumps past a seal.
                    () = sleep_until(wake), if idle => Wake::Timer,
                }
            };
            let first = match event {
                Wake::Sealed(res) => {
                    self.seal_done(res);
                    let now = Instant::now();
                    if wake.is_some_and(|w| w <= now) {
                        self.poll(now).await;
                    }
                    continue;
                }
                Wake::Timer => {
                    self.poll(Instant::now()).await;
                    continue;
                }
                Wake::Input(None) => break,
                Wake::Input(Some(input)) => input,
            };
            // Handle whatever else is queued too before cutting, so a burst
            // is cut into full batches rather than polled once per input.
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(input) = next.take() {
                match input {
                    Input::Stop(reply) => {
                        self.wait_sealing().await;
                        let _ = reply.send(());
                        return;
                    }
                    Input::Flush(reply) => {
                        let horizon = self.config.round_deadline
                            + self.config.aggregator.uplink_linger
                            + Duration::from_secs(1);
                        let now = Instant::now();
                        self.poll_at(now, now + horizon).await;
                        self.wait_sealing().await;
                        let _ = reply.send(());
                    }
                    Input::Expect {
                        group,
                        round,
                        mode,
                        not_after,
                        reply,
                    } => {
                        let res = self.expect(group, round, mode, not_after).await;
                        let _ = reply.send(res);
                    }
                    Input::Collect {
                        msg,
                        entry,
                        arrived,
                        reply,
                    } => {
                        let res = self.collect(msg, entry, arrived).await;
                        let _ = reply.send(res);
                    }
                }
                handled += 1;
                if handled < DRAIN_MAX {
                    next = rx.try_recv().ok();
                }
            }
            self.poll(Instant::now()).await;
        }
    }

    async fn expect(
        &mut self,
        group: GroupId,
        round: u64,
        mode: Mode,
        not_after: Option<u64>,
    ) -> Result<(), UsageError> {
        let now = Instant::now().into_std();
        let unix_now = super::unix_ms();
        let window = round_window(self.config.round_deadline, not_after, unix_now);
        let deadline = now + window;
        // Recorded before members can read the challenge, so a restarted
        // gateway still takes this round's responses. A failed record only
        // costs that (the round is open here either way).
        let row = OpenRoundRow {
            group: group.0,
            round,
            mode: mode.code(),
            deadline_ms: unix_now
                .saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX)),
        };
        if let Err(e) = self.spool.set_open_round(row, super::unix_ms()).await {
            tracing::warn!(group = group.0, round, error = %e, "open round not recorded in the spool");
        }
        let spec = RoundSpec {
            group,
            round,
            mode,
            members: self.attached.members_of(group.0),
            deadline,
        };
        self.agg.expect(spec, now)?;
        self.rounds
            .entry((group, round))
            .and_modify(|r| r.deadline = deadline)
            .or_insert(OpenRound {
                deadline,
                missing: 0,
                counted: false,
            });
        Ok(())
    }

    async fn collect(
        &mut self,
        msg: MemberMessage,
        entry: EntryId,
        arrived: Instant,
    ) -> Result<Collected, SubmitError> {
        // The spool returned a stored original that is on its way into a
        // batch (cut or not, sealed or not): a re-send. Not handed to the
        // aggregator, which forgets a message some time after cutting it
        // and would take it for new (a second batch that can never seal).
        if self.pending.contains(&entry) {
            return Ok(Collected::Duplicate);
        }
        // A re-send handed the id of a copy discarded since (its first
        // submission was refused, say before the round's challenge came):
        // the row is gone, so a 202 now would acknowledge nothing, and a
        // batch naming it could never seal. The member sends it again and
        // gets a fresh row.
        if self.discarded.contains(entry) {
            return Err(SubmitError::Discarded);
        }
        let now = Instant::now().into_std();
        let res = match msg {
            MemberMessage::Response(r) => self.agg.handle_response(r, entry, now),
            // The linger starts when the uplink arrived, so the spool
            // commit it waited for is not added to it; but at most half a
            // linger before now: when commits take longer than the linger
            // (an overloaded spool), a stream is still cut at most every
            // half linger, not at every collect, and its batches stay
            // large enough to amortize their seal and upload.
            MemberMessage::Uplink(u) => {
                let credit = self.config.aggregator.uplink_linger / 2;
                let arrived = arrived.into_std().min(now);
                let since = match now.checked_sub(credit) {
                    Some(floor) => arrived.max(floor),
                    // The clock is younger than the credit: no floor.
                    None => arrived,
                };
                self.agg.handle_uplink(u, entry, since)
            }
        };
        let keep = match res {
            Ok(Collected::New) => {
                self.pending.insert(entry);
                true
            }
            // A stored copy the aggregator will never batch: the original
            // was already batched, or the message is refused. Only an
            // unbatched row is deleted, so a sealed original is safe.
            _ => false,
        };
        if !keep {
            // Only a refusal makes a sharer of the row send again; a
            // duplicate's sharer is a duplicate too (202).
            if res.is_err() {
                self.discarded.insert(entry);
            }
            // Queued with the spool's writer now, so the member's next
            // append is applied after it; its commit is not awaited here:
            // the collector is one task, and an fsync per refused message
            // would let a flood of them hold up every member's collect.
            let done = self.spool.queue_discard_unbatched(entry);
            let failures = self.discarded.failures();
            tokio::spawn(async move {
                match done.await {
                    Ok(_) => {}
                    // The writer is gone (shutting down): whether the row
                    // was deleted is unknown, so the id stays discarded.
                    Err(SpoolError::Closed) => {}
                    Err(e) => {
                        // Left behind, it is batched after the next restart
                        // and the UDC judges it (a duplicate at worst);
                        // until then a re-send sharing the row is judged
                        // again.
                        tracing::warn!(entry = %entry, error = %e, "could not discard a refused entry");
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(entry);
                    }
                }
            });
        }
        res.map_err(SubmitError::Refused)
    }

    async fn poll(&mut self, now: Instant) {
        self.poll_at(now, now).await;
    }

    /// Cuts due batches as of `at` (later than `now` for a flush) and seals
    /// them; `now` stamps the events.
    async fn poll_at(&mut self, now: Instant, at: Instant) {
        // While the spool is failing, entries wait in the aggregator.
        if let Some(t) = self.retry_at {
            if t > now {
                return;
            }
            self.retry_at = None;
        }
        if !self.seal_backlog().await {
            return;
        }
        let at_std = at.into_std();
        loop {
            if self.ids.is_empty() && self.agg.pending() > 0 {
                match self.spool.reserve_batch_ids(BATCH_ID_BLOCK).await {
                    Ok(ids) => self.ids = ids,
                    Err(e) => {
                        tracing::error!(error = %e, "spool refused batch ids; retrying");
                        self.schedule_retry(now);
                        return;
                    }
                }
            }
            let cut = if self.ids.is_empty() {
                // Nothing pending: only rounds to close, no id is asked for.
                self.agg.poll_batch(at_std, &mut || 0)
            } else {
                self.agg.poll_batch(at_std, &mut Reserved(&mut self.ids))
            };
            match cut {
                Ok(Some(batch)) => {
                    // Members missing from a round count at the cut: the
                    // round may close (and be counted complete or
                    // deadline, below) before this batch's seal commits.
                    if let Some(round) = batch.round {
                        self.note_missing(batch.group, round, batch.missing.len());
                    }
                    // Queued now, awaited by the driver loop: members'
                    // entries keep flowing while the seal commits.
                    // Chained to the batch cut before it while that one's
                    // seal is unconfirmed: if it fails, this one fails too
                    // and both are sealed again in order (seal_backlog).
                    let after = self.sealing.back().map(|s| s.batch.batch_id);
                    let done = self.spool.queue_seal_batch(
                        batch.batch_id,
                        after,
                        &batch.handles,
                        batch.bytes.clone(),
                        batch.tags.tags.clone(),
                    );
                    self.sealing.push_back(Sealing {
                        batch,
                        cut_at: now,
                        done,
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "aggregator refused a batch id");
                    self.ids = 0..0;
                    break;
                }
            }
        }
        while let Some(closed) = self.agg.poll_closed_round() {
            self.note_missing(closed.group, closed.round, closed.missing.len());
            self.emit(CollectorEvent::RoundClosed {
                group: closed.group,
                round: closed.round,
                missing: closed.missing,
                at: now,
            });
        }
        // Rounds past their deadline are closed by the poll above.
        let metrics = &self.metrics;
        self.rounds.retain(|_, r| {
            if r.deadline > at_std {
                return true;
            }
            if r.counted {
                return false;
            }
            let outcome = if r.missing > 0 {
                GatewayRoundOutcome::Deadline
            } else {
                GatewayRoundOutcome::Complete
            };
            metrics.rounds.get(outcome).inc();
            false
        });
    }

    /// Seals cut batches in order; false if the spool failed (retry later).
    async fn seal_backlog(&mut self) -> bool {
        while let Some((batch, cut_at)) = self.unsealed.front() {
            let res = self
                .spool
                .seal_batch(
                    batch.batch_id,
                    &batch.handles,
                    batch.bytes.clone(),
                    batch.tags.tags.clone(),
                )
                .await;
            if let Err(e) = res {
                tracing::error!(batch = batch.batch_id, error = %e, "sealing a batch failed; retrying");
                self.schedule_retry(*cut_at);
                return false;
            }
            self.seal_retry = SEAL_RETRY_MIN;
            let Some((batch, cut_at)) = self.unsealed.pop_front() else {
                break;
            };
            self.sealed(batch, cut_at);
        }
        true
    }

    /// The oldest queued seal committed (or failed: then its batch is
    /// sealed again later, with the same id and bytes).
    fn seal_done(&mut self, res: Result<(), SpoolError>) {
        let Some(s) = self.sealing.pop_front() else {
            return;
        };
        match res {
            Ok(()) => {
                self.seal_retry = SEAL_RETRY_MIN;
                self.sealed(s.batch, s.cut_at);
            }
            Err(e) => {
                // Refused behind a failed predecessor: that failure already
                // scheduled the retry (the backoff is not doubled again).
                let chained = matches!(e, SpoolError::SealOrder { .. });
                if !chained {
                    tracing::error!(batch = s.batch.batch_id, error = %e, "sealing a batch failed; retrying");
                }
                self.unsealed.push_back((s.batch, s.cut_at));
                if !chained || self.retry_at.is_none() {
                    self.schedule_retry(s.cut_at);
                }
            }
        }
    }

    /// Waits for every queued seal (the drain and the stop).
    async fn wait_sealing(&mut self) {
        while let Some(s) = self.sealing.front_mut() {
            let res = (&mut s.done).await;
            self.seal_done(res);
        }
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now.max(Instant::now()) + self.seal_retry);
        self.seal_retry = (self.seal_retry * 2).min(SEAL_RETRY_MAX);
    }

    fn sealed(&mut self, batch: ReadyBatch<EntryId>, cut_at: Instant) {
        for h in &batch.handles {
            self.pending.remove(h);
        }
        self.metrics
            .batch_entries
            .observe(batch.handles.len() as f64);
        if let Some(round) = batch.round {
            // Every expected member answered: the round is complete now,
            // not only at its deadline (late alternatives may still follow).
            if batch.trigger == BatchTrigger::AllAnswered
                && let Some(r) = self.rounds.get_mut(&(batch.group, round))
                && !r.counted
            {
                r.counted = true;
                self.metrics.rounds.get(GatewayRoundOutcome::Complete).inc();
            }
        }
        self.sealed.notify_one();
        tracing::debug!(
            batch = batch.batch_id,
            entries = batch.handles.len(),
            trigger = ?batch.trigger,
            "batch sealed"
        );
        self.emit(CollectorEvent::Sealed {
            batch_id: batch.batch_id,
            kind: batch.kind,
            group: batch.group,
            round: batch.round,
            entries: batch.handles,
            trigger: batch.trigger,
            missing: batch.missing,
            cut_at,
        });
    }

    fn note_missing(&mut self, group: GroupId, round: u64, missing: usize) {
        self.metrics
            .round_missing_members
            .inc_by(u64::try_from(missing).unwrap_or(u64::MAX));
        if let Some(r) = self.rounds.get_mut(&(group, round)) {
            r.missing += missing;
        }
    }

    fn emit(&self, event: CollectorEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }
}

/// Sleeps until `at`, or forever without a deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
