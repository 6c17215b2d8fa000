//! The admin surface: /metrics, /healthz, /readyz over a real socket on
//! 127.0.0.1:0, readiness transitions, the `dapgw health` probe, and
//! `promtool check metrics` on both services' metric pages.

#[path = "support/skip.rs"]
mod skip;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dapgw::admin::{self, Fallback, ProbeCheck, ProbeError, Readiness};
use dapgw::telemetry::{
    self, EntryKind, GatewayMetrics, MemberEndpoint, ProcessMetrics, RequestOutcome,
    UdcBatchOutcome, UdcMetrics,
};
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running admin server and the means to stop it.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(registry: Registry, readiness: Readiness, fallback: Option<Fallback>) -> Self {
        Self::start_on("127.0.0.1:0", registry, readiness, fallback).await
    }

    async fn start_on(
        bind: &str,
        registry: Registry,
        readiness: Readiness,
        fallback: Option<Fallback>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(admin::serve_with_fallback(
            listener,
            registry,
            readiness,
            fallback,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("admin server stops after shutdown")
            .unwrap();
    }
}

/// One HTTP/1.1 request on a fresh connection.
async fn request(addr: SocketAddr, method: Method, path: &str) -> (StatusCode, HeaderMap, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    request(addr, Method::GET, path).await
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn endpoints_and_readiness_transitions() {
    let registry = Registry::new();
    let metrics = GatewayMetrics::register(&registry);
    let readiness = Readiness::gateway();
    // A loopback address of its own: the other tests bind 127.0.0.1, so none
    // of them can take this port over once the server closes it.
    let server = Server::start_on("127.0.0.91:0", registry, readiness.clone(), None).await;
    let addr = server.addr;

    // Liveness is independent of readiness.
    let (status, headers, body) = get(addr, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.trim(), "ok");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );

    // Not ready at start: both parts named.
    let (status, headers, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        json(&body),
        serde_json::json!({"ready": false, "not_ready": ["upstream", "spool"]})
    );

    readiness.set_upstream(true);
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["not_ready"], serde_json::json!(["spool"]));

    readiness.set_spool(true);
    let (status, _, body) = get(addr, "/readyz?verbose=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body), serde_json::json!({"ready": true}));

    // Upstream lost, then back.
    readiness.set_upstream(false);
    assert_eq!(
        get(addr, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    readiness.set_upstream(true);
    assert_eq!(get(addr, "/readyz").await.0, StatusCode::OK);

    // Metrics reflect what the service records.
    metrics
        .member_requests
        .get(MemberEndpoint::Response, RequestOutcome::Ok)
        .inc_by(3);
    metrics.spool_bytes.set(4096);
    let (status, headers, body) = get(addr, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        body.contains("dapgw_member_requests_total{endpoint=\"response\",outcome=\"ok\"} 3"),
        "{body}"
    );
    assert!(body.contains("dapgw_spool_bytes 4096"), "{body}");
    assert!(body.contains("dapgw_build_info{version="), "{body}");

    // HEAD works; other methods on known paths are refused; unknown paths 404.
    assert_eq!(
        request(addr, Method::HEAD, "/healthz").await.0,
        StatusCode::OK
    );
    let (status, headers, _) = request(addr, Method::POST, "/metrics").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["allow"], "GET, HEAD");
    for path in ["/", "/metrics/", "/readyz/x", "/admin", "/healthzz"] {
        assert_eq!(get(addr, path).await.0, StatusCode::NOT_FOUND, "{path}");
    }

    // SIGTERM: not ready for good, while liveness stays 200.
    readiness.set_draining();
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["not_ready"], serde_json::json!(["draining"]));
    assert_eq!(get(addr, "/healthz").await.0, StatusCode::OK);

    server.stop().await;
    // The listener is closed once serve returns. A child process that another
    // test forks (promtool, `dapgw health`) holds a copy of every descriptor
    // until its exec closes them (CLOEXEC), so a connect can still land in
    // that instant: the port must be refused within a short deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the admin listener still accepts after serve returned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/readyz?exclude=upstream`, the gateway's Kubernetes readiness probe:
/// ready while the spool is usable whatever the upstream, so the member
/// Service keeps routing to a gateway that spools through a WAN outage;
/// still 503 without the spool and once draining. Plain /readyz unchanged.
#[tokio::test]
async fn readyz_can_exclude_the_upstream() {
    let readiness = Readiness::gateway();
    let server = Server::start(Registry::new(), readiness.clone(), None).await;
    let addr = server.addr;
    const MEMBERS: &str = "/readyz?exclude=upstream";

    // Nothing usable yet: only the spool is named.
    let (status, _, body) = get(addr, MEMBERS).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        json(&body),
        serde_json::json!({"ready": false, "not_ready": ["spool"]})
    );

    // Spool usable, upstream down: ready for members, not for /readyz.
    readiness.set_spool(true);
    let (status, _, body) = get(addr, MEMBERS).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body), serde_json::json!({"ready": true}));
    let (status, _, body) = get(addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["not_ready"], serde_json::json!(["upstream"]));
    // Other parameters are ignored; exclude may repeat.
    assert_eq!(
        get(addr, "/readyz?verbose&exclude=upstream").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/readyz?exclude=upstream&exclude=spool").await.0,
        StatusCode::OK
    );

    // Spool lost: not ready either way.
    readiness.set_spool(false);
    assert_eq!(get(addr, MEMBERS).await.0, StatusCode::SERVICE_UNAVAILABLE);
    readiness.set_spool(true);
    readiness.set_upstream(true);
    assert_eq!(get(addr, "/readyz").await.0, StatusCode::OK);
    assert_eq!(get(addr, MEMBERS).await.0, StatusCode::OK);

    // A mistyped check is refused with a reason, not silently ignored;
    // draining cannot be excluded.
    for bad in ["/readyz?exclude=upstraem", "/readyz?exclude=draining"] {
        let (status, _, body) = get(addr, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body.contains("unknown readiness check"), "{body}");
    }

    // SIGTERM: 503 on both, whatever is excluded.
    readiness.set_draining();
    let (status, _, body) = get(addr, MEMBERS).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["not_ready"], serde_json::json!(["draining"]));
    assert_eq!(
        get(addr, "/readyz?exclude=upstream&exclude=spool").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(addr, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    server.stop().await;
}

#[tokio::test]
async fn udc_readiness_waits_for_the_store() {
    let registry = Registry::new();
    UdcMetrics::register(&registry);
    let readiness = Readiness::udc();
    let server = Server::start(registry, readiness.clone(), None).await;
    let (status, _, body) = get(server.addr, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&body)["not_ready"], serde_json::json!(["store"]));
    readiness.set_store(true);
    assert_eq!(get(server.addr, "/readyz").await.0, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn probe_reports_readiness() {
    let registry = Registry::new();
    let readiness = Readiness::gateway();
    let server = Server::start(registry, readiness.clone(), None).await;
    let target = server.addr.to_string();

    // Live but not ready: the probe's error carries the readiness body.
    admin::probe(&target, ProbeCheck::Live, PROBE_TIMEOUT)
        .await
        .unwrap();
    let err = admin::probe(&target, ProbeCheck::Ready, PROBE_TIMEOUT)
        .await
        .unwrap_err();
    match &err {
        ProbeError::NotOk { status, body, .. } => {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(body.contains("upstream"), "{body}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains(&target), "{err}");

    readiness.set_upstream(true);
    readiness.set_spool(true);
    admin::probe(
        &format!("http://{target}/"),
        ProbeCheck::Ready,
        PROBE_TIMEOUT,
    )
    .await
    .unwrap();
    server.stop().await;

    // Nothing listens any more.
    let err = admin::probe(&target, ProbeCheck::Live, PROBE_TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. }), "{err:?}");
    assert!(matches!(
        admin::probe("nonsense", ProbeCheck::Live, PROBE_TIMEOUT).await,
        Err(ProbeError::BadTarget(_))
    ));
}

#[tokio::test]
async fn probe_times_out_on_a_silent_peer() {
    // A listener that accepts but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        // Keep the socket open until the test ends.
        std::future::pending::<()>().await;
        drop(s);
    });
    let err = admin::probe(
        &addr.to_string(),
        ProbeCheck::Live,
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ProbeError::Timeout { .. }), "{err:?}");
    hold.abort();
}

#[tokio::test]
async fn fallback_serves_other_paths() {
    let fallback: Fallback = Arc::new(|req: Request<Bytes>| {
        Box::pin(async move {
            (req.uri().path() == "/v1/operator")
                .then(|| hyper::Response::new(Full::new(Bytes::from_static(b"operator\n"))))
        })
    });
    let server = Server::start(Registry::new(), Readiness::udc(), Some(fallback)).await;
    let (status, _, body) = get(server.addr, "/v1/operator").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "operator\n");
    assert_eq!(get(server.addr, "/v1/other").await.0, StatusCode::NOT_FOUND);
    // Built-in paths are not handed to the fallback.
    assert_eq!(get(server.addr, "/healthz").await.0, StatusCode::OK);
    server.stop().await;
}

/// A connection to `addr` from the loopback address `from` (127.0.0.x).
async fn connect_from(addr: SocketAddr, from: [u8; 4]) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((from, 0))).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Sends `head` (and nothing more) on a fresh connection and reads until
/// the server closes it or `within` passes; returns what was read.
async fn raw_exchange(addr: SocketAddr, head: &str, within: Duration) -> String {
    raw_exchange_from(addr, [127, 0, 0, 1], head, within).await
}

/// [`raw_exchange`] from the loopback address `from`.
async fn raw_exchange_from(
    addr: SocketAddr,
    from: [u8; 4],
    head: &str,
    within: Duration,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = connect_from(addr, from).await;
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A fallback request's body is read before the fallback authenticates it:
/// one that does not arrive in time is 408 and one over the cap is 413,
/// both with a JSON reason, and the fallback never sees either.
#[tokio::test]
async fn fallback_bodies_are_bounded_in_time_and_size() {
    let fallback: Fallback = Arc::new(|_req: Request<Bytes>| {
        Box::pin(async move { panic!("the fallback must not see a bad body") })
    });
    let server = Server::start(Registry::new(), Readiness::udc(), Some(fallback)).await;
    // Three bytes of a promised hundred, then silence.
    let slow = raw_exchange(
        server.addr,
        "POST /v1/admin/rounds HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc",
        admin::BODY_TIMEOUT + Duration::from_secs(10),
    )
    .await;
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(slow.contains("\"error\":\"body_timeout\""), "{slow}");
    let big = admin::MAX_FALLBACK_BODY + 1;
    let head = format!(
        "POST /v1/admin/rounds HTTP/1.1\r\nhost: x\r\ncontent-length: {big}\r\n\r\n{}",
        "a".repeat(big)
    );
    let large = raw_exchange(server.addr, &head, Duration::from_secs(10)).await;
    assert!(large.starts_with("HTTP/1.1 413"), "{large}");
    assert!(large.contains("\"error\":\"body_too_large\""), "{large}");
    server.stop().await;
}

const HEALTHZ: &str = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// Past [`admin::MAX_CONNECTIONS_PER_SOURCE`] open connections from one
/// address a new one from it is closed at accept, unanswered, while
/// another address is still served.
#[tokio::test]
async fn connections_beyond_a_sources_cap_are_closed() {
    let server = Server::start(Registry::new(), Readiness::udc(), None).await;
    let mut held = Vec::new();
    for _ in 0..admin::MAX_CONNECTIONS_PER_SOURCE {
        held.push(connect_from(server.addr, [127, 0, 0, 1]).await);
    }
    // Accepted in order: each probe comes after every held connection.
    let within = Duration::from_secs(10);
    let over = raw_exchange_from(server.addr, [127, 0, 0, 1], HEALTHZ, within).await;
    assert_eq!(over, "", "this source is at its cap");
    let other = raw_exchange_from(server.addr, [127, 0, 0, 2], HEALTHZ, within).await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    drop(held);
    server.stop().await;
}

/// Past [`admin::MAX_CONNECTIONS`] open connections in all (from several
/// addresses, each within its own cap) a new one from anywhere is closed at
/// accept; once the others are gone the listener serves again.
#[tokio::test]
async fn connections_beyond_the_listeners_cap_are_closed() {
    let server = Server::start(Registry::new(), Readiness::udc(), None).await;
    let per = admin::MAX_CONNECTIONS_PER_SOURCE;
    let sources = admin::MAX_CONNECTIONS.div_ceil(per);
    let mut held = Vec::new();
    for n in 0..sources {
        let take = per.min(admin::MAX_CONNECTIONS - held.len());
        for _ in 0..take {
            held.push(connect_from(server.addr, [127, 0, 0, 1 + n as u8]).await);
        }
    }
    assert_eq!(held.len(), admin::MAX_CONNECTIONS);
    let fresh = [127, 0, 0, 1 + sources as u8];
    let within = Duration::from_secs(10);
    let over = raw_exchange_from(server.addr, fresh, HEALTHZ, within).await;
    assert_eq!(over, "", "the listener is at its cap");
    drop(held);
    // The closed connections' tasks end and are reaped; then it answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = raw_exchange_from(server.addr, fresh, HEALTHZ, within).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

/// Why the promtool checks skip where promtool is absent.
const PROMTOOL_MISSING: &str = "not installed (apt-get install prometheus)";

/// Runs `promtool check metrics` on `page`; `None` when promtool is absent.
fn promtool_check(page: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success() && text.trim().is_empty(), text))
}

#[tokio::test]
async fn promtool_accepts_both_metric_pages() {
    let gw = Registry::new();
    let gm = GatewayMetrics::register(&gw);
    ProcessMetrics::register(&gw).unwrap();
    gm.batch_entries.observe(700.0);
    gm.upstream_request_duration.observe(12.5);
    gm.batches
        .get(EntryKind::Uplink, telemetry::BatchOutcome::Error)
        .inc();

    let udc = Registry::new();
    let um = UdcMetrics::register(&udc);
    ProcessMetrics::register(&udc).unwrap();
    um.batches
        .get(EntryKind::Response, UdcBatchOutcome::Localized)
        .inc();
    um.store.get(telemetry::StoreOp::Write).observe(0.003);

    let mut pages = Vec::new();
    for (name, registry) in [("gateway", gw), ("udc", udc)] {
        let server = Server::start(registry, Readiness::gateway(), None).await;
        let (status, _, page) = get(server.addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        server.stop().await;
        pages.push((name, page));
    }

    for (name, page) in &pages {
        match promtool_check(page) {
            Some((ok, out)) => assert!(
                ok,
                "promtool check metrics failed for {name}:\n{out}\n{page}"
            ),
            None => {
                skip::skip("promtool", &PROMTOOL_MISSING);
                return;
            }
        }
    }
}

#[tokio::test]
async fn promtool_rejects_a_bad_page() {
    // The check above can fail: a counter without `_total` is flagged.
    let page = "# HELP dapgw_bad Bad.\n# TYPE dapgw_bad counter\ndapgw_bad 1\n";
    match promtool_check(page) {
        Some((ok, out)) => assert!(!ok, "promtool accepted a bad page: {out}"),
        None => skip::skip("promtool", &PROMTOOL_MISSING),
    }
}

/// Runs `dapgw health ARGS` and returns its exit code and stderr.
async fn dapgw_health(args: &[&str]) -> (Option<i32>, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_dapgw"))
            .arg("health")
            .args(&args)
            .env_remove("DAPGW_ADMIN_LISTEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn dapgw_health_exit_codes() {
    let readiness = Readiness::gateway();
    let server = Server::start(Registry::new(), readiness.clone(), None).await;
    let url = server.addr.to_string();

    let (code, err) = dapgw_health(&["--url", &url]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("503") && err.contains("upstream"), "{err}");
    let (code, err) = dapgw_health(&["--url", &url, "--live"]).await;
    assert_eq!(code, Some(0), "{err}");

    readiness.set_upstream(true);
    readiness.set_spool(true);
    let (code, err) = dapgw_health(&["--url", &format!("http://{url}")]).await;
    assert_eq!(code, Some(0), "{err}");

    server.stop().await;
    let (code, err) = dapgw_health(&["--url", &url, "--live"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}
