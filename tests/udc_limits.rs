//! The UDC listener's limits, shared with the gateway (src/limits.rs), over
//! real TLS on loopback: the per-source cap (127.0.0.2 still served), a
//! late request head (HTTP/1.1 408, HTTP/2 closed), a late body (408), an
//! idle connection kept open only by PINGs (closed), and `/readyz` following
//! the store (a PostgreSQL cluster frozen with SIGSTOP, then resumed).

#[path = "support/skip.rs"]
mod skip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dapgw::config::UdcConfig;
use dapgw::udc::{self, keys_cmd};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Generous bound for anything the UDC must do "soon".
const PATIENCE: Duration = Duration::from_secs(15);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

struct Pki {
    ca: std::path::PathBuf,
}

struct Udc {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    admin: SocketAddr,
    pki: Pki,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Udc {
    async fn start(store_url: Option<String>, tweak: impl FnOnce(&mut UdcConfig)) -> Udc {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            dapgw::tls::dev_pki::generate(&dir.path().join("pki"), &[], &["gw-1".to_string()])
                .unwrap();
        let keys = dir.path().join("keys");
        keys_cmd::init(&keys).unwrap();
        let url = store_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("udc.sqlite3").display()));
        let mut config = UdcConfig {
            tls_cert: pki.server_cert.clone(),
            tls_key: pki.server_key.clone(),
            client_ca: pki.ca_cert.clone(),
            store_url: dapgw::config::SecretUrl::new(url),
            master_secret_file: keys.join(keys_cmd::files::MASTER),
            storage_key_file: keys.join(keys_cmd::files::STORAGE),
            signing_key_file: keys.join(keys_cmd::files::SIGNING),
            key_cert_file: keys.join(keys_cmd::files::SIGNING_CERT),
            ..UdcConfig::default()
        };
        tweak(&mut config);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin) = (l.local_addr().unwrap(), a.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(udc::run(
            config,
            udc::Listeners { udc: l, admin: a },
            async move {
                let _ = rx.await;
            },
        ));
        let u = Udc {
            _dir: dir,
            addr,
            admin,
            pki: Pki { ca: pki.ca_cert },
            stop: Some(tx),
            task,
        };
        u.wait_readyz(StatusCode::OK).await;
        u
    }

    async fn admin_get(&self, path: &str) -> Option<(StatusCode, String)> {
        let tcp = TcpStream::connect(self.admin).await.ok()?;
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = s.send_request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Waits until `/readyz` answers `want`; returns its body.
    async fn wait_readyz(&self, want: StatusCode) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((s, body)) = self.admin_get("/readyz").await
                && s == want
            {
                return body;
            }
            assert!(Instant::now() < deadline, "/readyz never answered {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn closed(&self, reason: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await.unwrap();
        let series = format!("dapgw_udc_connections_closed_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no series for {reason}"))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// A TLS connection from `from` (any 127.x.y.z) offering `alpn`.
async fn raw(
    addr: SocketAddr,
    pki: &Pki,
    alpn: &[u8],
    from: [u8; 4],
) -> std::io::Result<TlsStream<TcpStream>> {
    let roots = dapgw::tls::load_roots(&pki.ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(dapgw::tls::provider())
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
    tls.flush().await?;
    Ok(tls)
}

/// An HTTP/2 frame.
fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Frame types in a buffer of server frames (after its SETTINGS).
fn frame_types(mut buf: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while buf.len() >= 9 {
        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
        types.push(buf[3]);
        buf = &buf[(9 + len).min(buf.len())..];
    }
    types
}

/// Reads until the gateway closes the connection; panics if it does not
/// within [`PATIENCE`]. Returns what was read and when the close came.
async fn read_until_closed(tls: &mut TlsStream<TcpStream>) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let res = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(res.is_ok(), "the gateway did not close the connection");
    (got, Instant::now())
}

/// One source at `DAPGW_MAX_CONNECTIONS_PER_IP` has its next connection
/// closed at accept and counted; another source is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_refuses_one_source_while_another_is_served() {
    let u = Udc::start(None, |c| c.max_connections_per_ip = 1).await;
    let a = [127, 0, 0, 1];
    let mut held = raw(u.addr, &u.pki, b"http/1.1", a).await.unwrap();
    held.write_all(b"GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    held.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");

    match raw(u.addr, &u.pki, b"http/1.1", a).await {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await;
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(PATIENCE, tls.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "second connection of one source was served: {r:?}"
            );
        }
    }
    assert_eq!(u.closed("per_ip_limit").await, 1.0);

    let mut other = raw(u.addr, &u.pki, b"http/1.1", [127, 0, 0, 2])
        .await
        .unwrap();
    other
        .write_all(b"GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    other.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 404");
    drop((held, other));
    u.stop().await;
}

/// A late HTTP/1.1 head gets a 408, a late HTTP/2 header block closes the
/// connection, a late body gets a 408 `timeout`, and an HTTP/2 connection
/// kept open only by PINGs is closed with a GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_bodies_and_idle_connections_are_timed() {
    let header = Duration::from_millis(500);
    let idle = Duration::from_millis(900);
    let u = Udc::start(None, |c| {
        c.header_timeout_ms = header.as_millis() as u64;
        c.body_timeout_ms = 600;
        c.idle_timeout_ms = idle.as_millis() as u64;
    })
    .await;
    let from = [127, 0, 0, 1];

    let mut tls = raw(u.addr, &u.pki, b"http/1.1", from).await.unwrap();
    let sent = Instant::now();
    tls.write_all(b"POST /v1/direct HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut tls).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));
    assert!(closed - sent >= header - Duration::from_millis(20));

    let mut tls = raw(u.addr, &u.pki, b"h2", from).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    hello.extend(frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]));
    let sent = Instant::now();
    tls.write_all(&hello).await.unwrap();
    tls.flush().await.unwrap();
    let (_, closed) = read_until_closed(&mut tls).await;
    assert!(closed - sent >= header - Duration::from_millis(20));
    assert_eq!(u.closed("header_timeout").await, 2.0);

    // A body announced as 100 bytes, 10 sent.
    let mut tls = raw(u.addr, &u.pki, b"http/1.1", from).await.unwrap();
    tls.write_all(
        b"POST /v1/direct HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let mut got = vec![0u8; 12];
    tokio::time::timeout(PATIENCE, tls.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"HTTP/1.1 408");
    drop(tls);

    let mut tls = raw(u.addr, &u.pki, b"h2", from).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    tls.write_all(&hello).await.unwrap();
    tls.flush().await.unwrap();
    let opened = Instant::now();
    // PING every 50 ms, and ACK the gateway's own keep-alive PINGs as a
    // well-behaved HTTP/2 client does.
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut buf = [0u8; 4096];
        let mut pending = Vec::new();
        for i in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {
                    let ping = frame(0x6, 0, 0, &i.to_be_bytes());
                    if tls.write_all(&ping).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                }
                r = tls.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while pending.len() >= 9 {
                            let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                            if pending.len() < 9 + len {
                                break;
                            }
                            let f: Vec<u8> = pending.drain(..9 + len).collect();
                            if f[3] == 0x6 && f[4] & 0x1 == 0 {
                                let ack = frame(0x6, 0x1, 0, &f[9..]);
                                if tls.write_all(&ack).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                },
            }
        }
    })
    .await;
    assert!(read.is_ok(), "PINGs kept an idle connection open");
    assert!(opened.elapsed() >= idle - Duration::from_millis(20));
    let types = frame_types(&got);
    assert!(types.contains(&0x7), "closed with a GOAWAY: {types:?}");
    assert_eq!(u.closed("idle_timeout").await, 1.0);
    u.stop().await;
}

/// Sends `sig` to the PostgreSQL server and all its backends.
fn signal_cluster(pid: u32, sig: &str) {
    let mut pids = vec![pid.to_string()];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    pids.extend(children.split_whitespace().map(str::to_string));
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .args(&pids)
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pids:?}");
}

/// `/readyz` follows the store: a PostgreSQL cluster frozen (SIGSTOP on the
/// server and its backends, so queries hang) makes the UDC not ready with
/// `store` named; resumed, it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store() {
    use dapgw::udc::store::{PgCluster, PgClusterError};
    let cluster = match tokio::task::spawn_blocking(|| PgCluster::start(false))
        .await
        .unwrap()
    {
        Ok(c) => c,
        Err(e @ PgClusterError::NotInstalled(_)) => {
            skip::skip("PostgreSQL", &e);
            return;
        }
        Err(e) => panic!("{e}"),
    };
    cluster.create_database("udc_limits").unwrap();
    let u = Udc::start(Some(cluster.url("udc_limits")), |_| {}).await;
    let pid = cluster.server_pid().expect("the server pid");
    signal_cluster(pid, "STOP");
    let body = u.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    signal_cluster(pid, "CONT");
    assert!(body.contains("store"), "{body}");
    u.wait_readyz(StatusCode::OK).await;
    u.stop().await;
}
