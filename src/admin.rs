//! The admin listener beside the data path: plain HTTP/1.1 on a separate
//! port (loopback by default) for Prometheus and the orchestrator.
//!
//! ```text
//! GET /metrics  Prometheus text format of the service's registry
//! GET /healthz  200 "ok" while the process runs (liveness)
//! GET /readyz   200 when every part is usable, else 503 + JSON naming them
//! GET /readyz?exclude=upstream
//!               the same without the named check (Kubernetes convention;
//!               repeatable; `draining` cannot be excluded)
//! ```
//!
//! [`Readiness`] is the latch the service flips as its upstream link, spool
//! or store come and go, and that turns not-ready for good on SIGTERM
//! (linkerd2-proxy's `admin/src/server/readiness.rs`). [`probe`] is the
//! client side, used by `dapgw health` as the container health check (the
//! image has no shell or curl).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::telemetry;

/// Time a client gets to send its request headers on the admin port.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request body a fallback handler receives.
pub const MAX_FALLBACK_BODY: usize = 64 * 1024;

/// Time a client gets to send a fallback request's body (at most
/// [`MAX_FALLBACK_BODY`]) once its headers are in; then 408. Bodies are
/// read before the fallback authenticates the request, so without it one
/// silent client could hold a connection and its buffer for ever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the admin listener serves at once; one more is closed at
/// accept. Scrapers, probes and operators need a handful; the cap keeps a
/// flood of idle connections from taking the process's file descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// Connections one source (an IPv4 address, an IPv6 /64) may hold on the
/// admin listener, so one client cannot take all [`MAX_CONNECTIONS`] and
/// keep the scraper and the probes out (unless it shares their address).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

/// The readiness checks a probe may leave out with `/readyz?exclude=NAME`.
/// The gateway's Kubernetes readiness probe excludes `upstream`: a gateway
/// whose WAN link is down still takes members' traffic into its spool, so
/// the member Service must keep routing to it.
pub const EXCLUDABLE: [&str; 3] = ["upstream", "spool", "store"];

/// Readiness latch shared by the service's tasks and the admin server.
/// Clones share state. Ready when every required part is up and the
/// service is not draining; [`set_draining`](Self::set_draining) is final.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Debug)]
struct ReadinessInner {
    /// Which parts this service has; the others are never waited for.
    needs_upstream: bool,
    needs_spool: bool,
    needs_store: bool,
    upstream: AtomicBool,
    spool: AtomicBool,
    store: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    fn new(needs_upstream: bool, needs_spool: bool, needs_store: bool) -> Self {
        Readiness {
            inner: Arc::new(ReadinessInner {
                needs_upstream,
                needs_spool,
                needs_store,
                upstream: AtomicBool::new(false),
                spool: AtomicBool::new(false),
                store: AtomicBool::new(false),
                draining: AtomicBool::new(false),
            }),
        }
    }

    /// The gateway's latch: ready once the upstream link and the spool are
    /// usable. Starts not ready.
    pub fn gateway() -> Self {
        Self::new(true, true, false)
    }

    /// The UDC's latch: ready once the store is usable. Starts not ready.
    pub fn udc() -> Self {
        Self::new(false, false, true)
    }

    /// Records whether the upstream link works.
    pub fn set_upstream(&self, up: bool) {
        self.inner.upstream.store(up, Ordering::Release);
    }

    /// Records whether the spool accepts writes.
    pub fn set_spool(&self, ok: bool) {
        self.inner.spool.store(ok, Ordering::Release);
    }

    /// Records whether the store answers.
    pub fn set_store(&self, ok: bool) {
        self.inner.store.store(ok, Ordering::Release);
    }

    /// Marks the service as draining (SIGTERM): not ready from now on.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Whether the service is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// The parts that are not ready, in a fixed order; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        self.not_ready_excluding(&[])
    }

    /// Like [`not_ready`](Self::not_ready), ignoring the checks named in
    /// `exclude` (among [`EXCLUDABLE`]). Draining is never ignored.
    pub fn not_ready_excluding(&self, exclude: &[&str]) -> Vec<&'static str> {
        let i = &self.inner;
        let mut parts = Vec::new();
        if i.draining.load(Ordering::Acquire) {
            parts.push("draining");
        }
        let checks = [
            ("upstream", i.needs_upstream, &i.upstream),
            ("spool", i.needs_spool, &i.spool),
            ("store", i.needs_store, &i.store),
        ];
        for (name, needed, up) in checks {
            if needed && !exclude.contains(&name) && !up.load(Ordering::Acquire) {
                parts.push(name);
            }
        }
        parts
    }

    /// Whether every required part is up and the service is not draining.
    pub fn is_ready(&self) -> bool {
        self.not_ready().is_empty()
    }
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Response type of the admin server and of fallback handlers.
pub type AdminResponse = Response<Full<Bytes>>;

/// Handler for paths the admin server does not know itself (the UDC's
/// operator API). Receives the request with its body collected (at most
/// [`MAX_FALLBACK_BODY`] bytes); returns `None` to answer 404.
pub type Fallback = Arc<
    dyn Fn(Request<Bytes>) -> Pin<Box<dyn Future<Output = Option<AdminResponse>> + Send>>
        + Send
        + Sync,
>;

/// What every connection task needs, shared.
struct State {
    registry: Registry,
    readiness: Readiness,
    fallback: Option<Fallback>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` completes, then closes idle connections, lets in-flight
/// requests finish, and returns.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_fallback(listener, registry, readiness, None, shutdown).await
}

/// Like [`serve`], handing every other path to `fallback`.
pub async fn serve_with_fallback(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    fallback: Option<Fallback>,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(State {
        registry,
        readiness,
        fallback,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let sources = crate::limits::SourceSlots::new(MAX_CONNECTIONS_PER_SOURCE);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if conns.len() >= MAX_CONNECTIONS => {
                    tracing::debug!(%peer, "admin listener at its connection cap");
                    drop(stream);
                }
                Ok((stream, peer)) => {
                    let Some(slot) = sources.try_take(peer.ip()) else {
                        tracing::debug!(%peer, "admin listener: source at its connection cap");
                        drop(stream);
                        continue;
                    };
                    let conn = connection(stream, state.clone(), stop_rx.clone());
                    conns.spawn(async move {
                        conn.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener: accept failed");
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
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, &state).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    // The guard `wait_for` returns is not Send: drop it inside this block.
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        }
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn route(req: Request<Incoming>, state: &State) -> AdminResponse {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if known && !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            telemetry::encode(&state.registry),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            let exclude = match readyz_exclusions(req.uri().query()) {
                Ok(e) => e,
                Err(bad) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "text/plain; charset=utf-8",
                        format!(
                            "unknown readiness check `{bad}` in exclude=; known: {}\n",
                            EXCLUDABLE.join(", ")
                        ),
                    );
                }
            };
            let not_ready = state.readiness.not_ready_excluding(&exclude);
            let (status, body) = if not_ready.is_empty() {
                (StatusCode::OK, serde_json::json!({ "ready": true }))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "ready": false, "not_ready": not_ready }),
                )
            };
            text(status, "application/json", format!("{body}\n"))
        }
        _ => match &state.fallback {
            Some(f) => fallback(req, f).await,
            None => not_found(),
        },
    }
}

/// The checks named by the `exclude` parameters of a /readyz query (other
/// parameters, such as Kubernetes' `verbose`, are ignored); `Err` carries
/// an unknown name, cut to 64 characters, so a mistyped probe fails loudly
/// instead of silently checking everything.
fn readyz_exclusions(query: Option<&str>) -> Result<Vec<&'static str>, String> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let Some(("exclude", value)) = pair.split_once('=') else {
            continue;
        };
        match EXCLUDABLE.iter().find(|c| **c == value) {
            Some(c) => out.push(*c),
            None => {
                let cut = value.char_indices().nth(64).map_or(value.len(), |(i, _)| i);
                return Err(value[..cut].to_string());
            }
        }
    }
    Ok(out)
}

fn not_found() -> AdminResponse {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n",
    )
}

async fn fallback(req: Request<Incoming>, f: &Fallback) -> AdminResponse {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, MAX_FALLBACK_BODY).collect(),
    );
    let body = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "application/json",
                format!(
                    "{{\"error\":\"body_too_large\",\"reason\":\"the request body is over \
                     {MAX_FALLBACK_BODY} bytes or unreadable\"}}\n"
                ),
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "application/json",
                format!(
                    "{{\"error\":\"body_timeout\",\"reason\":\"the request body did not \
                     arrive within {} s\"}}\n",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
    };
    match f(Request::from_parts(parts, body)).await {
        Some(r) => r,
        None => not_found(),
    }
}

// ---------------------------------------------------------------------------
// Reading a metrics page (the demo, the bench and the tests)
// ---------------------------------------------------------------------------

/// A parsed `/metrics` page in the Prometheus text format: every sample
/// keyed by its series (`name{labels}` exactly as exposed).
///
/// This is the one reader of metric pages in dapgw: the demo and the bench
/// read the UDC's CPU clock and byte counters through it, and the tests
/// check the contract metrics with it.
#[derive(Clone, Debug, Default)]
pub struct MetricsPage(std::collections::BTreeMap<String, f64>);

impl MetricsPage {
    /// Parses the text exposition format. Comment lines and lines whose value
    /// is not a number are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.trim().to_string(), value.parse::<f64>().ok()?))
            })
            .collect();
        MetricsPage(samples)
    }

    /// The value of one series, written exactly as exposed (`name` or
    /// `name{k="v",...}` with the labels in the exposed order).
    pub fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// The sum of every sample of metric `name` whose labels include all of
    /// `labels` (`key="value"` pairs); 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .sum()
    }
}

// ---------------------------------------------------------------------------
// Probe (`dapgw health`)
// ---------------------------------------------------------------------------

/// Which admin endpoint [`probe`] checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProbeCheck {
    /// `/readyz`: ready to take traffic.
    Ready,
    /// `/healthz`: the process is alive.
    Live,
}

impl ProbeCheck {
    fn path(self) -> &'static str {
        match self {
            ProbeCheck::Ready => "/readyz",
            ProbeCheck::Live => "/healthz",
        }
    }
}

/// Why a probe failed. The target is named in every message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The target is neither `host:port` nor an `http://host:port` URL.
    #[error("bad probe target `{0}`: expected host:port or http://host:port")]
    BadTarget(String),
    /// No TCP connection.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The admin address.
        target: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// HTTP failure on the connection.
    #[error("request to {target} failed: {source}")]
    Http {
        /// The admin address.
        target: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// No complete answer within the timeout.
    #[error("no answer from {target} within {timeout:?}")]
    Timeout {
        /// The admin address.
        target: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The endpoint answered with something other than 200.
    #[error("{target}{path} answered {status}: {body}")]
    NotOk {
        /// The admin address.
        target: String,
        /// The path probed.
        path: &'static str,
        /// The status received.
        status: StatusCode,
        /// The start of the body (the readiness JSON says which part).
        body: String,
    },
}

/// Splits `host:port` or `http://host:port[/...]` into `host:port`.
fn probe_authority(target: &str) -> Result<String, ProbeError> {
    let bad = || ProbeError::BadTarget(target.to_string());
    let rest = match target.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(bad()),
        None => target,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Needs a port: the admin listener has no well-known one.
    match authority.rsplit_once(':') {
        // A wildcard listen address means this host: probe its loopback.
        Some(("0.0.0.0", port)) if port.parse::<u16>().is_ok() => Ok(format!("127.0.0.1:{port}")),
        Some(("[::]", port)) if port.parse::<u16>().is_ok() => Ok(format!("[::1]:{port}")),
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(authority.to_string())
        }
        _ => Err(bad()),
    }
}

/// GETs `/readyz` (or `/healthz`) from the admin listener at `target`
/// (`127.0.0.1:9090` or `http://127.0.0.1:9090`) and succeeds only on 200,
/// all within `timeout`.
pub async fn probe(target: &str, check: ProbeCheck, timeout: Duration) -> Result<(), ProbeError> {
    let authority = probe_authority(target)?;
    match tokio::time::timeout(timeout, probe_inner(&authority, check)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout {
            target: authority,
            timeout,
        }),
    }
}

async fn probe_inner(authority: &str, check: ProbeCheck) -> Result<(), ProbeError> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|source| ProbeError::Connect {
            target: authority.to_string(),
            source,
        })?;
    let http = |source| ProbeError::Http {
        target: authority.to_string(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(conn);
    let req = Request::get(check.path())
        .header(hyper::header::HOST, authority)
        .body(Full::new(Bytes::new()))
        .map_err(|_| ProbeError::BadTarget(authority.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 4096)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    driver.abort();
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(ProbeError::NotOk {
            target: authority.to_string(),
            path: check.path(),
            status,
            body: String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(200)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_page_gets_and_sums_by_name_and_labels() {
        let m = MetricsPage::parse(
            "# HELP x y\n# TYPE x_total counter\n\
             x_total{direction=\"sent\",kind=\"a\"} 3\n\
             x_total{direction=\"sent\",kind=\"b\"} 4\n\
             x_total{direction=\"received\"} 10\nx 1e3\nx_totalish 5\nbroken\nnan_ok x\n",
        );
        assert_eq!(m.sum("x_total", &[("direction", "sent")]), 7.0);
        assert_eq!(m.sum("x_total", &[]), 17.0);
        assert_eq!(m.sum("x", &[]), 1000.0);
        assert_eq!(m.sum("missing", &[]), 0.0);
        assert_eq!(m.get("x_total{direction=\"received\"}"), Some(10.0));
        assert_eq!(m.get("x_totalish"), Some(5.0));
        assert_eq!(m.get("x_total"), None);
        assert_eq!(m.get("nan_ok"), None);
    }

    #[test]
    fn readiness_latch() {
        let r = Readiness::gateway();
        assert_eq!(r.not_ready(), ["upstream", "spool"]);
        r.set_upstream(true);
        assert!(!r.is_ready());
        let clone = r.clone();
        clone.set_spool(true);
        assert!(r.is_ready());
        r.set_upstream(false);
        assert_eq!(r.not_ready(), ["upstream"]);
        r.set_upstream(true);
        r.set_draining();
        assert_eq!(r.not_ready(), ["draining"]);
        r.set_spool(true);
        assert!(!r.is_ready(), "draining is final");

        let u = Readiness::udc();
        assert_eq!(u.not_ready(), ["store"]);
        u.set_upstream(false);
        u.set_store(true);
        assert!(u.is_ready(), "the udc has no upstream or spool");
    }

    #[test]
    fn probe_targets() {
        assert_eq!(probe_authority("127.0.0.1:9090").unwrap(), "127.0.0.1:9090");
        assert_eq!(
            probe_authority("http://localhost:9090/readyz").unwrap(),
            "localhost:9090"
        );
        assert_eq!(probe_authority("[::1]:9090").unwrap(), "[::1]:9090");
        assert_eq!(probe_authority("0.0.0.0:9090").unwrap(), "127.0.0.1:9090");
        assert_eq!(probe_authority("[::]:9091").unwrap(), "[::1]:9091");
        for bad in ["https://x:1", "localhost", "http://:9090", "x:port", ""] {
            assert!(probe_authority(bad).is_err(), "{bad}");
        }
    }
}
