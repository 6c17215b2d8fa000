//! Test support for the gateway: a dev PKI, a fake UDC (HTTP/2 over mutual
//! TLS, the gateway-facing contract of docs/gateway.md), a member HTTPS
//! client (HTTP/1.1 or HTTP/2), and an in-process gateway on 127.0.0.1:0.
//! Shared by tests/gateway_http.rs and benches/gateway_relay.rs.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use dapgw::config::{ByteSize, GatewayConfig, SecretUrl};
use dapgw::gateway::{Listeners, run};
use dapgw::protocol::wire::{
    Batch, BatchBody, Challenge, Confirm, GroupId, MemberId, Outcome, Purpose, Response, SessionId,
    TagReply, Uplink, UplinkKind, Verdict, VerdictBody,
};
use dapgw::tls;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// name -> (cert, key)
    pub clients: HashMap<String, (PathBuf, PathBuf)>,
}

pub fn pki(clients: &[&str]) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = clients.iter().map(|s| s.to_string()).collect();
    let p = tls::dev_pki::generate(dir.path(), &[], &names).unwrap();
    Pki {
        ca: p.ca_cert,
        server_cert: p.server_cert,
        server_key: p.server_key,
        clients: p.clients.into_iter().map(|(n, c, k)| (n, (c, k))).collect(),
        dir,
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

pub fn response(id: u64, group: u32, round: u64, c: &[u8]) -> Response {
    Response {
        id: MemberId(id),
        kv: 1,
        group: GroupId(group),
        round,
        n_i: [id as u8; 16],
        e_i: None,
        c: Bytes::copy_from_slice(c),
        tag: Sha256::digest(c).as_slice()[..16].try_into().unwrap(),
    }
}

pub fn uplink(id: u64, group: u32, ctr: u64, c: &[u8]) -> Uplink {
    Uplink {
        group: GroupId(group),
        id: MemberId(id),
        sid: SessionId(id.to_be_bytes()),
        kind: UplinkKind::Reading,
        ctr,
        c: Bytes::copy_from_slice(c),
        tag: [ctr as u8; 16],
    }
}

pub fn challenge(group: u32, round: u64) -> Challenge {
    Challenge {
        group: GroupId(group),
        round,
        epoch: 1,
        nonce_v: [round as u8; 16],
        e_v: None,
        purpose: Purpose::Auth,
        group_seq: 0,
        config_hash: [0; 32],
        not_after: None,
        key_cert: None,
        key_id: 1,
        signature: [0; 64],
    }
}

/// A downlink record as the UDC frames it.
pub fn record(cursor: u64, audience: u8, group: u32, member: u64, msg: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u64(cursor);
    b.put_u8(audience);
    b.put_u32(group);
    b.put_u64(member);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

// ---------------------------------------------------------------------------
// Fake UDC
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdcMode {
    /// Answers every batch with a final verdict.
    Up,
    /// Answers 503 to batches (the link itself works).
    Failing,
    /// Asks for the tags of chunk 0 first, then answers finally.
    TagsFirst,
    /// Refuses every batch outright (400 with a JSON reason).
    Refusing,
    /// Answers every batch 413 with an HTML page, as a proxy in front of
    /// the UDC does over its own body limit (nginx's default is 1 MiB).
    ProxyRefusing,
    /// Answers every batch 413 with the UDC's own JSON error body, as the
    /// UDC does over its `DAPGW_MAX_BODY_BYTES`.
    TooLarge,
    /// Answers a final verdict with one outcome fewer than the batch has
    /// entries (a buggy UDC), applying and storing nothing.
    ShortVerdict,
}

#[derive(Default)]
pub struct UdcState {
    pub mode: Mutex<Option<UdcMode>>,
    /// Stored verdicts by batch id, with the batch hash.
    pub verdicts: Mutex<BTreeMap<u64, ([u8; 32], Bytes)>>,
    /// Batches received in order of first arrival (decoded).
    pub batches: Mutex<Vec<Batch>>,
    /// Every entry applied: (member, group, round or ctr, kind). Duplicates
    /// are counted in `duplicates`.
    pub applied: Mutex<HashSet<(u64, u32, u64, u8)>>,
    pub duplicates: Mutex<u64>,
    pub tag_replies: Mutex<Vec<TagReply>>,
    pub subscriptions: Mutex<Vec<Vec<u32>>>,
    pub downlink: Mutex<Vec<(u64, Bytes)>>,
    pub downlink_notify: Notify,
    pub batch_notify: Notify,
    pub gateway_ids: Mutex<Vec<String>>,
    /// When each uplink (member, ctr) arrived, if `record_arrivals`.
    pub arrivals: Mutex<Vec<(u64, u64, std::time::Instant)>>,
    pub record_arrivals: std::sync::atomic::AtomicBool,
    /// Every `POST /v1/batches`, re-sends included.
    pub batch_posts: std::sync::atomic::AtomicU64,
    /// While set, a new batch is applied and its verdict stored, but the
    /// answer waits until this is cleared and `release` notified (an
    /// answer from a stored verdict is not held).
    pub hold_answers: std::sync::atomic::AtomicBool,
    pub release: Notify,
    /// Answers that went into the hold (counted once each).
    pub held: std::sync::atomic::AtomicU64,
    /// While set, a downlink pull with nothing new is answered 204 at
    /// once, whatever its `wait_ms` (a UDC that does not hold long polls).
    pub downlink_ignores_wait: std::sync::atomic::AtomicBool,
    /// When each downlink pull arrived.
    pub downlink_pulls: Mutex<Vec<std::time::Instant>>,
}

pub struct FakeUdc {
    pub addr: SocketAddr,
    pub state: Arc<UdcState>,
    task: JoinHandle<()>,
}

impl Drop for FakeUdc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUdc {
    pub async fn start(pki: &Pki) -> FakeUdc {
        Self::start_on(pki, TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    pub async fn start_on(pki: &Pki, listener: TcpListener) -> FakeUdc {
        let state = Arc::new(UdcState::default());
        *state.mode.lock().unwrap() = Some(UdcMode::Up);
        Self::start_with(pki, listener, state).await
    }

    pub async fn start_with(pki: &Pki, listener: TcpListener, state: Arc<UdcState>) -> FakeUdc {
        let addr = listener.local_addr().unwrap();
        let cfg =
            tls::server_config(&pki.server_cert, &pki.server_key, Some(&pki.ca), true).unwrap();
        let acceptor = cfg.acceptor();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                // As the real UDC does: without it a verdict written in
                // two pieces waits for the gateway's delayed ACK (40 ms).
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let gw = tls::peer_identity(tls.get_ref().1).unwrap_or_default();
                    st.gateway_ids.lock().unwrap().push(gw);
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(udc_handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeUdc { addr, state, task }
    }

    pub fn set_mode(&self, m: UdcMode) {
        *self.state.mode.lock().unwrap() = Some(m);
    }

    /// Queues a downlink record for the gateway (next cursor).
    pub fn push(&self, audience: u8, group: u32, member: u64, msg: &[u8]) -> u64 {
        let mut dl = self.state.downlink.lock().unwrap();
        let cursor = dl.len() as u64 + 1;
        dl.push((cursor, record(cursor, audience, group, member, msg)));
        drop(dl);
        self.state.downlink_notify.notify_waiters();
        cursor
    }

    /// Waits until `pred` holds over the state, re-checked on every batch
    /// and every downlink pull.
    pub async fn wait_until(&self, what: &str, pred: impl Fn(&UdcState) -> bool) {
        let fut = async {
            loop {
                let n = self.state.batch_notify.notified();
                if pred(&self.state) {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), n).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// `POST /v1/batches` received so far, re-sends included.
    pub fn batch_posts(&self) -> u64 {
        self.state
            .batch_posts
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` batch posts have arrived (re-sends
    /// included).
    pub async fn wait_batch_posts(&self, what: &str, n: u64) {
        self.wait_until(what, |s| {
            s.batch_posts.load(std::sync::atomic::Ordering::SeqCst) >= n
        })
        .await;
    }

    /// Holds (`true`) or releases (`false`) the answers to new batches.
    pub fn hold_answers(&self, hold: bool) {
        self.state
            .hold_answers
            .store(hold, std::sync::atomic::Ordering::SeqCst);
        if !hold {
            self.state.release.notify_waiters();
        }
    }

    pub fn applied(&self) -> HashSet<(u64, u32, u64, u8)> {
        self.state.applied.lock().unwrap().clone()
    }
}

/// The UDC's JSON error body (docs/udc.md), which the gateway needs to
/// take a 400/409 as the UDC's own refusal.
fn refusal(code: &str) -> Bytes {
    Bytes::from(serde_json::json!({"error": code, "reason": "refused by the fake UDC"}).to_string())
}

fn answer(status: StatusCode, body: Bytes) -> HttpResponse<Full<Bytes>> {
    let mut r = HttpResponse::new(Full::new(body));
    *r.status_mut() = status;
    r
}

fn final_verdict(batch: &Batch, hash: [u8; 32]) -> Verdict {
    let (outcomes, confirms) = match &batch.body {
        BatchBody::Responses { round, entries, .. } => (
            vec![Outcome::Accepted; entries.len()],
            entries
                .iter()
                .map(|e| Confirm {
                    group: batch.group,
                    round: *round,
                    epoch: 1,
                    id: e.id,
                    sid: SessionId(e.id.0.to_be_bytes()),
                    w: [7; 32],
                })
                .collect(),
        ),
        BatchBody::Uplinks { entries } => (vec![Outcome::Accepted; entries.len()], Vec::new()),
    };
    Verdict {
        gateway_id: batch.gateway_id,
        batch_id: batch.batch_id,
        batch_hash: hash,
        body: VerdictBody::Final { outcomes, confirms },
    }
}

fn apply(st: &UdcState, batch: &Batch) {
    if st
        .record_arrivals
        .load(std::sync::atomic::Ordering::Relaxed)
        && let BatchBody::Uplinks { entries } = &batch.body
    {
        let now = std::time::Instant::now();
        st.arrivals
            .lock()
            .unwrap()
            .extend(entries.iter().map(|e| (e.id.0, e.ctr, now)));
    }
    let mut applied = st.applied.lock().unwrap();
    let mut dups = st.duplicates.lock().unwrap();
    let keys: Vec<(u64, u32, u64, u8)> = match &batch.body {
        BatchBody::Responses { round, entries, .. } => entries
            .iter()
            .map(|e| (e.id.0, batch.group.0, *round, 1))
            .collect(),
        BatchBody::Uplinks { entries } => entries
            .iter()
            .map(|e| (e.id.0, batch.group.0, e.ctr, 2))
            .collect(),
    };
    for k in keys {
        if !applied.insert(k) {
            *dups += 1;
        }
    }
}

async fn udc_handle(st: Arc<UdcState>, req: Request<Incoming>) -> HttpResponse<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mode = st.mode.lock().unwrap().unwrap_or(UdcMode::Up);
    match (method, path.as_str()) {
        (Method::PUT, "/v1/subscriptions") => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let groups: Vec<u32> = v["groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g.as_u64().unwrap() as u32)
                .collect();
            st.subscriptions.lock().unwrap().push(groups);
            answer(StatusCode::NO_CONTENT, Bytes::new())
        }
        (Method::POST, "/v1/batches") => {
            st.batch_posts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if mode == UdcMode::Failing {
                return answer(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
            }
            if mode == UdcMode::ProxyRefusing {
                return answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Bytes::from_static(
                        b"<html><head><title>413 Request Entity Too Large</title></head></html>",
                    ),
                );
            }
            if mode == UdcMode::TooLarge {
                return answer(StatusCode::PAYLOAD_TOO_LARGE, refusal("too_large"));
            }
            if mode == UdcMode::Refusing {
                return answer(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(
                        b"{\"error\":\"decode\",\"reason\":\"refused by the test\"}",
                    ),
                );
            }
            let Ok(batch) = Batch::decode(&body) else {
                return answer(StatusCode::BAD_REQUEST, refusal("bad_request"));
            };
            if batch.check_structure().is_err() {
                return answer(StatusCode::BAD_REQUEST, refusal("bad_request"));
            }
            let hash: [u8; 32] = Sha256::digest(&body).into();
            if let Some((h, v)) = st.verdicts.lock().unwrap().get(&batch.batch_id).cloned() {
                st.batch_notify.notify_waiters();
                return if h == hash {
                    answer(StatusCode::OK, v)
                } else {
                    answer(StatusCode::CONFLICT, refusal("conflict"))
                };
            }
            st.batches.lock().unwrap().push(batch.clone());
            if mode == UdcMode::TagsFirst {
                let v = Verdict {
                    gateway_id: batch.gateway_id,
                    batch_id: batch.batch_id,
                    batch_hash: hash,
                    body: VerdictBody::TagsRequested { chunks: vec![0] },
                };
                return answer(StatusCode::OK, v.to_bytes());
            }
            if mode == UdcMode::ShortVerdict {
                let mut v = final_verdict(&batch, hash);
                if let VerdictBody::Final { outcomes, .. } = &mut v.body {
                    outcomes.pop();
                }
                return answer(StatusCode::OK, v.to_bytes());
            }
            let v = final_verdict(&batch, hash).to_bytes();
            apply(&st, &batch);
            st.verdicts
                .lock()
                .unwrap()
                .insert(batch.batch_id, (hash, v.clone()));
            st.batch_notify.notify_waiters();
            let mut counted = false;
            loop {
                let released = st.release.notified();
                if !st.hold_answers.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if !std::mem::replace(&mut counted, true) {
                    st.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                released.await;
            }
            answer(StatusCode::OK, v)
        }
        (Method::POST, "/v1/tags") => {
            let Ok(reply) = TagReply::decode(&body) else {
                return answer(StatusCode::BAD_REQUEST, refusal("bad_request"));
            };
            let batch = st
                .batches
                .lock()
                .unwrap()
                .iter()
                .find(|b| b.batch_id == reply.batch_id)
                .cloned();
            let Some(batch) = batch else {
                return answer(StatusCode::NOT_FOUND, Bytes::new());
            };
            st.tag_replies.lock().unwrap().push(reply.clone());
            let v = final_verdict(&batch, reply.batch_hash).to_bytes();
            apply(&st, &batch);
            st.verdicts
                .lock()
                .unwrap()
                .insert(batch.batch_id, (reply.batch_hash, v.clone()));
            st.batch_notify.notify_waiters();
            answer(StatusCode::OK, v)
        }
        (Method::GET, "/v1/downlink") => {
            st.downlink_pulls
                .lock()
                .unwrap()
                .push(std::time::Instant::now());
            st.batch_notify.notify_waiters();
            if st
                .downlink_ignores_wait
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return answer(StatusCode::NO_CONTENT, Bytes::new());
            }
            let mut after = 0u64;
            let mut wait = 1000u64;
            for kv in query.split('&') {
                if let Some(v) = kv.strip_prefix("after=") {
                    after = v.parse().unwrap();
                }
                if let Some(v) = kv.strip_prefix("wait_ms=") {
                    wait = v.parse().unwrap();
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
            loop {
                let n = st.downlink_notify.notified();
                let out: Vec<Bytes> = st
                    .downlink
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(c, _)| *c > after)
                    .map(|(_, b)| b.clone())
                    .collect();
                if !out.is_empty() {
                    return answer(StatusCode::OK, Bytes::from(out.concat()));
                }
                if st
                    .downlink_ignores_wait
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    return answer(StatusCode::NO_CONTENT, Bytes::new());
                }
                if tokio::time::timeout_at(deadline, n).await.is_err() {
                    return answer(StatusCode::NO_CONTENT, Bytes::new());
                }
            }
        }
        _ => answer(StatusCode::NOT_FOUND, Bytes::new()),
    }
}

// ---------------------------------------------------------------------------
// Member client
// ---------------------------------------------------------------------------

pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

pub struct Client {
    sender: Sender,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not json: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl Client {
    /// Another handle on the same HTTP/2 connection (streams multiplex).
    pub fn try_clone(&self) -> Option<Client> {
        match &self.sender {
            Sender::H2(s) => Some(Client {
                sender: Sender::H2(s.clone()),
            }),
            Sender::H1(_) => None,
        }
    }

    pub async fn connect(addr: SocketAddr, pki: &Pki, h2: bool) -> Client {
        Self::connect_as(addr, pki, h2, None).await
    }

    /// A connection from local address `ip` (any 127.x.y.z on Linux): a
    /// distinct source for the gateway's per-source limits.
    pub async fn connect_from(addr: SocketAddr, pki: &Pki, h2: bool, ip: [u8; 4]) -> Client {
        Self::connect_with(addr, pki, h2, None, Some(ip)).await
    }

    pub async fn connect_as(
        addr: SocketAddr,
        pki: &Pki,
        h2: bool,
        cert: Option<(&Path, &Path)>,
    ) -> Client {
        Self::connect_with(addr, pki, h2, cert, None).await
    }

    async fn connect_with(
        addr: SocketAddr,
        pki: &Pki,
        h2: bool,
        cert: Option<(&Path, &Path)>,
        from: Option<[u8; 4]>,
    ) -> Client {
        let roots = tls::load_roots(&pki.ca).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match cert {
            Some((c, k)) => builder
                .with_client_auth_cert(tls::load_certs(c).unwrap(), tls::load_key(k).unwrap())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = match from {
            Some(ip) => {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind(SocketAddr::from((ip, 0))).unwrap();
                sock.connect(addr).await.unwrap()
            }
            None => TcpStream::connect(addr).await.unwrap(),
        };
        tcp.set_nodelay(true).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        let io = TokioIo::new(stream);
        let sender = if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Client { sender }
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        };
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn attach(&mut self, member: u64, groups: &[u32]) -> Reply {
        let body = serde_json::json!({"member": member, "groups": groups}).to_string();
        self.send(Method::POST, "/v1/attach", Some("application/json"), body)
            .await
    }

    pub async fn post(&mut self, msg: Bytes) -> Reply {
        self.send(
            Method::POST,
            "/v1/uplink",
            Some("application/vnd.dapgw"),
            msg,
        )
        .await
    }

    pub async fn poll(&mut self, member: u64, groups: &[u32], after: u64, wait_ms: u64) -> Reply {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let path = format!(
            "/v1/downlink?member={member}&groups={}&after={after}&wait_ms={wait_ms}",
            groups.join(",")
        );
        self.send(Method::GET, &path, None, Bytes::new()).await
    }
}

/// A TLS connection to a gateway's member listener from `from` (any
/// 127.x.y.z) offering `alpn`, no client certificate: for tests that speak
/// the protocol below [`Client`].
pub async fn raw(
    addr: SocketAddr,
    pki: &Pki,
    alpn: &[u8],
    from: [u8; 4],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let roots = tls::load_roots(&pki.ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((from, 0)))?;
    let tcp = sock.connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    // TLS 1.3: a server that closes at once is seen on the first read.
    tokio::io::AsyncWriteExt::flush(&mut tls).await?;
    Ok(tls)
}

// ---------------------------------------------------------------------------
// In-process gateway
// ---------------------------------------------------------------------------

pub struct Gateway {
    pub members: SocketAddr,
    pub admin: SocketAddr,
    pub spool_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), dapgw::gateway::GatewayError>>>,
}

pub fn gateway_config(pki: &Pki, udc: SocketAddr, spool_dir: &Path) -> GatewayConfig {
    let (cert, key) = pki.clients.get("gw-1").expect("a gw-1 client").clone();
    GatewayConfig {
        upstream_url: SecretUrl::new(format!("https://127.0.0.1:{}", udc.port())),
        upstream_ca: pki.ca.clone(),
        upstream_client_cert: cert,
        upstream_client_key: key,
        gateway_id: "gw-1".into(),
        tls_cert: pki.server_cert.clone(),
        tls_key: pki.server_key.clone(),
        spool_dir: spool_dir.to_path_buf(),
        spool_max_bytes: ByteSize::mib(64),
        batch_linger_ms: 20,
        round_deadline_ms: 3000,
        drain_grace_ms: 3000,
        retry_max_ms: 200,
        upstream_timeout_ms: 5000,
        ..GatewayConfig::default()
    }
}

impl Gateway {
    pub async fn start(config: GatewayConfig) -> Gateway {
        let members = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (members_addr, admin_addr) =
            (members.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let spool_dir = config.spool_dir.clone();
        let task = tokio::spawn(run(config, Listeners { members, admin }, async {
            let _ = rx.await;
        }));
        let gw = Gateway {
            members: members_addr,
            admin: admin_addr,
            spool_dir,
            stop: Some(tx),
            task: Some(task),
        };
        gw.wait_ready().await;
        gw
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let tcp = TcpStream::connect(self.admin).await.unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Waits until /readyz says 200 (upstream link up and spool usable).
    ///
    /// Bounded by 30 s of real time: under a paused clock (`start_paused`
    /// tests) the 20 ms sleeps auto-advance at once, so a bound in steps
    /// would leave the spool's writer thread and the TLS handshakes, which
    /// take real time, only a fraction of a second.
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.admin_get("/readyz").await.0 != StatusCode::OK {
            assert!(
                std::time::Instant::now() < deadline,
                "gateway never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A metric's value: the sample of `series`, written as exposed
    /// (`name` or `name{k="v",...}`); panics when there is none.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        dapgw::admin::MetricsPage::parse(&text)
            .get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }

    /// Starts the drain; returns the run task.
    pub fn shutdown(&mut self) -> JoinHandle<Result<(), dapgw::gateway::GatewayError>> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }

    pub async fn stop(mut self) {
        self.shutdown().await.unwrap().unwrap();
    }
}
