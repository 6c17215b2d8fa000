//! The UDC over real TLS on 127.0.0.1 with the dev PKI: gateways (mTLS,
//! HTTP/2), direct members (no client certificate) and the operator API.
//! Members are simulated from `keys` and `suite` directly.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dapgw::config::UdcConfig;
use dapgw::protocol::keys::{MasterSecret, MemberKeyDeriver, response_keys, transcript_hash};
use dapgw::protocol::suite::{Gcm, aggregate};
use dapgw::protocol::wire::{
    Batch, BatchBody, ChunkTags, Direct, DirectInner, GatewayId, GroupId, MemberId, Mode, Outcome,
    Response, ResponseEntry, TagReply, Verdict, VerdictBody,
};
use dapgw::udc::{self, keys_cmd};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

const G: u32 = 7;
const TOKEN: &str = "test-admin-token";

struct Harness {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    admin: SocketAddr,
    pki: dapgw::tls::dev_pki::DevPki,
    master: MasterSecret,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    async fn start(store_url: Option<String>) -> Self {
        Self::start_with(store_url, 60_000).await
    }

    async fn start_with(store_url: Option<String>, localize_timeout_ms: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dapgw::tls::dev_pki::generate(
            &dir.path().join("pki"),
            &[],
            &["gw-1".to_string(), "gw-2".to_string()],
        )
        .unwrap();
        let keys = dir.path().join("keys");
        keys_cmd::init(&keys).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        let url = store_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("udc.sqlite3").display()));
        let config = UdcConfig {
            tls_cert: pki.server_cert.clone(),
            tls_key: pki.server_key.clone(),
            client_ca: pki.ca_cert.clone(),
            admin_token_file: Some(token),
            store_url: dapgw::config::SecretUrl::new(url),
            master_secret_file: keys.join(keys_cmd::files::MASTER),
            storage_key_file: keys.join(keys_cmd::files::STORAGE),
            signing_key_file: keys.join(keys_cmd::files::SIGNING),
            key_cert_file: keys.join(keys_cmd::files::SIGNING_CERT),
            localize_timeout_ms,
            ..UdcConfig::default()
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let admin = a.local_addr().unwrap();
        let master = keys_cmd::load_master(&keys.join(keys_cmd::files::MASTER)).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(udc::run(
            config,
            udc::Listeners { udc: l, admin: a },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            _dir: dir,
            addr,
            admin,
            pki,
            master,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }

    /// A TLS client config trusting the dev CA, with gateway `gw`'s
    /// certificate (or none).
    fn tls(&self, gw: Option<&str>) -> Arc<rustls::ClientConfig> {
        match gw {
            Some(name) => {
                let (_, cert, key) = self.pki.clients.iter().find(|(n, _, _)| n == name).unwrap();
                dapgw::tls::client_config(&self.pki.ca_cert, cert, key)
                    .unwrap()
                    .config()
            }
            None => {
                let roots = dapgw::tls::load_roots(&self.pki.ca_cert).unwrap();
                let mut c = rustls::ClientConfig::builder_with_provider(dapgw::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                c.alpn_protocols = vec![b"h2".to_vec()];
                Arc::new(c)
            }
        }
    }

    /// One HTTP/2 request over a fresh TLS connection.
    async fn call(
        &self,
        gw: Option<&str>,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls(gw));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header("content-type", "application/vnd.dapgw")
            .body(Full::new(body.into()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    /// One request to the operator API (HTTP/1.1, plain).
    async fn admin(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let tcp = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let resp = send
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    async fn op(&self, method: Method, path: &str, body: serde_json::Value) -> serde_json::Value {
        let (s, v) = self.admin(Some(TOKEN), method, path, body).await;
        assert!(s.is_success(), "{path}: {s} {v}");
        v
    }

    fn member(&self, id: u64) -> (MemberId, dapgw::protocol::keys::MemberKey) {
        (
            MemberId(id),
            MemberKeyDeriver::new(&self.master).member_key(id, 1),
        )
    }
}

/// Parses a downlink records body into (cursor, audience, group, member,
/// message).
fn records(mut b: &[u8]) -> Vec<(u64, u8, u32, u64, Bytes)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let cursor = u64::from_be_bytes(b[..8].try_into().unwrap());
        let aud = b[8];
        let group = u32::from_be_bytes(b[9..13].try_into().unwrap());
        let member = u64::from_be_bytes(b[13..21].try_into().unwrap());
        let len = u32::from_be_bytes(b[21..25].try_into().unwrap()) as usize;
        out.push((
            cursor,
            aud,
            group,
            member,
            Bytes::copy_from_slice(&b[25..25 + len]),
        ));
        b = &b[25 + len..];
    }
    out
}

/// A member's psk response to `challenge`: (entry, tag).
fn respond(h: &Harness, id: u64, challenge: &Bytes) -> (ResponseEntry, [u8; 16]) {
    let (mid, key) = h.member(id);
    let ch_hash: [u8; 32] = Sha256::digest(challenge).into();
    let mut n_i = [0u8; 16];
    n_i[..8].copy_from_slice(&id.to_be_bytes());
    let th = transcript_hash(&ch_hash, id, 1, &n_i, None);
    let (resp, _) = response_keys(&key, &th);
    let mut c = Vec::new();
    let tag = Gcm::new(resp.k_resp.expose()).seal_in_place(resp.iv_resp.expose(), &th, &mut c);
    (
        ResponseEntry {
            id: mid,
            kv: 1,
            n_i,
            e_i: None,
            c: Bytes::from(c),
        },
        tag,
    )
}

/// A response batch of `entries` (sorted by id) in chunks of 4.
fn batch(gw: &str, batch_id: u64, round: u64, entries: Vec<(ResponseEntry, [u8; 16])>) -> Batch {
    let aggregates = entries
        .chunks(4)
        .map(|c| aggregate(c.iter().map(|(_, t)| t)))
        .collect();
    Batch {
        gateway_id: GatewayId::new(gw).unwrap(),
        batch_id,
        group: GroupId(G),
        chunk_size: 4,
        body: BatchBody::Responses {
            round,
            mode: Mode::Psk,
            entries: entries.into_iter().map(|(e, _)| e).collect(),
        },
        aggregates,
    }
}

fn outcomes(v: &Verdict) -> Vec<Outcome> {
    match &v.body {
        VerdictBody::Final { outcomes, .. } => outcomes.clone(),
        VerdictBody::TagsRequested { .. } => panic!("expected a final verdict"),
    }
}

async fn scenario(h: &Harness) {
    // Operator API needs the token.
    let (s, v) = h
        .admin(
            None,
            Method::GET,
            "/v1/admin/members",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"], "unauthorized");
    let (s, _) = h
        .admin(
            Some("wrong"),
            Method::GET,
            "/v1/admin/members",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // Members 1..=24 and 30 in group 7.
    let import: Vec<_> = (1..=24u64)
        .chain([30])
        .map(|id| serde_json::json!({"id": id, "kv": 1, "groups": [G]}))
        .collect();
    let v = h
        .op(
            Method::POST,
            "/v1/admin/members/import",
            serde_json::json!({"members": import}),
        )
        .await;
    assert_eq!(v["imported"], 25);

    // gw-1 subscribes; a round opens; its challenge is in gw-1's downlink.
    let (s, _) = h
        .call(
            Some("gw-1"),
            Method::PUT,
            "/v1/subscriptions",
            r#"{"groups":[7]}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(None, Method::PUT, "/v1/subscriptions", r#"{"groups":[7]}"#)
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "gateway endpoints need a certificate"
    );
    let v = h
        .op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": "psk", "purpose": "auth"}),
        )
        .await;
    let round = v["round"].as_u64().unwrap();
    let (s, body) = h
        .call(
            Some("gw-1"),
            Method::GET,
            "/v1/downlink?after=0&wait_ms=0",
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let recs = records(&body);
    assert_eq!(recs.len(), 1);
    let (c1, aud, group, _, challenge) = recs[0].clone();
    assert_eq!((aud, group), (1, G));
    let (s, _) = h
        .call(
            Some("gw-1"),
            Method::GET,
            &format!("/v1/downlink?after={c1}&wait_ms=0"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // An honest batch of 20 is accepted; the confirms go to gw-1's queue.
    let entries: Vec<_> = (1..=20).map(|id| respond(h, id, &challenge)).collect();
    let b = batch("gw-1", 1, round, entries.clone());
    let bytes = b.to_bytes();
    let (s, answer) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::OK, "{answer:?}");
    let verdict = Verdict::decode(&answer).unwrap();
    assert_eq!(outcomes(&verdict), vec![Outcome::Accepted; 20]);
    let (s, body) = h
        .call(
            Some("gw-1"),
            Method::GET,
            &format!("/v1/downlink?after={c1}&wait_ms=1000"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let confirms = records(&body);
    assert_eq!(confirms.len(), 20);
    assert!(confirms.iter().all(|r| r.0 > c1 && r.1 == 2));
    assert!(confirms.windows(2).all(|w| w[0].0 < w[1].0));

    // The same batch again: the stored verdict byte for byte.
    let (s, again) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, answer);
    // Another batch under the used id: 409.
    let other = batch("gw-1", 1, round, entries[..4].to_vec()).to_bytes();
    let (s, body) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", other)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body:?}");
    // gw-2 posting gw-1's batch: 403.
    let (s, body) = h
        .call(Some("gw-2"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"], "wrong_gateway");
    // Garbage: 400 with a reason.
    let (s, body) = h
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/batches",
            &b"\x01\x04junk"[..],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()));

    // Localization: member 22's ciphertext is altered in transit, so its
    // chunk's aggregate fails and V asks for the chunk's tags.
    let mut entries: Vec<_> = (21..=24).map(|id| respond(h, id, &challenge)).collect();
    let honest_tags: Vec<[u8; 16]> = entries.iter().map(|(_, t)| *t).collect();
    entries[1].0.n_i[15] ^= 1;
    let b = batch("gw-1", 2, round, entries);
    let bytes = b.to_bytes();
    let (s, answer) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::OK);
    let v = Verdict::decode(&answer).unwrap();
    let VerdictBody::TagsRequested { chunks } = &v.body else {
        panic!("expected a tag request, got {v:?}");
    };
    assert_eq!(chunks, &vec![0]);
    let reply = |hash: [u8; 32]| TagReply {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id: 2,
        batch_hash: hash,
        chunks: vec![ChunkTags {
            chunk: 0,
            tags: honest_tags.clone(),
        }],
    };
    let (s, _) = h
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/tags",
            reply([9; 32]).to_bytes(),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "batch hash mismatch");
    let mut unknown = reply(v.batch_hash);
    unknown.batch_id = 99;
    let (s, _) = h
        .call(Some("gw-1"), Method::POST, "/v1/tags", unknown.to_bytes())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, fin) = h
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/tags",
            reply(v.batch_hash).to_bytes(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let fin_v = Verdict::decode(&fin).unwrap();
    let o = outcomes(&fin_v);
    assert_eq!(o[0], Outcome::Accepted);
    assert_ne!(o[1], Outcome::Accepted);
    assert_eq!((o[2], o[3]), (Outcome::Accepted, Outcome::Accepted));
    // The batch retried after localization: the final verdict.
    let (s, again) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again, fin);

    // Direct (flow A), no client certificate.
    let (e, tag) = respond(h, 30, &challenge);
    let resp = Response::from_entry(e, GroupId(G), round, tag);
    let direct = Direct::new(&DirectInner::Response(resp), aggregate([&tag]));
    let (s, body) = h
        .call(None, Method::POST, "/v1/direct", direct.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let dv = Verdict::decode(&body).unwrap();
    assert_eq!(outcomes(&dv), vec![Outcome::Accepted]);
    let (s, again) = h
        .call(None, Method::POST, "/v1/direct", direct.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        again, body,
        "a retried direct response gets the same answer"
    );
    // A bad submission gets the uniform answer.
    let (s, body) = h
        .call(None, Method::POST, "/v1/direct", &b"nonsense"[..])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"], "not_accepted");
    // Per-source rate limit: the bucket (5 per second) runs dry.
    let mut limited = false;
    for _ in 0..10 {
        let (s, _) = h.call(None, Method::POST, "/v1/direct", &b"x"[..]).await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
    }
    assert!(limited, "direct submissions are rate limited");

    // Operator views.
    let rep = h
        .op(
            Method::GET,
            &format!("/v1/admin/rounds/{G}/{round}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(rep["accepted"], 24, "{rep}");
    assert_eq!(rep["localizations"], 1, "{rep}");
    assert_eq!(rep["unverified"], 1, "{rep}");
    assert_eq!(rep["missing_count"], 0, "every member answered: {rep}");
    let gws = h
        .op(Method::GET, "/v1/admin/gateways", serde_json::Value::Null)
        .await;
    let gw1 = &gws["gateways"][0];
    assert_eq!(gw1["gateway"], "gw-1");
    assert_eq!(gw1["batches"], 2, "{gws}");
    let members = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await;
    let m1 = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 1)
        .unwrap()
        .clone();
    assert!(m1["last_auth_ms"].as_u64().is_some(), "{m1}");

    // A configuration update fans out to gw-1.
    let last = confirms.last().unwrap().0;
    let v = h
        .op(
            Method::POST,
            &format!("/v1/admin/groups/{G}/updates"),
            serde_json::json!({"payload_hex": "0102"}),
        )
        .await;
    let seq = v["seq"].as_u64().unwrap();
    let u = h
        .op(
            Method::GET,
            &format!("/v1/admin/groups/{G}/updates/{seq}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(u["acked"].as_array().unwrap().len(), 0);
    // Revoking member 1 rekeys every other member with a session.
    let v = h
        .op(
            Method::POST,
            "/v1/admin/members/1/revoke",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(v["revoked"], 1);
    let (s, body) = h
        .call(
            Some("gw-1"),
            Method::GET,
            &format!("/v1/downlink?after={last}&wait_ms=0"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let recs = records(&body);
    assert!(recs.iter().any(|r| r.1 == 1), "the group message");
    let rekeyed: std::collections::BTreeSet<u64> =
        recs.iter().filter(|r| r.1 == 2).map(|r| r.3).collect();
    assert!(!rekeyed.contains(&1) && rekeyed.contains(&2), "{rekeyed:?}");
    let (s, _) = h
        .admin(
            Some(TOKEN),
            Method::POST,
            "/v1/admin/members/999/revoke",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Adding a member opens a new epoch too.
    h.op(
        Method::POST,
        "/v1/admin/members",
        serde_json::json!({"id": 40, "groups": [G]}),
    )
    .await;
    // Schedules.
    let v = h
        .op(
            Method::POST,
            "/v1/admin/schedules",
            serde_json::json!({"group": G, "every_s": 14400, "mode": "psk", "purpose": "read"}),
        )
        .await;
    assert!(v["id"].as_u64().is_some());
    let v = h
        .op(Method::GET, "/v1/admin/schedules", serde_json::Value::Null)
        .await;
    assert_eq!(v["schedules"].as_array().unwrap().len(), 1);
    let v = h
        .op(
            Method::GET,
            "/v1/admin/readings?member=2",
            serde_json::Value::Null,
        )
        .await;
    assert!(v["readings"].as_array().is_some());
    let (s, v) = h
        .admin(
            Some(TOKEN),
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": "nope"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udc_over_tls_with_sqlite() {
    let h = Harness::start(None).await;
    scenario(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udc_over_tls_with_postgres() {
    use dapgw::udc::store::{PgCluster, PgClusterError};
    let cluster = match tokio::task::spawn_blocking(|| PgCluster::start(false))
        .await
        .unwrap()
    {
        Ok(c) => c,
        Err(e @ PgClusterError::NotInstalled(_)) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the PostgreSQL tests cannot run: {e}"
            );
            eprintln!("SKIPPED: PostgreSQL is not available here: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    cluster.create_database("udc_http").unwrap();
    let h = Harness::start(Some(cluster.url("udc_http"))).await;
    scenario(&h).await;
    h.stop().await;
}

/// A tag request the gateway never answers is finalized by the background
/// task after `DAPGW_LOCALIZE_TIMEOUT_MS`: the unresolved chunk's entries
/// become unverified via gateway, and a retried batch gets that verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_tag_request_expires() {
    let h = Harness::start_with(None, 1).await;
    let import: Vec<_> = (1..=4u64)
        .map(|id| serde_json::json!({"id": id, "kv": 1, "groups": [G]}))
        .collect();
    h.op(
        Method::POST,
        "/v1/admin/members/import",
        serde_json::json!({"members": import}),
    )
    .await;
    h.call(
        Some("gw-1"),
        Method::PUT,
        "/v1/subscriptions",
        r#"{"groups":[7]}"#,
    )
    .await;
    let v = h
        .op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": "psk"}),
        )
        .await;
    let round = v["round"].as_u64().unwrap();
    let (_, body) = h
        .call(
            Some("gw-1"),
            Method::GET,
            "/v1/downlink?after=0&wait_ms=0",
            Bytes::new(),
        )
        .await;
    let challenge = records(&body)[0].4.clone();
    let mut entries: Vec<_> = (1..=4).map(|id| respond(&h, id, &challenge)).collect();
    entries[0].0.n_i[0] ^= 1;
    let bytes = batch("gw-1", 1, round, entries).to_bytes();
    let (s, first) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(matches!(
        Verdict::decode(&first).unwrap().body,
        VerdictBody::TagsRequested { .. }
    ));
    // The background task runs every second; allow it ten passes.
    let mut fin = None;
    for _ in 0..40 {
        let (s, answer) = h
            .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
            .await;
        assert_eq!(s, StatusCode::OK);
        let v = Verdict::decode(&answer).unwrap();
        if let VerdictBody::Final { .. } = v.body {
            fin = Some(v);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let fin = fin.expect("the localization expired into a final verdict");
    assert_eq!(outcomes(&fin), vec![Outcome::UnverifiedViaGateway; 4]);
    h.stop().await;
}
