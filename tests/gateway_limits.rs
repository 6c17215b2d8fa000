//! The gateway's connection limits against hostile clients, over real TLS on
//! loopback: the per-source connection cap (a second source, 127.0.0.2,
//! still gets in), request heads cut at `DAPGW_HEADER_TIMEOUT_MS` (HTTP/1.1
//! with a 408, HTTP/2 by closing), and connections kept open only by PINGs
//! or single bytes closed at `DAPGW_IDLE_TIMEOUT_MS`. Raw clients speak the
//! bytes themselves so they can send half a head.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Generous bound for anything the gateway must do "soon".
const PATIENCE: Duration = Duration::from_secs(15);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

async fn start(
    tweak: impl FnOnce(&mut dapgw::config::GatewayConfig),
) -> (Pki, FakeUdc, tempfile::TempDir, Gateway) {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    tweak(&mut cfg);
    let gw = Gateway::start(cfg).await;
    (pki, udc, dir, gw)
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

/// One source holds its `DAPGW_MAX_CONNECTIONS_PER_IP` connections; its
/// next connection is closed at accept and counted, while a second source
/// is served; a slot comes back when a connection of the source ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_cap_refuses_one_source_while_another_is_served() {
    let (pki, _udc, _dir, gw) = start(|c| c.max_connections_per_ip = 2).await;
    let a = [127, 0, 0, 1];
    let mut c1 = Client::connect_from(gw.members, &pki, true, a).await;
    let mut c2 = Client::connect_from(gw.members, &pki, false, a).await;
    assert_eq!(c1.attach(1, &[7]).await.status, StatusCode::OK);
    assert_eq!(c2.attach(2, &[7]).await.status, StatusCode::OK);

    // The third connection from 127.0.0.1 is closed before TLS completes
    // (or, TLS 1.3, on the first read).
    match raw(gw.members, &pki, b"h2", a).await {
        Err(_) => {}
        Ok(mut tls) => {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(PATIENCE, tls.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "third connection of one source was served: {r:?}"
            );
        }
    }
    assert_eq!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"per_ip_limit\"}")
            .await,
        1.0
    );

    // Another source is served meanwhile, and the first source's open
    // connections keep working.
    let mut other = Client::connect_from(gw.members, &pki, true, [127, 0, 0, 2]).await;
    assert_eq!(other.attach(3, &[7]).await.status, StatusCode::OK);
    assert_eq!(c1.attach(1, &[7]).await.status, StatusCode::OK);

    // A connection of the first source ends: its slot is free again.
    drop(c2);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(mut tls) = raw(gw.members, &pki, b"http/1.1", a).await {
            tls.write_all(
                b"GET /v1/downlink?member=1&wait_ms=0 HTTP/1.1\r\nhost: localhost\r\n\r\n",
            )
            .await
            .unwrap();
            let mut head = [0u8; 12];
            if tls.read_exact(&mut head).await.is_ok() {
                assert_eq!(&head, b"HTTP/1.1 204");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the source's slot never came back"
        );
        tokio::task::yield_now().await;
    }
    assert!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"per_ip_limit\"}")
            .await
            >= 1.0
    );
    drop((c1, other));
    gw.stop().await;
}

/// HTTP/1.1: half a request head gets a 408 and the close at the header
/// timeout, also while single bytes keep trickling in; a keep-alive
/// connection waiting between requests is not cut at the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_half_head_gets_408_at_the_header_timeout() {
    let header = Duration::from_millis(500);
    let (pki, _udc, _dir, gw) = start(|c| {
        c.header_timeout_ms = header.as_millis() as u64;
        c.idle_timeout_ms = 30_000;
    })
    .await;
    let from = [127, 0, 0, 1];

    // Half a head, then silence.
    let mut tls = raw(gw.members, &pki, b"http/1.1", from).await.unwrap();
    let sent = Instant::now();
    tls.write_all(b"POST /v1/uplink HTTP/1.1\r\nhost: localhost\r\ncontent-le")
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut tls).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"timeout\""), "{text}");
    assert!(
        closed - sent >= header - Duration::from_millis(20),
        "{:?}",
        closed - sent
    );

    // Single bytes every 50 ms: the head never ends, the bytes do not help.
    let tls = raw(gw.members, &pki, b"http/1.1", from).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let sent = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in b"GET /v1/downlink?member=1 HTTP/1.1\r\nhost: localhost\r\nx-pad: "
            .iter()
            .cycle()
            .take(400)
        {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "a trickled head kept the connection");
    let took = sent.elapsed();
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));
    assert!(took >= header - Duration::from_millis(20), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    trickle.abort();
    assert_eq!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"header_timeout\"}")
            .await,
        2.0
    );

    // Between requests nothing is pending: twice the header timeout later
    // the same keep-alive connection still serves.
    let mut c = Client::connect_from(gw.members, &pki, false, from).await;
    assert_eq!(c.attach(1, &[7]).await.status, StatusCode::OK);
    tokio::time::sleep(header * 2).await;
    assert_eq!(c.attach(1, &[7]).await.status, StatusCode::OK);
    gw.stop().await;
}

/// A whole head whose body stops short gets 408 `timeout` at the header
/// timeout, counted as a malformed uplink of reason `timeout` (not
/// `decode`); a body sent with a content type the endpoint does not take
/// is counted as `content_type` (not `method`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_short_gets_408_timeout() {
    let header = Duration::from_millis(500);
    let (pki, _udc, _dir, gw) = start(|c| {
        c.header_timeout_ms = header.as_millis() as u64;
        c.idle_timeout_ms = 30_000;
    })
    .await;
    let mut tls = raw(gw.members, &pki, b"http/1.1", [127, 0, 0, 1])
        .await
        .unwrap();
    tls.write_all(
        b"POST /v1/uplink HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let (got, _) = read_until_closed(&mut tls).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\":\"timeout\""), "{text}");
    let mut c = Client::connect(gw.members, &pki, true).await;
    let r = c
        .send(
            Method::POST,
            "/v1/uplink",
            Some("text/plain"),
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for (reason, want) in [
        ("timeout", 1.0),
        ("content_type", 1.0),
        ("decode", 0.0),
        ("method", 0.0),
    ] {
        let series =
            format!("dapgw_malformed_requests_total{{endpoint=\"uplink\",reason=\"{reason}\"}}");
        assert_eq!(gw.metric(&series).await, want, "{series}");
    }
    gw.stop().await;
}

/// HTTP/2: a HEADERS frame cut short, a header block left open (no
/// END_HEADERS, no CONTINUATION) and frames sent byte by byte are all cut
/// at the header timeout although the connection is otherwise fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_half_head_is_cut_at_the_header_timeout() {
    let header = Duration::from_millis(500);
    let (pki, _udc, _dir, gw) = start(|c| {
        c.header_timeout_ms = header.as_millis() as u64;
        c.idle_timeout_ms = 30_000;
    })
    .await;
    let from = [127, 0, 0, 1];
    let settings = frame(0x4, 0, 0, &[]);
    let cases: [Vec<u8>; 2] = [
        // HEADERS (END_HEADERS) announcing 40 bytes, 9 sent.
        frame(0x1, 0x4 | 0x1, 1, &[0x82; 40])[..18].to_vec(),
        // A whole HEADERS frame without END_HEADERS, and no CONTINUATION.
        frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]),
    ];
    for half in cases {
        let mut tls = raw(gw.members, &pki, b"h2", from).await.unwrap();
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(&settings);
        tls.write_all(&hello).await.unwrap();
        let sent = Instant::now();
        tls.write_all(&half).await.unwrap();
        tls.flush().await.unwrap();
        let (_, closed) = read_until_closed(&mut tls).await;
        let took = closed - sent;
        assert!(took >= header - Duration::from_millis(20), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    // PING frames written one byte every 40 ms: each frame takes longer
    // than the header timeout to arrive.
    let mut tls = raw(gw.members, &pki, b"h2", from).await.unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(&settings);
    tls.write_all(&hello).await.unwrap();
    tls.flush().await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let sent = Instant::now();
    let trickle = tokio::spawn(async move {
        let ping = frame(0x6, 0, 0, &[1; 8]);
        for b in ping.iter().cycle().take(400) {
            if wr.write_all(&[*b]).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        while let Ok(1..) = rd.read(&mut buf).await {}
    })
    .await;
    assert!(
        read.is_ok(),
        "a trickle of single bytes kept the connection"
    );
    assert!(sent.elapsed() >= header - Duration::from_millis(20));
    trickle.abort();
    assert_eq!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"header_timeout\"}")
            .await,
        3.0
    );
    gw.stop().await;
}

/// An HTTP/2 connection that only sends PINGs (answered, so bytes move
/// both ways) is closed with a GOAWAY at the idle timeout; a connection
/// that keeps making requests, or waits in a long poll longer than the
/// idle timeout, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_kept_alive_by_pings_is_closed() {
    let idle = Duration::from_millis(800);
    let (pki, _udc, _dir, gw) = start(|c| {
        c.header_timeout_ms = 400;
        c.idle_timeout_ms = idle.as_millis() as u64;
    })
    .await;
    let from = [127, 0, 0, 1];

    let mut tls = raw(gw.members, &pki, b"h2", from).await.unwrap();
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
    let took = opened.elapsed();
    assert!(took >= idle - Duration::from_millis(20), "{took:?}");
    let types = frame_types(&got);
    assert!(types.contains(&0x6), "PINGs were answered: {types:?}");
    assert!(types.contains(&0x7), "closed with a GOAWAY: {types:?}");
    assert_eq!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"idle_timeout\"}")
            .await,
        1.0
    );

    // Requests every 300 ms keep a connection; so does a long poll that
    // outlasts the idle timeout.
    let mut c = Client::connect_from(gw.members, &pki, true, from).await;
    for _ in 0..5 {
        assert_eq!(c.attach(1, &[7]).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let r = c.poll(1, &[7], 0, 1500).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(c.attach(1, &[7]).await.status, StatusCode::OK);
    assert_eq!(
        gw.metric("dapgw_member_connections_closed_total{reason=\"idle_timeout\"}")
            .await,
        1.0
    );
    gw.stop().await;
}

/// Posts uplinks of member `member` with counters from `ctr` on until the
/// gateway refuses one; returns the counters accepted and the refusal.
async fn flood(c: &mut Client, member: u64, ctr: &mut u64) -> (Vec<u64>, Reply) {
    let mut accepted = Vec::new();
    for _ in 0..1000 {
        *ctr += 1;
        let r = c
            .post(uplink(member, 1, *ctr, &[*ctr as u8; 64]).to_bytes())
            .await;
        if r.status != StatusCode::ACCEPTED {
            return (accepted, r);
        }
        accepted.push(*ctr);
    }
    panic!("the source was never held to its share");
}

/// Asserts a 503 refusal with `code`, a Retry-After and a reason.
fn assert_retry_later(r: &Reply, code: &str) {
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let j = r.json();
    assert_eq!(j["error"], code, "{j}");
    assert!(j["reason"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
    let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(secs >= 1);
}

/// One source (127.0.0.1) posting while the UDC cannot answer is held to
/// `DAPGW_SPOOL_MAX_BYTES_PER_SOURCE`: 503 `source_share`, counted, while a
/// second source (127.0.0.2) still gets 202. The share holds across a
/// restart on the same spool, and once the UDC answers the first source's
/// bytes come back and it is served again; nothing accepted is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_fill_the_spool() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.spool_max_bytes = dapgw::config::ByteSize::mib(1);
    cfg.spool_max_bytes_per_source = Some(dapgw::config::ByteSize(4096));
    let gw = Gateway::start(cfg.clone()).await;
    let (a, b) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let mut flooder = Client::connect_from(gw.members, &pki, true, a).await;
    let mut other = Client::connect_from(gw.members, &pki, true, b).await;
    let mut ctr = 0;
    let (mut accepted, refused) = flood(&mut flooder, 1, &mut ctr).await;
    assert_retry_later(&refused, "source_share");
    assert!(accepted.len() >= 10, "{accepted:?}");
    assert!(gw.metric("dapgw_spool_bytes").await < 64.0 * 1024.0);
    let r = other.post(uplink(2, 1, 1, &[2; 64]).to_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(gw.metric("dapgw_spool_source_rejected_total").await, 1.0);
    assert_eq!(gw.metric("dapgw_spool_rejected_total").await, 0.0);
    assert_eq!(
        gw.metric("dapgw_member_requests_total{endpoint=\"uplink\",outcome=\"overloaded\"}")
            .await,
        1.0
    );
    drop((flooder, other));

    // Restarted on the same spool, the source still holds its share.
    gw.stop().await;
    let gw = Gateway::start(cfg).await;
    let mut flooder = Client::connect_from(gw.members, &pki, true, a).await;
    let mut other = Client::connect_from(gw.members, &pki, false, b).await;
    ctr += 1;
    let r = flooder.post(uplink(1, 1, ctr, &[0; 64]).to_bytes()).await;
    assert_retry_later(&r, "source_share");
    let r = other.post(uplink(2, 1, 2, &[2; 64]).to_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    // The UDC answers: the source's bytes come back.
    udc.set_mode(UdcMode::Up);
    let mut want: HashSet<_> = accepted.iter().map(|&c| (1u64, 1u32, c, 2u8)).collect();
    want.extend([(2, 1, 1, 2), (2, 1, 2, 2)]);
    let w = want.clone();
    udc.wait_until("every accepted entry", move |s| {
        s.applied.lock().unwrap().is_superset(&w)
    })
    .await;
    let deadline = Instant::now() + PATIENCE;
    while gw.metric("dapgw_spool_entries").await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the verdicts never freed the spool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held again while the UDC cannot answer: a whole share's worth fits.
    udc.set_mode(UdcMode::Failing);
    let (again, refused) = flood(&mut flooder, 1, &mut ctr).await;
    assert_retry_later(&refused, "source_share");
    assert_eq!(again.len(), accepted.len(), "{again:?} vs {accepted:?}");
    accepted.extend(again);
    udc.set_mode(UdcMode::Up);
    want.extend(accepted.iter().map(|&c| (1u64, 1u32, c, 2u8)));
    let w = want.clone();
    udc.wait_until("every accepted entry", move |s| {
        s.applied.lock().unwrap().is_superset(&w)
    })
    .await;
    assert_eq!(udc.applied(), want, "only accepted entries arrive");
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    gw.stop().await;
}

/// A member's HTTP/2 peer may send at most 64 KiB that the gateway has not
/// read, per stream and per connection (hyper's defaults are 1 MiB each):
/// a long poll's unread body cannot pin a megabyte per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_flow_control_windows_are_small() {
    use hyper::{Method, Request};
    let (pki, _udc, _dir, gw) = start(|_| {}).await;
    let tls = raw(gw.members, &pki, b"h2", [127, 0, 0, 1]).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let poll = |wait_ms: u32| {
        Request::builder()
            .method(Method::GET)
            .uri(format!(
                "https://localhost/v1/downlink?member=1&groups=1&wait_ms={wait_ms}"
            ))
            .body(())
            .unwrap()
    };
    // One exchange first, so the server's SETTINGS are in effect.
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(poll(0), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::NO_CONTENT);
    let mut send = send.ready().await.unwrap();
    let (resp, mut stream) = send.send_request(poll(300), false).unwrap();
    stream.reserve_capacity(1 << 20);
    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx))
        .await
        .unwrap()
        .unwrap();
    assert!(granted <= 64 * 1024, "the window granted: {granted}");
    // The long poll still answers once its body ends.
    stream.send_data(bytes::Bytes::new(), true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::NO_CONTENT);
}

/// One source (127.0.0.1) attaching member ids and groups is held to
/// `DAPGW_ATTACH_MAX_MEMBERS_PER_SOURCE` and
/// `DAPGW_ATTACH_MAX_GROUPS_PER_SOURCE`: 503 `source_attach_full` and
/// `source_groups_full`, counted by reason, and the refused groups never
/// reach the UDC's subscription, while a second source (127.0.0.2) still
/// attaches. The shares hold across a restart on the same spool; a restart
/// under a smaller share keeps the most recently heard members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_fill_the_attach_registry() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.attach_max_members_per_source = 2;
    // The smallest group share the configuration accepts: what one member
    // may name.
    let share = dapgw::gateway::MAX_MEMBER_GROUPS as u32;
    cfg.attach_max_groups_per_source = u64::from(share);
    let gw = Gateway::start(cfg.clone()).await;
    let (a, b) = ([127, 0, 0, 1], [127, 0, 0, 2]);
    let mut flooder = Client::connect_from(gw.members, &pki, true, a).await;
    let mut other = Client::connect_from(gw.members, &pki, true, b).await;
    assert_eq!(flooder.attach(1, &[7]).await.status, StatusCode::OK);
    assert_eq!(flooder.attach(2, &[7, 8]).await.status, StatusCode::OK);
    assert_retry_later(&flooder.attach(3, &[7]).await, "source_attach_full");
    // Member 1 may fill the source's share (7, 8 and its 254 new groups
    // are 256); one more group is one too many.
    let filling: Vec<u32> = std::iter::once(7).chain(9..9 + share - 2).collect();
    assert_eq!(flooder.attach(1, &filling).await.status, StatusCode::OK);
    assert_retry_later(
        &flooder.attach(2, &[7, 8, 5000]).await,
        "source_groups_full",
    );
    // Another source is served, with new groups too.
    assert_eq!(other.attach(3, &[7, 6000]).await.status, StatusCode::OK);
    for (reason, n) in [
        ("source_members", 1.0),
        ("source_groups", 1.0),
        ("groups", 0.0),
    ] {
        let name = format!("dapgw_attach_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(gw.metric(&name).await, n, "{name}");
    }
    assert_eq!(gw.metric("dapgw_attached_members").await, 3.0);
    let mut subscribed = filling.clone();
    subscribed.extend([8, 6000]);
    subscribed.sort_unstable();
    udc.wait_until("the subscription of every attached group", |s| {
        s.subscriptions.lock().unwrap().last() == Some(&subscribed)
    })
    .await;
    assert!(
        udc.state
            .subscriptions
            .lock()
            .unwrap()
            .iter()
            .all(|g| !g.contains(&5000)),
        "a refused group was subscribed"
    );
    drop((flooder, other));

    // Restarted on the same spool, the source still holds its share.
    gw.stop().await;
    let gw = Gateway::start(cfg.clone()).await;
    let mut flooder = Client::connect_from(gw.members, &pki, true, a).await;
    assert_retry_later(&flooder.attach(4, &[7]).await, "source_attach_full");
    assert_retry_later(
        &flooder.attach(2, &[7, 8, 5001]).await,
        "source_groups_full",
    );
    assert_eq!(flooder.attach(2, &[7]).await.status, StatusCode::OK);
    drop(flooder);
    gw.stop().await;

    // Restarted with a smaller share: the source's most recently heard
    // member (2, attached again just now) is restored, member 1 is not,
    // and is forgotten in the spool: a later start with room again does
    // not bring it back.
    cfg.attach_max_members_per_source = 1;
    let gw = Gateway::start(cfg.clone()).await;
    assert_eq!(gw.metric("dapgw_attached_members").await, 2.0);
    let mut flooder = Client::connect_from(gw.members, &pki, true, a).await;
    assert_retry_later(&flooder.attach(4, &[7]).await, "source_attach_full");
    assert_eq!(flooder.attach(2, &[7]).await.status, StatusCode::OK);
    // Member 2 heard from the second source, which keeps its one member
    // (3): with the same groups it stays counted at the first and is
    // answered 200; with other groups it is refused there.
    let mut other = Client::connect_from(gw.members, &pki, true, b).await;
    assert_eq!(other.attach(2, &[7]).await.status, StatusCode::OK);
    assert_retry_later(&other.attach(2, &[8]).await, "source_attach_full");
    drop((flooder, other));
    gw.stop().await;
    cfg.attach_max_members_per_source = 2;
    let gw = Gateway::start(cfg).await;
    assert_eq!(gw.metric("dapgw_attached_members").await, 2.0);
    gw.stop().await;
}

/// Concurrent attaches of new members from one source with room for one:
/// exactly one is answered 200, and the spool holds exactly that one (the
/// check and the apply of each change are serialized around its write, so
/// no two pass the share together and no refused attach leaves a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attaches_from_one_source_take_its_share_once() {
    let (pki, _udc, dir, gw) = start(|c| {
        c.attach_max_members_per_source = 1;
    })
    .await;
    let n = 32u64;
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(n as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for m in 1..=n {
        let mut c = Client::connect_from(gw.members, &pki, true, [127, 0, 0, 1]).await;
        let together = together.clone();
        tasks.spawn(async move {
            together.wait().await;
            c.attach(m, &[7]).await.status
        });
    }
    let mut ok = 0;
    while let Some(status) = tasks.join_next().await {
        match status.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(gw.metric("dapgw_attached_members").await, 1.0);
    assert_eq!(
        gw.metric("dapgw_attach_rejected_total{reason=\"source_members\"}")
            .await,
        (n - 1) as f64
    );
    let db = rusqlite::Connection::open(dir.path().join("spool.db")).unwrap();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM attached", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "refused attaches left rows in the spool");
    drop(gw);
}
