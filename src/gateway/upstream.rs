//! The upstream client: `gateway -> udc` and back, outbound only.
//!
//! ```text
//! [spool] sealed batches --POST /v1/batches--> UDC --Verdict--> complete_batch (+ confirms to members)
//!                               ^  tags requested: POST /v1/tags with the kept tags
//! UDC --GET /v1/downlink (long poll)--> records --> collector.expect (challenges) --> [spool] push_downlink
//! attached groups --PUT /v1/subscriptions--> UDC
//! ```
//!
//! One HTTP/2 connection over mutual TLS (the UDC's CA pinned, the
//! gateway's client certificate) carries all three flows; it is dialled on
//! first use and again after it breaks, with jittered exponential backoff
//! capped at `DAPGW_RETRY_MAX_MS`. Batches go out in batch-id order, up to
//! [`BATCHES_IN_FLIGHT`] at once when the UDC's verdicts cannot depend on
//! the order it judges them in (`Order`), each verdict stored while the
//! sender goes on; a batch stays in the spool until its final verdict (or a 4xx refusal)
//! is stored, so a retried batch is answered from the UDC's stored
//! verdict, not applied twice. The UDC downlink cursor is persisted in the
//! spool after the records it covers are stored.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::collector::CollectorHandle;
use super::downlink::{RecordsError, parse_records};
use super::server::WIRE_CONTENT_TYPE;
use super::spool::{
    Audience, DownlinkItem, MAX_DEAD_LETTER_REASON, PendingBatch, Queued, Spool, SpoolError,
};
use super::{Attached, batch_progress, unix_ms, update_spool_gauges, wait_true};
use crate::admin::Readiness;
use crate::protocol::aggregator::{KeptTags, TagRequestError, answer_tag_request};
use crate::protocol::codec::DecodeError;
use crate::protocol::wire::{
    Batch, BatchBody, BatchKind, GatewayId, MAX_GROUP_CIPHERTEXT, Message, MessageType, SessionId,
    Verdict, VerdictBody,
};
use crate::telemetry::{BatchOutcome, Direction, EntryKind, GatewayMetrics};
use crate::tls::ReloadableClient;

/// Spool meta key of the last UDC downlink cursor stored.
pub(crate) const CURSOR_KEY: &str = "udc_downlink_cursor";

/// `wait_ms` of the gateway's own long poll at the UDC.
pub(crate) const UPSTREAM_WAIT_MS: u64 = 25_000;

/// Shortest time between the starts of two downlink pulls when the first
/// brought nothing new: a UDC that answers an empty pull at once (one that
/// ignores `wait_ms`, or is shutting down) is not polled in a tight loop.
pub(crate) const MIN_EMPTY_PULL: Duration = Duration::from_millis(500);

/// Largest response body taken from the UDC (a verdict for 16,384 entries
/// with confirms is about 1.2 MB; the UDC cuts a downlink answer at 4 MiB
/// of messages plus one record).
const MAX_UPSTREAM_BODY: usize = 32 << 20;

/// Largest message in a downlink record: a group message at its cap plus
/// its fixed fields.
const MAX_DOWNLINK_MESSAGE: usize = MAX_GROUP_CIPHERTEXT + 1024;

/// The slowest upstream link a batch's timeout allows for, in bytes per
/// second (1 Mbit/s): a batch or tag reply gets `DAPGW_UPSTREAM_TIMEOUT_MS`
/// plus the time its body takes at this rate. A sealed batch is re-sent
/// with the same bytes, so a fixed timeout shorter than its upload would
/// time it out on every attempt and hold every batch after it for good.
const MIN_UPSTREAM_RATE: u64 = 125_000;

/// The timeout of an exchange whose request body is `body_len` bytes.
fn exchange_timeout(base: Duration, body_len: usize) -> Duration {
    let bytes = u64::try_from(body_len).unwrap_or(u64::MAX);
    base.saturating_add(Duration::from_millis(
        bytes.saturating_mul(1000) / MIN_UPSTREAM_RATE,
    ))
}

/// Tag requests answered for one batch before it is retried from scratch.
const MAX_TAG_ROUNDS: usize = 4;

/// First backoff step.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// How often the batch sender re-lists the spool even without a notify.
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// Why an upstream exchange failed. Transport errors and 5xx are retried;
/// the caller decides per status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum UpstreamError {
    #[error("connecting to the udc: {0}")]
    Connect(#[source] std::io::Error),
    #[error("tls handshake with the udc: {0}")]
    Tls(#[source] std::io::Error),
    #[error("the udc did not negotiate HTTP/2 (ALPN h2)")]
    NotH2,
    #[error("http/2 with the udc: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the udc did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the udc's answer body is over {MAX_UPSTREAM_BODY} bytes or broken")]
    Body,
    #[error("the udc answered {0}")]
    Status(StatusCode),
    #[error("the udc's verdict does not decode: {0}")]
    BadVerdict(DecodeError),
    #[error("the udc's verdict names another batch")]
    WrongVerdict,
    #[error("the udc asked for tags {0} times for one batch")]
    TooManyTagRounds(usize),
    #[error("answering the tag request: {0}")]
    Tags(#[from] TagRequestError),
    #[error("the udc's downlink body: {0}")]
    Records(#[from] RecordsError),
    #[error("{0}")]
    Spool(#[from] SpoolError),
}

/// Where the UDC is: from `DAPGW_UPSTREAM_URL`.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    authority: String,
}

impl Target {
    /// Parses `https://host[:port][/]`.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| "expected an https:// URL such as https://udc.example:9443".to_string())?;
        if uri.scheme_str() != Some("https") {
            return Err("the scheme must be https".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("the URL must have no path or query".into());
        }
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_string())?;
        if authority.as_str().contains('@') {
            return Err("the URL must not carry credentials".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| "the host is not a valid DNS name or IP address".to_string())?;
        Ok(Target {
            port: authority.port_u16().unwrap_or(443),
            host,
            server_name,
            authority: authority.as_str().to_string(),
        })
    }
}

/// A response from the UDC with its body read.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

/// The one HTTP/2 connection to the UDC, dialled on demand.
pub(crate) struct Link {
    target: Target,
    tls: ReloadableClient,
    timeout: Duration,
    metrics: GatewayMetrics,
    readiness: Readiness,
    sender: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    /// Bumped for every new connection (subscriptions are re-sent).
    generation: watch::Sender<u64>,
}

impl Link {
    pub(crate) fn new(
        target: Target,
        tls: ReloadableClient,
        timeout: Duration,
        metrics: GatewayMetrics,
        readiness: Readiness,
    ) -> Self {
        metrics.upstream_up.set(0);
        Link {
            target,
            tls,
            timeout,
            metrics,
            readiness,
            sender: Mutex::new(None),
            generation: watch::channel(0).0,
        }
    }

    fn set_up(&self, up: bool) {
        self.metrics.upstream_up.set(i64::from(up));
        self.readiness.set_upstream(up);
    }

    /// The live connection's sender, dialling a new connection if needed.
    async fn sender(self: &Arc<Self>) -> Result<http2::SendRequest<Full<Bytes>>, UpstreamError> {
        let mut cached = self.sender.lock().await;
        if let Some(s) = cached.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *cached = None;
        let s = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?;
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                self.set_up(false);
                return Err(e);
            }
        };
        *cached = Some(s.clone());
        Ok(s)
    }

    async fn connect(self: &Arc<Self>) -> Result<http2::SendRequest<Full<Bytes>>, UpstreamError> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(UpstreamError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connector()
            .connect(t.server_name.clone(), tcp)
            .await
            .map_err(UpstreamError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(UpstreamError::NotH2);
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        let mut generation = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        self.set_up(true);
        tracing::info!(udc = %t.authority, "upstream link up");
        let link = Arc::downgrade(self);
        tokio::spawn(async move {
            let res = conn.await;
            // Only the current connection's end takes the link down.
            if let Some(link) = link.upgrade()
                && *link.generation.borrow() == generation
            {
                link.set_up(false);
                match res {
                    Ok(()) => tracing::warn!("upstream link closed"),
                    Err(e) => tracing::warn!(error = %e, "upstream link failed"),
                }
            }
        });
        Ok(sender)
    }

    /// One request with the body read, within `timeout` (dialling
    /// included).
    pub(crate) async fn request(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        let start = Instant::now();
        let res = self.bounded(method, path, body, timeout).await;
        self.metrics
            .upstream_request_duration
            .observe(start.elapsed().as_secs_f64());
        res
    }

    /// A downlink long poll: [`request`](Self::request) without the
    /// duration histogram, which would otherwise be made of the UDC's
    /// wait time (up to 25 s per poll) and say nothing about latency.
    pub(crate) async fn long_poll(
        self: &Arc<Self>,
        path: &str,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        self.bounded(Method::GET, path, None, timeout).await
    }

    async fn bounded(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
        timeout: Duration,
    ) -> Result<Answer, UpstreamError> {
        let res = tokio::time::timeout(timeout, self.exchange(method, path, body)).await;
        let res = res.map_err(|_| UpstreamError::Timeout(timeout))?;
        if let Ok(a) = &res {
            self.metrics
                .upstream_bytes
                .get(Direction::Received)
                .inc_by(a.body.len() as u64);
        }
        res
    }

    async fn exchange(
        self: &Arc<Self>,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Answer, UpstreamError> {
        let mut sender = self.sender().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.target.authority));
        let payload = match body {
            Some((ct, b)) => {
                req = req.header(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                b
            }
            None => Bytes::new(),
        };
        self.metrics
            .upstream_bytes
            .get(Direction::Sent)
            .inc_by(payload.len() as u64);
        let req = req.body(Full::new(payload))?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_UPSTREAM_BODY)
            .collect()
            .await
            .map_err(|_| UpstreamError::Body)?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            body,
        })
    }
}

/// Whether `body` is the UDC's JSON error, `{"error": "<code>", ...}`
/// (docs/udc.md), as opposed to a page from something in between.
fn udc_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_string))
}

/// Jittered exponential backoff: each wait is drawn from the upper half of
/// a window that doubles from [`BACKOFF_MIN`] up to the cap.
struct Backoff {
    window: Duration,
    max: Duration,
    rng: RandomState,
    n: u64,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            window: BACKOFF_MIN.min(max),
            max,
            rng: RandomState::new(),
            n: 0,
        }
    }

    fn reset(&mut self) {
        self.window = BACKOFF_MIN.min(self.max);
    }

    fn next_delay(&mut self) -> Duration {
        self.n = self.n.wrapping_add(1);
        let w = self.window;
        self.window = (w * 2).min(self.max);
        let half = w / 2;
        let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(self.rng.hash_one(self.n) % span)
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

/// The three upstream flows; cheap to clone (one clone per task).
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) link: Arc<Link>,
    pub(crate) spool: Spool,
    pub(crate) collector: CollectorHandle,
    pub(crate) attached: Arc<Attached>,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) gateway_id: GatewayId,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_max: Duration,
    /// Notified by the collector after each sealed batch.
    pub(crate) sealed: Arc<Notify>,
    /// True once the drain started: stop pulling downlink and subscribing.
    pub(crate) drain: watch::Receiver<bool>,
    /// True once the collector was flushed: the batch sender stops when the
    /// spool holds no more sealed batches.
    pub(crate) flushed: watch::Receiver<bool>,
}

/// The kind byte of an encoded batch (after the header, gateway id and
/// batch id), without decoding the entries.
fn batch_kind(bytes: &[u8]) -> EntryKind {
    let kind = bytes
        .get(2)
        .and_then(|&n| bytes.get(2 + 1 + usize::from(n) + 8))
        .copied()
        .and_then(BatchKind::from_code);
    match kind {
        Some(BatchKind::Uplinks) => EntryKind::Uplink,
        _ => EntryKind::Response,
    }
}

/// Batches on the wire at once. With one, a batch sealed while the previous
/// one was being judged waited for that verdict (most of the relay latency
/// tail, docs/gateway.md "Known limits"); more than a few only adds work
/// the UDC judges one batch at a time anyway (measured in docs/gateway.md).
pub(crate) const BATCHES_IN_FLIGHT: usize = 4;

/// The UDC's uplink replay window per session, in counters (protocol.md:
/// "replay window (64) per session, advanced only by accepted entries").
/// A member's uplinks in batches judged in either order are all accepted
/// only while their counters span less than this.
const REPLAY_WINDOW: u64 = 64;

/// A final verdict being stored: its batch id and kind, and the commit.
type Storing = (u64, EntryKind, Queued<Vec<u64>>);

/// What the verdict commits settled so far said.
#[derive(Clone, Copy, Default)]
struct Settled {
    /// Some commit was answered.
    any: bool,
    /// Some commit failed: its batch is sent again, after a backoff.
    failed: bool,
}

impl Settled {
    fn add(&mut self, ok: bool) {
        self.any = true;
        self.failed |= !ok;
    }
}

/// One member's uplinks under one session in an uplink batch: the counter
/// range they span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    member: u64,
    sid: SessionId,
    lo: u64,
    hi: u64,
}

/// What of a batch decides whether the UDC may judge it in either order
/// with another one, with the same verdicts: the batch sender puts a batch
/// on the wire next to those in flight only if it commutes with each.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Order {
    /// A round's responses, in this group. Responses never touch a
    /// current session (a new one stays pending until its first uplink,
    /// which the member can only send after the confirm, that is after
    /// this batch's verdict), so they commute with uplinks.
    Responses(u32),
    /// Uplinks of a group, one [`Run`] per member and session, by member.
    Uplinks { group: u32, runs: Vec<Run> },
    /// A batch that does not decode (the UDC will refuse it): sent alone.
    Alone,
}

impl Order {
    fn of(bytes: &Bytes) -> Order {
        let Ok(batch) = Batch::decode(bytes) else {
            return Order::Alone;
        };
        match batch.body {
            BatchBody::Responses { .. } => Order::Responses(batch.group.0),
            BatchBody::Uplinks { entries } => {
                // Entries are sorted by (id, sid, ctr): one run each.
                let mut runs: Vec<Run> = Vec::new();
                for e in &entries {
                    match runs.last_mut() {
                        Some(r) if r.member == e.id.0 && r.sid == e.sid => {
                            r.lo = r.lo.min(e.ctr);
                            r.hi = r.hi.max(e.ctr);
                        }
                        _ => runs.push(Run {
                            member: e.id.0,
                            sid: e.sid,
                            lo: e.ctr,
                            hi: e.ctr,
                        }),
                    }
                }
                Order::Uplinks {
                    group: batch.group.0,
                    runs,
                }
            }
        }
    }

    /// Whether the UDC reaches the same verdicts judging `self` and `other`
    /// in either order. Not for: two response batches of one group (a
    /// round's follow-up batch of alternatives goes after the main one);
    /// uplinks of a member under two sessions (the UDC drops the older
    /// session when the newer one is first used, so the older one's
    /// uplinks judged after it would be lost); a member's counters
    /// spanning the replay window or more (the lower ones judged last
    /// would be too old).
    fn commutes_with(&self, other: &Order) -> bool {
        match (self, other) {
            (Order::Alone, _) | (_, Order::Alone) => false,
            (Order::Responses(a), Order::Responses(b)) => a != b,
            (Order::Responses(_), Order::Uplinks { .. })
            | (Order::Uplinks { .. }, Order::Responses(_)) => true,
            (Order::Uplinks { group: a, runs: x }, Order::Uplinks { group: b, runs: y }) => {
                a != b || runs_commute(x, y)
            }
        }
    }
}

/// Two uplink batches of one group commute when every member in both uses
/// one session in both and its counters there span less than the window.
fn runs_commute(x: &[Run], y: &[Run]) -> bool {
    // Per member of `x`: its session (None once it has two), lowest and
    // highest counter.
    let mut of: HashMap<u64, (Option<SessionId>, u64, u64)> = HashMap::with_capacity(x.len());
    for r in x {
        of.entry(r.member)
            .and_modify(|m| {
                m.0 = m.0.filter(|sid| *sid == r.sid);
                m.1 = m.1.min(r.lo);
                m.2 = m.2.max(r.hi);
            })
            .or_insert((Some(r.sid), r.lo, r.hi));
    }
    y.iter().all(|r| match of.get(&r.member) {
        None => true,
        Some(&(sid, lo, hi)) => sid == Some(r.sid) && hi.max(r.hi) - lo.min(r.lo) < REPLAY_WINDOW,
    })
}

/// A batch on the wire: the task exchanging it and what orders it.
struct Flying {
    task: tokio::task::Id,
    batch_id: u64,
    order: Order,
}

/// What a batch exchange task returns: the batch id, its kind, the result.
type Exchanged = (u64, EntryKind, Result<Sent, UpstreamError>);

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Starts a hold of `backoff`'s next delay unless one is running: several
/// exchanges failing together (the UDC down) back off once, not once each.
fn hold_after(hold: &mut Option<Instant>, backoff: &mut Backoff) {
    let now = Instant::now();
    if hold.is_none_or(|t| t <= now) {
        *hold = Some(now + backoff.next_delay());
    }
}

impl Upstream {
    /// Drops the verdict commits that have been answered (see
    /// [`Upstream::stored`]).
    fn settle(&self, storing: &mut VecDeque<Storing>) -> Settled {
        let mut out = Settled::default();
        storing.retain_mut(|(batch_id, kind, done)| match done.try_take() {
            Some(res) => {
                out.add(self.stored(*batch_id, *kind, res));
                false
            }
            None => true,
        });
        out
    }

    /// Whether a verdict was stored; counts the exchange in
    /// `dapgw_batches_total` as `ok`, or as `unstored` when it was not
    /// stored: then it is logged, its batch stays sealed and is sent again
    /// after a backoff, and the UDC answers it from its stored verdict.
    fn stored(&self, batch_id: u64, kind: EntryKind, res: Result<Vec<u64>, SpoolError>) -> bool {
        match res {
            Ok(_) => {
                self.metrics.batches.get(kind, BatchOutcome::Ok).inc();
                batch_progress(&self.metrics);
                true
            }
            Err(e) => {
                self.metrics.batches.get(kind, BatchOutcome::Unstored).inc();
                tracing::warn!(batch = batch_id, error = %e, "verdict not stored; the batch is sent again after a backoff");
                false
            }
        }
    }
}

/// How a batch exchange ended without an error to retry.
enum Sent {
    /// The final verdict is being stored (queued in the spool).
    Completed(Queued<Vec<u64>>),
    Rejected(StatusCode),
}

impl Upstream {
    /// Sends sealed batches until the drain's flush is done and nothing is
    /// left, up to [`BATCHES_IN_FLIGHT`] at once.
    ///
    /// Sealed batches are listed in batch-id order and put on the wire in
    /// that order, each on a task of its own, while fewer than
    /// [`BATCHES_IN_FLIGHT`] are in flight and the next one commutes with
    /// every batch in flight ([`Order`]); a batch that does not waits, and
    /// so do the ones after it. Each exchange ends on its own: the UDC
    /// files verdicts by batch id, in any order.
    ///
    /// A final verdict is stored in the spool (queued with the writer)
    /// while the sender goes on, and a batch whose verdict is being stored
    /// is not sent again. An exchange that fails (transport, timeout, 5xx)
    /// leaves its batch sealed: nothing is sent until a backoff has passed,
    /// then the lowest pending batch alone, until an exchange succeeds. A verdict that fails to store
    /// leaves its batch sealed too, so it is listed and sent again (the UDC
    /// answers from its stored verdict), after a backoff of its own (reset
    /// once a verdict is stored): a spool that keeps failing (disk error)
    /// is not hammered in a tight loop.
    pub(crate) async fn run_batches(mut self) {
        let mut backoff = Backoff::new(self.retry_max);
        let mut store_backoff = Backoff::new(self.retry_max);
        let mut storing: VecDeque<Storing> = VecDeque::new();
        let mut flight: JoinSet<Exchanged> = JoinSet::new();
        let mut flying: Vec<Flying> = Vec::new();
        // The order of each listed batch not yet sent, by id (a sealed
        // batch's bytes never change): computed once, from bytes read once.
        let mut orders: std::collections::HashMap<u64, Order> = std::collections::HashMap::new();
        // Nothing is put on the wire before this (a backoff).
        let mut hold: Option<Instant> = None;
        let mut flush_open = true;
        // After a failed exchange only one batch is on the wire until an
        // exchange succeeds: a failing UDC gets one request per backoff.
        let mut probing = false;
        loop {
            let settled = self.settle(&mut storing);
            if settled.any {
                update_spool_gauges(&self.spool, &self.metrics);
                if settled.failed {
                    hold_after(&mut hold, &mut store_backoff);
                } else {
                    store_backoff.reset();
                }
            }
            let flushed = *self.flushed.borrow_and_update();
            let held = hold.filter(|t| *t > Instant::now());
            // Whether sealed batches may be waiting unsent.
            let mut unsent = true;
            let limit = if probing { 1 } else { BATCHES_IN_FLIGHT };
            if held.is_none() && flying.len() < limit {
                // Those in flight or being stored are listed too, and
                // skipped; one more than fits tells whether any wait.
                let listed = storing.len() + flying.len() + limit + 1;
                match self.spool.pending_batch_ids(listed).await {
                    Ok(ids) => {
                        // A full list may have left batches unlisted.
                        unsent = ids.len() == listed;
                        // Orders of batches no longer listed (their
                        // verdicts stored) are forgotten.
                        orders.retain(|id, _| ids.contains(id));
                        for id in ids {
                            if storing.iter().any(|(s, ..)| *s == id)
                                || flying.iter().any(|f| f.batch_id == id)
                            {
                                continue;
                            }
                            if flying.len() >= limit {
                                unsent = true;
                                break;
                            }
                            // A batch's bytes are read once per pass, and
                            // not at all when its known order keeps it
                            // back: a pass holds one batch it does not send.
                            let known = orders.get(&id).cloned();
                            if known
                                .as_ref()
                                .is_some_and(|o| !flying.iter().all(|f| o.commutes_with(&f.order)))
                            {
                                unsent = true;
                                break;
                            }
                            let batch = match self.spool.pending_batch(id).await {
                                Ok(Some(batch)) => batch,
                                // Its verdict was stored since.
                                Ok(None) => continue,
                                Err(e) => {
                                    tracing::error!(batch_id = id, error = %e, "reading a sealed batch failed");
                                    hold_after(&mut hold, &mut backoff);
                                    // Not sent: a drain must wait for it.
                                    unsent = true;
                                    break;
                                }
                            };
                            let order = match known {
                                Some(order) => order,
                                None => {
                                    let order = Order::of(&batch.bytes);
                                    orders.insert(id, order.clone());
                                    if !flying.iter().all(|f| order.commutes_with(&f.order)) {
                                        unsent = true;
                                        break;
                                    }
                                    order
                                }
                            };
                            let up = self.clone();
                            let task = flight
                                .spawn(async move {
                                    let kind = batch_kind(&batch.bytes);
                                    (batch.batch_id, kind, up.send_batch(&batch).await)
                                })
                                .id();
                            flying.push(Flying {
                                task,
                                batch_id: id,
                                order,
                            });
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "listing sealed batches failed");
                        hold_after(&mut hold, &mut backoff);
                        continue;
                    }
                }
            }
            if flushed && !unsent && flying.is_empty() && storing.is_empty() {
                return;
            }
            tokio::select! {
                joined = flight.join_next_with_id(), if !flying.is_empty() => {
                    if let Some(ok) =
                        self.exchanged(joined, &mut flying, &mut storing, &mut hold, &mut backoff)
                    {
                        probing = !ok;
                    }
                }
                res = async {
                    match storing.front_mut() {
                        Some((.., done)) => done.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((batch_id, kind, _)) = storing.pop_front() {
                        if self.stored(batch_id, kind, res) {
                            store_backoff.reset();
                        } else {
                            hold_after(&mut hold, &mut store_backoff);
                        }
                        update_spool_gauges(&self.spool, &self.metrics);
                    }
                }
                () = self.sealed.notified() => {}
                res = self.flushed.changed(), if flush_open && !flushed => {
                    flush_open = res.is_ok();
                }
                () = sleep_until(held) => {}
                () = tokio::time::sleep(RESCAN_EVERY) => {}
            }
        }
    }

    /// One exchange task ended: its batch leaves the flight; a final
    /// verdict is being stored, an error holds the sender for a backoff.
    /// Returns whether the exchange succeeded (None: no task ended).
    fn exchanged(
        &self,
        joined: Option<Result<(tokio::task::Id, Exchanged), tokio::task::JoinError>>,
        flying: &mut Vec<Flying>,
        storing: &mut VecDeque<Storing>,
        hold: &mut Option<Instant>,
        backoff: &mut Backoff,
    ) -> Option<bool> {
        let (task, (batch_id, kind, res)) = match joined {
            None => return None,
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                // Its batch stays sealed and is listed again.
                flying.retain(|f| f.task != e.id());
                tracing::error!(error = %e, "a batch exchange task failed; retrying");
                hold_after(hold, backoff);
                return Some(false);
            }
        };
        flying.retain(|f| f.task != task);
        match res {
            Ok(Sent::Completed(done)) => {
                backoff.reset();
                storing.push_back((batch_id, kind, done));
                Some(true)
            }
            Ok(Sent::Rejected(status)) => {
                backoff.reset();
                batch_progress(&self.metrics);
                tracing::error!(
                    batch = batch_id,
                    %status,
                    "the udc refused the batch; kept as a dead letter in the spool"
                );
                update_spool_gauges(&self.spool, &self.metrics);
                Some(true)
            }
            Err(e) => {
                tracing::warn!(batch = batch_id, error = %e, "batch not delivered; retrying");
                hold_after(hold, backoff);
                Some(false)
            }
        }
    }

    /// One batch exchange, counted in `dapgw_batches_total` unless its
    /// final verdict is being stored (then [`Upstream::stored`] counts it).
    async fn send_batch(&self, batch: &PendingBatch) -> Result<Sent, UpstreamError> {
        let kind = batch_kind(&batch.bytes);
        let res = self.exchange_batch(batch).await;
        let outcome = match &res {
            Ok(Sent::Completed(_)) => None,
            Ok(Sent::Rejected(_)) => Some(BatchOutcome::Rejected),
            Err(_) => Some(BatchOutcome::Error),
        };
        if let Some(outcome) = outcome {
            self.metrics.batches.get(kind, outcome).inc();
        }
        res
    }

    async fn exchange_batch(&self, batch: &PendingBatch) -> Result<Sent, UpstreamError> {
        let hash: [u8; 32] = Sha256::digest(&batch.bytes).into();
        let mut path = "/v1/batches";
        let mut body = batch.bytes.clone();
        for _ in 0..=MAX_TAG_ROUNDS {
            let answer = self
                .link
                .request(
                    Method::POST,
                    path,
                    Some((WIRE_CONTENT_TYPE, body.clone())),
                    exchange_timeout(self.request_timeout, body.len()),
                )
                .await?;
            match answer.status {
                StatusCode::OK => {}
                // The UDC no longer has the localization: send the batch
                // again; it answers from its stored state.
                StatusCode::NOT_FOUND if path == "/v1/tags" => {
                    path = "/v1/batches";
                    body = batch.bytes.clone();
                    continue;
                }
                // Too large for a body limit on the way (the UDC's
                // `DAPGW_MAX_BODY_BYTES`, or a proxy's): a setting, not the
                // batch's content, so the batch is held and retried until
                // the limit is raised (a sealed batch keeps its bytes)
                // rather than taken out of the pipeline with entries the
                // members were told were accepted.
                StatusCode::PAYLOAD_TOO_LARGE => {
                    tracing::error!(
                        batch = batch.batch_id,
                        bytes = body.len(),
                        udc = udc_refusal(&answer.body),
                        "batch over a body limit on the way to the UDC (the UDC's \
                         DAPGW_MAX_BODY_BYTES, or a proxy's): raise that limit; the \
                         batch is held and sent again with the same bytes, and the \
                         later ones wait behind it"
                    );
                    return Err(UpstreamError::Status(StatusCode::PAYLOAD_TOO_LARGE));
                }
                // Only the UDC's own refusal (its JSON error body) is
                // final: the same status from a proxy in between (an HTML
                // page) says nothing about the batch, so it is retried like
                // any failure rather than taking the entries out of the
                // pipeline.
                s @ (StatusCode::BAD_REQUEST | StatusCode::CONFLICT)
                    if !udc_refusal(&answer.body) =>
                {
                    tracing::warn!(
                        batch = batch.batch_id,
                        status = %s,
                        "refused without the UDC's error body (a proxy in between?); retrying"
                    );
                    return Err(UpstreamError::Status(s));
                }
                s @ (StatusCode::BAD_REQUEST | StatusCode::CONFLICT) => {
                    tracing::error!(
                        batch = batch.batch_id,
                        status = %s,
                        reason = %String::from_utf8_lossy(&answer.body[..answer.body.len().min(512)]),
                        "udc refused"
                    );
                    // Kept as a dead letter for the operator; the batch
                    // leaves the pipeline so later ones are not blocked.
                    let reason = String::from_utf8_lossy(
                        &answer.body[..answer.body.len().min(MAX_DEAD_LETTER_REASON)],
                    );
                    self.spool
                        .dead_letter_batch(batch.batch_id, s.as_u16(), &reason, unix_ms())
                        .await?;
                    return Ok(Sent::Rejected(s));
                }
                s => return Err(UpstreamError::Status(s)),
            }
            let verdict = Verdict::decode(&answer.body).map_err(UpstreamError::BadVerdict)?;
            if verdict.gateway_id != self.gateway_id
                || verdict.batch_id != batch.batch_id
                || verdict.batch_hash != hash
            {
                return Err(UpstreamError::WrongVerdict);
            }
            match &verdict.body {
                // One outcome per entry: a final verdict that says less
                // answers for entries it does not name, and completing the
                // batch would delete them unjudged.
                VerdictBody::Final { outcomes, .. }
                    if outcomes.len() != batch.entry_count as usize =>
                {
                    return Err(UpstreamError::WrongVerdict);
                }
                VerdictBody::Final { confirms, .. } => {
                    let items = confirms
                        .iter()
                        .map(|c| DownlinkItem {
                            audience: Audience::Member(c.id.0),
                            kind: MessageType::Confirm.code(),
                            bytes: c.to_bytes(),
                        })
                        .collect();
                    let done =
                        self.spool
                            .complete_batch(batch.batch_id, &answer.body, items, unix_ms());
                    return Ok(Sent::Completed(done));
                }
                VerdictBody::TagsRequested { chunks } => {
                    self.metrics.tag_requests.inc();
                    tracing::info!(
                        batch = batch.batch_id,
                        chunks = chunks.len(),
                        "udc asked for individual tags"
                    );
                    let tags = self.spool.batch_tags(batch.batch_id).await?;
                    let kept = KeptTags::from_sealed(&batch.bytes, tags)?;
                    let reply = answer_tag_request(&kept, &verdict)?;
                    path = "/v1/tags";
                    body = reply.to_bytes();
                }
            }
        }
        Err(UpstreamError::TooManyTagRounds(MAX_TAG_ROUNDS))
    }

    /// Pulls the UDC downlink into the spool until the drain starts.
    pub(crate) async fn run_downlink(self) {
        let mut backoff = Backoff::new(self.retry_max);
        let stop = wait_true(self.drain.clone());
        tokio::pin!(stop);
        let mut cursor = loop {
            match self.spool.get_meta(CURSOR_KEY).await {
                Ok(v) => {
                    break v
                        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                        .map_or(0, u64::from_be_bytes);
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the downlink cursor failed");
                    tokio::select! { () = &mut stop => return, () = backoff.sleep() => {} }
                }
            }
        };
        let timeout = self.request_timeout + Duration::from_millis(UPSTREAM_WAIT_MS);
        loop {
            let path = format!("/v1/downlink?after={cursor}&wait_ms={UPSTREAM_WAIT_MS}");
            let started = Instant::now();
            let res = tokio::select! {
                () = &mut stop => return,
                r = self.link.long_poll(&path, timeout) => r,
            };
            let before = cursor;
            let failed = match res {
                Ok(a) if a.status == StatusCode::OK => {
                    self.store_downlink(&a.body, &mut cursor).await.err()
                }
                Ok(a) if a.status == StatusCode::NO_CONTENT => None,
                Ok(a) => Some(UpstreamError::Status(a.status)),
                Err(e) => Some(e),
            };
            match failed {
                None => {
                    backoff.reset();
                    if cursor == before {
                        // Nothing new: the next pull starts no sooner than
                        // MIN_EMPTY_PULL after this one did.
                        tokio::select! {
                            () = &mut stop => return,
                            () = tokio::time::sleep_until(started + MIN_EMPTY_PULL) => {}
                        }
                    }
                }
                Some(e) => {
                    tracing::warn!(error = %e, "downlink pull failed; retrying");
                    tokio::select! { () = &mut stop => return, () = backoff.sleep() => {} }
                }
            }
        }
    }

    /// Stores the records after `cursor` and advances it. Challenges open
    /// their round in the collector before members can read them.
    ///
    /// A page the spool has no room for as a whole is stored in part: a
    /// prefix that fits (the page halved until one does), the cursor moved
    /// to its end. Refused whole, it would be asked for again from the same
    /// cursor and refused again, for good when it is larger than the whole
    /// spool (`DAPGW_SPOOL_MAX_BYTES` may be 1 MiB; a UDC answer holds up
    /// to 4 MiB of messages).
    async fn store_downlink(&self, body: &Bytes, cursor: &mut u64) -> Result<(), UpstreamError> {
        let records = parse_records(body, MAX_DOWNLINK_MESSAGE)?;
        let mut last = *cursor;
        let mut items = Vec::with_capacity(records.len());
        let mut item_cursors = Vec::with_capacity(records.len());
        for r in records {
            // Cursors strictly increase; anything else was stored already.
            if r.cursor <= last {
                continue;
            }
            last = r.cursor;
            let msg = match Message::decode(&r.message) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(cursor = r.cursor, error = %e, "udc downlink record does not decode; skipped");
                    continue;
                }
            };
            if let Message::Challenge(c) = &msg
                && let Err(e) = self
                    .collector
                    .expect(c.group, c.round, c.mode(), c.not_after)
                    .await
            {
                tracing::warn!(group = c.group.0, round = c.round, error = %e, "round not opened");
            }
            let audience = if r.audience == 2 {
                Audience::Member(r.member)
            } else {
                Audience::Group(r.group)
            };
            items.push(DownlinkItem {
                audience,
                kind: msg.message_type().code(),
                bytes: r.message,
            });
            item_cursors.push(r.cursor);
        }
        let mut n = items.len();
        while n > 0 {
            match self
                .spool
                .push_downlink(items[..n].to_vec(), unix_ms())
                .await
            {
                Ok(_) => break,
                Err(SpoolError::Full { .. }) if n > 1 => n = n.div_ceil(2),
                Err(e) => return Err(e.into()),
            }
        }
        if n < items.len() {
            tracing::info!(
                stored = n,
                records = items.len(),
                "the spool took part of a downlink page; the rest is pulled again"
            );
            // Up to the last record stored: what follows comes again with
            // the next pull (records skipped after it are skipped again).
            last = item_cursors[n - 1];
        }
        if last != *cursor {
            self.spool.set_meta(CURSOR_KEY, &last.to_be_bytes()).await?;
            *cursor = last;
        }
        Ok(())
    }

    /// Keeps the UDC's subscription equal to the attached members' groups,
    /// re-sending it on every new connection.
    pub(crate) async fn run_subscriptions(self) {
        let mut backoff = Backoff::new(self.retry_max);
        let mut groups_rx = self.attached.subscribe_groups();
        let mut gen_rx = self.link.generation.subscribe();
        let stop = wait_true(self.drain.clone());
        tokio::pin!(stop);
        let mut sent: Option<(Vec<u32>, u64)> = None;
        loop {
            let groups = groups_rx.borrow_and_update().clone();
            let generation = *gen_rx.borrow_and_update();
            if sent.as_ref() != Some(&(groups.clone(), generation)) {
                let body = serde_json::json!({ "groups": groups }).to_string();
                let res = tokio::select! {
                    () = &mut stop => return,
                    r = self.link.request(
                        Method::PUT,
                        "/v1/subscriptions",
                        Some(("application/json", Bytes::from(body))),
                        self.request_timeout,
                    ) => r,
                };
                match res {
                    Ok(a) if a.status.is_success() => {
                        backoff.reset();
                        // The PUT may itself have dialled the connection.
                        sent = Some((groups, *gen_rx.borrow_and_update()));
                        continue;
                    }
                    Ok(a) => tracing::warn!(status = %a.status, "subscription refused; retrying"),
                    Err(e) => tracing::warn!(error = %e, "subscription not sent; retrying"),
                }
                tokio::select! { () = &mut stop => return, () = backoff.sleep() => {} }
                continue;
            }
            tokio::select! {
                () = &mut stop => return,
                _ = groups_rx.changed() => {}
                _ = gen_rx.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's timeout grows with its body at 1 Mbit/s: a 16,384-entry
    /// batch of psk-ecdhe entries with full payloads (about 18 MB) gets 30 s
    /// plus 142 s, an empty body the configured timeout alone.
    #[test]
    fn an_exchange_timeout_allows_for_the_upload() {
        let base = Duration::from_secs(30);
        assert_eq!(exchange_timeout(base, 0), base);
        assert_eq!(
            exchange_timeout(base, 125_000),
            base + Duration::from_secs(1)
        );
        assert_eq!(
            exchange_timeout(base, 17_800_000),
            base + Duration::from_millis(142_400)
        );
        assert_eq!(exchange_timeout(Duration::MAX, usize::MAX), Duration::MAX);
    }

    #[test]
    fn target_parses_https_only() {
        let t = Target::parse("https://udc.example:9443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("udc.example", 9443));
        let t = Target::parse("https://[::1]:9443/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9443));
        assert_eq!(Target::parse("https://127.0.0.1").unwrap().port, 443);
        for bad in [
            "http://udc:1",
            "udc:1",
            "https://u:p@udc:1",
            "https://udc:1/x",
            "https://udc:1/?a=b",
            "",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let mut last_window = Duration::ZERO;
        for _ in 0..20 {
            let w = b.window;
            let d = b.next_delay();
            assert!(d >= w / 2 && d <= w, "{d:?} outside [{:?}, {w:?}]", w / 2);
            assert!(w >= last_window);
            last_window = w;
        }
        assert_eq!(b.window, Duration::from_secs(1));
        b.reset();
        assert_eq!(b.window, BACKOFF_MIN);
    }

    fn run(member: u64, sid: u8, lo: u64, hi: u64) -> Run {
        Run {
            member,
            sid: SessionId([sid; 8]),
            lo,
            hi,
        }
    }

    fn uplinks(group: u32, runs: &[Run]) -> Order {
        Order::Uplinks {
            group,
            runs: runs.to_vec(),
        }
    }

    #[test]
    fn order_reads_each_members_session_and_counter_range() {
        use crate::protocol::wire::{GroupId, MemberId, UplinkEntry, UplinkKind};
        let entry = |id: u64, sid: u8, ctr: u64| UplinkEntry {
            id: MemberId(id),
            sid: SessionId([sid; 8]),
            kind: UplinkKind::Reading,
            ctr,
            c: Bytes::from_static(b"c"),
        };
        let entries = vec![
            entry(1, 1, 3),
            entry(1, 1, 9),
            entry(1, 2, 1),
            entry(4, 1, 7),
        ];
        let bytes = Batch {
            gateway_id: GatewayId::new("gw-1").unwrap(),
            batch_id: 5,
            group: GroupId(9),
            chunk_size: 4,
            body: BatchBody::Uplinks { entries },
            aggregates: vec![[0; 16]],
        }
        .to_bytes();
        assert_eq!(
            Order::of(&bytes),
            uplinks(9, &[run(1, 1, 3, 9), run(1, 2, 1, 1), run(4, 1, 7, 7)])
        );
        assert_eq!(Order::of(&Bytes::from_static(b"\x01\x04")), Order::Alone);
    }

    #[test]
    fn batches_commute_only_when_the_udc_judges_them_alike_in_either_order() {
        let a = uplinks(1, &[run(1, 1, 10, 12), run(2, 1, 5, 5)]);
        // Other members, or the same members in the same session close by.
        assert!(a.commutes_with(&uplinks(1, &[run(3, 1, 1, 1)])));
        assert!(a.commutes_with(&uplinks(1, &[run(1, 1, 13, 73), run(2, 1, 4, 4)])));
        // Another group, or a round's responses.
        assert!(a.commutes_with(&uplinks(2, &[run(1, 2, 1, 1)])));
        assert!(a.commutes_with(&Order::Responses(1)));
        assert!(Order::Responses(1).commutes_with(&a));
        assert!(Order::Responses(1).commutes_with(&Order::Responses(2)));
        // A member's new session: first used later, it would drop the old
        // one before the old one's uplinks were judged.
        assert!(!a.commutes_with(&uplinks(1, &[run(1, 2, 1, 1)])));
        assert!(!uplinks(1, &[run(1, 2, 1, 1)]).commutes_with(&a));
        // Counters spanning the replay window: the lowest judged last
        // would be too old.
        assert!(!a.commutes_with(&uplinks(1, &[run(1, 1, 74, 74)])));
        assert!(!uplinks(1, &[run(2, 1, 69, 69)]).commutes_with(&a));
        // A member with two sessions in one batch commutes with nothing
        // that names it.
        let two = uplinks(1, &[run(1, 1, 1, 1), run(1, 2, 1, 1)]);
        assert!(!two.commutes_with(&uplinks(1, &[run(1, 2, 2, 2)])));
        assert!(!uplinks(1, &[run(1, 2, 2, 2)]).commutes_with(&two));
        // Two response batches of one group, and undecodable batches.
        assert!(!Order::Responses(1).commutes_with(&Order::Responses(1)));
        assert!(!Order::Alone.commutes_with(&a));
        assert!(!a.commutes_with(&Order::Alone));
    }

    #[test]
    fn batch_kind_reads_the_kind_byte() {
        // header, gateway id "g", batch id, kind 2
        let mut b = vec![1, 4, 1, b'g'];
        b.extend_from_slice(&7u64.to_be_bytes());
        b.push(2);
        assert_eq!(batch_kind(&b), EntryKind::Uplink);
        b[12] = 1;
        assert_eq!(batch_kind(&b), EntryKind::Response);
        assert_eq!(batch_kind(&[1]), EntryKind::Response);
    }
}
