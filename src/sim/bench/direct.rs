//! Flow A, `direct-mtls`: every member opens its own TLS 1.3 connection with
//! its client certificate straight to the UDC and POSTs one reading
//! (HTTP/1.1, one request per connection). `direct-mtls-resumed` first gives
//! each member a session ticket (warm-up, reported apart), then measures the
//! resumed connections: the best case for TLS.
//!
//! Also the baseline UDC role both flows use, and the members load driver.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use super::{
    ControlIn, Counting, IdentityMode, MembersArgs, RoleLaunch, Scenario, Traffic, UdcArgs, emit,
    member_index, member_name,
};

/// Largest reading body accepted.
pub(crate) const MAX_BODY: usize = 1024;

/// Header naming the member, set by the hop-by-hop gateway.
pub(crate) const MEMBER_HEADER: &str = "x-member-id";

/// The `direct-mtls` scenario, or `direct-mtls-resumed` with `resumed`.
pub(crate) fn scenario(resumed: bool) -> Scenario {
    let mut udc = vec![
        "udc",
        "--pki",
        "{pki}",
        "--members",
        "{members}",
        "--identity",
        "cert",
    ];
    let mut drv = vec![
        "members",
        "--target",
        "{addr:udc}",
        "--pki",
        "{pki}",
        "--members",
        "{members}",
        "--concurrency",
        "{concurrency}",
    ];
    if resumed {
        udc.push("--tickets");
        drv.push("--resume");
    }
    Scenario {
        name: if resumed {
            "direct-mtls-resumed"
        } else {
            "direct-mtls"
        }
        .into(),
        description: if resumed {
            "flow A, TLS 1.3 mTLS per member, resumed from a ticket"
        } else {
            "flow A, TLS 1.3 mTLS per member, full handshake"
        }
        .into(),
        servers: vec![RoleLaunch::bench_role("udc", &udc)],
        driver: RoleLaunch::bench_role("members", &drv),
        udc: "udc".into(),
        gateway: None,
        counter_sources: Vec::new(),
        settle: Vec::new(),
    }
}

/// A member's reading as posted.
#[derive(serde::Serialize, serde::Deserialize)]
struct Reading {
    member: String,
    seq: u64,
    kwh: f64,
}

/// What the UDC role counts.
struct UdcState {
    identity: IdentityMode,
    traffic: Arc<Traffic>,
    requests: AtomicU64,
    readings: AtomicU64,
    distinct: AtomicU64,
    duplicate: AtomicU64,
    rejected: AtomicU64,
    /// Readings per member (saturating at 255).
    seen: Vec<AtomicU8>,
}

impl UdcState {
    fn counters(&self) -> Value {
        let mut m = Map::new();
        self.traffic.fill(&mut m);
        for (k, v) in [
            ("requests", &self.requests),
            ("readings", &self.readings),
            ("readings_distinct", &self.distinct),
            ("readings_duplicate", &self.duplicate),
            ("readings_rejected", &self.rejected),
        ] {
            m.insert(k.into(), json!(v.load(Ordering::Relaxed)));
        }
        Value::Object(m)
    }

    /// Checks and records one reading; the status for the sender.
    fn record(&self, peer: Option<&str>, header: Option<&str>, body: &[u8]) -> StatusCode {
        let who = match self.identity {
            IdentityMode::Cert => peer,
            IdentityMode::GatewayHeader if peer == Some(super::GATEWAY_IDENTITY) => header,
            IdentityMode::GatewayHeader => None,
        };
        let reading: Option<Reading> = serde_json::from_slice(body).ok();
        let index = match (who, reading) {
            (Some(who), Some(r)) if r.member == who && r.kwh.is_finite() => {
                member_index(who, self.seen.len())
            }
            _ => None,
        };
        let Some(i) = index else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return StatusCode::FORBIDDEN;
        };
        self.readings.fetch_add(1, Ordering::Relaxed);
        let before = self.seen[i]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_add(1))
            })
            .unwrap_or(u8::MAX);
        if before == 0 {
            self.distinct.fetch_add(1, Ordering::Relaxed);
        } else {
            self.duplicate.fetch_add(1, Ordering::Relaxed);
        }
        StatusCode::NO_CONTENT
    }
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

async fn udc_handle(
    req: Request<Incoming>,
    peer: Option<Arc<str>>,
    state: Arc<UdcState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/hello") => empty(StatusCode::NO_CONTENT),
        (&Method::POST, "/reading") => {
            let header = req
                .headers()
                .get(MEMBER_HEADER)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string);
            match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => {
                    empty(state.record(peer.as_deref(), header.as_deref(), &body.to_bytes()))
                }
                Err(_) => {
                    state.rejected.fetch_add(1, Ordering::Relaxed);
                    empty(StatusCode::PAYLOAD_TOO_LARGE)
                }
            }
        }
        _ => empty(StatusCode::NOT_FOUND),
    };
    Ok(resp)
}

/// Serves one accepted TLS connection with HTTP/1.1 or h2 (by ALPN).
pub(crate) async fn serve_http<S, F, Fut>(tls: tokio_rustls::server::TlsStream<S>, handler: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>, Option<Arc<str>>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let (_, conn) = tls.get_ref();
    let peer: Option<Arc<str>> = crate::tls::peer_identity(conn).map(Arc::from);
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let svc = hyper::service::service_fn(move |req| handler(req, peer.clone()));
    let io = TokioIo::new(tls);
    // A peer that goes away mid-request is its own problem: nothing to do.
    let _ = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
    };
}

/// Accepts TCP connections on `listener` until aborted, counting their
/// bytes in `traffic`, and serves each with [`serve_http`] after the TLS
/// handshake (a failed handshake closes that connection only).
pub(crate) fn serve_tls<F, Fut>(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    traffic: Arc<Traffic>,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>, Option<Arc<str>>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                // Out of descriptors, say: back off instead of spinning.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let traffic = traffic.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(Counting::new(tcp, traffic)).await else {
                    return;
                };
                serve_http(tls, handler).await;
            });
        }
    })
}

/// `dapgw bench role udc`.
pub(crate) async fn udc(args: UdcArgs) -> anyhow::Result<()> {
    let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
    let tls = super::server_tls(&args.pki, alpn, args.tickets)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let state = Arc::new(UdcState {
        identity: args.identity,
        traffic: Arc::default(),
        requests: AtomicU64::new(0),
        readings: AtomicU64::new(0),
        distinct: AtomicU64::new(0),
        duplicate: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        seen: (0..args.members).map(|_| AtomicU8::new(0)).collect(),
    });
    emit(json!({"event": "ready", "addr": listener.local_addr()?.to_string()}));
    let handler_state = state.clone();
    let accept = serve_tls(
        listener,
        acceptor,
        state.traffic.clone(),
        move |req, peer| udc_handle(req, peer, handler_state.clone()),
    );
    let res = ControlIn::new().serve(|| state.counters()).await;
    accept.abort();
    res
}

// ---------------------------------------------------------------------------
// The members load driver
// ---------------------------------------------------------------------------

/// Outcome counts of one driver phase.
#[derive(Default)]
struct PhaseStats {
    ok: AtomicU64,
    failed: AtomicU64,
    full_handshakes: AtomicU64,
    resumed_handshakes: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl PhaseStats {
    fn json(&self, event: &str, wall: std::time::Duration) -> Value {
        let err = self
            .first_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        json!({
            "event": event,
            "ok": self.ok.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "full_handshakes": self.full_handshakes.load(Ordering::Relaxed),
            "resumed_handshakes": self.resumed_handshakes.load(Ordering::Relaxed),
            "first_error": err,
            "driver_wall_s": wall.as_secs_f64(),
        })
    }
}

/// Per-member client configurations: member `i`'s certificate and key, its
/// own session cache when `resume`.
fn member_configs(args: &MembersArgs) -> anyhow::Result<Vec<Arc<rustls::ClientConfig>>> {
    let roots = Arc::new(crate::tls::load_roots(&args.pki.join("ca.pem"))?);
    let certs_path = args.pki.join("members.pem");
    let keys_path = args.pki.join("members.key");
    let certs = CertificateDer::pem_file_iter(&certs_path)
        .with_context(|| format!("reading {}", certs_path.display()))?;
    let keys = PrivateKeyDer::pem_file_iter(&keys_path)
        .with_context(|| format!("reading {}", keys_path.display()))?;
    let provider = super::provider();
    let mut out = Vec::with_capacity(args.members);
    for (cert, key) in certs.zip(keys).take(args.members) {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(vec![cert?], key?)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.resumption = if args.resume {
            rustls::client::Resumption::in_memory_sessions(4)
        } else {
            rustls::client::Resumption::disabled()
        };
        out.push(Arc::new(cfg));
    }
    if out.len() != args.members {
        bail!(
            "{} holds {} members, {} asked",
            certs_path.display(),
            out.len(),
            args.members
        );
    }
    Ok(out)
}

/// One member connection: TLS to `target`, then `GET /hello` (warm-up) or
/// `POST /reading`, one request, then close.
async fn one_member(
    i: usize,
    cfg: Arc<rustls::ClientConfig>,
    target: std::net::SocketAddr,
    reading: bool,
    stats: &PhaseStats,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &stats.resumed_handshakes,
        _ => &stats.full_handshakes,
    }
    .fetch_add(1, Ordering::Relaxed);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);
    let req = if reading {
        let body = serde_json::to_vec(&Reading {
            member: member_name(i),
            seq: 1,
            kwh: 1000.0 + i as f64 * 0.125,
        })?;
        Request::post("/reading")
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?
    } else {
        Request::get("/hello")
            .header(hyper::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))?
    };
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    drop(sender);
    conn.await??;
    if !status.is_success() {
        bail!("member {i}: HTTP {status}");
    }
    Ok(())
}

async fn run_phase(
    configs: &[Arc<rustls::ClientConfig>],
    args: &MembersArgs,
    reading: bool,
    event: &str,
) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let stats = Arc::new(PhaseStats::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (i, cfg) in configs.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let (cfg, stats, target) = (cfg.clone(), stats.clone(), args.target);
        set.spawn(async move {
            let res = one_member(i, cfg, target, reading, &stats).await;
            drop(permit);
            match res {
                Ok(()) => stats.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    if let Ok(mut first) = stats.first_error.lock() {
                        first.get_or_insert_with(|| format!("member {i}: {e:#}"));
                    }
                    stats.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        });
        while set.try_join_next().is_some() {}
    }
    while let Some(res) = set.join_next().await {
        res.map_err(|e| anyhow!("member task: {e}"))?;
    }
    Ok(stats.json(event, started.elapsed()))
}

/// `dapgw bench role members`.
pub(crate) async fn members(args: MembersArgs) -> anyhow::Result<()> {
    let configs = member_configs(&args)?;
    let mut control = ControlIn::new();
    emit(json!({"event": "ready"}));
    let wait_go = |cmd: Option<String>| match cmd.as_deref() {
        Some("go") => Ok(()),
        other => Err(anyhow!("expected go, got {other:?}")),
    };
    wait_go(control.next().await?)?;
    if args.resume {
        emit(run_phase(&configs, &args, false, "warm").await?);
        wait_go(control.next().await?)?;
    }
    emit(run_phase(&configs, &args, true, "done").await?);
    // Stay until the harness has read this process's CPU time.
    while control.next().await?.is_some() {}
    Ok(())
}
