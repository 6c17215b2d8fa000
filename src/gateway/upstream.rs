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
//! capped at `DAPGW_RETRY_MAX_MS`. Batches go out in batch-id order, one at
//! a time (the next one is sent while the last verdict is being stored);
//! a batch stays in the spool until its final verdict (or a 4xx refusal)
//! is stored, so a retried batch is answered from the UDC's stored
//! verdict, not applied twice. The UDC downlink cursor is persisted in the
//! spool after the records it covers are stored.

use std::collections::VecDeque;
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
use tokio::time::Instant;

use super::collector::CollectorHandle;
use super::downlink::{RecordsError, parse_records};
use super::server::WIRE_CONTENT_TYPE;
use super::spool::{
    Audience, DownlinkItem, MAX_DEAD_LETTER_REASON, PendingBatch, Queued, Spool, SpoolError,
};
use super::{Attached, unix_ms, update_spool_gauges, wait_true};
use crate::admin::Readiness;
use crate::protocol::aggregator::{KeptTags, TagRequestError, answer_tag_request};
use crate::protocol::codec::DecodeError;
use crate::protocol::wire::{
    BatchKind, GatewayId, MAX_GROUP_CIPHERTEXT, Message, MessageType, Verdict, VerdictBody,
};
use crate::telemetry::{BatchOutcome, Direction, EntryKind, GatewayMetrics};
use crate::tls::ReloadableClient;

/// Spool meta key of the last UDC downlink cursor stored.
pub(crate) const CURSOR_KEY: &str = "udc_downlink_cursor";

/// `wait_ms` of the gateway's own long poll at the UDC.
pub(crate) const UPSTREAM_WAIT_MS: u64 = 25_000;

/// Largest response body taken from the UDC (a verdict for 16,384 entries
/// with confirms is about 1.2 MB; a downlink answer is bounded by the UDC).
const MAX_UPSTREAM_BODY: usize = 32 << 20;

/// Largest message in a downlink record: a group message at its cap plus
/// its fixed fields.
const MAX_DOWNLINK_MESSAGE: usize = MAX_GROUP_CIPHERTEXT + 1024;

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

    /// Whether a verdict was stored. One that was not is logged and counted
    /// (`dapgw_batches_total{outcome="unstored"}`): its batch stays sealed
    /// and is sent again after a backoff; the UDC answers it from its
    /// stored verdict.
    fn stored(&self, batch_id: u64, kind: EntryKind, res: Result<Vec<u64>, SpoolError>) -> bool {
        match res {
            Ok(_) => true,
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
    /// Sends sealed batches in batch-id order until the drain's flush is done
    /// and nothing is left.
    ///
    /// A final verdict is stored in the spool (queued with the writer) while
    /// the sender goes on: the next batches are listed and sent without
    /// waiting for that commit, and a batch whose verdict is being stored
    /// is not sent again. A verdict that fails to store leaves its batch
    /// sealed, so it is listed and sent again (the UDC answers from its
    /// stored verdict), after a backoff like the one after an upstream
    /// error (a backoff of its own, reset once a verdict is stored): a
    /// spool that keeps failing (disk error) is not hammered in a tight
    /// loop.
    pub(crate) async fn run_batches(mut self) {
        let mut backoff = Backoff::new(self.retry_max);
        let mut store_backoff = Backoff::new(self.retry_max);
        let mut storing: VecDeque<Storing> = VecDeque::new();
        let mut store_failed = false;
        loop {
            let settled = self.settle(&mut storing);
            if settled.any {
                update_spool_gauges(&self.spool, &self.metrics);
                if settled.failed {
                    store_failed = true;
                } else {
                    store_backoff.reset();
                }
            }
            if std::mem::take(&mut store_failed) {
                store_backoff.sleep().await;
            }
            let flushed = *self.flushed.borrow_and_update();
            let pending = match self.spool.pending_batches().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "listing sealed batches failed");
                    backoff.sleep().await;
                    continue;
                }
            };
            let pending: Vec<PendingBatch> = pending
                .into_iter()
                .filter(|b| !storing.iter().any(|(id, ..)| *id == b.batch_id))
                .collect();
            if pending.is_empty() {
                if let Some((batch_id, kind, done)) = storing.front_mut() {
                    // Nothing new to send: wait for the oldest verdict's
                    // commit (or a new batch), then list again.
                    let (batch_id, kind) = (*batch_id, *kind);
                    tokio::select! {
                        res = done => {
                            storing.pop_front();
                            if self.stored(batch_id, kind, res) {
                                store_backoff.reset();
                            } else {
                                store_failed = true;
                            }
                            update_spool_gauges(&self.spool, &self.metrics);
                        }
                        () = self.sealed.notified() => {}
                    }
                    continue;
                }
                if flushed {
                    return;
                }
                tokio::select! {
                    () = self.sealed.notified() => {}
                    _ = self.flushed.changed() => {}
                    () = tokio::time::sleep(RESCAN_EVERY) => {}
                }
                continue;
            }
            for batch in &pending {
                match self.send_batch(batch).await {
                    Ok(Sent::Completed(done)) => {
                        backoff.reset();
                        storing.push_back((batch.batch_id, batch_kind(&batch.bytes), done));
                    }
                    Ok(Sent::Rejected(status)) => {
                        backoff.reset();
                        tracing::error!(
                            batch = batch.batch_id,
                            %status,
                            entries = batch.entry_count,
                            "the udc refused the batch; kept as a dead letter in the spool"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(batch = batch.batch_id, error = %e, "batch not delivered; retrying");
                        backoff.sleep().await;
                        break;
                    }
                }
            }
            update_spool_gauges(&self.spool, &self.metrics);
        }
    }

    async fn send_batch(&self, batch: &PendingBatch) -> Result<Sent, UpstreamError> {
        let kind = batch_kind(&batch.bytes);
        let res = self.exchange_batch(batch).await;
        let outcome = match &res {
            Ok(Sent::Completed(_)) => BatchOutcome::Ok,
            Ok(Sent::Rejected(_)) => BatchOutcome::Rejected,
            Err(_) => BatchOutcome::Error,
        };
        self.metrics.batches.get(kind, outcome).inc();
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
                    self.request_timeout,
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
                s @ (StatusCode::BAD_REQUEST
                | StatusCode::CONFLICT
                | StatusCode::PAYLOAD_TOO_LARGE) => {
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
            let res = tokio::select! {
                () = &mut stop => return,
                r = self.link.long_poll(&path, timeout) => r,
            };
            let failed = match res {
                Ok(a) if a.status == StatusCode::OK => {
                    self.store_downlink(&a.body, &mut cursor).await.err()
                }
                Ok(a) if a.status == StatusCode::NO_CONTENT => None,
                Ok(a) => Some(UpstreamError::Status(a.status)),
                Err(e) => Some(e),
            };
            match failed {
                None => backoff.reset(),
                Some(e) => {
                    tracing::warn!(error = %e, "downlink pull failed; retrying");
                    tokio::select! { () = &mut stop => return, () = backoff.sleep() => {} }
                }
            }
        }
    }

    /// Stores the records after `cursor` and advances it. Challenges open
    /// their round in the collector before members can read them.
    async fn store_downlink(&self, body: &Bytes, cursor: &mut u64) -> Result<(), UpstreamError> {
        let records = parse_records(body, MAX_DOWNLINK_MESSAGE)?;
        let mut last = *cursor;
        let mut items = Vec::with_capacity(records.len());
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
                && let Err(e) = self.collector.expect(c.group, c.round, c.mode()).await
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
        }
        if !items.is_empty() {
            self.spool.push_downlink(items, unix_ms()).await?;
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
