//! Flow B, `hop-by-hop` (the traditional DAP): members use mutual TLS to a
//! terminating gateway, which reads each plaintext reading and forwards it
//! over its own persistent TLS connection (h2, client certificate
//! [`GATEWAY_IDENTITY`](super::GATEWAY_IDENTITY)) to the UDC. The UDC
//! trusts the gateway to name the member (`x-member-id`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use super::direct::{MAX_BODY, MEMBER_HEADER, serve_tls};
use super::{ControlIn, GatewayArgs, RoleLaunch, Scenario, Traffic, emit};

/// The `hop-by-hop` scenario.
pub(crate) fn scenario() -> Scenario {
    Scenario {
        name: "hop-by-hop".into(),
        description: "flow B, mTLS to a terminating gateway, one TLS link to the UDC".into(),
        servers: vec![
            RoleLaunch::bench_role(
                "udc",
                &[
                    "udc",
                    "--pki",
                    "{pki}",
                    "--members",
                    "{members}",
                    "--identity",
                    "gateway-header",
                ],
            ),
            RoleLaunch::bench_role(
                "gateway",
                &["gateway", "--upstream", "{addr:udc}", "--pki", "{pki}"],
            ),
        ],
        driver: RoleLaunch::bench_role(
            "members",
            &[
                "members",
                "--target",
                "{addr:gateway}",
                "--pki",
                "{pki}",
                "--members",
                "{members}",
                "--concurrency",
                "{concurrency}",
            ],
        ),
        udc: "udc".into(),
        gateway: Some("gateway".into()),
        counter_sources: Vec::new(),
        settle: Vec::new(),
    }
}

struct GatewayState {
    traffic: Arc<Traffic>,
    requests: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    upstream: SendRequest<Full<Bytes>>,
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}

async fn handle(
    req: Request<Incoming>,
    peer: Option<Arc<str>>,
    state: Arc<GatewayState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if (req.method(), req.uri().path()) != (&Method::POST, "/reading") {
        return Ok(status(StatusCode::NOT_FOUND));
    }
    let Some(peer) = peer else {
        return Ok(status(StatusCode::FORBIDDEN));
    };
    let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
        return Ok(status(StatusCode::PAYLOAD_TOO_LARGE));
    };
    // The gateway sees the plaintext here: that is the point of flow B.
    let fwd = Request::post("/reading")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(MEMBER_HEADER, &*peer)
        .body(Full::new(body.to_bytes()));
    let Ok(fwd) = fwd else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let mut up = state.upstream.clone();
    let res = match up.ready().await {
        Ok(()) => up.send_request(fwd).await,
        Err(e) => Err(e),
    };
    Ok(match res {
        Ok(resp) => {
            let s = resp.status();
            let _ = resp.into_body().collect().await;
            state.forwarded.fetch_add(1, Ordering::Relaxed);
            status(s)
        }
        Err(_) => {
            state.failed.fetch_add(1, Ordering::Relaxed);
            status(StatusCode::BAD_GATEWAY)
        }
    })
}

/// The gateway's persistent h2 link to the UDC.
async fn connect_upstream(args: &GatewayArgs) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let roots = crate::tls::load_roots(&args.pki.join("ca.pem"))?;
    let chain = crate::tls::load_certs(&args.pki.join("gateway.pem"))?;
    let key = crate::tls::load_key(&args.pki.join("gateway.key"))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(args.upstream)
        .await
        .with_context(|| format!("connecting to the UDC at {}", args.upstream))?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("dapgw bench gateway: upstream link: {e}");
        }
    });
    Ok(sender)
}

/// `dapgw bench role gateway`.
pub(crate) async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
    let tls = super::server_tls(&args.pki, alpn, false)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let upstream = connect_upstream(&args).await?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let state = Arc::new(GatewayState {
        traffic: Arc::default(),
        requests: AtomicU64::new(0),
        forwarded: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        upstream,
    });
    emit(json!({"event": "ready", "addr": listener.local_addr()?.to_string()}));
    let handler_state = state.clone();
    let accept = serve_tls(
        listener,
        acceptor,
        state.traffic.clone(),
        move |req, peer| handle(req, peer, handler_state.clone()),
    );
    let counters = || {
        let mut m = Map::new();
        state.traffic.fill(&mut m);
        for (k, v) in [
            ("requests", &state.requests),
            ("forwarded", &state.forwarded),
            ("forward_failed", &state.failed),
        ] {
            m.insert(k.into(), json!(v.load(Ordering::Relaxed)));
        }
        Value::Object(m)
    };
    let res = ControlIn::new().serve(counters).await;
    accept.abort();
    res
}
