//! One simulated meter: a [`Member`] state machine driven over the gateway's
//! member-facing API.
//!
//! Data flow: the agent attaches, then long-polls `GET /v1/downlink` with a
//! cursor. Challenges are answered (the new state is stored before the
//! response leaves; a repeated challenge re-sends the stored bytes),
//! confirms open sessions, group messages are applied and acked, rekeys and
//! key updates are applied. Readings are sealed at a fixed rate or on
//! command and posted to `POST /v1/uplink`. Every outcome is counted in the
//! fleet's [`Stats`].
//!
//! When a poll fails (the gateway may have restarted and forgotten who is
//! attached), the agent backs off and attaches again before each further
//! poll until one attach succeeds, keeping its cursor: so each member that
//! lost its gateway is attached again, and counted in
//! [`Stats::reattached`] and [`Stats::reattaches`] once per outage (however
//! many polls and attaches failed before the attach that succeeded).
//!
//! # Persistence
//!
//! Each member has one file, `member-<id>.state`, replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory):
//! `"DSIM" | version u8 = 1 | cursor u64 | member state`. The cursor stored
//! is the last record fully handled *before* the change, so a crash between
//! storing and sending replays that record: the member recognises the
//! challenge (or the group message) and re-sends the identical response
//! (or ack). A response or ack the gateway would not take (503s or
//! transport failures past the retries) is handled the same way without a
//! restart: the agent's cursor stays before the record, and the next poll,
//! after a backoff, brings it again. A restarted agent
//! restores the member (uplink counters continue above the stored
//! high-water mark) and polls from the stored cursor.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::{mpsc, oneshot, watch};
use zeroize::Zeroizing;

use super::client::{Audience, ClientError, GatewayClient, Record, decode_records};
use crate::protocol::keys::MemberCredential;
use crate::protocol::member::{Challenged, ErrorCause, Member, MemberError};
use crate::protocol::wire::{GroupId, GroupMessage, MessageType, UplinkKind};

/// File magic of a member state file.
const MAGIC: &[u8; 4] = b"DSIM";
/// File format version.
const FILE_VERSION: u8 = 1;
/// How often an overloaded (503) or unreachable gateway is retried for one
/// uplink before the agent gives up on that message.
const UPLINK_ATTEMPTS: u32 = 8;

/// What became of an uplink [`Agent::send_uplink`] posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// 202: durable in the gateway's spool.
    Accepted,
    /// Refused for good (a 4xx: the same bytes would be refused again).
    Refused,
    /// Not taken (503s or transport failures past the retries, a 408, a
    /// 5xx): worth sending again later.
    Failed,
}

/// How an agent behaves.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Directory holding the state files.
    pub state_dir: PathBuf,
    /// Send a reading this often once in a session; `None`: only on command.
    pub reading_interval: Option<Duration>,
    /// Long-poll wait sent to the gateway.
    pub wait_ms: u64,
    /// Reconnect (with backoff) after failures; when false, the agent stops
    /// at the first transport failure.
    pub reconnect: bool,
    /// First backoff after a failure; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Timeout of attach and uplink requests.
    pub request_timeout: Duration,
    /// fsync each state file (and its directory) before the message that
    /// depends on it leaves, as a real meter must. Off only where thousands
    /// of simulated meters share one disk and their power-loss durability is
    /// not under test (`dapgw demo`): the file is still replaced first.
    pub fsync: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("sim-state"),
            reading_interval: None,
            wait_ms: 25_000,
            reconnect: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            fsync: true,
        }
    }
}

/// What became of one group message at one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMessageOutcome {
    /// The group.
    pub group: u32,
    /// The seq, when the message decoded far enough to tell.
    pub seq: Option<u64>,
    /// `Ok(())`: decrypted and applied. `Err(reason)`: refused, with the
    /// member's reason.
    pub result: Result<(), String>,
}

/// Counters shared by every agent of a fleet. Each change bumps
/// [`Stats::subscribe`]'s watch value, so observers wait for conditions
/// without polling on a timer.
#[derive(Debug)]
pub struct Stats {
    /// Agents whose attach succeeded (counted once per agent start).
    pub attached: AtomicU64,
    /// Attaches repeated, and succeeded, after a poll failed: one per
    /// member per lost gateway connection (the agent attaches again before
    /// each poll until one attach succeeds; [`Stats::reattaches`] says
    /// which members).
    pub reattached: AtomicU64,
    /// Challenges answered with a new response.
    pub rounds_answered: AtomicU64,
    /// Stored responses re-sent for a repeated challenge.
    pub responses_resent: AtomicU64,
    /// Confirms opened (sessions started).
    pub confirms_opened: AtomicU64,
    /// Readings accepted by the gateway (202).
    pub readings_sent: AtomicU64,
    /// Group messages decrypted and applied.
    pub updates_applied: AtomicU64,
    /// Acks accepted by the gateway.
    pub acks_sent: AtomicU64,
    /// Rekeys applied.
    pub rekeys_applied: AtomicU64,
    /// Key updates applied.
    pub key_updates_applied: AtomicU64,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Successful re-attaches per member id.
    reattaches: std::sync::Mutex<BTreeMap<u64, u64>>,
    /// One lock for the per-seq counts and the per-member log, so that an
    /// observer that sees a count also finds the log entry behind it.
    groups: std::sync::Mutex<GroupRecords>,
    changed: watch::Sender<u64>,
}

/// Group messages as the members saw them.
#[derive(Debug, Default)]
struct GroupRecords {
    /// How many members applied each `(group, seq)`.
    by_seq: BTreeMap<(u32, u64), u64>,
    /// Every group message each member received, in order.
    log: BTreeMap<u64, Vec<GroupMessageOutcome>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            attached: AtomicU64::new(0),
            reattached: AtomicU64::new(0),
            rounds_answered: AtomicU64::new(0),
            responses_resent: AtomicU64::new(0),
            confirms_opened: AtomicU64::new(0),
            readings_sent: AtomicU64::new(0),
            updates_applied: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            rekeys_applied: AtomicU64::new(0),
            key_updates_applied: AtomicU64::new(0),
            errors: Default::default(),
            reattaches: Default::default(),
            groups: Default::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Stats {
    /// A watch that changes whenever any counter changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Counts an error of `kind` (e.g. `member.stale`, `http.409`).
    pub fn error(&self, kind: &str) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(kind.to_string()).or_default() += 1;
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Errors by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Successful re-attaches (see [`Stats::reattached`]) per member id;
    /// members that never re-attached are absent. An observer that wants
    /// every member back after an outage compares two snapshots member by
    /// member rather than the total, which a member that failed twice
    /// would count twice.
    pub fn reattaches(&self) -> BTreeMap<u64, u64> {
        self.reattaches
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    fn record_reattach(&self, member: u64) {
        if let Ok(mut m) = self.reattaches.lock() {
            *m.entry(member).or_default() += 1;
        }
        self.bump(&self.reattached);
    }

    /// How many members applied `(group, seq)`.
    pub fn updates_applied_for(&self, group: u32, seq: u64) -> u64 {
        self.groups
            .lock()
            .ok()
            .and_then(|g| g.by_seq.get(&(group, seq)).copied())
            .unwrap_or(0)
    }

    /// Members that applied each `(group, seq)`.
    pub fn updates_by_seq(&self) -> BTreeMap<(u32, u64), u64> {
        self.groups
            .lock()
            .map(|g| g.by_seq.clone())
            .unwrap_or_default()
    }

    /// Every group message `member` received, in order, with what became
    /// of it.
    pub fn group_log(&self, member: u64) -> Vec<GroupMessageOutcome> {
        self.groups
            .lock()
            .ok()
            .and_then(|g| g.log.get(&member).cloned())
            .unwrap_or_default()
    }

    fn record_group(&self, member: u64, outcome: GroupMessageOutcome) {
        let Ok(mut g) = self.groups.lock() else {
            return;
        };
        if outcome.result.is_ok()
            && let Some(seq) = outcome.seq
        {
            *g.by_seq.entry((outcome.group, seq)).or_default() += 1;
        }
        g.log.entry(member).or_default().push(outcome);
    }

    /// The counters as JSON (the `dapgw sim` summary).
    pub fn to_json(&self) -> serde_json::Value {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "attached": c(&self.attached),
            "reattached": c(&self.reattached),
            "rounds_answered": c(&self.rounds_answered),
            "responses_resent": c(&self.responses_resent),
            "confirms_opened": c(&self.confirms_opened),
            "readings_sent": c(&self.readings_sent),
            "updates_applied": c(&self.updates_applied),
            "acks_sent": c(&self.acks_sent),
            "rekeys_applied": c(&self.rekeys_applied),
            "key_updates_applied": c(&self.key_updates_applied),
            "errors": self.errors(),
        })
    }
}

/// A command to one agent.
#[derive(Debug)]
pub enum Command {
    /// Seal and send one reading now; answers whether the gateway took it
    /// (`Err` with the reason otherwise).
    SendReading(oneshot::Sender<Result<(), String>>),
}

/// Why an agent stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The credential or stored state is unusable.
    #[error("member {id}: {source}")]
    Member {
        /// The member.
        id: u64,
        /// Why.
        source: MemberError,
    },
    /// The state file could not be read or written.
    #[error("member state file {}: {source}", path.display())]
    Storage {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not one this simulator wrote.
    #[error("member state file {} is damaged", .0.display())]
    BadFile(PathBuf),
    /// The agent's task panicked (a bug; hostile input must never do this).
    #[error("agent task panicked")]
    Panicked,
    /// The gateway could not be reached and reconnecting is off.
    #[error("gateway: {0}")]
    Gateway(#[from] ClientError),
}

/// The state file of member `id` in `dir`.
pub fn state_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("member-{id}.state"))
}

/// A state file's contents: the downlink cursor and the member state
/// (which holds keys, so it is wiped when dropped).
pub type StoredState = (u64, Zeroizing<Vec<u8>>);

/// Reads a state file: `(cursor, member state)`; `None` when absent.
pub fn read_state(path: &Path) -> Result<Option<StoredState>, AgentError> {
    // The state holds the member's keys: wiped when dropped, like the
    // buffer `write_state` fills.
    let bytes = match std::fs::read(path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AgentError::Storage {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let bad = || AgentError::BadFile(path.to_path_buf());
    if bytes.len() < 13 || &bytes[..4] != MAGIC || bytes[4] != FILE_VERSION {
        return Err(bad());
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&bytes[5..13]);
    Ok(Some((
        u64::from_be_bytes(c),
        Zeroizing::new(bytes[13..].to_vec()),
    )))
}

/// Replaces a state file atomically: temp file, fsync, rename, fsync dir.
pub fn write_state(path: &Path, cursor: u64, state: &[u8]) -> Result<(), AgentError> {
    write_state_with(path, cursor, state, true)
}

/// [`write_state`], with the two fsyncs only when `fsync` (without them the
/// file is still replaced atomically before the message leaves, but a power
/// loss may take back the last change).
pub fn write_state_with(
    path: &Path,
    cursor: u64,
    state: &[u8],
    fsync: bool,
) -> Result<(), AgentError> {
    let err = |source| AgentError::Storage {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("state.tmp");
    let mut data = Zeroizing::new(Vec::with_capacity(13 + state.len()));
    data.extend_from_slice(MAGIC);
    data.push(FILE_VERSION);
    data.extend_from_slice(&cursor.to_be_bytes());
    data.extend_from_slice(state);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(&data).map_err(err)?;
    if fsync {
        f.sync_all().map_err(err)?;
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if fsync {
        // The rename is durable only once the directory is: a directory
        // that cannot be synced is an error, not skipped (a rename a power
        // loss takes back would bring back lower reserved counters, and
        // with them nonces already used).
        std::fs::File::open(dir_to_sync(path))
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
fn dir_to_sync(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// One member agent. Build with [`Agent::load`], drive with [`Agent::run`].
pub struct Agent {
    credential: MemberCredential,
    member: Member,
    groups: Vec<GroupId>,
    path: PathBuf,
    /// Last record fully handled.
    cursor: Option<u64>,
    client: GatewayClient,
    stats: Arc<Stats>,
    config: AgentConfig,
    readings: u64,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("member", &self.credential.id)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// The agent of `credential`: restored from its state file if present,
    /// else fresh (nothing is written until its first state change: a
    /// fresh member has used no counter).
    pub fn load(
        credential: MemberCredential,
        client: GatewayClient,
        stats: Arc<Stats>,
        config: AgentConfig,
    ) -> Result<Self, AgentError> {
        let id = credential.id;
        let path = state_path(&config.state_dir, id);
        let member_err = |source| AgentError::Member { id, source };
        let (member, cursor) = match read_state(&path)? {
            Some((cursor, state)) => (
                Member::restore(
                    &credential,
                    &state,
                    &mut rand_core::UnwrapErr(getrandom::SysRng),
                )
                .map_err(member_err)?,
                Some(cursor),
            ),
            None => (Member::new(&credential).map_err(member_err)?, None),
        };
        let groups = credential.groups.iter().map(|g| GroupId(*g)).collect();
        Ok(Self {
            credential,
            member,
            groups,
            path,
            cursor,
            client,
            stats,
            config,
            readings: 0,
        })
    }

    /// The member id.
    pub fn id(&self) -> u64 {
        self.credential.id
    }

    /// Runs until `stop` turns true (or, without reconnect, until a
    /// transport failure of a poll or an attach).
    ///
    /// Records are handled in cursor order: a record whose response or ack
    /// did not get through is handled again (after a backoff) before any
    /// later one, for as long as it takes, so that a lost ack cannot be
    /// skipped; later records (rekeys, newer rounds) wait behind it.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let mut backoff = self.config.backoff_min;
        // Attach (retrying) to learn where the downlink stands.
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let res = self
                .client
                .attach(self.member.id(), &self.groups, self.config.request_timeout)
                .await;
            match res {
                Ok(Ok(latest)) => {
                    if self.cursor.is_none() {
                        self.cursor = Some(latest);
                    }
                    self.stats.bump(&self.stats.attached);
                    break;
                }
                Ok(Err(reply)) => self
                    .stats
                    .error(&format!("attach.{}", reply.status.as_u16())),
                Err(e) => {
                    self.stats.error(&format!("transport.{}", e.kind()));
                    if !self.config.reconnect {
                        return Err(e.into());
                    }
                }
            }
            if pause(backoff, &mut stop).await {
                return Ok(());
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        backoff = self.config.backoff_min;
        let mut ticker = self.config.reading_interval.map(|d| {
            // Spread the members over the interval (by id), so a fleet does
            // not send all its readings in one burst.
            let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
            let offset = self.credential.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % nanos;
            let start = tokio::time::Instant::now() + Duration::from_nanos(offset);
            let mut t = tokio::time::interval_at(start, d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut poll = Box::pin(self.poll());
        let mut commands_open = true;
        // Set when a poll fails: the gateway may have restarted and lost
        // who is attached. Cleared only by a successful attach, which is
        // tried before every poll until then: a restarted gateway serves
        // polls without an attach, so waiting for the next poll to fail
        // could leave a member unattached (and uncounted) for good.
        let mut need_attach = false;
        loop {
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() { return Ok(()); }
                }
                res = &mut poll => {
                    match res {
                        Ok(reply) => {
                            if self.handle_downlink(reply).await? {
                                backoff = self.config.backoff_min;
                            } else {
                                // Refused or garbled: not again at once.
                                if pause(backoff, &mut stop).await { return Ok(()); }
                                backoff = (backoff * 2).min(self.config.backoff_max);
                            }
                        }
                        Err(e) => {
                            self.stats.error(&format!("transport.{}", e.kind()));
                            if !self.config.reconnect {
                                return Err(e.into());
                            }
                            if pause(backoff, &mut stop).await { return Ok(()); }
                            backoff = (backoff * 2).min(self.config.backoff_max);
                            need_attach = true;
                        }
                    }
                    // A gateway that restarted may have lost who is
                    // attached: say so again (the stored cursor stays, so
                    // nothing is missed or repeated).
                    if need_attach {
                        need_attach = !self.reattach().await;
                    }
                    poll = Box::pin(self.poll());
                }
                Some(()) = tick(&mut ticker) => {
                    if self.has_session() {
                        let _ = self.send_reading().await;
                    }
                }
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(Command::SendReading(reply)) => {
                        let _ = reply.send(self.send_reading().await);
                    }
                    None => commands_open = false,
                },
            }
        }
    }

    /// One attach attempt after a failed poll: true if it succeeded.
    /// Failures are counted, and the poll loop tries again before its next
    /// poll (after a backoff if that poll fails too).
    async fn reattach(&self) -> bool {
        let res = self
            .client
            .attach(self.member.id(), &self.groups, self.config.request_timeout)
            .await;
        match res {
            Ok(Ok(_)) => {
                self.stats.record_reattach(self.credential.id);
                true
            }
            Ok(Err(reply)) => {
                self.stats
                    .error(&format!("attach.{}", reply.status.as_u16()));
                false
            }
            Err(e) => {
                self.stats.error(&format!("transport.{}", e.kind()));
                false
            }
        }
    }

    /// A long poll from the current cursor, owning what it needs.
    fn poll(&self) -> impl Future<Output = Result<super::client::Reply, ClientError>> + use<> {
        let client = self.client.clone();
        let id = self.member.id();
        let groups = self.groups.clone();
        let after = self.cursor.unwrap_or(0);
        let wait_ms = self.config.wait_ms;
        async move { client.downlink(id, &groups, after, wait_ms).await }
    }

    fn has_session(&self) -> bool {
        self.groups
            .first()
            .is_some_and(|g| self.member.session(*g).is_some())
    }

    /// Handles one downlink answer; false when the gateway refused the
    /// poll or sent what cannot be read (the caller backs off then).
    async fn handle_downlink(&mut self, reply: super::client::Reply) -> Result<bool, AgentError> {
        match reply.status {
            StatusCode::OK => {}
            StatusCode::NO_CONTENT => return Ok(true),
            StatusCode::CONFLICT
                if serde_json::from_slice::<serde_json::Value>(&reply.body)
                    .is_ok_and(|j| j["error"] == "cursor_ahead") =>
            {
                // Another spool (replaced, or another gateway's): all of
                // it is new to this member. Records handled before come
                // again: the last challenge and group message answered get
                // their stored response and ack again, older ones are
                // refused as stale.
                self.stats.error("downlink.cursor_ahead");
                self.cursor = Some(0);
                return Ok(true);
            }
            s => {
                self.stats.error(&format!("downlink.{}", s.as_u16()));
                return Ok(false);
            }
        }
        let records = match decode_records(&reply.body) {
            Ok(r) => r,
            Err(_) => {
                self.stats.error("downlink.malformed");
                return Ok(false);
            }
        };
        for r in records {
            if self.cursor.is_some_and(|c| r.cursor <= c) {
                self.stats.error("downlink.old_cursor");
                continue;
            }
            if !self.handle_record(&r).await? {
                // The response or ack it owed did not reach the gateway:
                // the cursor stays before the record, so the next poll
                // (after a backoff) brings it again and the member sends
                // the same bytes again.
                return Ok(false);
            }
            self.cursor = Some(r.cursor);
        }
        Ok(true)
    }

    fn refused(&self, e: &MemberError) {
        let cause = match e.cause() {
            ErrorCause::Malformed => "malformed",
            ErrorCause::Crypto => "crypto",
            ErrorCause::Stale => "stale",
            _ => "misuse",
        };
        self.stats.error(&format!("member.{cause}"));
    }

    /// Handles one downlink record; false when the response or ack it
    /// owes could not be handed to the gateway (503s or transport failures
    /// past the retries), so that the record is handled again.
    async fn handle_record(&mut self, r: &Record) -> Result<bool, AgentError> {
        if let Audience::Member(m) = r.audience
            && m != self.member.id()
        {
            self.stats.error("downlink.not_for_us");
            return Ok(true);
        }
        let ty = r.message.get(1).copied().and_then(MessageType::from_code);
        match ty {
            Some(MessageType::Challenge) => {
                let out = match self.member.handle_challenge(&r.message, None) {
                    Ok(Challenged::Resend(bytes)) => {
                        self.stats.bump(&self.stats.responses_resent);
                        Some(bytes)
                    }
                    Ok(Challenged::Answer(answer)) => {
                        let reading = answer
                            .read_request()
                            .map(|_| format!("meter {}: {} Wh", self.credential.id, self.readings));
                        let reading = reading.unwrap_or_default();
                        match answer.respond(
                            reading.as_bytes(),
                            &mut rand_core::UnwrapErr(getrandom::SysRng),
                        ) {
                            Ok(out) => {
                                store(&self.path, self.cursor, out.state(), self.config.fsync)
                                    .await?;
                                self.stats.bump(&self.stats.rounds_answered);
                                Some(out.persisted())
                            }
                            Err(e) => {
                                self.refused(&e);
                                None
                            }
                        }
                    }
                    Err(e) => {
                        self.refused(&e);
                        None
                    }
                };
                if let Some(bytes) = out
                    && self.send_uplink(bytes, "response").await == Sent::Failed
                {
                    return Ok(false);
                }
            }
            Some(MessageType::Confirm) => match self.member.handle_confirm(&r.message) {
                Ok(out) => {
                    store(&self.path, self.cursor, out.state(), self.config.fsync).await?;
                    out.persisted();
                    self.stats.bump(&self.stats.confirms_opened);
                }
                Err(e) => self.refused(&e),
            },
            Some(MessageType::GroupMessage) => {
                let seq = GroupMessage::decode(&r.message).ok().map(|m| m.seq);
                let id = self.credential.id;
                match self.member.handle_group_message(&r.message) {
                    Ok(out) if out.event().resent => {
                        // Applied before (a record replayed after a
                        // restart): its ack again, byte for byte.
                        let ack = out.persisted();
                        if self.send_uplink(ack, "ack").await == Sent::Failed {
                            return Ok(false);
                        }
                    }
                    Ok(out) => {
                        // Applying the update is recording it; then persist.
                        let ev = out.event();
                        let outcome = GroupMessageOutcome {
                            group: ev.group.0,
                            seq: Some(ev.seq),
                            result: Ok(()),
                        };
                        store(&self.path, self.cursor, out.state(), self.config.fsync).await?;
                        let ack = out.persisted();
                        self.stats.record_group(id, outcome);
                        self.stats.bump(&self.stats.updates_applied);
                        if self.send_uplink(ack, "ack").await == Sent::Failed {
                            return Ok(false);
                        }
                    }
                    Err(e) => {
                        // Logged before the error count that observers
                        // wait on, so whoever sees the count finds the log.
                        self.stats.record_group(
                            id,
                            GroupMessageOutcome {
                                group: r.group.0,
                                seq,
                                result: Err(e.to_string()),
                            },
                        );
                        self.refused(&e);
                    }
                }
            }
            Some(MessageType::Rekey) => match self.member.handle_rekey(&r.message) {
                Ok(out) => {
                    store(&self.path, self.cursor, out.state(), self.config.fsync).await?;
                    out.persisted();
                    self.stats.bump(&self.stats.rekeys_applied);
                }
                Err(e) => self.refused(&e),
            },
            Some(MessageType::KeyUpdate) => match self.member.handle_key_update(&r.message) {
                Ok(out) => {
                    store(&self.path, self.cursor, out.state(), self.config.fsync).await?;
                    out.persisted();
                    self.stats.bump(&self.stats.key_updates_applied);
                }
                Err(e) => self.refused(&e),
            },
            _ => self.stats.error("downlink.unexpected_type"),
        }
        Ok(true)
    }

    /// Seals and sends one reading in the first group's session.
    async fn send_reading(&mut self) -> Result<(), String> {
        let group = *self.groups.first().ok_or("member is in no group")?;
        self.readings += 1;
        let payload = format!("meter {}: {} Wh", self.credential.id, self.readings);
        let bytes = match self
            .member
            .seal_uplink(group, UplinkKind::Reading, payload.as_bytes())
        {
            Ok(out) => {
                store(&self.path, self.cursor, out.state(), self.config.fsync)
                    .await
                    .map_err(|e| e.to_string())?;
                out.persisted()
            }
            Err(e) => {
                self.refused(&e);
                return Err(e.to_string());
            }
        };
        if self.send_uplink(bytes, "reading").await == Sent::Accepted {
            Ok(())
        } else {
            Err("the gateway did not take the reading".into())
        }
    }

    /// Posts a response or uplink; retries the same bytes on 503 and
    /// transport failures (the gateway's spool is idempotent).
    async fn send_uplink(&self, bytes: Bytes, what: &str) -> Sent {
        let mut backoff = self.config.backoff_min;
        for _ in 0..UPLINK_ATTEMPTS {
            match self
                .client
                .uplink(bytes.clone(), self.config.request_timeout)
                .await
            {
                Ok(r) if r.status == StatusCode::ACCEPTED => {
                    match what {
                        "reading" => self.stats.bump(&self.stats.readings_sent),
                        "ack" => self.stats.bump(&self.stats.acks_sent),
                        _ => {}
                    }
                    return Sent::Accepted;
                }
                Ok(r) if r.status == StatusCode::SERVICE_UNAVAILABLE => {
                    self.stats.error("uplink.503");
                    let wait = r
                        .retry_after
                        .map_or(backoff, |s| Duration::from_secs(s.min(60)));
                    tokio::time::sleep(wait).await;
                }
                Ok(r) => {
                    self.stats
                        .error(&format!("uplink.{}.{}", what, r.status.as_u16()));
                    // A body that arrived too slowly (408) or a failure on
                    // the gateway's side (5xx) says nothing about the bytes:
                    // worth sending again later. Any other 4xx refuses them.
                    if r.status == StatusCode::REQUEST_TIMEOUT || r.status.is_server_error() {
                        return Sent::Failed;
                    }
                    return Sent::Refused;
                }
                Err(e) => {
                    self.stats.error(&format!("transport.{}", e.kind()));
                    if !self.config.reconnect {
                        return Sent::Failed;
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
        Sent::Failed
    }
}

/// Stores `state` (if any) with the cursor of the last record handled
/// before the current one, on the blocking pool (the fsyncs would otherwise
/// stall the runtime's few worker threads); returns once it is durable.
async fn store(
    path: &Path,
    cursor: Option<u64>,
    state: Option<&[u8]>,
    fsync: bool,
) -> Result<(), AgentError> {
    let Some(state) = state else { return Ok(()) };
    let state = zeroize::Zeroizing::new(state.to_vec());
    let path = path.to_path_buf();
    let p = path.clone();
    tokio::task::spawn_blocking(move || write_state_with(&p, cursor.unwrap_or(0), &state, fsync))
        .await
        .map_err(|_| AgentError::Storage {
            path,
            source: std::io::Error::other("state writer task failed"),
        })?
}

/// Sleeps `d` unless `stop` turns true first; true when stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// The next tick of an optional interval (pending forever without one).
async fn tick(t: &mut Option<tokio::time::Interval>) -> Option<()> {
    match t {
        Some(t) => {
            t.tick().await;
            Some(())
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_without_a_directory_syncs_the_current_one() {
        assert_eq!(dir_to_sync(Path::new("member-1.state")), Path::new("."));
        assert_eq!(dir_to_sync(Path::new("s/member-1.state")), Path::new("s"));
        assert_eq!(dir_to_sync(Path::new("/member-1.state")), Path::new("/"));
    }
}
