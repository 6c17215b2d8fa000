//! The member-facing HTTPS server: the entry of `member -> gateway`.
//!
//! ```text
//! TCP accept (connection cap, per-source cap) -> TLS 1.3 (handshake timeout,
//!   optional client cert) -> crate::limits (head timeout, idle timeout)
//!   -> hyper auto (HTTP/1.1 or HTTP/2)
//!   -> POST /v1/attach | POST /v1/uplink | GET /v1/downlink
//! ```
//!
//! `POST /v1/uplink` answers 202 only after the spool has made the entry
//! durable and the collector has taken it. Every refusal is a JSON body
//! `{"error": "<code>", "reason": "<sentence>"}`; malformed input is 400 (413
//! for a body over `DAPGW_MAX_BODY_BYTES`) and is counted in
//! `dapgw_malformed_requests_total`. Nothing a member sends can panic the
//! gateway: bodies are decoded by the wire codec, which returns typed errors.
//!
//! Slow or flooding clients cannot starve others: connections are capped
//! (`DAPGW_MAX_CONNECTIONS`, waiting in the kernel backlog beyond it) and
//! so are those of one source (`DAPGW_MAX_CONNECTIONS_PER_IP`, closed at
//! accept beyond it), the TLS handshake and each request head (HTTP/1.1 or
//! HTTP/2) must arrive within `DAPGW_HEADER_TIMEOUT_MS` of its first byte, a
//! request body within the same time, a connection with no request for
//! `DAPGW_IDLE_TIMEOUT_MS` is closed however many bytes (PINGs) it moves,
//! and one HTTP/2 connection carries at most [`MAX_STREAMS`] requests at
//! once. See [`crate::limits`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::collector::{CollectorHandle, MemberMessage, SubmitError};
use super::spool::{EntryId, NewEntry, Spool, SpoolError, StreamKey};
use super::{Attached, MAX_MEMBER_GROUPS, downlink, update_spool_gauges, wait_true};
use crate::admin::Readiness;
use crate::config::GatewayConfig;
use crate::limits::{Activity, CLOSE_GRACE, ConnLimits, Expired, SourceSlot, SourceSlots, Watched};
use crate::protocol::aggregator::{CollectError, Collected};
use crate::protocol::codec::DecodeError;
use crate::telemetry::{
    Direction, EntryKind, GatewayMetrics, LimitReason, MalformedReason, MemberEndpoint,
    RequestOutcome,
};
use crate::tls::{self, ReloadableServer};

/// Most concurrent requests on one HTTP/2 connection.
pub(crate) const MAX_STREAMS: u32 = 64;

/// HTTP/2 flow-control window of a member connection and of each of its
/// streams: what a peer may send that the gateway has not read yet. Larger
/// bodies still arrive, a window at a time, as the handler reads them.
const H2_WINDOW: u32 = 64 * 1024;

/// Content type of wire messages.
pub(crate) const WIRE_CONTENT_TYPE: &str = "application/vnd.dapgw";

/// Content type of a downlink body (records, see docs/gateway.md).
pub(crate) const RECORDS_CONTENT_TYPE: &str = "application/vnd.dapgw.records";

/// Most audiences (a member, plus each group it names) the open long polls
/// of one member connection watch together. Each costs a wake-up
/// registration in the spool for as long as its poll waits, so without a
/// bound one connection's 64 streams of 256 groups each would pin about a
/// megabyte, and the connection cap a few gigabytes. A concentrator
/// polling for 64 members in 15 groups each fits.
pub(crate) const POLL_WATCH_BUDGET: usize = 1024;

/// What the open long polls of one connection watch, against
/// [`POLL_WATCH_BUDGET`].
#[derive(Clone, Debug, Default)]
struct PollBudget(Arc<std::sync::atomic::AtomicUsize>);

impl PollBudget {
    /// Takes `n` audiences for one poll, or `None` when they would pass
    /// the budget; they come back when the guard drops.
    fn take(&self, n: usize) -> Option<PollBudgetGuard> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= POLL_WATCH_BUDGET)
            })
            .ok()?;
        Some(PollBudgetGuard(self.clone(), n))
    }
}

/// Audiences a running poll holds of its connection's [`PollBudget`].
struct PollBudgetGuard(PollBudget, usize);

impl Drop for PollBudgetGuard {
    fn drop(&mut self) {
        (self.0)
            .0
            .fetch_sub(self.1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Largest `/v1/attach` body: a member id and [`MAX_MEMBER_GROUPS`] groups
/// fit many times over.
const MAX_ATTACH_BODY: usize = 16 * 1024;

/// The member-facing limits, from the config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_body: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Limits {
    pub(crate) fn from_config(c: &GatewayConfig) -> Self {
        Limits {
            max_connections: usize::try_from(c.max_connections)
                .unwrap_or(usize::MAX)
                .max(1),
            max_connections_per_ip: usize::try_from(c.max_connections_per_ip)
                .unwrap_or(usize::MAX)
                .max(1),
            max_body: usize::try_from(c.max_body_bytes.get()).unwrap_or(usize::MAX),
            header_timeout: c.header_timeout(),
            idle_timeout: c.idle_timeout(),
        }
    }

    /// The connection part, shared with the UDC's listener.
    fn conn(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            max_per_source: self.max_connections_per_ip,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// What every request handler needs.
pub(crate) struct Ctx {
    pub(crate) spool: Spool,
    pub(crate) collector: CollectorHandle,
    pub(crate) attached: Arc<Attached>,
    /// The attach registry's writer ([`run_attach_writer`]).
    pub(crate) attach_jobs: tokio::sync::mpsc::Sender<AttachJob>,
    pub(crate) metrics: GatewayMetrics,
    pub(crate) readiness: Readiness,
    pub(crate) limits: Limits,
    /// Members present client certificates whose identity is their id.
    pub(crate) member_certs: bool,
    /// Turns true when the drain starts.
    pub(crate) drain: watch::Receiver<bool>,
    /// `DAPGW_MISBEHAVE`: demonstration-only tampering (off in production).
    pub(crate) misbehave: Option<super::misbehave::Misbehave>,
}

/// Accepts members until the drain starts, then stops accepting and waits
/// for the open connections to finish (the caller bounds the wait).
pub(crate) async fn serve(listener: TcpListener, tls: ReloadableServer, ctx: Arc<Ctx>) {
    let limits = ctx.limits.conn();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let sources = SourceSlots::new(limits.max_per_source);
    let stop = wait_true(ctx.drain.clone());
    tokio::pin!(stop);
    let mut conns = JoinSet::new();
    loop {
        // Take a slot before accepting: beyond the cap, members wait in the
        // kernel's backlog instead of costing a TLS handshake.
        let permit = tokio::select! {
            () = &mut stop => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // One source at its cap: closed before any TLS work, and its
                // global slot is free again at once.
                let Some(source) = sources.try_take(peer.ip()) else {
                    ctx.metrics
                        .connections_closed
                        .get(LimitReason::PerIpLimit)
                        .inc();
                    tracing::debug!(%peer, "member source at its connection cap");
                    drop(tcp);
                    continue;
                };
                conns.spawn(connection(
                    tcp,
                    peer,
                    tls.acceptor(),
                    ctx.clone(),
                    (permit, source),
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Decrements `dapgw_members_connected` when the connection ends.
struct Connected(GatewayMetrics);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.members_connected.dec();
    }
}

/// Where a member request came from: the peer's IP as 16 bytes (IPv4 as
/// IPv4-mapped IPv6). The spool lets one source hold one message per slot,
/// and (by its IPv4 address or IPv6 /64) only its share of the spool.
#[derive(Clone, Copy, Debug)]
struct Source([u8; 16]);

impl Source {
    fn of(ip: std::net::IpAddr) -> Self {
        let v6 = match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        Source(v6.octets())
    }
}

async fn connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<Ctx>,
    _slots: (OwnedSemaphorePermit, SourceSlot),
) {
    ctx.metrics.members_connected.inc();
    let _connected = Connected(ctx.metrics.clone());
    let _ = tcp.set_nodelay(true);
    let limits = ctx.limits.conn();
    let closed = &ctx.metrics.connections_closed;
    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "member tls handshake failed");
            return;
        }
        Err(_) => {
            closed.get(LimitReason::HandshakeTimeout).inc();
            tracing::debug!("member tls handshake timed out");
            return;
        }
    };
    let identity: Option<Arc<str>> = tls::peer_identity(tls.get_ref().1).map(Arc::from);
    let activity = Activity::new();
    let io = Watched::new(tls, activity.clone());
    let svc_ctx = ctx.clone();
    let svc_activity = activity.clone();
    let source = Source::of(peer.ip());
    let budget = PollBudget::default();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(source);
        req.extensions_mut().insert(budget.clone());
        let ctx = svc_ctx.clone();
        let identity = identity.clone();
        let guard = svc_activity.request();
        async move {
            let resp = handle(&ctx, identity.as_deref(), req).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Request heads are timed by the watchdog below for both protocols
    // (hyper's HTTP/1 timer would also close idle keep-alive connections).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    // PINGs from the gateway find dead peers under a long poll; a peer's
    // PINGs keep nothing open (idle counts requests, not bytes).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(16 * 1024)
        // Member bodies are small (`DAPGW_MAX_BODY_BYTES`, 16 KiB by
        // default): a peer may have at most this much unread in flight
        // per stream and per connection (hyper's defaults are 1 MiB).
        .initial_stream_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let stop = wait_true(ctx.drain.clone());
    tokio::pin!(stop);
    let mut closing: Option<Instant> = None;
    loop {
        let close_at = closing.unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "member connection ended with an error");
                }
                return;
            }
            () = &mut stop, if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now() + limits.idle_timeout);
            }
            why = activity.expired(&limits), if closing.is_none() => match why {
                Expired::Idle => {
                    closed.get(LimitReason::IdleTimeout).inc();
                    tracing::debug!(%peer, "closing idle member connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
                Expired::Header => {
                    closed.get(LimitReason::HeaderTimeout).inc();
                    tracing::debug!(%peer, "member request head timed out");
                    if activity.is_h2() {
                        return;
                    }
                    // HTTP/1.1: a 408, then the end of the stream.
                    activity.cut();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            },
            () = tokio::time::sleep_until(close_at), if closing.is_some() => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A refused request: status, a short code, a human reason, and how it
/// counts.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    reason: String,
    outcome: RequestOutcome,
    malformed: Option<MalformedReason>,
    retry_after: Option<u64>,
}

impl Refusal {
    fn malformed(
        status: StatusCode,
        code: &'static str,
        why: MalformedReason,
        reason: impl Into<String>,
    ) -> Self {
        Refusal {
            status,
            code,
            reason: reason.into(),
            outcome: RequestOutcome::Malformed,
            malformed: Some(why),
            retry_after: None,
        }
    }

    fn overloaded(code: &'static str, reason: impl Into<String>, retry_after: u64) -> Self {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code,
            reason: reason.into(),
            outcome: RequestOutcome::Overloaded,
            malformed: None,
            retry_after: Some(retry_after),
        }
    }

    fn error(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            reason: reason.into(),
            outcome: RequestOutcome::Error,
            malformed: None,
            retry_after: None,
        }
    }

    fn forbidden(reason: impl Into<String>) -> Self {
        Refusal {
            status: StatusCode::FORBIDDEN,
            code: "identity",
            reason: reason.into(),
            outcome: RequestOutcome::Malformed,
            malformed: None,
            retry_after: None,
        }
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(
        status,
        "application/json",
        Bytes::from(value.to_string().into_bytes()),
    )
}

async fn handle(ctx: &Arc<Ctx>, identity: Option<&str>, req: Request<Incoming>) -> Reply {
    // Wall time, not tokio's (possibly paused) clock: this is a latency.
    let started = std::time::Instant::now();
    let mut endpoint = match req.uri().path() {
        "/v1/attach" => MemberEndpoint::Attach,
        "/v1/uplink" => MemberEndpoint::Uplink,
        "/v1/downlink" => MemberEndpoint::Poll,
        _ => MemberEndpoint::Other,
    };
    let res = match endpoint {
        MemberEndpoint::Attach => attach(ctx, identity, req).await,
        MemberEndpoint::Uplink => uplink(ctx, identity, req, &mut endpoint).await,
        MemberEndpoint::Poll => poll(ctx, identity, req).await,
        _ => Err(Refusal::malformed(
            StatusCode::NOT_FOUND,
            "not_found",
            MalformedReason::Method,
            "no such endpoint; the gateway serves /v1/attach, /v1/uplink and /v1/downlink",
        )),
    };
    let m = &ctx.metrics;
    let resp = match res {
        Ok(r) => {
            m.member_requests.get(endpoint, RequestOutcome::Ok).inc();
            r
        }
        Err(refusal) => {
            m.member_requests.get(endpoint, refusal.outcome).inc();
            if let Some(why) = refusal.malformed {
                m.malformed_requests.get(endpoint, why).inc();
            }
            let mut r = json(
                refusal.status,
                &serde_json::json!({"error": refusal.code, "reason": refusal.reason}),
            );
            if let Some(secs) = refusal.retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
                let allow = if endpoint == MemberEndpoint::Poll {
                    "GET"
                } else {
                    "POST"
                };
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            r
        }
    };
    let sent = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    m.member_bytes.get(Direction::Sent).inc_by(sent);
    if let Some(timed) = endpoint.timed() {
        m.member_request_duration
            .get(timed)
            .observe(started.elapsed().as_secs_f64());
    }
    resp
}

fn require_method(req: &Request<Incoming>, want: Method) -> Result<(), Refusal> {
    if req.method() == want {
        return Ok(());
    }
    Err(Refusal::malformed(
        StatusCode::METHOD_NOT_ALLOWED,
        "method",
        MalformedReason::Method,
        format!("use {want} on this endpoint"),
    ))
}

/// Accepts a missing content type or one of `allowed` (parameters ignored).
fn require_content_type(req: &Request<Incoming>, allowed: &[&str]) -> Result<(), Refusal> {
    let Some(ct) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .ok()
        .and_then(|s| s.split(';').next())
        .map(|s| s.trim().to_ascii_lowercase());
    match essence {
        Some(e) if allowed.contains(&e.as_str()) => Ok(()),
        _ => Err(Refusal::malformed(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            MalformedReason::ContentType,
            format!("content-type must be {}", allowed.join(" or ")),
        )),
    }
}

/// Reads the whole body: at most `max` bytes, within the header timeout.
async fn read_body(ctx: &Ctx, req: Request<Incoming>, max: usize) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::malformed(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            MalformedReason::TooLarge,
            format!("the body exceeds {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), max).collect();
    let collected = match tokio::time::timeout(ctx.limits.header_timeout, body).await {
        Err(_) => {
            return Err(Refusal::malformed(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                MalformedReason::Timeout,
                "the body did not arrive in time",
            ));
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(Refusal::malformed(
                StatusCode::BAD_REQUEST,
                "body",
                MalformedReason::Decode,
                "the body could not be read",
            ));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    ctx.metrics
        .member_bytes
        .get(Direction::Received)
        .inc_by(collected.len() as u64);
    Ok(collected)
}

/// With member certificates, the certificate must name `member` (its first
/// DNS SAN or CN is the member id in decimal).
fn check_identity(ctx: &Ctx, identity: Option<&str>, member: u64) -> Result<(), Refusal> {
    if !ctx.member_certs {
        return Ok(());
    }
    match identity.and_then(|s| s.parse::<u64>().ok()) {
        Some(id) if id == member => Ok(()),
        Some(_) => Err(Refusal::forbidden(
            "the client certificate belongs to another member",
        )),
        None => Err(Refusal::forbidden(
            "a client certificate naming the member id is required",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachBody {
    member: u64,
    groups: Vec<u32>,
}

async fn attach(
    ctx: &Arc<Ctx>,
    identity: Option<&str>,
    req: Request<Incoming>,
) -> Result<Reply, Refusal> {
    require_method(&req, Method::POST)?;
    require_content_type(&req, &["application/json"])?;
    let req_source = req.extensions().get::<Source>().copied();
    let body = read_body(ctx, req, MAX_ATTACH_BODY.min(ctx.limits.max_body)).await?;
    let parsed: AttachBody = serde_json::from_slice(&body).map_err(|e| {
        Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "bad_json",
            MalformedReason::Decode,
            format!(
                "expected {{\"member\": <u64>, \"groups\": [<u32>...]}}: {}",
                json_problem(&e)
            ),
        )
    })?;
    if parsed.groups.is_empty() || parsed.groups.len() > MAX_MEMBER_GROUPS {
        return Err(Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "groups",
            MalformedReason::TooLarge,
            format!("name 1 to {MAX_MEMBER_GROUPS} groups"),
        ));
    }
    check_identity(ctx, identity, parsed.member)?;
    // The share is counted by the peer's address (IPv4) or /64 (IPv6),
    // as the connection cap and the spool's share are.
    let source = req_source.map(|s| crate::limits::source_key(std::net::IpAddr::from(s.0)));
    // The same groups again only refresh the member's last-heard time,
    // unless the member expired in between (then it is written as new).
    let now = ctx.attached.now_ms();
    let durable = ctx
        .attached
        .touch_if_durable(parsed.member, &parsed.groups, source, now)
        .map_err(|e| attach_full(&ctx.metrics, e))?;
    if !durable {
        // A change (or a repeat of one still being written) goes to the
        // registry's single writer, which answers once it is durable. A
        // client that goes away meanwhile leaves its change queued: the
        // spool and the registry cannot disagree over it.
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = AttachJob {
            member: parsed.member,
            groups: super::normalize_groups(&parsed.groups),
            source,
            reply,
        };
        ctx.attach_jobs
            .send(job)
            .await
            .map_err(|_| spool_unavailable())?;
        answer.await.map_err(|_| spool_unavailable())??;
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"cursor": ctx.spool.last_cursor()}),
    ))
}

/// Attach changes queued for the registry's writer before attaches wait to
/// queue.
pub(crate) const ATTACH_QUEUE: usize = 4096;

/// Most attach changes the writer stages and writes together.
const ATTACH_GROUP: usize = 256;

/// An attach change for the registry's writer ([`run_attach_writer`]).
#[derive(Debug)]
pub(crate) struct AttachJob {
    member: u64,
    groups: Vec<u32>,
    source: Option<super::SourceKey>,
    reply: tokio::sync::oneshot::Sender<Result<(), Refusal>>,
}

/// The attach registry's single writer. It takes the attach changes queued
/// since its last write (up to [`ATTACH_GROUP`]), stages each in order
/// ([`Attached::stage`]: the caps and shares checked against everything
/// staged before it), writes the changed ones to the spool in one request,
/// settles them (kept, or undone if the write failed), and only then
/// answers each. One writer, so concurrent attaches cannot together pass a
/// cap or a share and the spool never keeps a row the registry refused;
/// grouped, so a fleet attaching at once costs a commit per group of
/// attaches, not per member. Ends when the endpoint's senders are gone.
pub(crate) async fn run_attach_writer(
    mut jobs: tokio::sync::mpsc::Receiver<AttachJob>,
    spool: Spool,
    attached: Arc<Attached>,
    metrics: GatewayMetrics,
) {
    use super::Staged;
    while let Some(first) = jobs.recv().await {
        let mut group = vec![first];
        while group.len() < ATTACH_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let now = attached.now_ms();
        let mut staged = Vec::new();
        let mut waiting = Vec::new();
        for job in group {
            match attached.stage(job.member, &job.groups, job.source, now) {
                Ok(Staged::Unchanged) => {
                    let _ = job.reply.send(Ok(()));
                }
                Ok(Staged::Repeat) => waiting.push(job.reply),
                Ok(Staged::Changed(undo)) => {
                    staged.push(undo);
                    waiting.push(job.reply);
                }
                Err(e) => {
                    let _ = job.reply.send(Err(attach_full(&metrics, e)));
                }
            }
        }
        let written = if staged.is_empty() {
            Ok(())
        } else {
            let rows = staged
                .iter()
                .map(|u| {
                    let (member, groups, source) = u.row();
                    (member, groups.to_vec(), source)
                })
                .collect();
            spool.set_attached_many(rows, now).await
        };
        if let Err(e) = &written {
            tracing::error!(error = %e, members = staged.len(), "attach not persisted");
        }
        let written = written.is_ok();
        attached.settle(written, staged);
        metrics
            .attached_members
            .set(i64::try_from(attached.len()).unwrap_or(i64::MAX));
        for reply in waiting {
            let _ = reply.send(if written {
                Ok(())
            } else {
                Err(spool_unavailable())
            });
        }
    }
}

/// An attach refused by a cap of the registry or a source's share of it:
/// 503 with its code, counted by reason.
fn attach_full(metrics: &GatewayMetrics, e: super::AttachFull) -> Refusal {
    metrics.attach_rejected.get(e.reason()).inc();
    Refusal::overloaded(e.code(), e.to_string(), 60)
}

/// Where a JSON body went wrong, without echoing it.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io | Category::Eof => "the body ended early",
        Category::Syntax => "the body is not JSON",
        Category::Data => "a field is missing, unknown or of the wrong type",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

async fn uplink(
    ctx: &Arc<Ctx>,
    identity: Option<&str>,
    req: Request<Incoming>,
    endpoint: &mut MemberEndpoint,
) -> Result<Reply, Refusal> {
    // An uplink's linger counts from here (CollectorHandle::collect_since).
    let arrived = tokio::time::Instant::now();
    require_method(&req, Method::POST)?;
    let source = req.extensions().get::<Source>().copied();
    require_content_type(&req, &[WIRE_CONTENT_TYPE, "application/octet-stream"])?;
    let body = read_body(ctx, req, ctx.limits.max_body).await?;
    let msg = MemberMessage::decode(&body).map_err(decode_refusal)?;
    let (body, msg) = match (&ctx.misbehave, msg) {
        (Some(m), MemberMessage::Response(r)) => match m.tamper(&r) {
            Some((altered, invented)) => {
                tracing::warn!(
                    altered = altered.id.0,
                    invented = invented.id.0,
                    group = altered.group.0,
                    round = altered.round,
                    "misbehave: tampered"
                );
                relay_invented(ctx, invented).await;
                (altered.to_bytes(), MemberMessage::Response(altered))
            }
            None => (body, MemberMessage::Response(r)),
        },
        (_, msg) => (body, msg),
    };
    let (stream, kind, sort_key) = match &msg {
        MemberMessage::Response(r) => {
            *endpoint = MemberEndpoint::Response;
            let stream = StreamKey::Round {
                group: r.group.0,
                round: r.round,
            };
            (stream, EntryKind::Response, r.id.0.to_be_bytes().to_vec())
        }
        MemberMessage::Uplink(u) => {
            let mut key = Vec::with_capacity(16);
            key.extend_from_slice(&u.sid.0);
            key.extend_from_slice(&u.ctr.to_be_bytes());
            (
                StreamKey::Uplink { group: u.group.0 },
                EntryKind::Uplink,
                key,
            )
        }
    };
    let member = msg.member().0;
    check_identity(ctx, identity, member)?;
    ctx.attached.touch(member, ctx.attached.now_ms());
    let entry = NewEntry {
        stream,
        member,
        sort_key,
        bytes: body,
    };
    // The append and the hand-off to the collector run as a task of their
    // own: a client that resets its HTTP/2 stream (or closes the
    // connection) drops this handler, and an entry committed to the spool
    // but never handed over would sit there, counted against the bounds,
    // until a restart.
    let task_ctx = Arc::clone(ctx);
    let source = source.map(|s| s.0);
    let (id, collected) =
        detached(
            async move { store_and_collect(&task_ctx, entry, kind, source, msg, arrived).await },
        )
        .await?;
    match collected {
        Ok(_) => {
            // The hot path: formatted directly, not through a JSON value.
            Ok(reply(
                StatusCode::ACCEPTED,
                "application/json",
                Bytes::from(format!("{{\"entry\":{}}}", id.get())),
            ))
        }
        Err(SubmitError::Refused(e)) => {
            tracing::debug!(member, error = %e, "member entry refused");
            Err(collect_refusal(e))
        }
        Err(SubmitError::Discarded) => Err(Refusal::overloaded(
            "resend",
            "an identical earlier submission was refused meanwhile and nothing is stored; send it again",
            1,
        )),
        Err(_) => Err(Refusal::overloaded(
            "draining",
            "the gateway is shutting down; retry with another gateway or later",
            1,
        )),
    }
}

/// Runs `work` as a task of its own and awaits it: a client that goes away
/// drops its request's handler, and must not cut `work` off between a
/// spool write and what has to follow it.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, Refusal>> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::spawn(work).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "member request task failed");
        Err(spool_unavailable())
    })
}

/// 503 `spool_unavailable` for a spool write that failed.
fn spool_unavailable() -> Refusal {
    Refusal::overloaded("spool_unavailable", "the spool failed; retry", 1)
}

/// 503 `spool_unavailable` for a downlink the spool could not read.
fn downlink_unavailable() -> Refusal {
    Refusal {
        retry_after: Some(1),
        ..Refusal::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "spool_unavailable",
            "the downlink could not be read; retry later",
        )
    }
}

/// Refuses a downlink cursor past every cursor this gateway's spool has
/// handed out (409 `cursor_ahead`): it came from a spool that was replaced
/// or from another gateway, and waiting for this spool to pass it would
/// starve the member of everything stored meanwhile.
async fn check_cursor(ctx: &Ctx, after: u64) -> Result<(), Refusal> {
    let committed = ctx.spool.committed_cursor().await.map_err(|e| {
        tracing::error!(error = %e, "downlink cursor not read");
        downlink_unavailable()
    })?;
    if after <= committed {
        return Ok(());
    }
    // Retry-After: a client that does not know this answer and polls
    // again at once is slowed down.
    Err(Refusal {
        retry_after: Some(1),
        ..Refusal::error(
            StatusCode::CONFLICT,
            "cursor_ahead",
            format!(
                "cursor {after} is past this gateway's downlink, which ends at {committed}: it \
             came from a replaced spool or another gateway; read again from 0 (records \
             already handled come again: the last ones get their stored answers, older ones are refused as stale)"
            ),
        )
    })
}

/// Stores `entry` durably and hands `msg` to the collector: the id, and
/// what the collector made of it. `arrived` is when the request reached
/// the gateway (an uplink's linger counts from then).
async fn store_and_collect(
    ctx: &Ctx,
    entry: NewEntry,
    kind: EntryKind,
    source: Option<[u8; 16]>,
    msg: MemberMessage,
    arrived: tokio::time::Instant,
) -> Result<(EntryId, Result<Collected, SubmitError>), Refusal> {
    let appended = match ctx.spool.append_entry(entry, source).await {
        Ok(appended) => {
            ctx.readiness.set_spool(true);
            appended
        }
        Err(e) => return Err(spool_refusal(ctx, e)),
    };
    // A re-send of a message already sealed into a batch is on its way: it
    // is stored, so 202, and it must not be collected again (the
    // aggregator forgets a message some time after its batch is cut, and
    // after a restart; collected anew, it would be cut into a second batch
    // that can never be sealed).
    let collected = if appended.batched {
        Ok(Collected::Duplicate)
    } else {
        ctx.collector.collect_since(msg, appended.id, arrived).await
    };
    update_spool_gauges(&ctx.spool, &ctx.metrics);
    // Counted here, so an entry whose client went away is counted too.
    if let Ok(Collected::New) = collected {
        ctx.metrics.uplink_entries.get(kind).inc();
    }
    Ok((appended.id, collected))
}

/// Spools and collects a response the misbehaving gateway made up, as if
/// its member had posted it (see [`super::misbehave`]).
async fn relay_invented(ctx: &Ctx, r: crate::protocol::wire::Response) {
    let entry = NewEntry {
        stream: StreamKey::Round {
            group: r.group.0,
            round: r.round,
        },
        member: r.id.0,
        sort_key: r.id.0.to_be_bytes().to_vec(),
        bytes: r.to_bytes(),
    };
    let member = r.id;
    match ctx.spool.append(entry).await {
        Ok(id) => {
            if let Err(e) = ctx.collector.collect(MemberMessage::Response(r), id).await {
                tracing::warn!(member = %member, error = %e, "misbehave: invented response refused");
            }
        }
        Err(e) => {
            tracing::warn!(member = %member, error = %e, "misbehave: could not spool the invented response")
        }
    }
}

fn decode_refusal(e: DecodeError) -> Refusal {
    match e {
        DecodeError::WrongType(_) => Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "wrong_type",
            MalformedReason::WrongType,
            format!("{e}; this endpoint takes a Response (0x02) or an Uplink (0x03)"),
        ),
        DecodeError::TooLong(_) => Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "too_long",
            MalformedReason::TooLarge,
            e.to_string(),
        ),
        _ => Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "decode",
            MalformedReason::Decode,
            e.to_string(),
        ),
    }
}

fn spool_refusal(ctx: &Ctx, e: SpoolError) -> Refusal {
    match e {
        SpoolError::Full { retry_after } => {
            ctx.metrics.spool_rejected.inc();
            Refusal::overloaded(
                "spool_full",
                "the gateway's spool is full while the UDC catches up; retry later",
                retry_after.as_secs_f64().ceil().max(1.0) as u64,
            )
        }
        SpoolError::SourceFull { retry_after } => {
            ctx.metrics.spool_source_rejected.inc();
            Refusal::overloaded(
                "source_share",
                "this source (address or IPv6 /64) holds its share of the gateway's spool \
                 until the UDC answers for its messages; other sources are still served; retry later",
                retry_after.as_secs_f64().ceil().max(1.0) as u64,
            )
        }
        SpoolError::Conflict => Refusal::malformed(
            StatusCode::CONFLICT,
            "conflict",
            MalformedReason::Duplicate,
            "too many different messages are already held for this round or uplink counter",
        ),
        SpoolError::TooLarge { .. } => Refusal::malformed(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            MalformedReason::TooLarge,
            "the message can never fit the gateway's spool",
        ),
        other => {
            if matches!(other, SpoolError::Storage(_) | SpoolError::Closed) {
                ctx.readiness.set_spool(false);
            }
            tracing::error!(error = %other, "spool append failed");
            Refusal {
                retry_after: Some(1),
                ..Refusal::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "spool_unavailable",
                    "the gateway could not store the message; retry later",
                )
            }
        }
    }
}

fn collect_refusal(e: CollectError) -> Refusal {
    match e {
        CollectError::Malformed(d) => decode_refusal(d),
        CollectError::UnknownRound { .. } | CollectError::RoundClosed { .. } => Refusal::malformed(
            StatusCode::CONFLICT,
            "round_not_open",
            MalformedReason::Stale,
            e.to_string(),
        ),
        CollectError::ModeMismatch { .. } => Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "mode_mismatch",
            MalformedReason::Decode,
            e.to_string(),
        ),
        CollectError::ConflictingResponse { .. } | CollectError::ConflictingUplink { .. } => {
            Refusal::malformed(
                StatusCode::CONFLICT,
                "conflict",
                MalformedReason::Duplicate,
                e.to_string(),
            )
        }
        // A fixed sentence: the counts behind it are the gateway's own.
        CollectError::Full(_) | CollectError::TooManyCollectors(_) => Refusal::overloaded(
            "busy",
            "the gateway holds as much as it may right now; retry",
            1,
        ),
    }
}

/// The query of `GET /v1/downlink`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PollQuery {
    pub(crate) member: u64,
    pub(crate) groups: Vec<u32>,
    pub(crate) after: u64,
    pub(crate) wait: Duration,
}

/// Parses the downlink query strictly: unknown or repeated parameters,
/// non-numbers and too many groups are errors naming the parameter.
pub(crate) fn parse_poll_query(q: &str) -> Result<PollQuery, String> {
    let (mut member, mut groups, mut after, mut wait) = (None, None, None, None);
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dup = |name: &str| format!("parameter {name} is repeated");
        match k {
            "member" => {
                let m = v
                    .parse::<u64>()
                    .map_err(|_| "member must be an unsigned 64-bit integer".to_string())?;
                if member.replace(m).is_some() {
                    return Err(dup("member"));
                }
            }
            "groups" => {
                let mut list = Vec::new();
                for g in v.split(',').filter(|g| !g.is_empty()) {
                    if list.len() == MAX_MEMBER_GROUPS {
                        return Err(format!("at most {MAX_MEMBER_GROUPS} groups"));
                    }
                    list.push(g.parse::<u32>().map_err(|_| {
                        "groups must be comma-separated unsigned 32-bit integers".to_string()
                    })?);
                }
                if groups.replace(list).is_some() {
                    return Err(dup("groups"));
                }
            }
            "after" => {
                let a = v
                    .parse::<u64>()
                    .map_err(|_| "after must be an unsigned 64-bit cursor".to_string())?;
                if after.replace(a).is_some() {
                    return Err(dup("after"));
                }
            }
            "wait_ms" => {
                let w = v
                    .parse::<u64>()
                    .map_err(|_| "wait_ms must be a whole number of milliseconds".to_string())?;
                if wait.replace(w).is_some() {
                    return Err(dup("wait_ms"));
                }
            }
            _ => {
                return Err("unknown parameter; use member, groups, after and wait_ms".to_string());
            }
        }
    }
    let member = member.ok_or_else(|| "member is required".to_string())?;
    let wait = Duration::from_millis(
        wait.unwrap_or(downlink::DEFAULT_WAIT_MS)
            .min(downlink::MAX_WAIT_MS),
    );
    Ok(PollQuery {
        member,
        groups: groups.unwrap_or_default(),
        after: after.unwrap_or(0),
        wait,
    })
}

async fn poll(ctx: &Ctx, identity: Option<&str>, req: Request<Incoming>) -> Result<Reply, Refusal> {
    require_method(&req, Method::GET)?;
    let q = parse_poll_query(req.uri().query().unwrap_or("")).map_err(|reason| {
        Refusal::malformed(
            StatusCode::BAD_REQUEST,
            "query",
            MalformedReason::Decode,
            reason,
        )
    })?;
    let budget = req.extensions().get::<PollBudget>().cloned();
    // A GET's body is not read: dropped now, not held (with the HTTP/2
    // window's worth of buffered bytes) for the length of the long poll.
    drop(req);
    check_identity(ctx, identity, q.member)?;
    // Heard from, even when refused below.
    ctx.attached.touch(q.member, ctx.attached.now_ms());
    let watched = super::normalize_groups(&q.groups).len() + 1;
    let _held = match budget.map(|b| b.take(watched)) {
        Some(None) => {
            return Err(Refusal {
                retry_after: Some(1),
                outcome: RequestOutcome::Overloaded,
                ..Refusal::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "poll_budget",
                    format!(
                        "the long polls open on this connection watch {POLL_WATCH_BUDGET} \
                         audiences (a member and each of its groups) together at most; \
                         wait for one to return, or poll on another connection"
                    ),
                )
            });
        }
        Some(Some(held)) => Some(held),
        None => None,
    };
    if q.after > ctx.spool.last_cursor() {
        check_cursor(ctx, q.after).await?;
    }
    let records = downlink::poll(&ctx.spool, &q, ctx.drain.clone())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "downlink read failed");
            downlink_unavailable()
        })?;
    if records.is_empty() {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        return Ok(r);
    }
    if ctx.member_certs && q.after > 0 {
        // The member proved it holds its items up to `after`: drop them.
        downlink::ack(ctx.spool.clone(), q.member, q.after);
    }
    let body = downlink::encode_records(q.member, &records, &ctx.metrics);
    Ok(reply(StatusCode::OK, RECORDS_CONTENT_TYPE, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_query_is_strict() {
        let q = parse_poll_query("member=7&groups=1,2&after=9&wait_ms=100").unwrap();
        assert_eq!(
            q,
            PollQuery {
                member: 7,
                groups: vec![1, 2],
                after: 9,
                wait: Duration::from_millis(100)
            }
        );
        let q = parse_poll_query("member=7").unwrap();
        assert_eq!(q.wait, Duration::from_millis(downlink::DEFAULT_WAIT_MS));
        assert_eq!(
            parse_poll_query("member=7&wait_ms=999999999").unwrap().wait,
            Duration::from_millis(downlink::MAX_WAIT_MS)
        );
        for bad in [
            "",
            "member=x",
            "member=1&member=2",
            "member=1&groups=a",
            "member=1&groups=4294967296",
            "member=1&after=-1",
            "member=1&foo=2",
            "member=18446744073709551616",
        ] {
            assert!(parse_poll_query(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_MEMBER_GROUPS).map(|g| g.to_string()).collect();
        assert!(parse_poll_query(&format!("member=1&groups={}", many.join(","))).is_err());
    }
}
