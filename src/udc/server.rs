//! The UDC's gateway-facing HTTPS server (HTTP/2 and HTTP/1.1 over
//! tokio-rustls, mutual TLS).
//!
//! ```text
//! gateway --TLS (client cert: gateway id = first DNS SAN)--> route --> service::Udc
//! member  --TLS (no cert)--> /v1/direct --rate limit--> service::Udc
//! ```
//!
//! Before hyper, `crate::limits` caps connections (`DAPGW_MAX_CONNECTIONS`,
//! `DAPGW_MAX_CONNECTIONS_PER_IP`) and times the TLS handshake and each
//! request head (`DAPGW_HEADER_TIMEOUT_MS`; HTTP/1.1 gets a 408) and idle
//! connections (`DAPGW_IDLE_TIMEOUT_MS`, counted in requests, not bytes); a
//! request body must arrive within `DAPGW_BODY_TIMEOUT_MS` (408).
//!
//! The gateway id comes from the verified client certificate only; a batch
//! naming another gateway is refused with 403. Every error answer is JSON
//! `{"error", "reason"}`; nothing a peer sends can panic the server.
// `Err` carries the HTTP answer itself, built at most once per request.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::service::{ServiceError, Udc};
use crate::limits::{Activity, CLOSE_GRACE, ConnLimits, Expired, SourceSlot, SourceSlots, Watched};
use crate::telemetry::LimitReason;

/// Content type of protocol messages.
pub const WIRE: &str = "application/vnd.dapgw";
/// Content type of downlink record streams.
pub const RECORDS: &str = "application/vnd.dapgw.records";
/// Longest long poll on `/v1/downlink`.
pub const MAX_WAIT_MS: u64 = 25_000;

/// Server tunables.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Direct submissions allowed per source IP per second (burst = rate).
    pub direct_per_second: u32,
    /// Open connections at most; beyond it they wait in the kernel backlog.
    pub max_connections: usize,
    /// Open connections from one source (IPv6: one /64); beyond it a new
    /// connection is closed at accept.
    pub max_connections_per_ip: usize,
    /// TLS handshake, and each request head from its first byte.
    pub header_timeout: Duration,
    /// A whole request body (408 beyond it).
    pub body_timeout: Duration,
    /// No request for this long: the connection is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            direct_per_second: 5,
            max_connections: 1024,
            max_connections_per_ip: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ServerOptions {
    fn conn(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections.max(1),
            max_per_source: self.max_connections_per_ip.max(1),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

/// Most distinct groups one `PUT /v1/subscriptions` may name. The store
/// compares the new set with the old inside its write transaction, so an
/// unbounded list would hold every other writer up.
pub use crate::protocol::MAX_SUBSCRIBED_GROUPS;

/// A per-source token bucket for `/v1/direct`, keyed as the connection
/// caps count sources ([`crate::limits::source_key`]: an IPv4 address, an
/// IPv6 /64), so a host cannot get a fresh bucket per address it picks
/// from its prefix.
#[derive(Debug, Default)]
struct RateLimiter {
    buckets: StdMutex<HashMap<[u8; 16], (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes one token for `ip`'s source; false when the bucket is empty.
    fn allow(&self, ip: IpAddr, rate: u32) -> bool {
        let key = crate::limits::source_key(ip);
        let rate = f64::from(rate.max(1));
        let now = Instant::now();
        let mut map = match self.buckets.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        // Bound memory under address churn: forget full buckets.
        if map.len() > 100_000 {
            map.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = map.entry(key).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct State {
    udc: Arc<Udc>,
    opts: ServerOptions,
    limiter: RateLimiter,
    /// Bytes of gateways' request bodies held at once, read or waiting to
    /// be judged: [`BODY_BUDGET_BODIES`] of the largest bodies in all,
    /// [`GATEWAY_SHARE_BODIES`] of them per gateway identity.
    bodies: BodyBudget<String>,
    /// The same for `/v1/direct`, apart (senders without a certificate
    /// must not spend the gateways'): [`DIRECT_BODY_BUDGET`] in all,
    /// [`DIRECT_SOURCE_BUDGET`] per source.
    direct_bodies: BodyBudget<[u8; 16]>,
    /// When an over-budget refusal was last logged (unix s), so a flood
    /// of them logs once a second.
    budget_logged: std::sync::atomic::AtomicU64,
}

/// Bytes of `/v1/direct` bodies held at once (256 of the 64 KiB cap).
pub const DIRECT_BODY_BUDGET: usize = 16 << 20;

/// Bytes of `/v1/direct` bodies one source (an IPv4 address, an IPv6 /64)
/// holds at once: four of the 64 KiB cap.
pub const DIRECT_SOURCE_BUDGET: usize = 256 << 10;

/// A `/v1/direct` body arrives whole within this (or the server's body
/// timeout, if shorter): a member's submission is small and sent at once,
/// and a slow one holds its source's budget.
pub const DIRECT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many largest-size request bodies the server holds at once, over
/// all connections: one gateway certificate may open many connections
/// and streams, and each body is kept whole until its batch is judged
/// (one at a time). Beyond the budget a request gets 503 `busy` at once.
pub const BODY_BUDGET_BODIES: usize = 8;

/// How many of them one gateway certificate may hold: the batches a
/// gateway keeps in flight (4) and one more request (its subscriptions,
/// sent again on every new connection).
pub const GATEWAY_SHARE_BODIES: usize = 5;

/// Largest `/v1/subscriptions` body.
const SUBSCRIPTIONS_CAP: usize = 1 << 20;

/// Byte budgets for request bodies: one over all requests, and one per key
/// (a gateway identity, a direct source), so that no key takes the whole.
struct BodyBudget<K> {
    total: Arc<Semaphore>,
    per_key: usize,
    keys: StdMutex<KeyBudgets<K>>,
}

/// The per-key budgets, and the map size at which idle ones are dropped.
struct KeyBudgets<K> {
    map: HashMap<K, Arc<Semaphore>>,
    prune_at: usize,
}

/// Per-key budgets kept before idle ones are dropped (at least).
const KEY_BUDGETS_KEPT: usize = 10_000;

impl<K: std::hash::Hash + Eq + Clone> BodyBudget<K> {
    fn new(total: usize, per_key: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            per_key: per_key.min(Semaphore::MAX_PERMITS),
            keys: StdMutex::new(KeyBudgets {
                map: HashMap::new(),
                prune_at: KEY_BUDGETS_KEPT,
            }),
        }
    }

    /// The budgets a body of `key` draws on: the total and the key's own.
    fn of(&self, key: &K) -> [Arc<Semaphore>; 2] {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        // Bound the map under key churn: a budget no request holds (the
        // map's is its only handle) is dropped; one a request holds stays,
        // even before its first byte, so no key gets a second budget. The
        // next prune waits until the map has doubled, so the scans cost
        // little per request however many keys are in use.
        if keys.map.len() >= keys.prune_at {
            keys.map.retain(|_, s| Arc::strong_count(s) > 1);
            keys.prune_at = (keys.map.len() * 2).max(KEY_BUDGETS_KEPT);
        }
        let own = keys
            .map
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_key)))
            .clone();
        [Arc::clone(&self.total), own]
    }
}

type Resp = Response<Full<Bytes>>;

/// Serves gateways and direct members on `listener` with `tls` until
/// `shutdown` completes; then in-flight requests finish and it returns.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    udc: Arc<Udc>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    // Sized in bodies of the largest cap a gateway endpoint has (a batch,
    // or a 1 MiB subscription list), so every body fits its share: past the
    // share a request is refused only while others are held.
    let unit = opts.max_body_bytes.max(SUBSCRIPTIONS_CAP);
    let budget = unit.saturating_mul(BODY_BUDGET_BODIES);
    let state = Arc::new(State {
        udc,
        opts,
        limiter: RateLimiter::default(),
        bodies: BodyBudget::new(budget, unit.saturating_mul(GATEWAY_SHARE_BODIES)),
        direct_bodies: BodyBudget::new(DIRECT_BODY_BUDGET, DIRECT_SOURCE_BUDGET),
        budget_logged: std::sync::atomic::AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let limits = state.opts.conn();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let sources = SourceSlots::new(limits.max_per_source);
    tokio::pin!(shutdown);
    loop {
        // A slot before accepting: beyond the cap, peers wait in the backlog.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(source) = sources.try_take(peer.ip()) else {
                        state.udc.metrics().connections_closed.get(LimitReason::PerIpLimit).inc();
                        tracing::debug!(%peer, "source at its connection cap");
                        continue;
                    };
                    conns.spawn(connection(
                        stream,
                        peer,
                        tls.clone(),
                        state.clone(),
                        stop_rx.clone(),
                        (permit, source),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "udc listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    stop: watch::Receiver<bool>,
    _slots: (OwnedSemaphorePermit, SourceSlot),
) {
    let limits = state.opts.conn();
    let closed = state.udc.metrics().connections_closed.clone();
    // Answers (verdicts) leave at once: with Nagle's algorithm a response
    // written in two pieces waits for the gateway's delayed ACK (40 ms).
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await;
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            return;
        }
        Err(_) => {
            closed.get(LimitReason::HandshakeTimeout).inc();
            return;
        }
    };
    let identity = crate::tls::peer_identity(stream.get_ref().1);
    let identity: Arc<Option<String>> = Arc::new(identity);
    let activity = Activity::new();
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let identity = identity.clone();
        let guard = svc_activity.request();
        async move {
            let resp = route(req, &state, identity.as_deref(), peer).await;
            drop(guard);
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Heads are timed by the watchdog below (crate::limits), for both
    // protocols.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        // A gateway needs a few streams (batches, tag replies, its long
        // poll); hyper's default of 200 would let one certificate hold
        // thousands of long polls per connection cap.
        .max_concurrent_streams(MAX_GATEWAY_STREAMS)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Some(limits.header_timeout))
        .keep_alive_timeout(limits.header_timeout);
    let conn = builder.serve_connection(TokioIo::new(Watched::new(stream, activity.clone())), svc);
    tokio::pin!(conn);
    let stopped = async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    // After a drain starts, in-flight requests finish (bounded by the
    // caller's grace); after a limit, CLOSE_GRACE.
    let mut closing: Option<Option<Instant>> = None;
    loop {
        let close_at = closing
            .flatten()
            .unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut stopped, if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(None);
            }
            why = activity.expired(&limits), if closing.is_none() => match why {
                Expired::Idle => {
                    closed.get(LimitReason::IdleTimeout).inc();
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Some(Instant::now() + CLOSE_GRACE));
                }
                Expired::Header => {
                    closed.get(LimitReason::HeaderTimeout).inc();
                    tracing::debug!(%peer, "request head timed out");
                    if activity.is_h2() {
                        return;
                    }
                    activity.cut();
                    closing = Some(Some(Instant::now() + CLOSE_GRACE));
                }
            },
            () = tokio::time::sleep_until(close_at), if closing.flatten().is_some() => return,
        }
    }
}

/// A JSON error answer `{"error": code, "reason": reason}`.
pub(crate) fn error(status: StatusCode, code: &str, reason: &str) -> Resp {
    let body = serde_json::json!({ "error": code, "reason": reason }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn bytes(status: StatusCode, ct: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

fn service_error(e: ServiceError) -> Resp {
    match e {
        ServiceError::BadRequest(r) => error(StatusCode::BAD_REQUEST, "bad_request", &r),
        ServiceError::WrongGateway { .. } => {
            error(StatusCode::FORBIDDEN, "wrong_gateway", &e.to_string())
        }
        ServiceError::Conflict(r) => error(StatusCode::CONFLICT, "conflict", &r),
        ServiceError::NotFound(r) => error(StatusCode::NOT_FOUND, "not_found", &r),
        ServiceError::Busy(r) => {
            let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "busy", &r);
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        ServiceError::Internal(detail) => {
            tracing::error!(error = %detail, "request failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the UDC could not complete the request; retry later",
            )
        }
    }
}

/// The bytes a body holds of both its budgets (the total, its key's).
struct Held([OwnedSemaphorePermit; 2]);

impl Held {
    fn start(budgets: &[Arc<Semaphore>; 2]) -> Result<Self, BodyError> {
        let none = |s: &Arc<Semaphore>| {
            Arc::clone(s)
                .try_acquire_many_owned(0)
                .map_err(|_| BodyError::OverBudget)
        };
        Ok(Self([none(&budgets[0])?, none(&budgets[1])?]))
    }

    /// Takes `n` more bytes of both, or none (`OverBudget`).
    fn take(&mut self, budgets: &[Arc<Semaphore>; 2], n: u32) -> Result<(), BodyError> {
        let total = Arc::clone(&budgets[0])
            .try_acquire_many_owned(n)
            .map_err(|_| BodyError::OverBudget)?;
        let own = Arc::clone(&budgets[1])
            .try_acquire_many_owned(n)
            .map_err(|_| BodyError::OverBudget)?;
        self.0[0].merge(total);
        self.0[1].merge(own);
        Ok(())
    }
}

/// Why a request body was not read whole.
enum BodyError {
    /// Over the cap of this endpoint.
    TooLarge,
    /// A body budget ([`State::bodies`], [`State::direct_bodies`]) is spent.
    OverBudget,
    /// The stream failed.
    Read,
}

/// Reads a request body of at most `cap` bytes within `within`, taking
/// its bytes from both `budgets` as they arrive: the permits returned hold
/// them until they are dropped (after the answer is built). `Err` is the
/// answer to send.
async fn body(
    req: Request<Incoming>,
    cap: usize,
    within: Duration,
    budgets: [Arc<Semaphore>; 2],
    state: &State,
) -> Result<(Bytes, [OwnedSemaphorePermit; 2]), Resp> {
    let read = async {
        let mut held = Held::start(&budgets)?;
        let mut body = Limited::new(req.into_body(), cap);
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    BodyError::TooLarge
                } else {
                    BodyError::Read
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let n = u32::try_from(data.len()).map_err(|_| BodyError::TooLarge)?;
            held.take(&budgets, n)?;
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), held.0))
    };
    match tokio::time::timeout(within, read).await {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body did not arrive in time",
        )),
        Ok(Ok(read)) => Ok(read),
        Ok(Err(BodyError::TooLarge)) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("request body over {cap} bytes"),
        )),
        Ok(Err(BodyError::OverBudget)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = state
                .budget_logged
                .swap(now, std::sync::atomic::Ordering::Relaxed);
            if last != now {
                tracing::warn!(
                    "request bodies held at once are at a budget (all, or this gateway's or source's share); answered 503"
                );
            }
            Err(service_error(ServiceError::Busy(
                "the server holds too many request bodies; retry".into(),
            )))
        }
        Ok(Err(BodyError::Read)) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the request body could not be read",
        )),
    }
}

/// Parses `a=1&b=2` into pairs (no percent-decoding needed for our keys).
fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn route(
    req: Request<Incoming>,
    state: &State,
    identity: Option<&str>,
    peer: SocketAddr,
) -> Resp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let allowed = match path.as_str() {
        "/v1/batches" | "/v1/tags" | "/v1/direct" => Method::POST,
        "/v1/subscriptions" => Method::PUT,
        "/v1/downlink" => Method::GET,
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    if method != allowed {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            &format!("{path} takes {allowed}"),
        );
    }
    if path == "/v1/direct" {
        return direct(req, state, peer).await;
    }
    let Some(gateway) = identity else {
        return error(
            StatusCode::FORBIDDEN,
            "no_client_certificate",
            "gateway endpoints need a client certificate",
        );
    };
    let gateway = gateway.to_owned();
    match path.as_str() {
        "/v1/batches" | "/v1/tags" => {
            let (b, _held) = match body(
                req,
                state.opts.max_body_bytes,
                state.opts.body_timeout,
                state.bodies.of(&gateway),
                state,
            )
            .await
            {
                Ok(b) => b,
                Err(r) => return r,
            };
            let res = if path == "/v1/batches" {
                state.udc.handle_batch(&gateway, b).await
            } else {
                state.udc.handle_tags(&gateway, b).await
            };
            match res {
                Ok(answer) => bytes(StatusCode::OK, WIRE, answer),
                Err(e) => service_error(e),
            }
        }
        "/v1/subscriptions" => {
            let budgets = state.bodies.of(&gateway);
            let (b, _held) = match body(
                req,
                SUBSCRIPTIONS_CAP,
                state.opts.body_timeout,
                budgets,
                state,
            )
            .await
            {
                Ok(b) => b,
                Err(r) => return r,
            };
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Subs {
                groups: Vec<u32>,
            }
            let mut subs: Subs = match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, "bad_json", &e.to_string());
                }
            };
            subs.groups.sort_unstable();
            subs.groups.dedup();
            if subs.groups.len() > MAX_SUBSCRIBED_GROUPS {
                return error(
                    StatusCode::BAD_REQUEST,
                    "too_many_groups",
                    &format!("a gateway subscribes to at most {MAX_SUBSCRIBED_GROUPS} groups"),
                );
            }
            match state.udc.subscribe(&gateway, subs.groups).await {
                Ok(()) => bytes(StatusCode::NO_CONTENT, "text/plain", Bytes::new()),
                Err(e) => service_error(e),
            }
        }
        _ => downlink(req, state, &gateway).await,
    }
}

async fn downlink(req: Request<Incoming>, state: &State, gateway: &str) -> Resp {
    let q = query(&req);
    let parse = |k: &str, default: u64| -> Result<u64, Resp> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_query",
                    &format!("{k} must be an unsigned integer"),
                )
            }),
        }
    };
    let (after, wait_ms) = match (parse("after", 0), parse("wait_ms", MAX_WAIT_MS)) {
        (Ok(a), Ok(w)) => (a, w.min(MAX_WAIT_MS)),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let waker = state.udc.downlink_waker(gateway);
    loop {
        // Register interest before reading so an append in between wakes us.
        let notified = waker.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match state.udc.downlink(gateway, after).await {
            Ok(records) if !records.is_empty() => {
                return bytes(StatusCode::OK, RECORDS, records);
            }
            Ok(_) => {}
            Err(e) => return service_error(e),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return bytes(StatusCode::NO_CONTENT, RECORDS, Bytes::new());
        }
        // Woken by this process's appends to this gateway's queue; read
        // again every DOWNLINK_RECHECK too, for appends by other processes
        // sharing the store, which wake nothing here.
        let _ = tokio::time::timeout_at(deadline.min(now + DOWNLINK_RECHECK), notified).await;
    }
}

/// Most concurrent HTTP/2 streams on one connection to the UDC.
const MAX_GATEWAY_STREAMS: u32 = 64;

/// How often a downlink long poll reads its queue again without being
/// woken: appends by another UDC process on the same store reach the
/// gateway within this time instead of at the end of its poll.
const DOWNLINK_RECHECK: Duration = Duration::from_secs(2);

async fn direct(req: Request<Incoming>, state: &State, peer: SocketAddr) -> Resp {
    if !state.limiter.allow(peer.ip(), state.opts.direct_per_second) {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many direct submissions from this source",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let budgets = state
        .direct_bodies
        .of(&crate::limits::source_key(peer.ip()));
    let within = state.opts.body_timeout.min(DIRECT_BODY_TIMEOUT);
    let (b, _held) = match body(req, 64 << 10, within, budgets, state).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match state.udc.handle_direct(b).await {
        Ok(answer) => bytes(StatusCode::OK, WIRE, answer),
        Err(e @ ServiceError::Busy(_)) => service_error(e),
        // Uniform: an unauthenticated submitter learns nothing more.
        Err(ServiceError::Internal(detail)) => {
            tracing::error!(error = %detail, "direct submission failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the UDC could not complete the request; retry later",
            )
        }
        Err(_) => error(
            StatusCode::BAD_REQUEST,
            "not_accepted",
            "the submission was not accepted",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{BodyBudget, BodyError, Held, KEY_BUDGETS_KEPT, RateLimiter};
    use std::sync::Arc;

    /// A key holds at most its share, and all keys together at most the
    /// total; a body's bytes are free again when it is dropped.
    #[test]
    fn a_key_takes_at_most_its_share_of_the_body_budget() {
        let budget = BodyBudget::new(8, 5);
        let a = budget.of(&"a");
        let mut held_a = Held::start(&a).ok().unwrap();
        for _ in 0..5 {
            assert!(held_a.take(&a, 1).is_ok());
        }
        assert!(matches!(held_a.take(&a, 1), Err(BodyError::OverBudget)));
        let b = budget.of(&"b");
        let mut held_b = Held::start(&b).ok().unwrap();
        for _ in 0..3 {
            assert!(held_b.take(&b, 1).is_ok());
        }
        assert!(
            matches!(held_b.take(&b, 1), Err(BodyError::OverBudget)),
            "the total is spent"
        );
        assert_eq!(budget.total.available_permits(), 0);
        drop(held_a);
        assert_eq!(budget.total.available_permits(), 5);
        assert!(held_b.take(&b, 2).is_ok());
    }

    /// Idle per-key budgets are dropped once the map is large, but one a
    /// request holds stays (no key gets a second budget), and the next
    /// prune waits for the map to double.
    #[test]
    fn idle_key_budgets_are_dropped_and_held_ones_kept() {
        let budget = BodyBudget::new(1 << 20, 10);
        let held = budget.of(&0usize);
        for k in 1..KEY_BUDGETS_KEPT {
            let _ = budget.of(&k);
        }
        // The map is at the threshold: this call prunes the idle keys.
        let again = budget.of(&0usize);
        assert!(Arc::ptr_eq(&held[1], &again[1]), "the held budget stays");
        let keys = budget.keys.lock().unwrap();
        assert_eq!(keys.map.len(), 1);
        assert_eq!(keys.prune_at, KEY_BUDGETS_KEPT);
    }

    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Every address of one IPv6 /64 draws on one bucket (a host picks
    /// addresses from its prefix at will); another /64 and an IPv4 address
    /// have their own, and an IPv4-mapped address is its IPv4 address.
    #[test]
    fn direct_buckets_are_per_source_not_per_address() {
        let limiter = RateLimiter::default();
        for last in 1..=5u16 {
            assert!(limiter.allow(ip(&format!("2001:db8:1:2::{last:x}")), 5));
        }
        assert!(!limiter.allow(ip("2001:db8:1:2:ffff::9"), 5), "same /64");
        assert!(limiter.allow(ip("2001:db8:1:3::1"), 5), "another /64");
        for _ in 0..5 {
            assert!(limiter.allow(ip("192.0.2.7"), 5));
        }
        assert!(!limiter.allow(ip("::ffff:192.0.2.7"), 5), "mapped IPv4");
        assert!(limiter.allow(ip("192.0.2.8"), 5));
    }
}
