//! The simulated members' side of the member-facing gateway API: a small
//! HTTPS client (hyper 1 over tokio-rustls) shared by every agent of a fleet,
//! and the decoder of downlink record bodies.
//!
//! Data flow: an [`super::agent`] task asks [`GatewayClient`] for `attach`,
//! `uplink` and `downlink`; the client multiplexes those requests over a few
//! TLS connections. When the gateway offers HTTP/2 (ALPN `h2`), the pool
//! holds `connections` multiplexed connections and agents are spread over
//! them, so tens of thousands of members use a handful of sockets. When the
//! gateway only speaks HTTP/1.1, each in-flight request needs a connection
//! of its own; idle ones are kept and reused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::protocol::wire::{GroupId, MemberId};
use crate::tls::{self, ReloadableCert, TlsError};

/// Content type of dapgw wire messages.
pub const WIRE_CONTENT_TYPE: &str = "application/vnd.dapgw";

/// Largest response body the client reads; a downlink body of many records
/// stays far below this.
pub const MAX_BODY: usize = 4 << 20;

/// Largest single wire message accepted inside a downlink record (the
/// largest group message is ~64 KiB).
pub const MAX_RECORD_MESSAGE: usize = 128 << 10;

/// Why a request to the gateway failed. Never carries body bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The gateway URL is not `https://host[:port][/]`.
    #[error("gateway url {0:?} is not https://host[:port]")]
    BadUrl(String),
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// TCP connect or the TLS handshake failed.
    #[error("connecting to the gateway: {0}")]
    Connect(std::io::Error),
    /// HTTP-level failure (connection reset, protocol error).
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request (or connect) did not finish in time.
    #[error("request timed out")]
    Timeout,
    /// The response body was over [`MAX_BODY`] or broke off.
    #[error("response body: {0}")]
    Body(String),
    /// TLS configuration problem.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl ClientError {
    /// A short stable name for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadUrl(_) | Self::Tls(_) => "config",
            Self::Resolve { .. } | Self::Connect(_) => "connect",
            Self::Http(_) => "http",
            Self::Timeout => "timeout",
            Self::Body(_) => "body",
        }
    }
}

/// A response: status, `Retry-After` (seconds) if present, and the body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// `Retry-After` in seconds, when the gateway sent one.
    pub retry_after: Option<u64>,
    /// The body (bounded by [`MAX_BODY`]).
    pub body: Bytes,
}

/// How the client reaches the gateway.
#[derive(Clone)]
pub struct ClientOptions {
    /// `https://host:port`.
    pub gateway: String,
    /// TLS configuration (from [`client_tls`]).
    pub tls: Arc<ClientConfig>,
    /// HTTP/2 connections in the pool; a [`super::Fleet`] sizes a 0 by its
    /// member count ([`super::STREAMS_PER_CONNECTION`]), a bare client
    /// treats it as 1.
    pub connections: usize,
    /// Bound on connect plus TLS handshake.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("gateway", &self.gateway)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

/// The TLS client configuration for talking to a gateway: TLS 1.3, trusting
/// only the CA in `ca`, offering ALPN `h2` then `http/1.1`, and presenting
/// `client_cert` (certificate and key files) when given.
pub fn client_tls(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = tls::load_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((cert, key)) => {
            builder.with_client_cert_resolver(Arc::new(ReloadableCert::load(cert, key)?))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type H2 = http2::SendRequest<Full<Bytes>>;
type H1 = http1::SendRequest<Full<Bytes>>;

/// One pool slot: a live HTTP/2 connection (with its number, from
/// [`Inner::opened`]), a connection being opened by a task of its own
/// (the receiver turns `Some` when it is done: `Err` with the reason if it
/// failed), or a note that the server only speaks HTTP/1.1.
enum Slot {
    Empty,
    Connecting(watch::Receiver<Option<Result<(), String>>>),
    H2(H2, u64),
    H1Only,
}

/// A connection just opened (HTTP/2 with its number).
enum Conn {
    H2(H2, u64),
    H1(H1),
}

/// A cheap-to-clone client for one gateway, shared by all agents.
#[derive(Clone)]
pub struct GatewayClient {
    inner: Arc<Inner>,
}

struct Inner {
    connector: tokio_rustls::TlsConnector,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    authority: String,
    connect_timeout: Duration,
    /// Locked only for moments, never across an `.await`: a request's
    /// future may stop being polled at any point (an agent that is busy
    /// elsewhere), and a lock it held would stall every request of the slot.
    slots: Vec<std::sync::Mutex<Slot>>,
    h1_idle: std::sync::Mutex<Vec<H1>>,
    next_slot: AtomicUsize,
    opened: AtomicU64,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("authority", &self.inner.authority)
            .field("connections_opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

impl GatewayClient {
    /// A client for `options.gateway`. Opens no connection yet.
    pub fn new(options: ClientOptions) -> Result<Self, ClientError> {
        let url = options.gateway.trim_end_matches('/');
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| ClientError::BadUrl(options.gateway.clone()))?;
        let bad = || ClientError::BadUrl(options.gateway.clone());
        if uri.scheme_str() != Some("https") || uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let authority = uri.authority().ok_or_else(bad)?.to_string();
        let n = options.connections.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                connector: tokio_rustls::TlsConnector::from(options.tls),
                host,
                port,
                server_name,
                authority,
                connect_timeout: options.connect_timeout,
                slots: (0..n).map(|_| std::sync::Mutex::new(Slot::Empty)).collect(),
                h1_idle: std::sync::Mutex::new(Vec::new()),
                next_slot: AtomicUsize::new(0),
                opened: AtomicU64::new(0),
            }),
        })
    }

    /// How many TLS connections this client has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// `POST /v1/attach`; returns the gateway's latest downlink cursor.
    pub async fn attach(
        &self,
        member: MemberId,
        groups: &[GroupId],
        timeout: Duration,
    ) -> Result<Result<u64, Reply>, ClientError> {
        let groups: Vec<u32> = groups.iter().map(|g| g.0).collect();
        let body = serde_json::json!({ "member": member.0, "groups": groups }).to_string();
        let reply = self
            .request(
                Method::POST,
                "/v1/attach",
                Some(("application/json", Bytes::from(body))),
                timeout,
            )
            .await?;
        if reply.status != StatusCode::OK {
            return Ok(Err(reply));
        }
        #[derive(serde::Deserialize)]
        struct Attached {
            cursor: u64,
        }
        match serde_json::from_slice::<Attached>(&reply.body) {
            Ok(a) => Ok(Ok(a.cursor)),
            Err(_) => Ok(Err(reply)),
        }
    }

    /// `POST /v1/uplink` with a Response or Uplink message.
    pub async fn uplink(&self, message: Bytes, timeout: Duration) -> Result<Reply, ClientError> {
        self.request(
            Method::POST,
            "/v1/uplink",
            Some((WIRE_CONTENT_TYPE, message)),
            timeout,
        )
        .await
    }

    /// `GET /v1/downlink` (long poll of `wait_ms`).
    pub async fn downlink(
        &self,
        member: MemberId,
        groups: &[GroupId],
        after: u64,
        wait_ms: u64,
    ) -> Result<Reply, ClientError> {
        let groups: Vec<String> = groups.iter().map(|g| g.0.to_string()).collect();
        let path = format!(
            "/v1/downlink?member={}&groups={}&after={after}&wait_ms={wait_ms}",
            member.0,
            groups.join(",")
        );
        // The server may hold the request for wait_ms; allow for transfer.
        let timeout = Duration::from_millis(wait_ms) + Duration::from_secs(10);
        self.request(Method::GET, &path, None, timeout).await
    }

    /// One request on a pooled connection, within `timeout`.
    ///
    /// A request that times out on a pooled HTTP/2 connection takes that
    /// connection out of the pool: a connection on which a request got no
    /// answer in time may be wedged without being closed (`is_closed()`
    /// stays false), and every retry queued on it would time out too. The
    /// next request opens a fresh one; requests still in flight on the old
    /// one finish or time out on it, and it closes when the last is done.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let idx = self.inner.next_slot.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
        // The pooled connection this request went out on (0: none yet).
        let used = AtomicU64::new(0);
        match tokio::time::timeout(timeout, self.request_inner(method, path, body, idx, &used))
            .await
        {
            Ok(res) => res,
            Err(_) => {
                self.evict(idx, used.load(Ordering::Relaxed));
                Err(ClientError::Timeout)
            }
        }
    }

    /// Empties slot `idx` if it still holds connection number `conn`.
    fn evict(&self, idx: usize, conn: u64) {
        if conn == 0 {
            return;
        }
        let mut slot = lock(&self.inner.slots[idx]);
        if matches!(&*slot, Slot::H2(_, n) if *n == conn) {
            *slot = Slot::Empty;
        }
    }

    /// The live HTTP/2 connection of slot `idx` (its number in `used`), or
    /// `None` if the gateway speaks HTTP/1.1 only. An empty slot is filled
    /// by a connect running in a task of its own, which every request of
    /// the slot waits for: one connect per slot at a time, and it finishes
    /// whether or not the request that started it is still polled.
    async fn pooled(&self, idx: usize, used: &AtomicU64) -> Result<Option<H2>, ClientError> {
        loop {
            let mut wait = {
                let mut slot = lock(&self.inner.slots[idx]);
                match &*slot {
                    Slot::H2(s, n) if !s.is_closed() => {
                        used.store(*n, Ordering::Relaxed);
                        return Ok(Some(s.clone()));
                    }
                    Slot::H1Only => return Ok(None),
                    Slot::Connecting(rx) => rx.clone(),
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        *slot = Slot::Connecting(rx.clone());
                        let this = self.clone();
                        tokio::spawn(async move {
                            let res = this.connect().await;
                            let done = {
                                let mut slot = lock(&this.inner.slots[idx]);
                                match res {
                                    Ok(Conn::H2(s, n)) => {
                                        *slot = Slot::H2(s, n);
                                        Ok(())
                                    }
                                    Ok(Conn::H1(s)) => {
                                        *slot = Slot::H1Only;
                                        this.idle_h1(s);
                                        Ok(())
                                    }
                                    Err(e) => {
                                        *slot = Slot::Empty;
                                        Err(format!("{}: {e}", e.kind()))
                                    }
                                }
                            };
                            let _ = tx.send(Some(done));
                        });
                        rx
                    }
                }
            };
            let done = match wait.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                Err(_) => {
                    // The connect task ended without a word: free the slot.
                    let mut slot = lock(&self.inner.slots[idx]);
                    if matches!(&*slot, Slot::Connecting(_)) {
                        *slot = Slot::Empty;
                    }
                    return Err(ClientError::Connect(std::io::Error::other(
                        "connect task ended",
                    )));
                }
            };
            match done {
                // Take what the connect put into the slot.
                Some(Ok(())) => continue,
                Some(Err(e)) if e.starts_with("timeout") => return Err(ClientError::Timeout),
                Some(Err(e)) => return Err(ClientError::Connect(std::io::Error::other(e))),
                None => continue,
            }
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        idx: usize,
        used: &AtomicU64,
    ) -> Result<Reply, ClientError> {
        let inner = &self.inner;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", inner.authority));
        let payload = match body {
            Some((ct, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, ct);
                b
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::Body(e.to_string()))?;
        let h2 = self.pooled(idx, used).await?;
        let resp = match h2 {
            Some(mut s) => {
                s.ready().await?;
                // HTTP/2 takes the authority from the URI; no Host header.
                s.send_request(req).await?
            }
            None => {
                let mut s = self.h1().await?;
                let mut req = req;
                if let Ok(host) = inner.authority.parse() {
                    req.headers_mut().insert(hyper::header::HOST, host);
                }
                *req.uri_mut() = path
                    .parse()
                    .map_err(|_| ClientError::Body("bad request path".into()))?;
                let resp = s.send_request(req).await?;
                let (parts, body) = resp.into_parts();
                let body = read_body(body).await;
                // Reused only after a complete exchange.
                if body.is_ok() {
                    self.idle_h1(s);
                }
                return Ok(reply(parts, body?));
            }
        };
        let (parts, body) = resp.into_parts();
        Ok(reply(parts, read_body(body).await?))
    }

    fn idle_h1(&self, s: H1) {
        if let Ok(mut idle) = self.inner.h1_idle.lock() {
            idle.push(s);
        }
    }

    /// An idle HTTP/1.1 connection, or a new one.
    async fn h1(&self) -> Result<H1, ClientError> {
        loop {
            let popped = self.inner.h1_idle.lock().ok().and_then(|mut v| v.pop());
            match popped {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        match self.connect().await? {
            Conn::H1(s) => Ok(s),
            // The server now offers h2: use it for this one request.
            Conn::H2(..) => Err(ClientError::Body(
                "gateway switched protocols between connections".into(),
            )),
        }
    }

    /// Opens a TLS connection and runs the HTTP handshake the server chose.
    async fn connect(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        let fut = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((inner.host.as_str(), inner.port))
                .await
                .map_err(|source| ClientError::Resolve {
                    host: inner.host.clone(),
                    source,
                })?
                .collect();
            let mut last = None;
            let mut tcp = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(t) => {
                        tcp = Some(t);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = tcp.ok_or_else(|| {
                ClientError::Connect(last.unwrap_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                }))
            })?;
            tcp.set_nodelay(true).map_err(ClientError::Connect)?;
            let tls = inner
                .connector
                .connect(inner.server_name.clone(), tcp)
                .await
                .map_err(ClientError::Connect)?;
            let number = inner.opened.fetch_add(1, Ordering::Relaxed) + 1;
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let io = TokioIo::new(tls);
            if is_h2 {
                let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    // A closed connection is noticed by the next request.
                    let _ = conn.await;
                });
                Ok(Conn::H2(send, number))
            } else {
                let (send, conn) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(Conn::H1(send))
            }
        };
        tokio::time::timeout(inner.connect_timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// Locks a pool slot (a poisoned lock still holds a valid `Slot`).
fn lock(m: &std::sync::Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Body(e.to_string()))
}

fn reply(parts: hyper::http::response::Parts, body: Bytes) -> Reply {
    let retry_after = parts
        .headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    Reply {
        status: parts.status,
        retry_after,
        body,
    }
}

/// Who a downlink record is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every member of the group.
    Group,
    /// One member.
    Member(MemberId),
}

/// One downlink record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in the gateway's queue.
    pub cursor: u64,
    /// Who it is for.
    pub audience: Audience,
    /// The group.
    pub group: GroupId,
    /// A complete wire message.
    pub message: Bytes,
}

/// Why a downlink body did not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The body ends inside a record.
    #[error("downlink body truncated at byte {0}")]
    Truncated(usize),
    /// An audience byte other than 1 or 2.
    #[error("unknown audience {0}")]
    Audience(u8),
    /// A record message over [`MAX_RECORD_MESSAGE`].
    #[error("record message of {0} bytes is over the cap")]
    TooLong(usize),
    /// Cursors did not increase strictly.
    #[error("cursor {0} does not increase")]
    CursorOrder(u64),
}

/// Decodes a downlink body: `cursor u64 | audience u8 | group u32 | member
/// u64 | message vec32`, repeated. Cursors must increase strictly.
pub fn decode_records(body: &Bytes) -> Result<Vec<Record>, RecordError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut last: Option<u64> = None;
    while at < body.len() {
        let take = |at: usize, n: usize| -> Result<&[u8], RecordError> {
            body.get(at..at.saturating_add(n))
                .ok_or(RecordError::Truncated(at))
        };
        let u64_at = |n: &mut usize| -> Result<u64, RecordError> {
            let mut b = [0u8; 8];
            b.copy_from_slice(take(*n, 8)?);
            *n += 8;
            Ok(u64::from_be_bytes(b))
        };
        let cursor = u64_at(&mut at)?;
        let aud = take(at, 1)?[0];
        at += 1;
        let mut g = [0u8; 4];
        g.copy_from_slice(take(at, 4)?);
        at += 4;
        let member = u64_at(&mut at)?;
        let mut l = [0u8; 4];
        l.copy_from_slice(take(at, 4)?);
        at += 4;
        let len = u32::from_be_bytes(l) as usize;
        if len > MAX_RECORD_MESSAGE {
            return Err(RecordError::TooLong(len));
        }
        take(at, len)?;
        let message = body.slice(at..at + len);
        at += len;
        if last.is_some_and(|l| cursor <= l) {
            return Err(RecordError::CursorOrder(cursor));
        }
        last = Some(cursor);
        let audience = match aud {
            1 => Audience::Group,
            2 => Audience::Member(MemberId(member)),
            other => return Err(RecordError::Audience(other)),
        };
        out.push(Record {
            cursor,
            audience,
            group: GroupId(u32::from_be_bytes(g)),
            message,
        });
    }
    Ok(out)
}

/// Encodes records in the downlink framing (the inverse of
/// [`decode_records`]), for tests and fakes.
pub fn encode_records(records: &[Record]) -> Bytes {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&r.cursor.to_be_bytes());
        let (aud, member) = match r.audience {
            Audience::Group => (1u8, 0u64),
            Audience::Member(m) => (2, m.0),
        };
        out.push(aud);
        out.extend_from_slice(&r.group.0.to_be_bytes());
        out.extend_from_slice(&member.to_be_bytes());
        out.extend_from_slice(&(r.message.len() as u32).to_be_bytes());
        out.extend_from_slice(&r.message);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client with one pooled connection to a test server on `port`,
    /// trusting the dev PKI in `dir`.
    fn one_connection_client(dir: &std::path::Path, port: u16) -> GatewayClient {
        GatewayClient::new(ClientOptions {
            gateway: format!("https://localhost:{port}"),
            tls: client_tls(
                &dir.join("ca.pem"),
                Some((&dir.join("gateway.pem"), &dir.join("gateway.key"))),
            )
            .unwrap(),
            connections: 1,
            connect_timeout: Duration::from_secs(10),
        })
        .unwrap()
    }

    fn rec(cursor: u64, audience: Audience) -> Record {
        Record {
            cursor,
            audience,
            group: GroupId(7),
            message: Bytes::from_static(b"\x01\x08abc"),
        }
    }

    #[test]
    fn records_round_trip() {
        let rs = vec![
            rec(1, Audience::Group),
            rec(5, Audience::Member(MemberId(9))),
        ];
        assert_eq!(decode_records(&encode_records(&rs)).unwrap(), rs);
        assert_eq!(decode_records(&Bytes::new()).unwrap(), vec![]);
    }

    #[test]
    fn records_refuse_garbage() {
        let good = encode_records(&[rec(1, Audience::Group), rec(2, Audience::Group)]);
        for cut in 1..good.len() {
            if cut == good.len() / 2 {
                continue; // a record boundary
            }
            assert!(decode_records(&good.slice(..cut)).is_err(), "cut {cut}");
        }
        let mut bad = good.to_vec();
        bad[8] = 3;
        assert_eq!(
            decode_records(&Bytes::from(bad)),
            Err(RecordError::Audience(3))
        );
        let reordered = encode_records(&[rec(2, Audience::Group), rec(2, Audience::Group)]);
        assert_eq!(decode_records(&reordered), Err(RecordError::CursorOrder(2)));
        let mut huge = good.slice(..21).to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_records(&Bytes::from(huge)),
            Err(RecordError::TooLong(_))
        ));
    }

    /// A gateway whose first connection never answers (as a wedged
    /// connection would): the request that times out on it takes it out of
    /// the pool, and the retry goes out on a fresh connection and is
    /// answered. Without the eviction every retry queues on the first one.
    #[tokio::test]
    async fn a_request_that_times_out_takes_its_connection_out_of_the_pool() {
        use std::convert::Infallible;

        let dir = tempfile::tempdir().unwrap();
        crate::sim::bench::generate_pki(dir.path(), 0).unwrap();
        let server = crate::sim::bench::server_tls(dir.path(), &[b"h2"], false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for n in 0u32.. {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let wedged = n == 0;
                let svc = hyper::service::service_fn(move |_req| async move {
                    if wedged {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .status(StatusCode::ACCEPTED)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc),
                );
            }
        });
        let client = one_connection_client(dir.path(), port);
        let first = client
            .uplink(Bytes::from_static(b"x"), Duration::from_millis(500))
            .await;
        assert!(matches!(first, Err(ClientError::Timeout)), "{first:?}");
        assert_eq!(client.connections_opened(), 1);
        let second = client
            .uplink(Bytes::from_static(b"x"), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(second.status, StatusCode::ACCEPTED);
        assert_eq!(client.connections_opened(), 2);
    }

    /// The bench flake: an agent's long poll started the slot's connect
    /// and then was not polled while the agent sent a reading; the slot's
    /// lock, held across the connect, stalled every request of every member
    /// on that slot. A request future that stops being polled mid-connect
    /// must not stop the others.
    #[tokio::test]
    async fn a_connect_started_by_a_request_no_longer_polled_still_serves_the_others() {
        use std::convert::Infallible;

        let dir = tempfile::tempdir().unwrap();
        crate::sim::bench::generate_pki(dir.path(), 0).unwrap();
        let server = crate::sim::bench::server_tls(dir.path(), &[b"h2"], false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A slow handshake: the first request is still connecting
                    // when it stops being polled.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(StatusCode::ACCEPTED)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let client = one_connection_client(dir.path(), port);
        let mut first = Box::pin(client.uplink(Bytes::from_static(b"a"), Duration::from_secs(30)));
        // Polled until it is connecting, then kept but no longer polled.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut first)
                .await
                .is_err()
        );
        let second = client
            .uplink(Bytes::from_static(b"b"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(second.status, StatusCode::ACCEPTED);
        assert_eq!(client.connections_opened(), 1);
        // The first one, polled again, goes out on the same connection.
        assert_eq!(first.await.unwrap().status, StatusCode::ACCEPTED);
    }
}
