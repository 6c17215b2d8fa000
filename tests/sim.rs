//! `dapgw::sim` against a fake gateway: a hyper server on 127.0.0.1:0 with
//! the dev PKI that serves the member-facing API (attach, uplink, long-poll
//! downlink with cursors) from an in-memory queue, and plays the gateway's
//! and V's roles with the real aggregator and verifier (`tests/common`).
//!
//! Waits are on the fleet's counters (watch channel) with a timeout, and on
//! the fake's own watch channels; nothing sleeps to synchronise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{World, outcomes};
use dapgw::protocol::keys::MemberCredential;
use dapgw::protocol::wire::{GroupId, MemberId, Mode, Outcome, Purpose, Uplink, VerdictBody};
use dapgw::sim::agent::{AgentConfig, Stats};
use dapgw::sim::client::{Audience, ClientOptions, Record, client_tls, encode_records};
use dapgw::sim::{Fleet, FleetConfig};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

const G: u32 = 7;
const WAIT: Duration = Duration::from_secs(30);

/// The fake gateway's shared state. Locks are never held across an await.
struct Fake {
    world: Mutex<World>,
    /// The downlink queue (cursors from 1).
    queue: Mutex<Vec<Record>>,
    queue_changed: watch::Sender<u64>,
    /// Every uplink body taken (202), in arrival order.
    uplinks: Mutex<Vec<Bytes>>,
    uplinks_changed: watch::Sender<u64>,
    seen: Mutex<BTreeSet<[u8; 32]>>,
    /// TLS connections accepted.
    connections: AtomicU64,
    /// Client certificate identities seen.
    identities: Mutex<BTreeSet<String>>,
    /// Answer every request with garbage.
    garbage: AtomicBool,
    garbage_i: AtomicU64,
    /// Members whose next (or current) long poll fails at the HTTP level,
    /// as when the gateway process dies under it; each fails once.
    fail_polls: Mutex<BTreeSet<u64>>,
    /// Members whose next attach is refused (503), as by a gateway that is
    /// still starting; each is refused once.
    refuse_attaches: Mutex<BTreeSet<u64>>,
    /// How many of the next uplinks are answered 503 (Retry-After 0), as
    /// by a gateway whose spool is full.
    refuse_uplinks: AtomicU64,
}

impl Fake {
    fn publish(&self, audience: Audience, group: u32, message: Bytes) {
        let mut q = self.queue.lock().unwrap();
        let cursor = q.len() as u64 + 1;
        q.push(Record {
            cursor,
            audience,
            group: GroupId(group),
            message,
        });
        drop(q);
        self.queue_changed.send_modify(|v| *v += 1);
    }

    fn uplinks(&self) -> Vec<Bytes> {
        self.uplinks.lock().unwrap().clone()
    }

    /// Waits until `n` uplinks were taken.
    async fn wait_uplinks(&self, n: usize) {
        let mut rx = self.uplinks_changed.subscribe();
        tokio::time::timeout(WAIT, async {
            while self.uplinks.lock().unwrap().len() < n {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("uplinks did not arrive");
    }

    /// Plays a gateway restart: the long poll of each of `members` fails
    /// (those waiting now are woken to fail), then each one's first attach
    /// is refused while polls are served as usual.
    fn restart(&self, members: &[u64]) {
        self.refuse_attaches
            .lock()
            .unwrap()
            .extend(members.iter().copied());
        self.fail_polls
            .lock()
            .unwrap()
            .extend(members.iter().copied());
        self.queue_changed.send_modify(|v| *v += 1);
    }
}

fn reply(status: StatusCode, ct: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ct)
        .body(Full::new(body.into()))
        .unwrap()
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Garbage answers, cycled: junk bodies, truncated and mis-framed records,
/// records whose messages are junk of every downlink type.
fn garbage(i: u64) -> Response<Full<Bytes>> {
    let junk = |n: usize, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|k| (k as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let rec = |cursor: u64, aud: Audience, msg: Vec<u8>| Record {
        cursor,
        audience: aud,
        group: GroupId(G),
        message: Bytes::from(msg),
    };
    let base = 1000 + i * 10;
    match i % 8 {
        0 => reply(StatusCode::OK, "application/vnd.dapgw.records", junk(57, 3)),
        1 => {
            let good = encode_records(&[rec(base, Audience::Group, junk(40, 1))]);
            reply(StatusCode::OK, "x", good.slice(..good.len() - 3))
        }
        2 => reply(StatusCode::OK, "x", vec![0xff; 4096]),
        3 => reply(StatusCode::INTERNAL_SERVER_ERROR, "x", "oops"),
        _ => {
            // Records with the right version and each downlink type byte,
            // then junk; plus one naming another member.
            let msgs: Vec<Record> = [0x01u8, 0x07, 0x08, 0x09, 0x0A, 0x02, 0xEE]
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let mut m = vec![1, *t];
                    m.extend(junk(20 + k * 37, *t));
                    rec(base + k as u64, Audience::Member(MemberId(1)), m)
                })
                .chain([rec(base + 9, Audience::Member(MemberId(999)), vec![1, 7])])
                .collect();
            reply(StatusCode::OK, "x", encode_records(&msgs))
        }
    }
}

/// A service error: hyper resets the stream (HTTP/2) or closes the
/// connection (HTTP/1.1), so the client sees a transport failure.
fn gateway_died() -> std::io::Error {
    std::io::Error::other("gateway died")
}

async fn handle(
    fake: Arc<Fake>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if fake.garbage.load(Ordering::Relaxed) {
        let i = fake.garbage_i.fetch_add(1, Ordering::Relaxed);
        if req.uri().path() == "/v1/attach" {
            // Every other attach is answered with broken JSON.
            let body = if i.is_multiple_of(2) {
                "{not json"
            } else {
                "{\"cursor\": 0}"
            };
            return Ok(reply(StatusCode::OK, "application/json", body));
        }
        return Ok(garbage(i));
    }
    let path = req.uri().path().to_string();
    let q = query(req.uri());
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, "text/plain", "body")),
    };
    Ok(match path.as_str() {
        "/v1/attach" => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["member"].is_u64() && v["groups"].is_array());
            let member = v["member"].as_u64().unwrap();
            if fake.refuse_attaches.lock().unwrap().remove(&member) {
                return Ok(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "starting",
                ));
            }
            let latest = fake.queue.lock().unwrap().len() as u64;
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "cursor": latest }).to_string(),
            )
        }
        "/v1/uplink" => {
            if fake
                .refuse_uplinks
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let mut r = reply(StatusCode::SERVICE_UNAVAILABLE, "application/json", "{}");
                r.headers_mut()
                    .insert(hyper::header::RETRY_AFTER, "0".parse().unwrap());
                return Ok(r);
            }
            let h: [u8; 32] = Sha256::digest(&body).into();
            if fake.seen.lock().unwrap().contains(&h) {
                // Byte-identical re-send: idempotent.
                fake.uplinks.lock().unwrap().push(body);
                fake.uplinks_changed.send_modify(|v| *v += 1);
                return Ok(reply(StatusCode::ACCEPTED, "application/json", "{}"));
            }
            let res = {
                let mut w = fake.world.lock().unwrap();
                let now = w.now;
                w.gateway.handle_bytes(&body, (), now)
            };
            match res {
                Ok(_) => {
                    fake.seen.lock().unwrap().insert(h);
                    fake.uplinks.lock().unwrap().push(body);
                    fake.uplinks_changed.send_modify(|v| *v += 1);
                    reply(StatusCode::ACCEPTED, "application/json", "{\"entry\":1}")
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
            }
        }
        "/v1/downlink" => {
            let member: u64 = q["member"].parse().unwrap();
            let groups: BTreeSet<u32> = q["groups"]
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let after: u64 = q["after"].parse().unwrap();
            let wait = Duration::from_millis(q["wait_ms"].parse().unwrap());
            let mut rx = fake.queue_changed.subscribe();
            let dies = || fake.fail_polls.lock().unwrap().remove(&member);
            let pick = || -> Vec<Record> {
                fake.queue
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.cursor > after)
                    .filter(|r| match r.audience {
                        Audience::Group => groups.contains(&r.group.0),
                        Audience::Member(m) => m.0 == member,
                    })
                    .cloned()
                    .collect()
            };
            // Like the gateway: a cursor past this queue's end came from
            // another (replaced) queue.
            let ahead = || after > fake.queue.lock().unwrap().len() as u64;
            let found = tokio::time::timeout(wait, async {
                loop {
                    if dies() {
                        return None;
                    }
                    if ahead() {
                        return Some(None);
                    }
                    let rs = pick();
                    if !rs.is_empty() {
                        return Some(Some(rs));
                    }
                    if rx.changed().await.is_err() {
                        return Some(Some(Vec::new()));
                    }
                }
            })
            .await
            .unwrap_or(Some(Some(Vec::new())))
            .ok_or_else(gateway_died)?;
            let Some(found) = found else {
                return Ok(reply(
                    StatusCode::CONFLICT,
                    "application/json",
                    r#"{"error":"cursor_ahead","reason":"past this queue"}"#,
                ));
            };
            if found.is_empty() {
                reply(StatusCode::NO_CONTENT, "text/plain", "")
            } else {
                reply(
                    StatusCode::OK,
                    "application/vnd.dapgw.records",
                    encode_records(&found),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "no"),
    })
}

/// Starts the fake gateway; returns it, its URL and the CA file.
async fn start(world: World, dir: &std::path::Path) -> (Arc<Fake>, String, std::path::PathBuf) {
    start_with(world, dir, false, &[]).await
}

/// [`start`], optionally offering only HTTP/1.1 (no `h2` in ALPN).
async fn start_with(
    world: World,
    dir: &std::path::Path,
    http1_only: bool,
    client_names: &[String],
) -> (Arc<Fake>, String, std::path::PathBuf) {
    let pki = dapgw::tls::dev_pki::generate(&dir.join("pki"), &[], client_names).unwrap();
    // With client names, client certificates are required.
    let client_ca = (!client_names.is_empty()).then_some(pki.ca_cert.as_path());
    let server = dapgw::tls::server_config(
        &pki.server_cert,
        &pki.server_key,
        client_ca,
        client_ca.is_some(),
    )
    .unwrap();
    let acceptor = if http1_only {
        let mut config = (*server.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    } else {
        server.acceptor()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake {
        world: Mutex::new(world),
        queue: Mutex::new(Vec::new()),
        queue_changed: watch::channel(0).0,
        uplinks: Mutex::new(Vec::new()),
        uplinks_changed: watch::channel(0).0,
        seen: Mutex::new(BTreeSet::new()),
        connections: AtomicU64::new(0),
        identities: Mutex::new(BTreeSet::new()),
        garbage: AtomicBool::new(false),
        garbage_i: AtomicU64::new(0),
        fail_polls: Mutex::new(BTreeSet::new()),
        refuse_attaches: Mutex::new(BTreeSet::new()),
        refuse_uplinks: AtomicU64::new(0),
    });
    let f = fake.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            f.connections.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            let f = f.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(id) = dapgw::tls::peer_identity(tls.get_ref().1) {
                    f.identities.lock().unwrap().insert(id);
                }
                let svc = hyper::service::service_fn(move |req| handle(f.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (
        fake,
        format!("https://localhost:{}", addr.port()),
        pki.ca_cert,
    )
}

fn fleet(
    url: &str,
    ca: &std::path::Path,
    creds: Vec<MemberCredential>,
    state_dir: &std::path::Path,
    connections: usize,
) -> Fleet {
    Fleet::spawn(FleetConfig {
        client: ClientOptions {
            gateway: url.to_string(),
            tls: client_tls(ca, None).unwrap(),
            connections,
            connect_timeout: Duration::from_secs(10),
        },
        credentials: creds,
        agent: AgentConfig {
            state_dir: state_dir.to_path_buf(),
            wait_ms: 5_000,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..AgentConfig::default()
        },
        member_tls: BTreeMap::new(),
    })
    .unwrap()
}

fn count(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn creds(fake: &Fake, ids: &[u64]) -> Vec<MemberCredential> {
    let mut w = fake.world.lock().unwrap();
    ids.iter().map(|id| w.node(*id).cred.clone()).collect()
}

/// Opens a psk auth round at V and publishes its challenge; returns the
/// challenge.
fn open_round(fake: &Fake) -> Bytes {
    open_round_with(fake, Mode::Psk, Purpose::Auth)
}

/// [`open_round`] in any mode and purpose.
fn open_round_with(fake: &Fake, mode: Mode, purpose: Purpose) -> Bytes {
    let (ch, _) = fake.world.lock().unwrap().open_round(G, mode, purpose);
    fake.publish(Audience::Group, G, ch.clone());
    ch
}

/// Batches what the gateway collected, has V judge it, publishes confirms;
/// returns the accepted member ids (responses) or (id << 32 | ctr) keys.
fn settle(fake: &Fake) -> Vec<u64> {
    let mut w = fake.world.lock().unwrap();
    let mut accepted = Vec::new();
    for b in w.flush_all() {
        let verdict = w.submit_final(b.bytes.clone());
        for (k, o) in outcomes(&b.bytes, &verdict) {
            assert_eq!(o, Outcome::Accepted, "entry {k}");
            accepted.push(k);
        }
        let VerdictBody::Final { confirms, .. } = &verdict.body else {
            unreachable!()
        };
        for c in confirms {
            fake.publish(Audience::Member(c.id), G, c.to_bytes());
        }
    }
    accepted.sort();
    accepted
}

fn uplinks_of(fake: &Fake, id: u64) -> Vec<Uplink> {
    fake.uplinks()
        .iter()
        .filter(|b| b.get(1) == Some(&0x03))
        .map(|b| Uplink::decode(b).unwrap())
        .filter(|u| u.id.0 == id)
        .collect()
}

async fn wait(fleet: &Fleet, what: &str, cond: impl Fn(&Stats) -> bool) {
    assert!(
        fleet.wait_for(WAIT, cond).await,
        "timed out waiting for {what}: {}",
        fleet.stats().to_json()
    );
}

/// The whole member life cycle through HTTPS, then a restart from the state
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_round_readings_update_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let (fake, url, ca) = start(World::with_members(4, &[G], ids), dir.path()).await;
    let state = dir.path().join("state");
    let f = fleet(&url, &ca, creds(&fake, &ids), &state, 2);
    wait(&f, "attach", |s| count(&s.attached) == 3).await;

    // A round: every member answers, V accepts, confirms open sessions.
    let challenge = open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 3).await;
    fake.wait_uplinks(3).await;
    let responses: BTreeMap<u64, Bytes> = fake
        .uplinks()
        .into_iter()
        .map(|b| (u64::from_be_bytes(b[2..10].try_into().unwrap()), b))
        .collect();
    assert_eq!(settle(&fake), vec![1, 2, 3]);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 3).await;
    for id in ids {
        assert!(state.join(format!("member-{id}.state")).exists());
    }

    // Readings on command, counters strictly increasing, V accepts them.
    for _ in 0..3 {
        f.send_reading(1).await.unwrap();
    }
    f.send_reading(2).await.unwrap();
    assert_eq!(count(&f.stats().readings_sent), 4);
    let ctrs: Vec<u64> = uplinks_of(&fake, 1).iter().map(|u| u.ctr).collect();
    assert_eq!(ctrs, vec![1, 2, 3]);
    {
        let mut w = fake.world.lock().unwrap();
        let linger = w.gateway.config().uplink_linger;
        w.advance(linger);
    }
    assert_eq!(settle(&fake).len(), 4);

    // A group update: applied by all, acked, V learns who applied it.
    publish_update(&fake, b"tariff: peak 17-20h");
    wait(&f, "acks", |s| {
        count(&s.acks_sent) == 3 && s.updates_applied_for(G, 1) == 3
    })
    .await;
    fake.wait_uplinks(3 + 4 + 3).await;
    assert_eq!(f.could_read(2, G, 1), Some(Ok(())));
    settle(&fake);
    let acked: Vec<u64> = {
        let w = fake.world.lock().unwrap();
        w.udc
            .acks
            .acked(GroupId(G), 1)
            .unwrap()
            .iter()
            .map(|m| m.0)
            .collect()
    };
    assert_eq!(acked, vec![1, 2, 3]);
    let failed = f.shutdown().await;
    assert!(failed.is_empty(), "{failed:?}");
    let high = uplinks_of(&fake, 1).iter().map(|u| u.ctr).max().unwrap();

    // Restart from the state directory: the same challenge again gets the
    // identical responses; counters continue above the high-water mark.
    let before = fake.uplinks().len();
    let f = fleet(&url, &ca, creds(&fake, &ids), &state, 2);
    wait(&f, "re-attach", |s| count(&s.attached) == 3).await;
    fake.publish(Audience::Group, G, challenge);
    wait(&f, "resends", |s| count(&s.responses_resent) >= 3).await;
    // The group message comes again too (each member's stored cursor is
    // from before it): its ack is sent again, byte for byte.
    let mut n = before + 3;
    let resent: BTreeMap<u64, Bytes> = loop {
        fake.wait_uplinks(n).await;
        let resent: BTreeMap<u64, Bytes> = fake.uplinks()[before..]
            .iter()
            .filter(|b| b.get(1) == Some(&0x02))
            .map(|b| (u64::from_be_bytes(b[2..10].try_into().unwrap()), b.clone()))
            .collect();
        if resent.len() == responses.len() {
            break resent;
        }
        n += 1;
    };
    assert_eq!(resent, responses);
    // Each member handled the group message's record before the
    // republished challenge, and waited for its ack's 202 first.
    let acks = |bs: &[Bytes]| -> BTreeMap<u64, Bytes> {
        bs.iter()
            .filter_map(|b| {
                let u = Uplink::decode(b).ok()?;
                (u.kind == dapgw::protocol::wire::UplinkKind::Ack).then(|| (u.id.0, b.clone()))
            })
            .collect()
    };
    let first_acks = acks(&fake.uplinks()[..before]);
    assert_eq!(first_acks.len(), 3);
    assert_eq!(
        acks(&fake.uplinks()[before..]),
        first_acks,
        "each ack again, byte for byte"
    );
    assert_eq!(count(&f.stats().rounds_answered), 0);

    f.send_reading(1).await.unwrap();
    let after = uplinks_of(&fake, 1).iter().map(|u| u.ctr).max().unwrap();
    assert!(after > high, "counter {after} not above {high}");
    {
        let mut w = fake.world.lock().unwrap();
        let linger = w.gateway.config().uplink_linger;
        w.advance(linger);
    }
    assert_eq!(settle(&fake), vec![1 << 32 | after]);
    assert!(f.shutdown().await.is_empty());
}

/// V signs a group update of group G with `payload` (not after 10 s) and
/// the fake gateway publishes it to the group.
fn publish_update(fake: &Fake, payload: &[u8]) {
    let msg = {
        let mut w = fake.world.lock().unwrap();
        let w = &mut *w;
        w.udc
            .verifier
            .group_message(
                w.udc.groups.get_mut(&GroupId(G)).unwrap(),
                payload,
                10,
                &mut w.rng,
            )
            .unwrap()
    };
    fake.publish(Audience::Group, G, msg);
}

/// Members `ids` of group G behind a fake gateway, attached and in a
/// session (a round answered, accepted and confirmed).
async fn in_session(ids: &[u64], dir: &std::path::Path) -> (Arc<Fake>, Fleet) {
    let (fake, url, ca) = start(World::with_members(4, &[G], ids.iter().copied()), dir).await;
    let f = fleet(&url, &ca, creds(&fake, ids), &dir.join("state"), 2);
    let n = ids.len() as u64;
    wait(&f, "attach", |s| count(&s.attached) == n).await;
    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == n).await;
    fake.wait_uplinks(ids.len()).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == n).await;
    (fake, f)
}

/// A member whose stored cursor is past everything its gateway's spool
/// holds (the spool was replaced) is told so (409 `cursor_ahead`) and
/// reads that spool from its start: it answers the next round instead of
/// waiting for the new spool to pass its old cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_cursor_is_past_a_replaced_spool_reads_it_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, f) = in_session(&[1, 2, 3], dir.path()).await;
    // The spool is replaced: its cursors start again below the members'.
    fake.queue.lock().unwrap().clear();
    fake.queue_changed.send_modify(|v| *v += 1);
    open_round(&fake);
    wait(&f, "answers in the new spool", |s| {
        count(&s.rounds_answered) == 6
    })
    .await;
    assert!(f.shutdown().await.is_empty());
}

/// An ack the gateway would not take (503 on every retry) is not dropped:
/// the agent keeps its cursor before the group message, polls it again
/// after a backoff, and the member sends the same ack bytes again, without
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_the_gateway_refused_is_sent_again_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, f) = in_session(&[1], dir.path()).await;
    let before = fake.uplinks().len();
    // More 503s than the agent's retries of one uplink (8).
    fake.refuse_uplinks.store(10, Ordering::Relaxed);
    publish_update(&fake, b"tariff: flat");
    wait(&f, "the ack", |s| count(&s.acks_sent) == 1).await;
    let s = f.stats();
    assert_eq!(count(&s.updates_applied), 1);
    assert!(s.errors()["uplink.503"] >= 10, "{:?}", s.errors());
    fake.wait_uplinks(before + 1).await;
    settle(&fake);
    let acked: Vec<u64> = {
        let w = fake.world.lock().unwrap();
        let acked = w.udc.acks.acked(GroupId(G), 1).unwrap();
        acked.iter().map(|m| m.0).collect()
    };
    assert_eq!(acked, vec![1]);
    assert!(f.shutdown().await.is_empty());
}

/// Many agents share a few HTTP/2 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_share_connections() {
    let dir = tempfile::tempdir().unwrap();
    // DAPGW_SIM_TEST_MEMBERS scales the test up by hand (a measurement).
    let n: u64 = std::env::var("DAPGW_SIM_TEST_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let ids: Vec<u64> = (1..=n).collect();
    let (fake, url, ca) = start(World::with_members(16, &[G], ids.clone()), dir.path()).await;
    let t0 = std::time::Instant::now();
    // 0: the fleet sizes the pool (one connection per STREAMS_PER_CONNECTION
    // members).
    let f = fleet(&url, &ca, creds(&fake, &ids), &dir.path().join("state"), 0);
    wait(&f, "attach", |s| count(&s.attached) == n).await;
    let t_attach = t0.elapsed();
    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == n).await;
    fake.wait_uplinks(n as usize).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == n).await;
    eprintln!(
        "{n} members: attached in {t_attach:?}, round with confirms done at {:?}",
        t0.elapsed()
    );
    let pool = n.div_ceil(dapgw::sim::STREAMS_PER_CONNECTION as u64);
    assert!(f.connections_opened() <= pool, "{}", f.connections_opened());
    assert!(count(&fake.connections) <= pool);
    assert!(f.shutdown().await.is_empty());
}

/// A gateway restart drops every member's long poll, and the restarted
/// gateway refuses each member's first attach but serves its polls: each
/// member attaches again before every poll until an attach succeeds, and is
/// counted once, by id (an agent that tried once and then just polled would
/// never count, and the demo's step 6 would wait for it in vain).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reattach_once_after_a_lost_poll_even_if_the_first_attach_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let (fake, url, ca) = start(World::with_members(4, &[G], ids), dir.path()).await;
    let f = fleet(&url, &ca, creds(&fake, &ids), &dir.path().join("state"), 1);
    wait(&f, "attach", |s| count(&s.attached) == 3).await;
    assert!(f.stats().reattaches().is_empty());

    fake.restart(&ids);
    wait(&f, "every member re-attached", |s| {
        s.reattaches().len() == ids.len()
    })
    .await;
    let stats = f.stats();
    assert_eq!(
        stats.reattaches(),
        ids.iter().map(|id| (*id, 1)).collect::<BTreeMap<_, _>>()
    );
    assert_eq!(count(&stats.reattached), 3);
    let errors = stats.errors();
    assert_eq!(errors.get("attach.503"), Some(&3), "{errors:?}");
    assert_eq!(errors.get("transport.http"), Some(&3), "{errors:?}");
    assert!(fake.fail_polls.lock().unwrap().is_empty());

    // Re-attached members still take part in a round.
    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 3).await;
    fake.wait_uplinks(3).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 3).await;
    assert_eq!(count(&stats.reattached), 3);
    assert!(f.shutdown().await.is_empty());
}

/// A gateway without HTTP/2: each in-flight request gets its own HTTP/1.1
/// connection, idle ones are reused, and the round still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u64> = (1..=5).collect();
    let (fake, url, ca) = start_with(
        World::with_members(4, &[G], ids.clone()),
        dir.path(),
        true,
        &[],
    )
    .await;
    let f = fleet(&url, &ca, creds(&fake, &ids), &dir.path().join("state"), 2);
    wait(&f, "attach", |s| count(&s.attached) == 5).await;
    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 5).await;
    fake.wait_uplinks(5).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 5).await;
    f.send_reading(3).await.unwrap();
    // Five parked long polls plus at most a few for attach and uplinks.
    let opened = f.connections_opened();
    assert!((5..=12).contains(&opened), "{opened}");
    assert!(f.shutdown().await.is_empty());
}

/// Garbage from the gateway is counted, never panics, and the agents stay
/// alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_gateway_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2];
    let (fake, url, ca) = start(World::with_members(4, &[G], ids), dir.path()).await;
    fake.garbage.store(true, Ordering::Relaxed);
    let f = fleet(&url, &ca, creds(&fake, &ids), &dir.path().join("state"), 1);
    wait(&f, "garbage handled", |s| {
        let e = s.errors();
        let has = |k: &str| e.get(k).copied().unwrap_or(0) > 0;
        count(&s.attached) == 2
            && has("downlink.malformed")
            && has("downlink.500")
            && has("member.malformed")
            && has("downlink.not_for_us")
            && has("downlink.unexpected_type")
    })
    .await;
    fake.garbage.store(false, Ordering::Relaxed);
    // Both agents are alive and answer commands (no session yet: refused).
    for id in ids {
        assert!(f.send_reading(id).await.is_err());
    }
    let failed = f.shutdown().await;
    assert!(failed.is_empty(), "{failed:?}");
}

/// `dapgw sim` as a process: reads a credentials file, attaches the selected
/// members, stops on SIGTERM or after `--duration-s` and prints the JSON
/// summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dapgw_sim_command_prints_summary() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let (fake, url, ca) = start(World::with_members(4, &[G], ids), dir.path()).await;
    let file = dapgw::protocol::keys::CredentialFile::new(creds(&fake, &ids));
    let cred_path = dir.path().join("members.json");
    std::fs::write(&cred_path, serde_json::to_string(&file).unwrap()).unwrap();
    let state = dir.path().join("state");
    let args = |duration_s: &str| -> Vec<String> {
        [
            "sim",
            "--gateway",
            &url,
            "--ca",
            &ca.display().to_string(),
            "--credentials",
            &cred_path.display().to_string(),
            "--members",
            "1..3",
            "--state-dir",
            &state.display().to_string(),
            "--duration-s",
            duration_s,
            "--summary-every-s",
            "1",
            "--wait-ms",
            "500",
        ]
        .map(String::from)
        .to_vec()
    };
    // 120 s is a hang guard only: the test stops the run with SIGTERM once
    // both members are attached, however long that takes on a loaded
    // machine.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args(args("120"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Progress lines are printed once the SIGTERM handler is installed; wait
    // for one that counts both members attached.
    let stderr = child.stderr.take().unwrap();
    let (attached, seen) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let done = line.starts_with("sim ") && line.contains(" attached=2 ");
            seen.push(line);
            if done {
                return (true, seen);
            }
        }
        (false, seen)
    })
    .await
    .unwrap();
    assert!(attached, "never saw both members attached: {seen:#?}");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["members"], 2);
    assert_eq!(summary["attached"], 2);
    assert!(
        summary["elapsed_s"].as_f64().is_some_and(|e| e < 120.0),
        "SIGTERM did not end the run: {summary}"
    );
    assert_eq!(summary["agents_failed"], serde_json::json!([]));
    for k in [
        "rounds_answered",
        "confirms_opened",
        "readings_sent",
        "updates_applied",
        "acks_sent",
        "errors",
        "connections_opened",
        "elapsed_s",
    ] {
        assert!(!summary[k].is_null(), "{k} missing: {summary}");
    }
    assert!(state.is_dir());

    // `--duration-s` ends a run by itself (how many members attached in
    // that second depends on the machine's load, so it is not checked).
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_dapgw"))
        .args(args("1"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let Ok(out) = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    else {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        panic!("--duration-s 1 did not end the run within 60 s");
    };
    let out = out.unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(summary["members"], 2, "{summary}");
    assert!(
        summary["elapsed_s"].as_f64().is_some_and(|e| e >= 1.0),
        "{summary}"
    );
    assert_eq!(summary["agents_failed"], serde_json::json!([]));
}

/// Members with their own client certificates each present theirs on a
/// connection of their own; the others share the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2];
    let names = vec!["member-1".to_string(), "member-2".to_string()];
    let (fake, url, ca) =
        start_with(World::with_members(4, &[G], ids), dir.path(), false, &names).await;
    let pki = dir.path().join("pki");
    let mut member_tls = BTreeMap::new();
    for id in ids {
        let cert = pki.join(format!("client-member-{id}.pem"));
        let key = pki.join(format!("client-member-{id}.key"));
        member_tls.insert(id, client_tls(&ca, Some((&cert, &key))).unwrap());
    }
    let f = Fleet::spawn(FleetConfig {
        client: ClientOptions {
            gateway: url,
            tls: client_tls(&ca, None).unwrap(),
            connections: 4,
            connect_timeout: Duration::from_secs(10),
        },
        credentials: creds(&fake, &ids),
        agent: AgentConfig {
            state_dir: dir.path().join("state"),
            wait_ms: 5_000,
            ..AgentConfig::default()
        },
        member_tls,
    })
    .unwrap();
    wait(&f, "attach", |s| count(&s.attached) == 2).await;
    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 2).await;
    fake.wait_uplinks(2).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 2).await;
    assert_eq!(
        *fake.identities.lock().unwrap(),
        names.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(f.connections_opened(), 2);
    assert!(f.shutdown().await.is_empty());
}

/// What the demo shows: after a revocation and a rekey, the remaining
/// members read the second update and the revoked one refuses it (recorded
/// with the member's reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_member_cannot_read_next_update() {
    use dapgw::protocol::verifier::MemberStatus;
    let dir = tempfile::tempdir().unwrap();
    let (fake, f) = in_session(&[1, 2, 3], dir.path()).await;

    publish_update(&fake, b"update one");
    wait(&f, "first update", |s| s.updates_applied_for(G, 1) == 3).await;

    let rekeys = {
        let mut w = fake.world.lock().unwrap();
        let w = &mut *w;
        let rekeys = w
            .udc
            .verifier
            .revoke(
                w.udc.groups.get_mut(&GroupId(G)).unwrap(),
                MemberId(3),
                &mut w.udc.sessions,
                &mut w.rng,
            )
            .unwrap();
        w.udc.registry.get_mut(MemberId(3)).unwrap().status = MemberStatus::Revoked;
        rekeys
    };
    for r in &rekeys {
        fake.publish(Audience::Member(r.id), G, r.to_bytes());
    }
    wait(&f, "rekeys", |s| count(&s.rekeys_applied) == 2).await;
    publish_update(&fake, b"update two");
    wait(&f, "second update", |s| {
        s.updates_applied_for(G, 2) == 2
            && s.errors().get("member.stale").copied().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(f.could_read(1, G, 2), Some(Ok(())));
    assert_eq!(f.could_read(2, G, 2), Some(Ok(())));
    assert_eq!(f.could_read(3, G, 1), Some(Ok(())));
    let refused = f.could_read(3, G, 2).expect("member 3 received update 2");
    let reason = refused.expect_err("the revoked member read update 2");
    assert!(reason.contains("epoch"), "{reason}");
    assert!(f.shutdown().await.is_empty());
}

/// A psk-ecdhe read round, a root-key update over the downlink, and the
/// next round answered (and accepted) under the new key version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecdhe_read_round_and_key_update() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1u64, 2];
    let (fake, url, ca) = start(World::with_members(4, &[G], ids), dir.path()).await;
    let f = fleet(&url, &ca, creds(&fake, &ids), &dir.path().join("state"), 1);
    wait(&f, "attach", |s| count(&s.attached) == 2).await;
    let read = Purpose::Read(Bytes::from_static(b"read 1.8.0"));
    open_round_with(&fake, Mode::PskEcdhe, read);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 2).await;
    fake.wait_uplinks(2).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 2).await;

    let update = {
        let mut w = fake.world.lock().unwrap();
        let w = &mut *w;
        let record = w.udc.registry.get_mut(MemberId(1)).unwrap().clone();
        let slot = w.udc.sessions.get_mut(GroupId(G), MemberId(1)).unwrap();
        let issued = w
            .udc
            .verifier
            .key_update(slot, &record, &mut w.rng)
            .unwrap();
        *w.udc.registry.get_mut(MemberId(1)).unwrap() = issued.record.clone();
        issued.updates[0].to_bytes()
    };
    fake.publish(Audience::Member(MemberId(1)), G, update);
    wait(&f, "key update", |s| count(&s.key_updates_applied) == 1).await;

    open_round(&fake);
    wait(&f, "answers", |s| count(&s.rounds_answered) == 4).await;
    fake.wait_uplinks(4).await;
    assert_eq!(settle(&fake), ids);
    wait(&f, "confirms", |s| count(&s.confirms_opened) == 4).await;
    let accepts_old = {
        let mut w = fake.world.lock().unwrap();
        w.udc.registry.get_mut(MemberId(1)).unwrap().accepts_kv(1)
    };
    assert!(!accepts_old, "V still accepts key version 1");
    assert!(f.shutdown().await.is_empty());
}
