//! The UDC over real TLS on 127.0.0.1 with the dev PKI: gateways (mTLS,
//! HTTP/2), direct members (no client certificate) and the operator API.
//! Members are simulated from `keys` and `suite` directly.

#[path = "support/skip.rs"]
mod skip;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use dapgw::config::UdcConfig;
use dapgw::protocol::keys::MemberCredential;
use dapgw::protocol::keys::{MasterSecret, MemberKeyDeriver, response_keys, transcript_hash};
use dapgw::protocol::member::{Challenged, Member};
use dapgw::protocol::suite::{Gcm, aggregate};
use dapgw::protocol::wire::{
    Batch, BatchBody, ChunkTags, Confirm, Direct, DirectInner, GatewayId, GroupId, MemberId,
    MessageType, Mode, Outcome, Response, ResponseEntry, TagReply, Verdict, VerdictBody,
};
use dapgw::protocol::wire::{Uplink, UplinkEntry, UplinkKind};
use dapgw::udc::{self, keys_cmd};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

const G: u32 = 7;
const TOKEN: &str = "test-admin-token";

struct Harness {
    _dir: Arc<tempfile::TempDir>,
    addr: SocketAddr,
    admin: SocketAddr,
    pki: dapgw::tls::dev_pki::DevPki,
    master: MasterSecret,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Kept to start the UDC again over the same store and keys.
    config: UdcConfig,
}

impl Harness {
    async fn start(store_url: Option<String>) -> Self {
        Self::start_with(store_url, 60_000).await
    }

    async fn start_with(store_url: Option<String>, localize_timeout_ms: u64) -> Self {
        Self::start_tuned(store_url, |c| c.localize_timeout_ms = localize_timeout_ms).await
    }

    /// A UDC whose configuration `tune` changes first.
    async fn start_tuned(store_url: Option<String>, tune: impl FnOnce(&mut UdcConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dapgw::tls::dev_pki::generate(
            &dir.path().join("pki"),
            &[],
            // The third is named as a direct submission's verdicts once
            // were (`direct-<member>-<group>`), to show it cannot collide.
            &[
                "gw-1".to_string(),
                "gw-2".to_string(),
                format!("direct-30-{G}"),
            ],
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
            ..UdcConfig::default()
        };
        let mut config = config;
        tune(&mut config);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let admin = a.local_addr().unwrap();
        let master = keys_cmd::load_master(&keys.join(keys_cmd::files::MASTER)).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(udc::run(
            config.clone(),
            udc::Listeners { udc: l, admin: a },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            _dir: Arc::new(dir),
            addr,
            admin,
            pki,
            master,
            stop: Some(tx),
            task,
            config,
        }
    }

    /// Stops the UDC (draining) and starts a new process-worth of it (a new
    /// `Udc`, empty caches and metrics) over the same store and keys.
    async fn restart(&mut self) {
        self.halt().await;
        self.resume().await;
    }

    /// Stops the UDC (draining); [`Self::resume`] starts it again.
    async fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }

    /// Starts the UDC stopped by [`Self::halt`] on new listeners.
    async fn resume(&mut self) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = l.local_addr().unwrap();
        self.admin = a.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = tokio::spawn(udc::run(
            self.config.clone(),
            udc::Listeners { udc: l, admin: a },
            async move {
                let _ = rx.await;
            },
        ));
    }

    /// A second UDC process over the same store and keys (its own
    /// listeners, caches and metrics), as several behind a load balancer.
    async fn second(&self) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin) = (l.local_addr().unwrap(), a.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(udc::run(
            self.config.clone(),
            udc::Listeners { udc: l, admin: a },
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            _dir: self._dir.clone(),
            addr,
            admin,
            pki: self.pki.clone(),
            master: keys_cmd::load_master(&self.config.master_secret_file).unwrap(),
            stop: Some(tx),
            task,
            config: self.config.clone(),
        }
    }

    /// `/metrics` of the admin listener, as text.
    async fn metrics(&self) -> String {
        let tcp = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .uri("/metrics")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A member running the real member state machine, provisioned like
    /// the UDC's import (derived key, version 1, group G).
    fn real_member(&self, id: u64) -> Member {
        let root = keys_cmd::read_hex::<32>(
            &self
                ._dir
                .path()
                .join("keys")
                .join(keys_cmd::files::ROOT_PUB),
        )
        .unwrap();
        Member::new(&MemberCredential {
            id,
            kv: 1,
            key: MemberKeyDeriver::new(&self.master).member_key(id, 1),
            groups: vec![G],
            root_public_key: *root,
            min_online_key_version: 1,
        })
        .unwrap()
    }

    /// gw-1's downlink records after `after` (waits up to 5 s for one).
    async fn downlink(&self, after: u64) -> Vec<(u64, u8, u32, u64, Bytes)> {
        let (s, body) = self
            .call(
                Some("gw-1"),
                Method::GET,
                &format!("/v1/downlink?after={after}&wait_ms=5000"),
                Bytes::new(),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "no downlink records after {after}");
        records(&body)
    }

    /// gw-1's downlink records after `after`, without waiting.
    async fn downlink_now(&self, after: u64) -> Vec<(u64, u8, u32, u64, Bytes)> {
        let (s, body) = self
            .call(
                Some("gw-1"),
                Method::GET,
                &format!("/v1/downlink?after={after}&wait_ms=0"),
                Bytes::new(),
            )
            .await;
        match s {
            StatusCode::NO_CONTENT => Vec::new(),
            StatusCode::OK => records(&body),
            s => panic!("downlink: {s} {body:?}"),
        }
    }

    /// Posts a batch as gw-1 and decodes the verdict.
    async fn post_batch(&self, b: &Batch) -> Verdict {
        let (s, body) = self
            .call(Some("gw-1"), Method::POST, "/v1/batches", b.to_bytes())
            .await;
        assert_eq!(s, StatusCode::OK, "{body:?}");
        Verdict::decode(&body).unwrap()
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
        let (s, _, b) = self.call_h(gw, method, path, body).await;
        (s, b)
    }

    /// [`Self::call`], with the answer's headers.
    async fn call_h(
        &self,
        gw: Option<&str>,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, hyper::HeaderMap, Bytes) {
        let mut answers = self.call_burst(gw, method, path, body.into(), 1).await;
        answers.pop().unwrap()
    }

    /// `n` copies of one HTTP/2 request, all in flight at once on one
    /// fresh TLS connection; their answers in the order they came.
    async fn call_burst(
        &self,
        gw: Option<&str>,
        method: Method,
        path: &str,
        body: Bytes,
        n: usize,
    ) -> Vec<(StatusCode, hyper::HeaderMap, Bytes)> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.tls(gw));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut in_flight = tokio::task::JoinSet::new();
        for _ in 0..n {
            let mut send = send.clone();
            let req = Request::builder()
                .method(method.clone())
                .uri(format!("https://localhost{path}"))
                .header("content-type", "application/vnd.dapgw")
                .body(Full::new(body.clone()))
                .unwrap();
            in_flight.spawn(async move {
                let resp = send.send_request(req).await.unwrap();
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, headers, body)
            });
        }
        in_flight.join_all().await
    }

    /// One request to the operator API (HTTP/1.1, plain).
    async fn admin(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let (status, _, body) = self.admin_full(token, method, path, body).await;
        let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    /// An authorized operator request without a body: status, headers and
    /// the body as is.
    async fn admin_raw(&self, method: Method, path: &str) -> (StatusCode, hyper::HeaderMap, Bytes) {
        self.admin_full(Some(TOKEN), method, path, serde_json::Value::Null)
            .await
    }

    async fn admin_full(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: serde_json::Value,
    ) -> (StatusCode, hyper::HeaderMap, Bytes) {
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
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
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

    /// Imports members `ids` into group `G` (derived keys, version 1)
    /// through the operator API; all of them must be imported.
    async fn import_members(&self, ids: impl IntoIterator<Item = u64>) {
        let import: Vec<_> = ids
            .into_iter()
            .map(|id| serde_json::json!({"id": id, "kv": 1, "groups": [G]}))
            .collect();
        let v = self
            .op(
                Method::POST,
                "/v1/admin/members/import",
                serde_json::json!({"members": import}),
            )
            .await;
        assert_eq!(v["imported"], import.len(), "{v}");
    }

    /// Subscribes gateway `gw` to group `G`.
    async fn subscribe(&self, gw: &str) {
        let (s, _) = self
            .call(
                Some(gw),
                Method::PUT,
                "/v1/subscriptions",
                r#"{"groups":[7]}"#,
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }

    /// Opens a psk auth round of group `G` through the operator API and
    /// returns its number.
    async fn open_auth_round(&self) -> u64 {
        self.op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": "psk", "purpose": "auth"}),
        )
        .await["round"]
            .as_u64()
            .unwrap()
    }

    /// Members `1..=n` of group `G`, authenticated in a psk auth round
    /// through gw-1, each holding the session its confirm (from the
    /// verdict) opened; gw-1's downlink cursor after the round's challenge.
    async fn authenticated(&self, n: u64) -> (Vec<Member>, u64) {
        let (mut members, r, v) = self.accepted_round(n).await;
        open_confirms(&mut members, &v);
        (members, r.cursor)
    }

    /// Members `1..=n` of group `G`, accepted in a psk auth round through
    /// gw-1 (batch 1), their confirms not opened yet: the members, the
    /// round, the verdict.
    async fn accepted_round(&self, n: u64) -> (Vec<Member>, OpenRound, Verdict) {
        let mut members: Vec<Member> = (1..=n).map(|id| self.real_member(id)).collect();
        let r = self.auth_round(n).await;
        let v = self
            .post_batch(&batch(
                "gw-1",
                1,
                r.round,
                answer(&mut members, &r.challenge, b""),
            ))
            .await;
        assert_eq!(outcomes(&v), vec![Outcome::Accepted; n as usize]);
        (members, r, v)
    }

    /// Members `1..=n` of group `G` imported, gw-1 subscribed, a psk auth
    /// round open and its challenge read from gw-1's downlink.
    async fn auth_round(&self, n: u64) -> OpenRound {
        self.import_members(1..=n).await;
        self.subscribe("gw-1").await;
        let round = self.open_auth_round().await;
        let recs = self.downlink(0).await;
        OpenRound {
            round,
            challenge: last_group_record(&recs),
            cursor: recs.last().unwrap().0,
        }
    }
}

/// An open round as gw-1 saw it ([`Harness::auth_round`]).
struct OpenRound {
    round: u64,
    /// The round's challenge.
    challenge: Bytes,
    /// gw-1's downlink cursor after the challenge.
    cursor: u64,
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

/// The confirms of a final verdict: (member, Confirm bytes), in batch order.
fn confirms(v: &Verdict) -> Vec<(u64, Bytes)> {
    match &v.body {
        VerdictBody::Final { confirms, .. } => {
            confirms.iter().map(|c| (c.id.0, c.to_bytes())).collect()
        }
        VerdictBody::TagsRequested { .. } => panic!("expected a final verdict"),
    }
}

/// Hands each member of `members` (ids from 1, in order) its confirm from
/// `v`; each must open.
fn open_confirms(members: &mut [Member], v: &Verdict) {
    for (id, msg) in confirms(v) {
        members[(id - 1) as usize]
            .handle_confirm(&msg)
            .unwrap()
            .persisted();
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
    h.import_members((1..=24).chain([30])).await;

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
    // A subscription list is bounded (distinct groups; repeats count once).
    let too_many: Vec<u32> = (0..=dapgw::udc::server::MAX_SUBSCRIBED_GROUPS as u32).collect();
    let (s, b) = h
        .call(
            Some("gw-1"),
            Method::PUT,
            "/v1/subscriptions",
            serde_json::json!({ "groups": too_many }).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("too_many_groups"));
    let repeated = serde_json::json!({ "groups": vec![7u32; 10_000] }).to_string();
    let (s, _) = h
        .call(Some("gw-1"), Method::PUT, "/v1/subscriptions", repeated)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
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
    assert_eq!(h.downlink_now(c1).await, []);

    // An honest batch of 20 is accepted; the confirms reach gw-1 in the
    // verdict, one per member, and are not queued on its downlink again
    // (a rekey issued later queues a member's pending confirm again ahead
    // of it: `a_confirm_goes_ahead_of_a_later_rekey`).
    let entries: Vec<_> = (1..=20).map(|id| respond(h, id, &challenge)).collect();
    let b = batch("gw-1", 1, round, entries.clone());
    let bytes = b.to_bytes();
    let (s, answer) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", bytes.clone())
        .await;
    assert_eq!(s, StatusCode::OK, "{answer:?}");
    let verdict = Verdict::decode(&answer).unwrap();
    assert_eq!(outcomes(&verdict), vec![Outcome::Accepted; 20]);
    let confirmed: Vec<u64> = confirms(&verdict).into_iter().map(|(id, _)| id).collect();
    assert_eq!(confirmed, (1..=20).collect::<Vec<_>>());
    assert_eq!(h.downlink_now(c1).await, []);

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

    // A gateway named like a direct submission's record posts a batch whose
    // id is the round: it is judged under its own name, and member 30's
    // direct response below is still judged (not taken for a re-send).
    let gw = format!("direct-30-{G}");
    let again: Vec<_> = (1..=4).map(|id| respond(h, id, &challenge)).collect();
    let named = batch(&gw, round, round, again).to_bytes();
    let (s, body) = h.call(Some(&gw), Method::POST, "/v1/batches", named).await;
    assert_eq!(s, StatusCode::OK, "{body:?}");

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
    // Per-source rate limit: the bucket (5 tokens, refilled at 5 per
    // second) runs dry. Requests one after the other would not empty it
    // on a machine slow enough to take 200 ms per request, so they come in
    // bursts of 20 on one connection, all in flight at once: a burst gets
    // no 429 only if the server's 20 checks spread over 3 s or more, and
    // the test stops at the first burst that gets one (of at most 10).
    let mut limited = None;
    for _ in 0..10 {
        let answers = h
            .call_burst(
                None,
                Method::POST,
                "/v1/direct",
                Bytes::from_static(b"x"),
                20,
            )
            .await;
        limited = answers
            .into_iter()
            .find(|(s, _, _)| *s == StatusCode::TOO_MANY_REQUESTS);
        if limited.is_some() {
            break;
        }
    }
    let (_, headers, body) = limited.expect("direct submissions are rate limited");
    assert_eq!(headers["retry-after"], "1");
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"], "rate_limited", "{e}");

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
    let listed = gws["gateways"].as_array().unwrap();
    let gw1 = listed.iter().find(|g| g["gateway"] == "gw-1").unwrap();
    assert_eq!(gw1["batches"], 2, "{gws}");
    // Direct submissions are not filed as a gateway's batches.
    assert_eq!(listed.len(), 2, "gw-1 and direct-30-7 only: {gws}");
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
    let last = c1;
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
    // Schedules: a read schedule keeps its read request, an auth one has
    // none.
    let v = h
        .op(
            Method::POST,
            "/v1/admin/schedules",
            serde_json::json!({"group": G, "every_s": 14400, "mode": "psk", "purpose": "read",
                               "read_request": "0102ff"}),
        )
        .await;
    let read_id = v["id"].as_u64().unwrap();
    let v = h
        .op(
            Method::POST,
            "/v1/admin/schedules",
            serde_json::json!({"group": G, "every_s": 3600, "mode": "psk", "purpose": "auth"}),
        )
        .await;
    let auth_id = v["id"].as_u64().unwrap();
    let v = h
        .op(Method::GET, "/v1/admin/schedules", serde_json::Value::Null)
        .await;
    let list = v["schedules"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    assert_eq!(list[0]["id"], read_id, "{v}");
    assert_eq!(list[0]["read_request"], "0102ff", "{v}");
    assert_eq!(list[1]["id"], auth_id, "{v}");
    assert_eq!(list[1]["read_request"], serde_json::Value::Null, "{v}");
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

    // A group named twice is one group (once it was two compare-and-set
    // writes of one group row, the second always lost: 503 for ever);
    // key version 0 is refused, as on import.
    let (s, v) = h
        .admin(
            Some(TOKEN),
            Method::POST,
            "/v1/admin/members",
            serde_json::json!({"id": 90, "groups": [99, 98, 99]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["groups"], serde_json::json!([98, 99]), "{v}");
    let (s, v) = h
        .admin(
            Some(TOKEN),
            Method::POST,
            "/v1/admin/members",
            serde_json::json!({"id": 91, "groups": [99], "kv": 0}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"], "bad_request");
}

/// The whole gateway-facing and operator scenario over mutual TLS, on
/// each store.
async fn udc_over_tls(store_url: Option<String>) {
    let h = Harness::start(store_url).await;
    scenario(&h).await;
    h.stop().await;
}

/// Declares a `sqlite` and a `postgres` test (in a module named after the
/// scenario) that run `$scenario(store_url)`: `None` for a fresh SQLite
/// store, or a database `$db` of a throwaway PostgreSQL cluster.
macro_rules! on_both_stores {
    ($scenario:ident, $db:literal) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(None).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(cluster) = super::pg_cluster().await else {
                    return;
                };
                cluster.create_database($db).unwrap();
                super::$scenario(Some(cluster.url($db))).await;
            }
        }
    };
}

/// A throwaway PostgreSQL cluster, or `None` (with a visible message) where
/// PostgreSQL is not installed outside CI.
async fn pg_cluster() -> Option<dapgw::udc::store::PgCluster> {
    use dapgw::udc::store::{PgCluster, PgClusterError};
    match tokio::task::spawn_blocking(|| PgCluster::start(false))
        .await
        .unwrap()
    {
        Ok(c) => Some(c),
        Err(e @ PgClusterError::NotInstalled(_)) => {
            skip::skip("PostgreSQL", &e);
            None
        }
        Err(e) => panic!("{e}"),
    }
}

on_both_stores!(udc_over_tls, "udc_http");

/// A tag request the gateway never answers is finalized by the background
/// task after `DAPGW_LOCALIZE_TIMEOUT_MS`: the unresolved chunk's entries
/// become unverified via gateway, and a retried batch gets that verdict.
/// The verified chunk's confirms are in it, and, since no request was
/// waiting for that verdict, queued on the gateway's downlink too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_tag_request_expires() {
    let h = Harness::start_with(None, 1).await;
    let OpenRound {
        round,
        challenge,
        cursor,
    } = h.auth_round(6).await;
    let mut entries: Vec<_> = (1..=6).map(|id| respond(&h, id, &challenge)).collect();
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
    // The background task runs every second; 30 s of real time is only a
    // hang guard (the machine may be loaded), the loop ends at the first
    // final verdict.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut fin = None;
    while std::time::Instant::now() < deadline {
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
    let mut want = vec![Outcome::UnverifiedViaGateway; 4];
    want.extend([Outcome::Accepted; 2]);
    assert_eq!(outcomes(&fin), want);
    let confirmed = confirms(&fin);
    assert_eq!(
        confirmed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![5, 6]
    );
    let queued: Vec<(u64, Bytes)> = h
        .downlink(cursor)
        .await
        .into_iter()
        .filter(|r| r.1 == 2)
        .map(|r| (r.3, r.4))
        .collect();
    assert_eq!(queued, confirmed);
    h.stop().await;
}

// ---------------------------------------------------------------------------
// Real members: sessions, uplinks, acks and read rounds across restarts
// ---------------------------------------------------------------------------

fn member_rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

/// Every member answers `challenge` with `payload`: the batch entries.
fn answer(
    members: &mut [Member],
    challenge: &Bytes,
    payload: &[u8],
) -> Vec<(ResponseEntry, [u8; 16])> {
    members
        .iter_mut()
        .map(|m| {
            let bytes = match m.handle_challenge(challenge, None).unwrap() {
                Challenged::Answer(a) => a.respond(payload, &mut member_rng()).unwrap().persisted(),
                Challenged::Resend(b) => b,
            };
            let r = Response::decode(&bytes).unwrap();
            (r.entry(), r.tag)
        })
        .collect()
}

/// An uplink batch of gw-1 from sealed uplink messages, in chunks of 4.
fn uplink_batch(batch_id: u64, sealed: &[Bytes]) -> Batch {
    let mut ups: Vec<Uplink> = sealed.iter().map(|b| Uplink::decode(b).unwrap()).collect();
    ups.sort_by_key(|u| u.entry().sort_key());
    Batch {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id,
        group: GroupId(G),
        chunk_size: 4,
        body: BatchBody::Uplinks {
            entries: ups.iter().map(Uplink::entry).collect::<Vec<UplinkEntry>>(),
        },
        aggregates: ups
            .chunks(4)
            .map(|c| aggregate(c.iter().map(|u| &u.tag)))
            .collect(),
    }
}

/// The sum of the samples of `name` in `/metrics` text that carry every
/// label of `labels` (0 when absent).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    dapgw::admin::MetricsPage::parse(text).sum(name, labels)
}

/// The members the Rekey records in `recs` go to, sorted.
fn rekeyed_members(recs: &[(u64, u8, u32, u64, Bytes)]) -> Vec<u64> {
    use dapgw::protocol::wire::MessageType;
    let mut ids: Vec<u64> = recs
        .iter()
        .filter(|r| {
            r.4.get(1).copied().and_then(MessageType::from_code) == Some(MessageType::Rekey)
        })
        .map(|r| r.3)
        .collect();
    ids.sort_unstable();
    ids
}

/// The last group record (challenge or group message) in `recs`.
fn last_group_record(recs: &[(u64, u8, u32, u64, Bytes)]) -> Bytes {
    recs.iter().rev().find(|r| r.1 == 1).unwrap().4.clone()
}

/// Real members through gw-1: a psk round, a UDC restart between the
/// confirms and the first readings (the pending sessions must survive),
/// readings and an alarm, a second restart (the replay windows must
/// survive), a group update and its acks, a read round with a localization,
/// a revocation; then every contract metric is checked against what
/// happened since the last restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_across_restarts_and_the_metrics() {
    let mut h = Harness::start(None).await;

    // An auth round; the confirms reach the members.
    let (mut members, mut cursor) = h.authenticated(3).await;
    assert!(members.iter().all(|m| m.session(GroupId(G)).is_some()));

    // Restart between the confirms and the first readings: the gauge comes
    // back from the store, and the (still unused) sessions verify.
    h.restart().await;
    let text = h.metrics().await;
    assert_eq!(
        metric(&text, "dapgw_udc_sessions_active", &[]),
        3.0,
        "{text}"
    );
    let first: Vec<Bytes> = members
        .iter_mut()
        .enumerate()
        .map(|(i, m)| {
            let kind = if i == 2 {
                UplinkKind::Alarm
            } else {
                UplinkKind::Reading
            };
            m.seal_uplink(GroupId(G), kind, format!("reading {i}").as_bytes())
                .unwrap()
                .persisted()
        })
        .collect();
    let v = h.post_batch(&uplink_batch(2, &first)).await;
    assert_eq!(
        outcomes(&v),
        vec![Outcome::Accepted; 3],
        "sessions survived the restart"
    );
    let r = h
        .op(
            Method::GET,
            "/v1/admin/readings?member=3",
            serde_json::Value::Null,
        )
        .await;
    let got = r["readings"].as_array().unwrap();
    assert_eq!(got.len(), 1, "{r}");
    assert_eq!(got[0]["kind"], UplinkKind::Alarm.code());
    assert_eq!(got[0]["payload_hex"], hex::encode("reading 2"));

    // Restart again: the replay windows survive. Member 1's first uplink
    // again is a replay; its next one is fresh.
    h.restart().await;
    let next = members[0]
        .seal_uplink(GroupId(G), UplinkKind::Reading, b"second")
        .unwrap()
        .persisted();
    let v = h
        .post_batch(&uplink_batch(3, &[first[0].clone(), next]))
        .await;
    assert_eq!(
        outcomes(&v),
        vec![Outcome::ReplayedCounter, Outcome::Accepted]
    );

    // A group update: every member opens it and acks it.
    let u = h
        .op(
            Method::POST,
            &format!("/v1/admin/groups/{G}/updates"),
            serde_json::json!({"payload_hex": "c0ffee"}),
        )
        .await;
    let seq = u["seq"].as_u64().unwrap();
    let recs = h.downlink(cursor).await;
    cursor = recs.last().unwrap().0;
    let update = last_group_record(&recs);
    let acks: Vec<Bytes> = members
        .iter_mut()
        .map(|m| m.handle_group_message(&update).unwrap().persisted())
        .collect();
    let v = h.post_batch(&uplink_batch(4, &acks)).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 3]);
    let shown = h
        .op(
            Method::GET,
            &format!("/v1/admin/groups/{G}/updates/{seq}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(shown["acked"].as_array().unwrap().len(), 3, "{shown}");
    assert_eq!(shown["acked_count"], 3, "{shown}");
    assert_eq!(shown["next"], serde_json::Value::Null, "{shown}");
    // Paged: two, then the rest after the second.
    let first = h
        .op(
            Method::GET,
            &format!("/v1/admin/groups/{G}/updates/{seq}?limit=2"),
            serde_json::Value::Null,
        )
        .await;
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["acked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["member"].as_u64().unwrap())
            .collect()
    };
    let page1 = ids(&first);
    assert_eq!(page1.len(), 2, "{first}");
    assert_eq!(first["acked_count"], 3, "{first}");
    assert_eq!(first["next"], page1[1], "{first}");
    let rest = h
        .op(
            Method::GET,
            &format!(
                "/v1/admin/groups/{G}/updates/{seq}?limit=2&after={}",
                page1[1]
            ),
            serde_json::Value::Null,
        )
        .await;
    let mut all = page1.clone();
    all.extend(ids(&rest));
    assert_eq!(all, ids(&shown), "{rest}");
    assert_eq!(rest["next"], serde_json::Value::Null, "{rest}");

    // A read round; member 3's reading is altered on the way, so the chunk
    // is localized and member 3 ends unverified via the gateway.
    let v = h
        .op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": "psk", "purpose": "read", "read_request": "01"}),
        )
        .await;
    let round = v["round"].as_u64().unwrap();
    let recs = h.downlink(cursor).await;
    let mut entries = answer(&mut members, &last_group_record(&recs), b"meter 42.0 kWh");
    let tags: Vec<[u8; 16]> = entries.iter().map(|(_, t)| *t).collect();
    let mut c = entries[2].0.c.to_vec();
    c[0] ^= 1;
    entries[2].0.c = Bytes::from(c);
    let b = batch("gw-1", 5, round, entries);
    let v = h.post_batch(&b).await;
    assert!(matches!(v.body, VerdictBody::TagsRequested { .. }), "{v:?}");
    let reply = TagReply {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id: 5,
        batch_hash: Sha256::digest(b.to_bytes()).into(),
        chunks: vec![ChunkTags { chunk: 0, tags }],
    };
    let (s, body) = h
        .call(Some("gw-1"), Method::POST, "/v1/tags", reply.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(
        outcomes(&Verdict::decode(&body).unwrap()),
        vec![
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::UnverifiedViaGateway
        ]
    );
    let r = h
        .op(
            Method::GET,
            "/v1/admin/readings?member=2",
            serde_json::Value::Null,
        )
        .await;
    assert!(
        r["readings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["payload_hex"] == hex::encode("meter 42.0 kWh")),
        "{r}"
    );
    h.op(
        Method::POST,
        &format!("/v1/admin/rounds/{G}/{round}/close"),
        serde_json::Value::Null,
    )
    .await;
    h.op(
        Method::POST,
        "/v1/admin/members/2/revoke",
        serde_json::Value::Null,
    )
    .await;

    // Every contract metric, counted since the last restart.
    let text = h.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        m("dapgw_udc_members_authenticated_total", &[("mode", "psk")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        m("dapgw_udc_entries_rejected_total", &[("reason", "replay")]),
        1.0
    );
    assert_eq!(
        m("dapgw_udc_entries_rejected_total", &[("reason", "bad_tag")]),
        1.0
    );
    assert_eq!(
        m(
            "dapgw_udc_batches_total",
            &[("kind", "uplink"), ("outcome", "accepted")]
        ),
        2.0
    );
    assert_eq!(
        m(
            "dapgw_udc_batches_total",
            &[("kind", "response"), ("outcome", "accepted")]
        ),
        1.0
    );
    assert!(m("dapgw_udc_batch_verify_seconds_count", &[]) >= 4.0);
    assert_eq!(m("dapgw_udc_localizations_total", &[]), 1.0);
    assert_eq!(m("dapgw_udc_rounds_total", &[("outcome", "partial")]), 1.0);
    assert_eq!(
        m("dapgw_udc_readings_total", &[]),
        3.0,
        "1 uplink + 2 read-round readings"
    );
    assert_eq!(m("dapgw_udc_group_updates_total", &[]), 1.0);
    assert_eq!(m("dapgw_udc_acks_total", &[]), 3.0);
    assert!(m("dapgw_udc_store_seconds_count", &[("op", "read")]) >= 4.0);
    assert!(m("dapgw_udc_store_seconds_count", &[("op", "write")]) >= 6.0);
    assert_eq!(m("dapgw_udc_sessions_active", &[]), 2.0, "member 2 revoked");
    h.stop().await;
}

/// Two UDC processes over one PostgreSQL store: a batch applied by one is
/// answered by the other from the stored verdict (not applied twice), and a
/// write that loses a race on a session slot is a 503 with `Retry-After`
/// (nothing written), after which the retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_udcs_share_one_postgres_store() {
    let Some(cluster) = pg_cluster().await else {
        return;
    };
    cluster.create_database("two_udcs").unwrap();
    let url = cluster.url("two_udcs");
    let a = Harness::start(Some(url.clone())).await;
    let b = a.second().await;
    a.import_members(1..=4).await;
    a.subscribe("gw-1").await;
    let round = a.open_auth_round().await;
    // The queue is shared: b serves the challenge a queued.
    let recs = b.downlink(0).await;
    let cursor = recs.last().unwrap().0;
    let challenge = last_group_record(&recs);
    let b1 = batch(
        "gw-1",
        1,
        round,
        (1..=4).map(|id| respond(&a, id, &challenge)).collect(),
    );
    let (s, from_a) = a
        .call(Some("gw-1"), Method::POST, "/v1/batches", b1.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        outcomes(&Verdict::decode(&from_a).unwrap()),
        vec![Outcome::Accepted; 4]
    );
    let (s, from_b) = b
        .call(Some("gw-1"), Method::POST, "/v1/batches", b1.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(from_a, from_b, "answered from the stored verdict");
    let gws = b
        .op(Method::GET, "/v1/admin/gateways", serde_json::Value::Null)
        .await;
    assert_eq!(gws["gateways"][0]["batches"], 1, "{gws}");
    assert_eq!(gws["gateways"][0]["entries"], 4, "{gws}");
    // One confirm each, in the verdict; none queued on the shared downlink.
    assert_eq!(confirms(&Verdict::decode(&from_a).unwrap()).len(), 4);
    assert!(b.downlink_now(cursor).await.is_empty());

    // Round 2 (opened by b). While a judges its batch, another writer
    // changes member 1's session slot: a's write must lose cleanly.
    let round2 = b.open_auth_round().await;
    let challenge = last_group_record(&a.downlink(cursor).await);
    let b2 = batch(
        "gw-1",
        2,
        round2,
        (1..=4).map(|id| respond(&a, id, &challenge)).collect(),
    );
    let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.batch_execute(
        "BEGIN; UPDATE sessions SET version = version + 1 WHERE member = 1 AND grp = 7",
    )
    .await
    .unwrap();
    let ((status, headers, body), ()) = tokio::join!(
        a.call_h(Some("gw-1"), Method::POST, "/v1/batches", b2.to_bytes()),
        async {
            // Commit once a's write waits on the row lock.
            for _ in 0..1000 {
                let n: i64 = pg
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n > 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            pg.batch_execute("COMMIT").await.unwrap();
        }
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(e["error"], "busy");
    assert!(
        e["reason"].as_str().is_some_and(|r| r.contains("retry")),
        "{e}"
    );
    // Nothing of a's judgement was written; the retry (through b) works.
    let (s, body) = b
        .call(Some("gw-1"), Method::POST, "/v1/batches", b2.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(
        outcomes(&Verdict::decode(&body).unwrap()),
        vec![Outcome::Accepted; 4]
    );
    let rep = a
        .op(
            Method::GET,
            &format!("/v1/admin/rounds/{G}/{round2}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(rep["accepted"], 4, "{rep}");
    b.stop().await;
    a.stop().await;
}

/// Two UDC processes on one PostgreSQL store, each with the round in its
/// own cache from before the other's acceptances: a response already
/// accepted through one process, replayed (by another gateway) through the
/// other, gets no second session. The store decides: the write fails as a
/// whole (503 `busy`, nothing written), and the retry answers
/// `AlreadyAccepted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_udcs_accept_a_member_once_per_round() {
    let Some(cluster) = pg_cluster().await else {
        return;
    };
    cluster.create_database("accept_once").unwrap();
    let a = Harness::start(Some(cluster.url("accept_once"))).await;
    let b = a.second().await;
    a.subscribe("gw-2").await;
    let OpenRound {
        round,
        challenge,
        cursor,
    } = a.auth_round(4).await;
    let mk = |gw: &str, batch_id: u64, ids: &[u64]| {
        batch(
            gw,
            batch_id,
            round,
            ids.iter().map(|m| respond(&a, *m, &challenge)).collect(),
        )
        .to_bytes()
    };
    // b caches the round (accepting member 4), then a accepts 1 and 2.
    let (s, body) = b
        .call(
            Some("gw-2"),
            Method::POST,
            "/v1/batches",
            mk("gw-2", 1, &[4]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let (s, body) = a
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/batches",
            mk("gw-1", 1, &[1, 2]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let first_gw1 = Verdict::decode(&body).unwrap();
    assert_eq!(outcomes(&first_gw1), vec![Outcome::Accepted; 2]);
    // Member 1's response again, through b (whose cached round does not
    // know): member 1's session slot, read with the batch, says it was
    // accepted in this round.
    let (s, body) = b
        .call(
            Some("gw-2"),
            Method::POST,
            "/v1/batches",
            mk("gw-2", 2, &[1, 3]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    assert_eq!(
        outcomes(&Verdict::decode(&body).unwrap()),
        vec![Outcome::AlreadyAccepted, Outcome::Accepted]
    );
    // And the other way round: member 4 (accepted by b) through a.
    let (s, body) = a
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/batches",
            mk("gw-1", 2, &[4]),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let second_gw1 = Verdict::decode(&body).unwrap();
    assert_eq!(outcomes(&second_gw1), vec![Outcome::AlreadyAccepted]);
    let rep = b
        .op(
            Method::GET,
            &format!("/v1/admin/rounds/{G}/{round}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(rep["accepted"], 4, "{rep}");
    // One confirm per member: gw-1 got those of 1 and 2 only, in its
    // verdicts, and none on its downlink.
    let confirmed: Vec<u64> = [first_gw1, second_gw1]
        .iter()
        .flat_map(confirms)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(confirmed, vec![1, 2]);
    assert!(a.downlink_now(cursor).await.is_empty());
    b.stop().await;
    a.stop().await;
}

/// Bad input at every endpoint: a 4xx with a JSON `{"error", "reason"}`
/// body, never a 5xx or a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_with_a_json_reason() {
    let h = Harness::start(None).await;
    let check = |what: &str, s: StatusCode, body: &[u8], want: StatusCode, code: &str| {
        assert_eq!(s, want, "{what}: {}", String::from_utf8_lossy(body));
        let e: serde_json::Value =
            serde_json::from_slice(body).unwrap_or_else(|_| panic!("{what}: not JSON: {body:?}"));
        assert_eq!(e["error"], code, "{what}: {e}");
        assert!(
            e["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{what}: {e}"
        );
    };
    // A valid uplink batch, cut short, and a tag reply nobody asked for.
    let valid = uplink_batch(1, &[]).to_bytes();
    let orphan = TagReply {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id: 99,
        batch_hash: [0; 32],
        chunks: vec![],
    };
    let gw = [
        (
            "batch garbage",
            Method::POST,
            "/v1/batches",
            Bytes::from_static(b"\x01\x04garbage"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "batch truncated",
            Method::POST,
            "/v1/batches",
            valid.slice(..valid.len() - 1),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "batch empty",
            Method::POST,
            "/v1/batches",
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "tags garbage",
            Method::POST,
            "/v1/tags",
            Bytes::from_static(b"nope"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "tags unknown batch",
            Method::POST,
            "/v1/tags",
            orphan.to_bytes(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "subscriptions not json",
            Method::PUT,
            "/v1/subscriptions",
            Bytes::from_static(b"groups=7"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            "subscriptions wrong type",
            Method::PUT,
            "/v1/subscriptions",
            Bytes::from_static(br#"{"groups":"7"}"#),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            "downlink cursor",
            Method::GET,
            "/v1/downlink?after=abc",
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            "downlink wait",
            Method::GET,
            "/v1/downlink?after=0&wait_ms=-5",
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "bad_query",
        ),
        (
            "direct garbage",
            Method::POST,
            "/v1/direct",
            Bytes::from_static(b"\x01\x0b\x00"),
            StatusCode::BAD_REQUEST,
            "not_accepted",
        ),
        (
            "direct too large",
            Method::POST,
            "/v1/direct",
            Bytes::from(vec![0u8; 65 << 10]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            "wrong method",
            Method::DELETE,
            "/v1/batches",
            Bytes::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
        (
            "unknown path",
            Method::GET,
            "/v1/nothing",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (what, method, path, body, want, code) in gw {
        let (s, b) = h.call(Some("gw-1"), method, path, body).await;
        check(what, s, &b, want, code);
    }
    let (s, b) = h
        .call(None, Method::POST, "/v1/batches", valid.clone())
        .await;
    check(
        "no certificate",
        s,
        &b,
        StatusCode::FORBIDDEN,
        "no_client_certificate",
    );

    // The operator API.
    let raw = |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap();
    let admin = [
        (
            "round bad mode",
            Method::POST,
            "/v1/admin/rounds",
            raw(r#"{"group":7,"mode":"rsa","purpose":"auth"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round no group",
            Method::POST,
            "/v1/admin/rounds",
            raw(r#"{"mode":"psk","purpose":"auth"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round read request",
            Method::POST,
            "/v1/admin/rounds",
            raw(r#"{"group":7,"mode":"psk","purpose":"read","read_request":"zz"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round report id",
            Method::GET,
            "/v1/admin/rounds/7/x",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round unknown",
            Method::GET,
            "/v1/admin/rounds/7/12345",
            serde_json::Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "update payload",
            Method::POST,
            "/v1/admin/groups/7/updates",
            raw(r#"{"payload_hex":"zz"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "update unknown",
            Method::GET,
            "/v1/admin/groups/7/updates/9",
            serde_json::Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "readings no member",
            Method::GET,
            "/v1/admin/readings",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "member bad id",
            Method::POST,
            "/v1/admin/members",
            raw(r#"{"id":"one","groups":[7]}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "revoke unknown",
            Method::POST,
            "/v1/admin/members/999/revoke",
            serde_json::Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "schedule bad period",
            Method::POST,
            "/v1/admin/schedules",
            raw(r#"{"group":7,"every_s":"often","mode":"psk","purpose":"auth"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round read_request too long",
            Method::POST,
            "/v1/admin/rounds",
            raw(&format!(
                r#"{{"group":7,"mode":"psk","purpose":"read","read_request":"{}"}}"#,
                "00".repeat(257)
            )),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round duration past the clock",
            Method::POST,
            "/v1/admin/rounds",
            raw(r#"{"group":7,"mode":"psk","duration_s":18446744073709551615}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "schedule period past the clock",
            Method::POST,
            "/v1/admin/schedules",
            raw(r#"{"group":7,"every_s":18446744073709551615,"purpose":"auth"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round auth with read_request",
            Method::POST,
            "/v1/admin/rounds",
            raw(r#"{"group":7,"mode":"psk","purpose":"auth","read_request":"01"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "schedule read_request not hex",
            Method::POST,
            "/v1/admin/schedules",
            raw(r#"{"group":7,"every_s":60,"purpose":"read","read_request":"zz"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "schedule read_request too long",
            Method::POST,
            "/v1/admin/schedules",
            raw(&format!(
                r#"{{"group":7,"every_s":60,"purpose":"read","read_request":"{}"}}"#,
                "00".repeat(257)
            )),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "schedule auth with read_request",
            Method::POST,
            "/v1/admin/schedules",
            raw(r#"{"group":7,"every_s":60,"purpose":"auth","read_request":"01"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "round report bad after",
            Method::GET,
            "/v1/admin/rounds/7/1?after=x",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "readings bad after",
            Method::GET,
            "/v1/admin/readings?member=1&after=1234",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "members limit",
            Method::GET,
            "/v1/admin/members?limit=lots",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "members limit 0",
            Method::GET,
            "/v1/admin/members?limit=0",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "readings limit 0",
            Method::GET,
            "/v1/admin/readings?member=1&limit=0",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "members misspelt parameter",
            Method::GET,
            "/v1/admin/members?limt=5",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "members parameter twice",
            Method::GET,
            "/v1/admin/members?limit=5&limit=6",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "parameter on an endpoint that takes none",
            Method::GET,
            "/v1/admin/gateways?all=1",
            serde_json::Value::Null,
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "schedule parameter on a POST",
            Method::POST,
            "/v1/admin/schedules?group=7",
            raw(r#"{"group":7,"every_s":60}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (what, method, path, body, want, code) in admin {
        let (s, v) = h.admin(Some(TOKEN), method, path, body).await;
        check(what, s, v.to_string().as_bytes(), want, code);
    }
    // None of the refused schedules was stored.
    let v = h
        .op(Method::GET, "/v1/admin/schedules", serde_json::Value::Null)
        .await;
    assert_eq!(v["schedules"], serde_json::json!([]), "{v}");
    h.stop().await;
}

/// A round report's `rejected` and `missing` lists page with `after` (a
/// member id); the counts stay the round's.
/// A round report whose missing list is cut at 1000 names the next page's
/// `after`; that page holds the rest and names none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_report_names_its_next_page() {
    let h = Harness::start(None).await;
    let round = h.auth_round(1003).await.round;
    let path = format!("/v1/admin/rounds/{G}/{round}");
    let first = h.op(Method::GET, &path, serde_json::Value::Null).await;
    assert_eq!(first["missing"].as_array().unwrap().len(), 1000);
    assert_eq!(first["next"], 1000, "{}", first["next"]);
    let rest = h
        .op(
            Method::GET,
            &format!("{path}?after=1000"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(rest["missing"], serde_json::json!([1001, 1002, 1003]));
    assert!(rest["next"].is_null(), "{rest}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_report_lists_page_after_a_member() {
    let h = Harness::start(None).await;
    let OpenRound {
        round, challenge, ..
    } = h.auth_round(5).await;
    // Member 4 answers; 9 and 10 are no members of this UDC.
    let entries = [4, 9, 10].map(|id| respond(&h, id, &challenge)).to_vec();
    let tags: Vec<[u8; 16]> = entries.iter().map(|(_, t)| *t).collect();
    let b = batch("gw-1", 1, round, entries);
    // The unknown members' tags do not add up: the UDC asks for the tags.
    let v = h.post_batch(&b).await;
    assert!(matches!(v.body, VerdictBody::TagsRequested { .. }), "{v:?}");
    let reply = TagReply {
        gateway_id: GatewayId::new("gw-1").unwrap(),
        batch_id: 1,
        batch_hash: Sha256::digest(b.to_bytes()).into(),
        chunks: vec![ChunkTags { chunk: 0, tags }],
    };
    let (s, body) = h
        .call(Some("gw-1"), Method::POST, "/v1/tags", reply.to_bytes())
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let got = outcomes(&Verdict::decode(&body).unwrap());
    assert_eq!(got[0], Outcome::Accepted, "{got:?}");
    assert!(got[1..].iter().all(|o| *o != Outcome::Accepted), "{got:?}");
    let ids = |v: &serde_json::Value, k: &str| -> Vec<u64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().or_else(|| x["member"].as_u64()).unwrap())
            .collect()
    };
    let path = |after: &str| format!("/v1/admin/rounds/{G}/{round}{after}");
    let all = h.op(Method::GET, &path(""), serde_json::Value::Null).await;
    assert!(all["next"].is_null(), "both lists complete: {all}");
    assert_eq!(ids(&all, "missing"), [1, 2, 3, 5], "{all}");
    assert_eq!(ids(&all, "rejected"), [9, 10], "{all}");
    let page = h
        .op(Method::GET, &path("?after=3"), serde_json::Value::Null)
        .await;
    assert_eq!(ids(&page, "missing"), [5], "{page}");
    assert_eq!(ids(&page, "rejected"), [9, 10], "{page}");
    let page = h
        .op(Method::GET, &path("?after=9"), serde_json::Value::Null)
        .await;
    assert_eq!(ids(&page, "missing"), Vec::<u64>::new(), "{page}");
    assert_eq!(ids(&page, "rejected"), [10], "{page}");
    assert_eq!(
        (&page["accepted"], &page["missing_count"]),
        (&all["accepted"], &all["missing_count"])
    );
    assert_eq!(page["missing_count"], 4, "{page}");
    h.stop().await;
}

/// Member 1 of group `G` (imported, gw-1 subscribed), accepted in a psk
/// auth round through gw-1 and holding the session its confirm opened.
async fn member_in_session(h: &Harness) -> Member {
    let (mut members, _) = h.authenticated(1).await;
    members.pop().unwrap()
}

/// `member`'s next reading in group `G`, sealed.
fn reading(member: &mut Member, text: &[u8]) -> Uplink {
    let sealed = member
        .seal_uplink(GroupId(G), UplinkKind::Reading, text)
        .unwrap()
        .persisted();
    Uplink::decode(&sealed).unwrap()
}

/// `up` with its first ciphertext byte flipped: its tag no longer fits.
fn forged(up: &Uplink) -> Uplink {
    let mut forged = up.clone();
    let mut c = forged.c.to_vec();
    c[0] ^= 1;
    forged.c = Bytes::from(c);
    forged
}

/// `up` as a direct submission (flow A, a batch of one).
fn direct_uplink(up: &Uplink) -> Bytes {
    Direct::new(&DirectInner::Uplink(up.clone()), aggregate([&up.tag])).to_bytes()
}

/// One batch of 25 uplinks from one member: 25 readings stored in the same
/// millisecond. Paged 4 at a time through `next`/`after`, every one comes
/// back exactly once, in the order of one big page; the last page says
/// there is no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_page_within_one_millisecond() {
    let h = Harness::start(None).await;
    let mut member = member_in_session(&h).await;
    let sealed: Vec<Bytes> = (0..25)
        .map(|i| {
            member
                .seal_uplink(
                    GroupId(G),
                    UplinkKind::Reading,
                    format!("r{i:02}").as_bytes(),
                )
                .unwrap()
                .persisted()
        })
        .collect();
    let v = h.post_batch(&uplink_batch(2, &sealed)).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 25]);
    let whole = h
        .op(
            Method::GET,
            "/v1/admin/readings?member=1",
            serde_json::Value::Null,
        )
        .await;
    let whole = whole["readings"].as_array().unwrap().clone();
    assert_eq!(whole.len(), 25);
    assert!(whole.iter().all(|r| r["ts_ms"] == whole[0]["ts_ms"]));
    let mut got = Vec::new();
    let mut path = "/v1/admin/readings?member=1&limit=4".to_string();
    for _ in 0..8 {
        let page = h.op(Method::GET, &path, serde_json::Value::Null).await;
        got.extend(page["readings"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(page["truncated"], true, "{page}");
                path = format!("/v1/admin/readings?member=1&limit=4&after={next}");
            }
            None => {
                assert_eq!(page["truncated"], false, "{page}");
                break;
            }
        }
    }
    assert_eq!(got, whole);
    h.stop().await;
}

/// A harness and two more `Udc`s on its store (as two processes behind a
/// load balancer), members `1..=n` of group `G` imported, and an open psk
/// auth round with its challenge.
/// An active member row with a derived key of version `kv` (as
/// `import_members` takes it).
fn derived_row(id: u64, groups: Vec<u32>, kv: u32) -> udc::store::MemberRow {
    use dapgw::udc::store::{KeySource, MemberRow, MemberStatus};
    MemberRow {
        id,
        groups,
        key_source: KeySource::Derived,
        kv,
        min_kv: kv,
        status: MemberStatus::Active,
        added_at_ms: 0,
    }
}

async fn two_udcs_in_a_round(
    store_url: Option<String>,
    n: u64,
) -> (
    Harness,
    Arc<udc::service::Udc>,
    Arc<udc::service::Udc>,
    u64,
    Bytes,
) {
    let h = Harness::start(store_url).await;
    // The harness's own UDC has opened (and migrated) the store once it
    // answers; two more processes opening a fresh SQLite file at the same
    // moment could see it locked.
    h.subscribe("gw-1").await;
    let a = udc::build(&h.config).await.unwrap();
    let b = udc::build(&h.config).await.unwrap();
    let rows = (1..=n).map(|id| derived_row(id, vec![G], 1)).collect();
    a.import_members(rows).await.unwrap();
    a.subscribe("gw-1", vec![G]).await.unwrap();
    let (round, challenge) = open_psk_round(&a).await;
    (h, a, b, round, challenge)
}

/// [`two_udcs_in_a_round`] with members 1 to `n`, whose responses `a` has
/// accepted in one batch of gw-1 (so each has a session): the harness
/// and both processes.
async fn accepted_in_a_round(
    store_url: Option<String>,
    n: u64,
) -> (Harness, Arc<udc::service::Udc>, Arc<udc::service::Udc>) {
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, n).await;
    let body = psk_batch(&h, 1, round, &challenge, 1..=n);
    let answer = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&answer).unwrap()),
        vec![Outcome::Accepted; n as usize]
    );
    (h, a, b)
}

/// gw-1's batch `batch_id` of the psk responses of members `ids` to
/// `challenge` (round `round` of group `G`).
fn psk_batch(
    h: &Harness,
    batch_id: u64,
    round: u64,
    challenge: &Bytes,
    ids: std::ops::RangeInclusive<u64>,
) -> Bytes {
    batch(
        "gw-1",
        batch_id,
        round,
        ids.map(|m| respond(h, m, challenge)).collect(),
    )
    .to_bytes()
}

/// Whether a stored slot holds a session.
fn has_session(s: &Option<dapgw::udc::store::StoredSlot>) -> bool {
    s.as_ref().is_some_and(|s| s.sid.is_some())
}

/// Opens a psk auth round of group `G` on `u` and reads its challenge from
/// gw-1's downlink.
async fn open_psk_round(u: &udc::service::Udc) -> (u64, Bytes) {
    let round = u
        .open_round(
            G,
            Mode::Psk,
            dapgw::protocol::wire::Purpose::Auth,
            Some(60_000),
        )
        .await
        .unwrap();
    let challenge = last_group_record(&records(&u.downlink("gw-1", 0).await.unwrap()));
    (round, challenge)
}

/// Two `Udc`s on one store: `b` revokes member 2 after `a` has read the
/// group and judged a batch accepting it, but before `a` writes. `a`'s
/// write is refused as a whole (busy, nothing stored), and the retried
/// batch is judged at the new epoch: member 2 is revoked, the others
/// accepted, and member 2 never holds a session.
async fn revocation_between_read_and_write(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 3).await;
    let epoch_before = a.store().group(G).await.unwrap().unwrap().epoch;
    let body = psk_batch(&h, 1, round, &challenge, 1..=3);
    let other = b.clone();
    a.before_next_batch_write(async move {
        assert!(other.revoke_member(2).await.unwrap());
    });
    let err = a.handle_batch("gw-1", body.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let store = a.store();
    assert!(store.verdict("gw-1", 1).await.unwrap().is_none());
    assert!(store.group(G).await.unwrap().unwrap().epoch > epoch_before);
    let slots = store.sessions(vec![(1, G), (2, G), (3, G)]).await.unwrap();
    assert!(
        slots
            .iter()
            .all(|s| s.as_ref().is_none_or(|s| s.sid.is_none())),
        "nothing of the refused write is stored: {slots:?}"
    );
    // The gateway's retry (to either process) is judged at the new epoch.
    let answer = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&answer).unwrap()),
        vec![Outcome::Accepted, Outcome::Revoked, Outcome::Accepted]
    );
    let slots = store.sessions(vec![(1, G), (2, G), (3, G)]).await.unwrap();
    assert_eq!(
        slots.iter().map(has_session).collect::<Vec<_>>(),
        vec![true, false, true]
    );
    h.stop().await;
}

on_both_stores!(revocation_between_read_and_write, "revoke_race");

/// Two `Udc`s on one store: `a` revokes member 2, which has no session
/// slot yet, and between `a`'s read of the group and its write `b`
/// commits a batch giving member 2 its first session (judged before the
/// revocation). `a`'s write must fail (busy) rather than leave member 2
/// that session (uplinks are judged on the slot alone); the retried
/// revocation erases it.
async fn revocation_racing_a_first_acceptance(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 3).await;
    let body = psk_batch(&h, 1, round, &challenge, 1..=3);
    let other = b.clone();
    a.before_next_rekey_write(async move {
        let answer = other.handle_batch("gw-1", body).await.unwrap();
        assert_eq!(
            outcomes(&Verdict::decode(&answer).unwrap()),
            vec![Outcome::Accepted; 3]
        );
    });
    let err = a.revoke_member(2).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    assert!(a.revoke_member(2).await.unwrap());
    let slots = a
        .store()
        .sessions(vec![(1, G), (2, G), (3, G)])
        .await
        .unwrap();
    assert_eq!(
        slots.iter().map(has_session).collect::<Vec<_>>(),
        vec![true, false, true],
        "member 2's session is erased"
    );
    h.stop().await;
}

on_both_stores!(revocation_racing_a_first_acceptance, "revoke_first_accept");

/// An import never changes a registered member: run again with a file that
/// names a member revoked since (active, other groups, another key
/// version), it skips that member and the others already registered, and
/// registers only the new id. (And a repeated revocation changes nothing.)
async fn an_import_never_changes_a_registered_member(store_url: Option<String>) {
    use dapgw::udc::store::{MemberStatus, Store};
    let (h, a, _b, _round, _challenge) = two_udcs_in_a_round(store_url, 3).await;
    assert!(a.revoke_member(2).await.unwrap());
    // Revoking again (a retried call) starts no further epoch.
    let epoch = a.store().group(G).await.unwrap().unwrap().epoch;
    assert!(a.revoke_member(2).await.unwrap());
    assert_eq!(a.store().group(G).await.unwrap().unwrap().epoch, epoch);
    let rows = (1..=4).map(|id| derived_row(id, vec![G, 9], 2)).collect();
    assert_eq!(a.import_members(rows).await.unwrap(), (1, 3));
    let got = a.store().members(vec![1, 2, 4]).await.unwrap();
    let got: Vec<_> = got
        .into_iter()
        .map(|m| {
            let m = m.unwrap();
            (m.status, m.kv, m.groups)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (MemberStatus::Active, 1, vec![G]),
            (MemberStatus::Revoked, 1, vec![G]),
            (MemberStatus::Active, 2, vec![G, 9]),
        ]
    );
    h.stop().await;
}

on_both_stores!(
    an_import_never_changes_a_registered_member,
    "import_unchanged"
);

/// Two `Udc`s on one store: `a` judges a batch of responses while the
/// round is open, and between its read and its write `b` closes the
/// round. `a`'s write must fail (busy): committed, it would accept members
/// into a round already closed (and reported). Judged again, the entries
/// are refused as for a closed round.
async fn batch_racing_a_round_close(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 2).await;
    let body = psk_batch(&h, 1, round, &challenge, 1..=2);
    let other = b.clone();
    a.before_next_batch_write(async move {
        assert!(other.close_round(G, round).await.unwrap());
    });
    let err = a.handle_batch("gw-1", body.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let answer = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&answer).unwrap()),
        vec![Outcome::RoundNotOpen; 2]
    );
    h.stop().await;
}

on_both_stores!(batch_racing_a_round_close, "round_close_race");

/// Two `Udc`s on one store: `a` imports member 10 into a group with no
/// group message under its key (no rekey needed), and between `a`'s read
/// and its write `b` publishes an update under that key. `a`'s write must
/// fail (busy): committed, member 10's first confirm would hand it the key
/// of a message sent before it joined. The retried import rekeys.
async fn import_racing_an_update(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    // Members 1 and 2 hold sessions (so a rekey has someone to reach).
    let (h, a, b) = accepted_in_a_round(store_url, 2).await;
    let other = b.clone();
    a.before_next_import_write(async move {
        other.publish_update(G, b"\x01\x02", None).await.unwrap();
    });
    let row = derived_row(10, vec![G], 1);
    let err = a.import_members(vec![row.clone()]).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let twice = a
        .import_members(vec![row.clone(), row.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(&twice, ServiceError::BadRequest(r) if r.contains("member 10 is named twice")),
        "{twice:?}"
    );
    assert_eq!(a.import_members(vec![row]).await.unwrap(), (1, 0));
    let rekeyed = rekeyed_members(&records(&a.downlink("gw-1", 0).await.unwrap()));
    assert_eq!(rekeyed, vec![1, 2]);
    h.stop().await;
}

on_both_stores!(import_racing_an_update, "import_race");

/// As `import_racing_an_update`, into a group with no state yet: `b`
/// publishes the group's first message between `a`'s read and its write.
/// With no group row to compare, `a`'s import went through, and member 10's
/// first confirm would have handed it the key that sealed that message.
/// The import creates the group first and compares it like any other: it
/// fails busy, and the retry moves the group to a new epoch.
async fn import_racing_a_first_update(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    const NEW: u32 = 77;
    let (h, a, b, _, _) = two_udcs_in_a_round(store_url, 1).await;
    assert!(a.store().group(NEW).await.unwrap().is_none());
    let other = b.clone();
    a.before_next_import_write(async move {
        other.publish_update(NEW, b"\x01", None).await.unwrap();
    });
    let row = derived_row(10, vec![NEW], 1);
    let err = a.import_members(vec![row.clone()]).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let sealed_at = a.store().group(NEW).await.unwrap().unwrap().epoch;
    assert_eq!(a.import_members(vec![row]).await.unwrap(), (1, 0));
    assert!(a.store().group(NEW).await.unwrap().unwrap().epoch > sealed_at);
    h.stop().await;
}

on_both_stores!(import_racing_a_first_update, "import_race_new");

/// Two `Udc`s on one store: `a` imports members 20 and 21 into group 77
/// (no group state yet: the import creates it), and between its read
/// of who is registered and its write `b` adds member 20 (key version 3,
/// group 9). The import must not replace what `b` wrote
/// (the rule: an import never changes a registered member): it fails
/// (busy), leaving group 77 unknown to the operator API, and the retry
/// imports 21 and skips 20.
async fn import_racing_an_added_member(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::{MemberRow, Store};
    let (h, a, b, _round, _challenge) = two_udcs_in_a_round(store_url, 2).await;
    let other = b.clone();
    a.before_next_import_write(async move {
        other.add_member(20, vec![9], Some(3)).await.unwrap();
    });
    let rows: Vec<MemberRow> = [20, 21].map(|id| derived_row(id, vec![77], 1)).to_vec();
    let err = a.import_members(rows.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    // The failed import created group 77's row and imported nobody: the
    // group is still unknown to the operator API (a typo in a failed
    // import must not make a round there acceptable).
    let round = serde_json::json!({"group": 77, "mode": "psk", "purpose": "auth"});
    let (s, v) = h
        .admin(Some(TOKEN), Method::POST, "/v1/admin/rounds", round.clone())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"], "unknown_group", "{v}");
    assert_eq!(a.import_members(rows).await.unwrap(), (1, 1));
    let (s, v) = h
        .admin(Some(TOKEN), Method::POST, "/v1/admin/rounds", round)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let got = a.store().members(vec![20, 21]).await.unwrap();
    let got: Vec<_> = got
        .into_iter()
        .map(|m| {
            let m = m.unwrap();
            (m.kv, m.groups)
        })
        .collect();
    assert_eq!(got, vec![(3, vec![9]), (1, vec![77])]);
    h.stop().await;
}

on_both_stores!(import_racing_an_added_member, "import_add_race");

/// Two `Udc`s on one store: `a` revokes member 3 while no member has a
/// session (so its new epoch rekeys nobody), and between `a`'s read and
/// its write `b` commits a batch (judged against the old epoch) giving
/// members 1 and 2 their first sessions, with the old group key that
/// member 3 knows. `a`'s write must fail (busy); the retried revocation
/// rekeys 1 and 2 into the new epoch.
async fn revocation_racing_other_members_first_acceptance(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 3).await;
    let body = psk_batch(&h, 1, round, &challenge, 1..=2);
    let other = b.clone();
    a.before_next_rekey_write(async move {
        let answer = other.handle_batch("gw-1", body).await.unwrap();
        assert_eq!(
            outcomes(&Verdict::decode(&answer).unwrap()),
            vec![Outcome::Accepted; 2]
        );
    });
    let err = a.revoke_member(3).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    assert!(a.revoke_member(3).await.unwrap());
    let rekeyed = rekeyed_members(&records(&a.downlink("gw-1", 0).await.unwrap()));
    assert_eq!(rekeyed, vec![1, 2]);
    h.stop().await;
}

on_both_stores!(
    revocation_racing_other_members_first_acceptance,
    "revoke_other_first_accept"
);

/// A reading another process accepts between a rekey's read of the slots
/// and its write (a revocation rewrites every other member's slot) is kept
/// as a use of the slot as read. The rekey's write must fail (busy): it
/// would otherwise seal the slot as read, without that use, and move the
/// version, which leaves the use stale and the reading's counter open to a
/// replay. Retried, the rekey folds the use in, and the reading stays a
/// replay through either process.
async fn a_use_committed_between_a_rekeys_read_and_write_is_kept(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let h = Harness::start(store_url).await;
    let (mut members, _) = h.authenticated(3).await;
    let a = udc::build(&h.config).await.unwrap();
    let b = udc::build(&h.config).await.unwrap();
    let r1 = members[0]
        .seal_uplink(GroupId(G), UplinkKind::Reading, b"r1")
        .unwrap()
        .persisted();
    let body = uplink_batch(20, std::slice::from_ref(&r1)).to_bytes();
    let other = b.clone();
    a.before_next_rekey_write(async move {
        let answer = other.handle_batch("gw-1", body).await.unwrap();
        assert_eq!(
            outcomes(&Verdict::decode(&answer).unwrap()),
            vec![Outcome::Accepted]
        );
    });
    let err = a.revoke_member(3).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    assert!(a.revoke_member(3).await.unwrap());
    let slot = a
        .store()
        .sessions(vec![(1, G)])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(
        (slot.version, slot.used),
        (2, None),
        "rewritten once, the use folded in"
    );
    for (udc, batch_id) in [(&a, 21), (&b, 22)] {
        let replay = uplink_batch(batch_id, std::slice::from_ref(&r1)).to_bytes();
        let answer = udc.handle_batch("gw-1", replay).await.unwrap();
        assert_eq!(
            outcomes(&Verdict::decode(&answer).unwrap()),
            vec![Outcome::ReplayedCounter]
        );
    }
    h.stop().await;
}

on_both_stores!(
    a_use_committed_between_a_rekeys_read_and_write_is_kept,
    "use_between_rekey_read_and_write"
);

/// Two `Udc`s on one store: `a` has judged member 2 (its member cache
/// holds it, active), then `b` revokes member 2. In the next round `a` must
/// see the revocation (the registry version changed): member 2 is refused
/// as revoked, member 3 (also cached) accepted.
async fn cached_member_revoked_by_another_process(store_url: Option<String>) {
    let (h, a, b) = accepted_in_a_round(store_url, 3).await;
    assert!(b.revoke_member(2).await.unwrap());
    let next = a
        .open_round(
            G,
            Mode::Psk,
            dapgw::protocol::wire::Purpose::Auth,
            Some(60_000),
        )
        .await
        .unwrap();
    let challenge = last_group_record(&records(&a.downlink("gw-1", 0).await.unwrap()));
    let body = psk_batch(&h, 2, next, &challenge, 2..=3);
    let answer = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&answer).unwrap()),
        vec![Outcome::Revoked, Outcome::Accepted]
    );
    h.stop().await;
}

on_both_stores!(cached_member_revoked_by_another_process, "revoke_cached");

/// Two UDC processes judge the same member's response in the same round
/// at the same time: b accepts it (through another gateway) after a read
/// the member's slot and before a writes. a's write fails as a whole (its
/// compare-and-set on the slot), nothing of it is stored, and the retry is
/// judged against b's acceptance: the member is accepted once.
async fn acceptance_race_between_read_and_write(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 2).await;
    let body = psk_batch(&h, 1, round, &challenge, 1..=2);
    let other = batch("gw-2", 1, round, vec![respond(&h, 1, &challenge)]).to_bytes();
    let b2 = b.clone();
    a.before_next_batch_write(async move {
        let answer = b2.handle_batch("gw-2", other).await.unwrap();
        assert_eq!(
            outcomes(&Verdict::decode(&answer).unwrap()),
            vec![Outcome::Accepted]
        );
    });
    let err = a.handle_batch("gw-1", body.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let store = a.store();
    assert!(store.verdict("gw-1", 1).await.unwrap().is_none());
    let two = store.sessions(vec![(2, G)]).await.unwrap().pop().unwrap();
    assert!(two.is_none(), "nothing of the refused write is stored");
    // The retry: member 1 already accepted (by b), member 2 accepted now.
    let answer = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&answer).unwrap()),
        vec![Outcome::AlreadyAccepted, Outcome::Accepted]
    );
    let rep = store.round_report(G, round).await.unwrap().unwrap();
    assert_eq!((rep.accepted, rep.missing), (2, 0));
    let one = store.round_outcomes(G, round, None, 10).await.unwrap();
    assert_eq!(
        one.iter()
            .map(|o| (o.member, o.gateway.as_deref()))
            .collect::<Vec<_>>(),
        vec![(1, Some("gw-2")), (2, Some("gw-1"))],
        "member 1's acceptance (through gw-2) stands"
    );
    // a's metrics count the committed write only, not the refused one.
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&a.registry().gather())
        .unwrap();
    assert_eq!(
        metric(
            &text,
            "dapgw_udc_members_authenticated_total",
            &[("mode", "psk")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "dapgw_udc_entries_rejected_total",
            &[("reason", "replay")]
        ),
        1.0,
        "{text}"
    );
    h.stop().await;
}

on_both_stores!(acceptance_race_between_read_and_write, "accept_race");

/// Whether the socket of this process bound to `local` and connected to
/// `peer` has `TCP_NODELAY` set (found through `/proc/self/fd`); `None`
/// while there is no such socket yet.
fn nodelay_of(local: SocketAddr, peer: SocketAddr) -> Option<bool> {
    use std::os::fd::FromRawFd;
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket =
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor is only borrowed for two getsockname-like
        // calls and a getsockopt; ManuallyDrop never closes it. A descriptor
        // closed and reused meanwhile just fails those calls.
        let s = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        if s.local_addr().ok() == Some(local) && s.peer_addr().ok() == Some(peer) {
            return s.nodelay().ok();
        }
    }
    None
}

/// The UDC turns Nagle's algorithm off on the connections it accepts: a
/// verdict written in two pieces would otherwise wait for the gateway's
/// delayed ACK (40 ms on Linux), which was the relay latency tail the
/// gateway_relay bench showed (1 to 2 % of uplinks about 40 ms late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_have_nodelay() {
    let h = Harness::start(None).await;
    let client = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let peer = client.local_addr().unwrap();
    // The server sets it right after accept, on its own task: wait for it
    // (30 s: a hang guard only).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        seen = nodelay_of(h.addr, peer);
        if seen == Some(true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, Some(true), "the udc's side of the connection");
    drop(client);
    h.stop().await;
}

/// `dapgw udc round start` and `round schedule` without `--purpose` send
/// none, so they open what the operator API opens for a body without one:
/// auth rounds (never a reading collected that the operator did not ask
/// for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_api_default_to_auth_rounds() {
    let h = Harness::start(None).await;
    h.import_members(1..=2).await;
    let admin = h.admin.to_string();
    let token = h._dir.path().join("token");
    let cli = |op: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dapgw"))
            .arg("udc")
            .args(op)
            .arg("--admin")
            .arg(&admin)
            .arg("--token-file")
            .arg(&token)
            .env_remove("DAPGW_ADMIN_LISTEN")
            .env_remove("DAPGW_ADMIN_TOKEN_FILE")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "dapgw udc {op:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()
    };
    // The round first: a schedule's rounds open in the background.
    let round = tokio::task::block_in_place(|| {
        cli(&["round", "start", "--group", "7", "--mode", "psk"])
    })["round"]
        .as_u64()
        .unwrap();
    let report = h
        .op(
            Method::GET,
            &format!("/v1/admin/rounds/{G}/{round}"),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(report["purpose"], "auth", "{report}");
    let by_cli = tokio::task::block_in_place(|| {
        cli(&["round", "schedule", "--group", "7", "--every-s", "3600"])
    })["id"]
        .clone();
    let by_api = h
        .op(
            Method::POST,
            "/v1/admin/schedules",
            serde_json::json!({"group": G, "every_s": 3600}),
        )
        .await["id"]
        .clone();
    let list = h
        .op(Method::GET, "/v1/admin/schedules", serde_json::Value::Null)
        .await;
    let purpose_of = |id: &serde_json::Value| {
        list["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == *id)
            .unwrap_or_else(|| panic!("schedule {id} listed: {list}"))["purpose"]
            .clone()
    };
    assert_eq!(purpose_of(&by_cli), "auth", "{list}");
    assert_eq!(purpose_of(&by_api), "auth", "{list}");
    h.stop().await;
}

/// `GET /v1/admin/members` reads the sessions of a whole page at once: each
/// member still shows its own last authentication, sessions and key
/// version, on one page and split over pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_listing_shows_each_members_sessions() {
    let h = Harness::start(None).await;
    let r = h.auth_round(4).await;
    // Members 1 to 3 answer; 4 does not.
    let entries = (1..=3).map(|id| respond(&h, id, &r.challenge)).collect();
    let v = h.post_batch(&batch("gw-1", 1, r.round, entries)).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 3]);
    // Member 5: key version 2, two groups, never authenticated.
    h.op(
        Method::POST,
        "/v1/admin/members/import",
        serde_json::json!({"members": [{"id": 5, "kv": 2, "groups": [G, 8]}]}),
    )
    .await;
    let whole = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await["members"]
        .as_array()
        .unwrap()
        .clone();
    let ids: Vec<u64> = whole.iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    for m in &whole[..3] {
        let at = m["last_auth_ms"].as_u64().expect("authenticated");
        assert!(at > 0, "{m}");
        assert_eq!(
            m["sessions"],
            serde_json::json!([{"group": G, "last_auth_ms": at}]),
            "{m}"
        );
        assert_eq!(m["kv"], 1, "{m}");
    }
    for m in &whole[3..] {
        assert!(m["last_auth_ms"].is_null(), "{m}");
        assert_eq!(m["sessions"], serde_json::json!([]), "{m}");
    }
    assert_eq!(whole[4]["kv"], 2);
    assert_eq!(whole[4]["groups"], serde_json::json!([G, 8]));
    // Pages of two: the same members with the same sessions.
    let mut paged = Vec::new();
    let mut path = "/v1/admin/members?limit=2".to_string();
    loop {
        let page = h.op(Method::GET, &path, serde_json::Value::Null).await["members"]
            .as_array()
            .unwrap()
            .clone();
        let Some(last) = page.last() else { break };
        path = format!("/v1/admin/members?limit=2&after={}", last["id"]);
        paged.extend(page);
    }
    assert_eq!(paged, whole);
    h.stop().await;
}
/// A group id the UDC knows nothing of (no member, never used: a typo)
/// is 404 `unknown_group` for a round, a schedule and an update, and
/// nothing is created; once a member is imported into it, it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_rounds_schedules_and_updates_in_an_unknown_group() {
    let h = Harness::start(None).await;
    for (path, body) in [
        (
            "/v1/admin/rounds",
            serde_json::json!({"group": 4242, "mode": "psk", "purpose": "auth"}),
        ),
        (
            "/v1/admin/schedules",
            serde_json::json!({"group": 4242, "every_s": 3600, "mode": "psk", "purpose": "auth"}),
        ),
        (
            "/v1/admin/groups/4242/updates",
            serde_json::json!({"payload_hex": "c0ffee"}),
        ),
    ] {
        let (s, v) = h.admin(Some(TOKEN), Method::POST, path, body).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["error"], "unknown_group", "{path}: {v}");
        assert!(v["reason"].as_str().unwrap().contains("group 4242"), "{v}");
    }
    let (s, v) = h
        .admin(
            Some(TOKEN),
            Method::GET,
            "/v1/admin/schedules",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["schedules"], serde_json::json!([]), "nothing scheduled");
    let (s, _, _) = h.admin_raw(Method::GET, "/v1/admin/rounds/4242/1").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "no round was opened");
    h.op(
        Method::POST,
        "/v1/admin/members/import",
        serde_json::json!({"members": [{"id": 4242, "groups": [4242], "kv": 1}]}),
    )
    .await;
    let v = h
        .op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": 4242, "mode": "psk", "purpose": "auth"}),
        )
        .await;
    assert_eq!(v["group"], 4242, "{v}");
    h.stop().await;
}

/// Importing members is provisioning: no rekey, unless a group they join
/// has sealed a group message under its current key. Then the newcomer's
/// first confirm would hand it the key that opens that message, so the
/// group moves to a new epoch in the import's transaction and every
/// member with a session is rekeyed (backward secrecy, as adding a member
/// through `POST /v1/admin/members` gives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_into_a_group_that_sealed_a_message_under_its_key_rekeys() {
    let h = Harness::start(None).await;
    let (_members, confirmed) = h.authenticated(2).await;
    let rekeyed_after = |after: u64| {
        let h = &h;
        async move {
            let recs = h.downlink_now(after).await;
            let last = recs.last().map_or(after, |r| r.0);
            (last, rekeyed_members(&recs))
        }
    };
    // No group message yet: the import rekeys nobody.
    h.import_members([3]).await;
    let (cursor, ids) = rekeyed_after(confirmed).await;
    assert_eq!(ids, Vec::<u64>::new());
    // A group message under the current key, then an import: a new epoch.
    h.op(
        Method::POST,
        &format!("/v1/admin/groups/{G}/updates"),
        serde_json::json!({"payload_hex": "0102"}),
    )
    .await;
    let (cursor, _) = rekeyed_after(cursor).await;
    h.import_members([4]).await;
    let (cursor, ids) = rekeyed_after(cursor).await;
    assert_eq!(ids, vec![1, 2], "the members with a session are rekeyed");
    // Nothing sealed under the new key yet: the next import rekeys nobody.
    h.import_members([5]).await;
    assert_eq!(rekeyed_after(cursor).await.1, Vec::<u64>::new());
    h.stop().await;
}

/// A member accepted in a psk round after missing three psk-ecdhe rounds
/// in a row (its gateway may be dropping psk-ecdhe challenges to keep it
/// off forward secrecy) is counted in
/// `dapgw_udc_gateway_misbehaviour_total{kind="dropped_ecdhe"}`; one that
/// answered them is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_kept_off_psk_ecdhe_rounds_are_reported() {
    let h = Harness::start(None).await;
    let (mut members, mut cursor) = h.authenticated(2).await;
    let dropped = |text: &str| {
        metric(
            text,
            "dapgw_udc_gateway_misbehaviour_total",
            &[("kind", "dropped_ecdhe")],
        )
    };
    let mut batch_id = 2;
    // Three psk-ecdhe rounds: member 2 answers them, member 1 never sees
    // them.
    for _ in 0..3 {
        let round = h
            .op(
                Method::POST,
                "/v1/admin/rounds",
                serde_json::json!({"group": G, "mode": "psk-ecdhe", "purpose": "auth"}),
            )
            .await["round"]
            .as_u64()
            .unwrap();
        let recs = h.downlink(cursor).await;
        let challenge = last_group_record(&recs);
        let mut b = batch(
            "gw-1",
            batch_id,
            round,
            answer(&mut members[1..], &challenge, b""),
        );
        if let BatchBody::Responses { mode, .. } = &mut b.body {
            *mode = Mode::PskEcdhe;
        }
        let v = h.post_batch(&b).await;
        batch_id += 1;
        assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
        cursor = recs.last().unwrap().0;
    }
    assert_eq!(dropped(&h.metrics().await), 0.0);
    // Then a psk round both answer: member 1 missed three in a row.
    let round = h.open_auth_round().await;
    let challenge = last_group_record(&h.downlink(cursor).await);
    let v = h
        .post_batch(&batch(
            "gw-1",
            batch_id,
            round,
            answer(&mut members, &challenge, b""),
        ))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    assert_eq!(dropped(&h.metrics().await), 1.0);
    h.stop().await;
}

/// A known operator path asked with a method it does not take is 405
/// with an `Allow` header naming the ones it does; an unknown path is 404.
/// A misspelt query parameter is 400 naming it and the ones the endpoint
/// takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_wrong_methods_and_unknown_parameters_are_named() {
    let h = Harness::start(None).await;
    for (method, path, allow) in [
        (Method::GET, "/v1/admin/rounds", "POST"),
        (Method::HEAD, "/v1/admin/rounds", "POST"),
        (Method::HEAD, "/v1/admin/schedules/3", "DELETE"),
        (Method::DELETE, "/v1/admin/rounds/7/1", "GET, HEAD"),
        (Method::GET, "/v1/admin/rounds/7/1/close", "POST"),
        (Method::PUT, "/v1/admin/schedules", "GET, HEAD, POST"),
        (Method::GET, "/v1/admin/schedules/3", "DELETE"),
        (Method::GET, "/v1/admin/groups/7/updates", "POST"),
        (Method::POST, "/v1/admin/groups/7/updates/1", "GET, HEAD"),
        (Method::DELETE, "/v1/admin/members", "GET, HEAD, POST"),
        (Method::GET, "/v1/admin/members/import", "POST"),
        (Method::GET, "/v1/admin/members/5/revoke", "POST"),
        (Method::POST, "/v1/admin/readings", "GET, HEAD"),
        (Method::POST, "/v1/admin/gateways", "GET, HEAD"),
    ] {
        let (status, headers, body) = h.admin_raw(method.clone(), path).await;
        assert_eq!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {body:?}"
        );
        assert_eq!(headers["allow"], allow, "{method} {path}");
        if method == Method::HEAD {
            assert!(body.is_empty(), "{method} {path}: {body:?}");
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "method_not_allowed", "{method} {path}: {v}");
    }
    // HEAD is answered wherever GET is: its status and length, no body.
    for path in [
        "/v1/admin/members",
        "/v1/admin/schedules",
        "/v1/admin/gateways",
    ] {
        let (get, get_headers, get_body) = h.admin_raw(Method::GET, path).await;
        let (head, headers, body) = h.admin_raw(Method::HEAD, path).await;
        assert_eq!((get, head), (StatusCode::OK, StatusCode::OK), "{path}");
        assert!(body.is_empty(), "HEAD {path}: {body:?}");
        assert_eq!(
            headers["content-length"],
            get_body.len().to_string(),
            "{path}"
        );
        assert_eq!(
            headers["content-type"], get_headers["content-type"],
            "{path}"
        );
    }
    let (s, _, body) = h.admin_raw(Method::HEAD, "/v1/admin/rounds/7/99").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.is_empty());
    // The path and the method are judged before the query.
    for (method, path, want) in [
        (
            Method::PUT,
            "/v1/admin/members?after=1",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::DELETE,
            "/v1/admin/readings?member=1",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/v1/admin/members/5", StatusCode::NOT_FOUND),
        (Method::GET, "/v1/admin/nothing?x=1", StatusCode::NOT_FOUND),
        (Method::GET, "/v1/admin/rounds/7", StatusCode::NOT_FOUND),
    ] {
        let (status, _, body) = h.admin_raw(method.clone(), path).await;
        assert_eq!(status, want, "{method} {path}: {body:?}");
    }
    // A bare parameter is a parameter: unknown, or not a number.
    for (path, says) in [
        ("/v1/admin/members?limt", "unknown query parameter `limt`"),
        ("/v1/admin/members?limit", "limit must be"),
    ] {
        let (s, v) = h
            .admin(Some(TOKEN), Method::GET, path, serde_json::Value::Null)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(v["reason"].as_str().unwrap().contains(says), "{path}: {v}");
    }
    let (s, v) = h
        .admin(
            Some(TOKEN),
            Method::GET,
            "/v1/admin/readings?member=1&limt=5",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        v["reason"],
        "unknown query parameter `limt`; this endpoint takes member, from, to, after, limit"
    );
    h.stop().await;
}

/// The operator API percent-decodes query strings (names and values), and
/// answers 400 naming the parameter when one is not valid percent-encoded
/// UTF-8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_query_strings_are_percent_decoded() {
    let h = Harness::start(None).await;
    let round = h.auth_round(3).await.round;
    for after in ["1", "%31"] {
        let report = h
            .op(
                Method::GET,
                &format!("/v1/admin/rounds/{G}/{round}?after={after}"),
                serde_json::Value::Null,
            )
            .await;
        assert_eq!(report["missing"], serde_json::json!([2, 3]), "{after}");
    }
    let listed = h
        .op(
            Method::GET,
            "/v1/admin/members?%61fter=1&limit=%31",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(listed["members"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["members"][0]["id"], 2, "{listed}");
    for (q, param) in [
        ("after=%zz", "`after`"),
        ("after=1%3", "`after`"),
        ("after=%ff", "`after`"),
        ("limit=1&after=%C3%28", "`after`"),
        ("%zz=1", "name"),
    ] {
        let (s, v) = h
            .admin(
                Some(TOKEN),
                Method::GET,
                &format!("/v1/admin/members?{q}"),
                serde_json::Value::Null,
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"], "bad_request", "{q}: {v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(
            reason.contains(param) && reason.contains("percent-encoded"),
            "{q}: {reason}"
        );
    }
    h.stop().await;
}

/// The (hits, misses) of `cache` in `/metrics` text.
fn cache_lookups(text: &str, cache: &str) -> (f64, f64) {
    let of = |outcome| {
        metric(
            text,
            "dapgw_udc_cache_lookups_total",
            &[("cache", cache), ("outcome", outcome)],
        )
    };
    (of("hit"), of("miss"))
}

/// Readings stored as session uses (docs/udc.md, "Session uses"): the
/// sealed slot stays as the round wrote it and the use beside it carries
/// the window, yet every replay is refused: from the same process (its
/// slot cache), after a restart (the use read from the store), through a
/// second process and back (a cached slot whose use moved elsewhere is
/// read again), and after the next round rewrote the slot (the use folded
/// into the sealing). A member whose batch holds two sessions is resealed
/// whole.
async fn readings_kept_as_uses_survive_restarts_and_rounds(store_url: Option<String>) {
    fn seal(m: &mut Member, what: &[u8]) -> Bytes {
        m.seal_uplink(GroupId(G), UplinkKind::Reading, what)
            .unwrap()
            .persisted()
    }
    let mut a = Harness::start(store_url).await;
    let (mut members, cursor) = a.authenticated(2).await;
    // Opened once the UDC has created (and migrated) the store.
    use dapgw::udc::store::Store;
    let store = dapgw::udc::store::open(a.config.store_url.expose())
        .await
        .unwrap();
    let slot = async |member: u64| {
        store
            .sessions(vec![(member, G)])
            .await
            .unwrap()
            .pop()
            .unwrap()
            .unwrap()
    };
    let before = slot(1).await;
    assert_eq!((before.version, before.used), (1, None));
    let r = [
        seal(&mut members[0], b"r1"),
        seal(&mut members[0], b"r2"),
        seal(&mut members[1], b"s1"),
    ];
    let v = a.post_batch(&uplink_batch(2, &r)).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 3]);
    // The readings left the sealed slot and its version as they were.
    let after = slot(1).await;
    assert_eq!((after.version, &after.state), (1, &before.state));
    let used = after.used.expect("a use beside the slot");
    assert_eq!((used.top, used.seen), (2, 0b11));

    // Same process (cache hit), then after a restart (from the store).
    let v = a.post_batch(&uplink_batch(3, &r[..1])).await;
    assert_eq!(outcomes(&v), vec![Outcome::ReplayedCounter]);
    a.restart().await;
    let r3 = seal(&mut members[0], b"r3");
    let v = a
        .post_batch(&uplink_batch(4, &[r[1].clone(), r3.clone()]))
        .await;
    assert_eq!(
        outcomes(&v),
        vec![Outcome::ReplayedCounter, Outcome::Accepted]
    );

    // Another process takes the next reading; this one, holding the slot
    // in its cache with the older use, must read it again.
    let b = a.second().await;
    let r4 = seal(&mut members[0], b"r4");
    let v = b.post_batch(&uplink_batch(5, &[r3, r4.clone()])).await;
    assert_eq!(
        outcomes(&v),
        vec![Outcome::ReplayedCounter, Outcome::Accepted]
    );
    let v = a
        .post_batch(&uplink_batch(6, std::slice::from_ref(&r4)))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::ReplayedCounter]);
    assert_eq!(slot(1).await.version, 1, "still uses only");

    // The next round rewrites the slot with the use folded in: the use is
    // stale, and the window it carried still refuses r4 (the member is
    // still in the old session: it has not opened the new confirm).
    let round = a.open_auth_round().await;
    let challenge = last_group_record(&a.downlink(cursor).await);
    let round2 = a
        .post_batch(&batch(
            "gw-1",
            7,
            round,
            answer(&mut members, &challenge, b""),
        ))
        .await;
    assert_eq!(outcomes(&round2), vec![Outcome::Accepted; 2]);
    // Since the restart the uplink batches looked no member up, but the
    // first read its member (1) into the empty registry copy: member 1
    // hits it, member 2 (no uplink since) misses.
    let text = a.metrics().await;
    assert_eq!(cache_lookups(&text, "registry"), (1.0, 1.0), "{text}");
    let folded = slot(1).await;
    assert_eq!((folded.version, folded.used), (2, None));
    let r5 = seal(&mut members[0], b"r5");
    let v = a
        .post_batch(&uplink_batch(8, &[r4.clone(), r5.clone()]))
        .await;
    assert_eq!(
        outcomes(&v),
        vec![Outcome::ReplayedCounter, Outcome::Accepted]
    );
    assert_eq!(slot(1).await.version, 2);
    a.restart().await;
    let v = a.post_batch(&uplink_batch(9, &[r4, r5])).await;
    assert_eq!(outcomes(&v), vec![Outcome::ReplayedCounter; 2]);

    // A batch with the member's readings under both sessions (the old one,
    // then the new one once its confirm is open) is sealed whole.
    let old = seal(&mut members[0], b"old");
    open_confirms(&mut members, &round2);
    let new = seal(&mut members[0], b"new");
    let v = a.post_batch(&uplink_batch(10, &[old, new])).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    let whole = slot(1).await;
    assert_eq!((whole.version, whole.used), (3, None));
    assert_ne!(whole.state, folded.state);
    b.stop().await;
    a.stop().await;
}

on_both_stores!(readings_kept_as_uses_survive_restarts_and_rounds, "uses");

/// The slot cache (docs/udc.md, "Slot cache"): a UDC process takes the
/// session slots it wrote itself from memory, and reads from the store a
/// slot another process rewrote since. Here process a accepts members 1
/// and 2 and their first readings (hits), process b accepts member 1's
/// next reading, and a is then sent that reading again: a must judge it on
/// the store's slot (a replay, answered at once) rather than on its own
/// older copy (which would accept it and then fail its compare-and-set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_cache_serves_own_writes_only() {
    let a = Harness::start(None).await;
    let (mut members, _) = a.authenticated(2).await;
    let slot = |text: &str, outcome: &str| {
        metric(
            text,
            "dapgw_udc_cache_lookups_total",
            &[("cache", "slot"), ("outcome", outcome)],
        )
    };
    let mut seal = |i: usize, what: &[u8]| {
        members[i]
            .seal_uplink(GroupId(G), UplinkKind::Reading, what)
            .unwrap()
            .persisted()
    };

    // Both slots were written by a's round batch: its next reads hit.
    let first = [seal(0, b"1a"), seal(1, b"2a")];
    let v = a.post_batch(&uplink_batch(2, &first)).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    let v = a.post_batch(&uplink_batch(3, &[seal(0, b"1b")])).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    let text = a.metrics().await;
    assert_eq!(
        (slot(&text, "hit"), slot(&text, "miss")),
        (3.0, 0.0),
        "{text}"
    );
    // The round's batch read both members (misses); the uplink batches
    // looked no member up.
    assert_eq!(cache_lookups(&text, "registry"), (0.0, 2.0), "{text}");

    // Another process accepts member 1's next reading: its slot changes
    // under a's copy.
    let b = a.second().await;
    let third = seal(0, b"1c");
    let v = b
        .post_batch(&uplink_batch(4, std::slice::from_ref(&third)))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    // `post_batch` wants 200: a stale copy would fail the write (503).
    let v = a.post_batch(&uplink_batch(5, &[third])).await;
    assert_eq!(outcomes(&v), vec![Outcome::ReplayedCounter]);
    let text = a.metrics().await;
    assert_eq!(
        (slot(&text, "hit"), slot(&text, "miss")),
        (3.0, 1.0),
        "{text}"
    );
    b.stop().await;
    a.stop().await;
}

/// Slot-cache hit and miss counts of a `Udc`.
fn slot_counts(u: &udc::service::Udc) -> (f64, f64) {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&u.registry().gather())
        .unwrap();
    let count = |outcome| {
        metric(
            &text,
            "dapgw_udc_cache_lookups_total",
            &[("cache", "slot"), ("outcome", outcome)],
        )
    };
    (count("hit"), count("miss"))
}

/// The slot cache inside one process: a rekey (a member added) rewrites
/// the slots it loaded, so the next batch misses them; a batch that fails
/// (another process revoked a member between its read and its write)
/// puts nothing back, so its retry misses too and is judged on the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_cache_misses_after_a_rekey_and_after_a_failed_batch() {
    use dapgw::udc::service::ServiceError;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(None, 3).await;
    let answer_round = |batch_id: u64, round: u64, challenge: &Bytes| {
        batch(
            "gw-1",
            batch_id,
            round,
            (1..=3).map(|m| respond(&h, m, challenge)).collect(),
        )
        .to_bytes()
    };
    let v = a
        .handle_batch("gw-1", answer_round(1, round, &challenge))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&v).unwrap()),
        vec![Outcome::Accepted; 3]
    );
    assert_eq!(slot_counts(&a), (0.0, 0.0), "no slot stored before");

    // The rekey loads the three slots the batch wrote (hits) and rewrites
    // them: the next round's batch misses all three.
    a.add_member(4, vec![G], Some(1)).await.unwrap();
    assert_eq!(slot_counts(&a), (3.0, 0.0));
    let (r2, ch2) = open_psk_round(&a).await;
    let v = a
        .handle_batch("gw-1", answer_round(2, r2, &ch2))
        .await
        .unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&v).unwrap()),
        vec![Outcome::Accepted; 3]
    );
    assert_eq!(slot_counts(&a), (3.0, 3.0));

    // Its slots are cached; a batch reads them (hits) and fails at its
    // write, so its retry reads them from the store: member 2's emptied by
    // the revocation, 1 and 3 as this process last wrote them.
    let (r3, ch3) = open_psk_round(&a).await;
    let body = answer_round(3, r3, &ch3);
    a.before_next_batch_write(async move {
        assert!(b.revoke_member(2).await.unwrap());
    });
    let err = a.handle_batch("gw-1", body.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    assert_eq!(slot_counts(&a), (6.0, 3.0));
    let v = a.handle_batch("gw-1", body).await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&v).unwrap()),
        vec![Outcome::Accepted, Outcome::Revoked, Outcome::Accepted]
    );
    assert_eq!(slot_counts(&a), (6.0, 5.0));
    h.stop().await;
}

/// Backs up the SQLite store `db` into `to` the way an operator would
/// while the UDC runs: `VACUUM INTO`, one consistent snapshot (a copy of
/// the file would miss what sits in the WAL).
fn backup_store(db: &std::path::Path, to: &std::path::Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute("VACUUM INTO ?1", [to.to_str().unwrap()]).unwrap();
}

/// Restores the backup `from` in place of the (stopped) store `db`: the
/// file replaced, its WAL and shared memory removed.
fn restore_store(from: &std::path::Path, db: &std::path::Path) {
    for ext in ["-wal", "-shm"] {
        let side = db.with_file_name(format!(
            "{}{ext}",
            db.file_name().unwrap().to_str().unwrap()
        ));
        if side.exists() {
            std::fs::remove_file(&side).unwrap();
        }
    }
    std::fs::copy(from, db).unwrap();
}

/// Opens a psk auth round of group 8 (one member, 80, never answering)
/// and returns its number.
async fn open_round8(h: &Harness) -> u64 {
    h.op(
        Method::POST,
        "/v1/admin/members/import",
        serde_json::json!({"members": [{"id": 80, "groups": [8], "kv": 1}]}),
    )
    .await;
    h.op(
        Method::POST,
        "/v1/admin/rounds",
        serde_json::json!({"group": 8, "mode": "psk", "purpose": "auth"}),
    )
    .await["round"]
        .as_u64()
        .unwrap()
}

/// gw-2's downlink records after `after` (waits up to 5 s for one).
async fn gw2_downlink(h: &Harness, after: u64) -> Vec<(u64, u8, u32, u64, Bytes)> {
    let (s, body) = h
        .call(
            Some("gw-2"),
            Method::GET,
            &format!("/v1/downlink?after={after}&wait_ms=5000"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "no gw-2 downlink records after {after}");
    records(&body)
}

/// A member revoked after the backup (active again in the restored store)
/// and named by the recovery's revoke list is marked revoked in the
/// recovery's transaction: the recovery round sets it aside as `Revoked`
/// while the other member is accepted; an id the store does not hold is
/// reported, not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_revokes_members_revoked_after_the_backup() {
    let mut h = Harness::start(None).await;
    let db = h._dir.path().join("udc.sqlite3");
    let backup = tempfile::tempdir().unwrap();
    let backup = backup.path().join("udc-backup.sqlite3");
    let mut members: Vec<Member> = (1..=2).map(|id| h.real_member(id)).collect();
    let r = h.auth_round(2).await;
    backup_store(&db, &backup);
    h.op(
        Method::POST,
        "/v1/admin/members/2/revoke",
        serde_json::Value::Null,
    )
    .await;
    h.halt().await;
    restore_store(&backup, &db);
    let rec = {
        let u = udc::build(&h.config).await.unwrap();
        u.recover_after_restore(600_000, vec![2, 99]).await.unwrap()
    };
    assert_eq!(
        (rec.members_revoked, rec.revoke_not_found.clone()),
        (1, vec![99]),
        "{rec:?}"
    );
    h.resume().await;
    let recs = h.downlink(r.cursor).await;
    let challenge = last_group_record(&recs);
    let opened = rec.rounds_opened[0];
    let mut b = batch(
        "gw-1",
        2,
        opened.round,
        answer(&mut members, &challenge, b""),
    );
    if let BatchBody::Responses { mode, .. } = &mut b.body {
        *mode = Mode::PskEcdhe;
    }
    let v = h.post_batch(&b).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted, Outcome::Revoked]);
    h.stop().await;
}

/// The recovery run twice on the same restored store (an operator
/// repeating the command): the second run finds the first run's own rows
/// newest, stamped at its time, and reports the first run's
/// `newest_record_ms` (about the backup's time) instead; it raises the
/// floor again and counts two recoveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_recovery_reports_the_backups_newest_record() {
    use dapgw::protocol::verifier::state::RESTORE_OFFSET;
    let mut h = Harness::start(None).await;
    let db = h._dir.path().join("udc.sqlite3");
    let backup = tempfile::tempdir().unwrap();
    let backup = backup.path().join("udc-backup.sqlite3");
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = unix_ms();
    h.auth_round(2).await;
    backup_store(&db, &backup);
    h.halt().await;
    restore_store(&backup, &db);
    let u = udc::build(&h.config).await.unwrap();
    let first = u.recover_after_restore(600_000, vec![]).await.unwrap();
    let second = u.recover_after_restore(600_000, vec![]).await.unwrap();
    let newest = first.newest_record_ms.expect("the backup holds rows");
    let first_at = second.previous_recovery_ms.expect("the first run's time");
    assert!(
        newest >= before && newest < first_at,
        "{first:?} {second:?}"
    );
    assert_eq!(second.newest_record_ms, Some(newest), "{second:?}");
    assert_eq!(
        (second.floor, second.recoveries),
        (2 * RESTORE_OFFSET, 2),
        "{second:?}"
    );
    drop(u);
    h.resume().await;
    h.stop().await;
}

/// A gateway subscribing to a group while a round of it is open gets that
/// round's challenge (the round's fan-out reached only gw-1), and the
/// members' responses through it are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_during_an_open_round_delivers_its_challenge() {
    let h = Harness::start(None).await;
    let mut members: Vec<Member> = (1..=2).map(|id| h.real_member(id)).collect();
    let r = h.auth_round(2).await;
    h.subscribe("gw-2").await;
    let recs = gw2_downlink(&h, 0).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].1, recs[0].2, &recs[0].4), (1, G, &r.challenge));
    // Subscribing again to the same group queues nothing more.
    h.subscribe("gw-2").await;
    let (s, _) = h
        .call(
            Some("gw-2"),
            Method::GET,
            &format!("/v1/downlink?after={}", recs[0].0),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let v = h
        .post_batch(&batch(
            "gw-1",
            1,
            r.round,
            answer(&mut members, &recs[0].4, b""),
        ))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    h.stop().await;
}

/// The store backed up while the UDC runs (`VACUUM INTO`), used on, then
/// restored with the UDC stopped, and recovered offline before the UDC
/// starts again (docs/udc.md, "Restoring a backup"). The report counts what
/// the recovery did; a response to the round open at the backup is
/// `RoundNotOpen`; an uplink accepted after the backup cannot be replayed;
/// the recovery's psk-ecdhe challenge reaches gw-1 after the cursor it held
/// before the restore (with that of group 9, subscribed to but without
/// state, created above the floor) and the members authenticate in it;
/// gw-2, first used
/// after the backup (no cursor row in the restored store), and group 8,
/// created after the backup (no row), start above the recovery floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_restore_refuses_replays_and_reaches_members() {
    use dapgw::protocol::verifier::state::RESTORE_OFFSET;
    let mut h = Harness::start(None).await;
    let db = h._dir.path().join("udc.sqlite3");
    let backup = tempfile::tempdir().unwrap();
    let backup = backup.path().join("udc-backup.sqlite3");
    let (mut members, r, v) = h.accepted_round(2).await;
    open_confirms(&mut members, &v);
    let mut seal = |i: usize, what: &[u8]| {
        members[i]
            .seal_uplink(GroupId(G), UplinkKind::Reading, what)
            .unwrap()
            .persisted()
    };
    let v = h
        .post_batch(&uplink_batch(2, &[seal(0, b"1a"), seal(1, b"2a")]))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    // gw-1 also subscribes to group 9, which has no state yet.
    let (s, _) = h
        .call(
            Some("gw-1"),
            Method::PUT,
            "/v1/subscriptions",
            r#"{"groups":[7,9]}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // The backup, taken while the UDC runs; then what it does not hold: a
    // reading, a group update, gw-2's first subscription and downlink, and
    // group 8's first round.
    backup_store(&db, &backup);
    let late = seal(0, b"1b");
    let v = h
        .post_batch(&uplink_batch(3, std::slice::from_ref(&late)))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    h.op(
        Method::POST,
        &format!("/v1/admin/groups/{G}/updates"),
        serde_json::json!({"payload_hex": "c0ffee"}),
    )
    .await;
    let cursor = h.downlink(0).await.last().unwrap().0;
    h.subscribe("gw-2").await;
    h.op(
        Method::POST,
        &format!("/v1/admin/groups/{G}/updates"),
        serde_json::json!({"payload_hex": "c0ffef"}),
    )
    .await;
    let gw2_cursor = gw2_downlink(&h, 0).await.last().unwrap().0;
    let late_round8 = open_round8(&h).await;

    // Restored with the UDC stopped, recovered offline (as `dapgw udc
    // recover` does: its own `Udc` over the config's store and keys).
    h.halt().await;
    restore_store(&backup, &db);
    let rec = {
        let u = udc::build(&h.config).await.unwrap();
        u.recover_after_restore(600_000, vec![]).await.unwrap()
    };
    assert_eq!(
        (
            rec.groups_raised,
            rec.groups_created,
            rec.sessions_dropped,
            rec.rounds_closed,
            rec.gateways_raised
        ),
        (1, 1, 2, 1, 1),
        "{rec:?}"
    );
    assert_eq!((rec.floor, rec.recoveries), (RESTORE_OFFSET, 1), "{rec:?}");
    assert_eq!(rec.previous_recovery_ms, None);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(rec.newest_record_ms.is_some_and(|t| t <= now), "{rec:?}");
    assert_eq!(rec.rounds_opened.len(), 2, "{rec:?}");
    let (opened, opened9) = (rec.rounds_opened[0], rec.rounds_opened[1]);
    assert_eq!((opened.group, opened9.group), (G, 9));
    assert!(opened.round > RESTORE_OFFSET + r.round, "{rec:?}");
    assert_eq!(opened9.round, RESTORE_OFFSET + 1, "created above the floor");
    assert!(
        opened.closes_at_ms > now && opened.closes_at_ms <= now + 600_000,
        "{rec:?}"
    );
    h.resume().await;

    // The round open at the backup was closed.
    let entries: Vec<_> = (1..=2).map(|id| respond(&h, id, &r.challenge)).collect();
    let v = h.post_batch(&batch("gw-1", 4, r.round, entries)).await;
    assert_eq!(outcomes(&v), vec![Outcome::RoundNotOpen; 2]);
    // The replay finds no session to verify it.
    let v = h.post_batch(&uplink_batch(5, &[late])).await;
    assert_eq!(outcomes(&v), vec![Outcome::UnknownSession]);

    // The new challenge comes after the cursor gw-1 held before the
    // restore, and the members answer it.
    let recs = h.downlink(cursor).await;
    assert!(recs[0].0 > RESTORE_OFFSET, "{:?}", recs[0].0);
    let groups: Vec<u32> = recs.iter().map(|r| r.2).collect();
    assert_eq!(groups, vec![G, 9], "both recovery challenges");
    let challenge = recs[0].4.clone();
    let entries = answer(&mut members, &challenge, b"");
    assert!(entries.iter().all(|(e, _)| e.e_i.is_some()), "psk-ecdhe");
    let mut b = batch("gw-1", 6, opened.round, entries);
    if let BatchBody::Responses { mode, .. } = &mut b.body {
        *mode = Mode::PskEcdhe;
    }
    let v = h.post_batch(&b).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);

    // gw-2 subscribes again (its subscription went with the restore); its
    // queue starts above the floor, past the cursor it held, with group 7's
    // recovery challenge (still open) first: the recovery queued it to the
    // subscribers of the restored store, which gw-2 was not.
    h.subscribe("gw-2").await;
    h.op(
        Method::POST,
        &format!("/v1/admin/groups/{G}/updates"),
        serde_json::json!({"payload_hex": "c0fff0"}),
    )
    .await;
    let recs = gw2_downlink(&h, gw2_cursor).await;
    assert!(recs[0].0 > RESTORE_OFFSET, "{:?}", recs[0].0);
    assert_eq!(
        (recs[0].1, recs[0].2, &recs[0].4),
        (1, G, &challenge),
        "the recovery challenge reaches gw-2"
    );
    assert!(recs.len() >= 2 && recs[1].4 != challenge, "then the update");
    // A member handed it a second time re-sends its response.
    assert!(matches!(
        members[0].handle_challenge(&recs[0].4, None).unwrap(),
        Challenged::Resend(_)
    ));
    // Group 8, first used after the backup, starts above the floor.
    let round = open_round8(&h).await;
    assert!(round > RESTORE_OFFSET && round > late_round8, "{round}");
    h.stop().await;
}

/// A refused uplink (here a forged one; anyone can post to `/v1/direct`)
/// leaves its member's session slot as it was, version and use included:
/// a rewrite on every refused entry let any client make honest batches
/// that another UDC process was judging for that member conflict (503).
/// An accepted uplink moves the slot's use (its version stays: docs/udc.md,
/// "Session uses").
async fn a_refused_uplink_does_not_rewrite_the_members_slot(store_url: Option<String>) {
    use dapgw::udc::store::Store;
    let h = Harness::start(store_url).await;
    let mut member = member_in_session(&h).await;
    let u = udc::build(&h.config).await.unwrap();
    let store = u.store();
    let slot = || async {
        let s = store.sessions(vec![(1, G)]).await.unwrap()[0]
            .clone()
            .unwrap();
        (s.version, s.used)
    };
    let before = slot().await;
    assert_eq!(before.1, None);
    let honest = reading(&mut member, b"1 Wh");
    let (s, body) = h
        .call(
            None,
            Method::POST,
            "/v1/direct",
            direct_uplink(&forged(&honest)),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?}");
    assert_eq!(slot().await, before, "a refused uplink moved the slot");
    let (s, body) = h
        .call(None, Method::POST, "/v1/direct", direct_uplink(&honest))
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let after = slot().await;
    assert_eq!(after.0, before.0, "a use, not a rewrite");
    assert_eq!(
        after.1.map(|u| (u.top, u.seen)),
        Some((1, 1)),
        "an accepted uplink moves the slot's use"
    );
    drop(u);
    h.stop().await;
}

on_both_stores!(
    a_refused_uplink_does_not_rewrite_the_members_slot,
    "refused_uplink_slot"
);

/// A write wakes the long polls of the gateways whose queues it appended
/// to, and no others (every poll of every gateway used to re-read its
/// queue on every write with downlink); and a poll held by one process
/// sees records another process sharing the store appended, within its
/// re-read period rather than at the end of its wait.
async fn downlink_wakes_its_gateway_only_and_sees_other_processes(store_url: Option<String>) {
    use std::future::Future;
    use std::task::Poll;
    let (h, a, b, _round, _challenge) = two_udcs_in_a_round(store_url, 1).await;
    a.subscribe("gw-2", vec![G + 1]).await.unwrap();
    let gw1 = a.downlink_waker("gw-1");
    let gw2 = a.downlink_waker("gw-2");
    let (n1, n2) = (gw1.notified(), gw2.notified());
    tokio::pin!(n1);
    tokio::pin!(n2);
    n1.as_mut().enable();
    n2.as_mut().enable();
    open_psk_round(&a).await;
    let woken1 = std::future::poll_fn(|cx| Poll::Ready(n1.as_mut().poll(cx).is_ready())).await;
    let woken2 = std::future::poll_fn(|cx| Poll::Ready(n2.as_mut().poll(cx).is_ready())).await;
    assert!(woken1, "gw-1's poll is woken");
    assert!(!woken2, "gw-2's poll is not");

    // The harness's process holds gw-1's poll; `b` appends. (The poll is
    // sent first and a whole other request is answered before `b`
    // appends, so the poll has read its empty queue by then; were it not,
    // the test could only pass wrongly, never fail wrongly.)
    let h = Arc::new(h);
    let cursor = h.downlink(0).await.last().unwrap().0;
    let started = std::time::Instant::now();
    let poll = tokio::spawn({
        let h = h.clone();
        async move {
            let path = format!("/v1/downlink?after={cursor}&wait_ms=25000");
            h.call(Some("gw-1"), Method::GET, &path, Bytes::new()).await
        }
    });
    h.downlink(0).await;
    open_psk_round(&b).await;
    let (status, _) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the other process's round arrives");
    // Within the re-read period (2 s), not at the end of the 25 s wait.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let h = Arc::into_inner(h).unwrap();
    h.stop().await;
}

on_both_stores!(
    downlink_wakes_its_gateway_only_and_sees_other_processes,
    "downlink_wake"
);

/// Re-adding a member with fewer groups takes it out of the groups it no
/// longer names as a revocation there would (a new epoch, its sessions
/// erased, the others rekeyed), and keeps its key version and an imported
/// key (replaced by a derived one of version 1, the meter could not
/// authenticate).
async fn re_adding_a_member_with_fewer_groups_rekeys_those_it_left(store_url: Option<String>) {
    use dapgw::udc::store::{KeySource, Sealed, Store};
    let (h, a, _b) = accepted_in_a_round(store_url, 3).await;
    let store = a.store();
    let epoch = store.group(G).await.unwrap().unwrap().epoch;
    // Member 2's key becomes an imported one (as a vendor import would).
    let mut row = store
        .members(vec![2])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let sealed = Sealed::new(vec![7; 44]);
    row.key_source = KeySource::Imported(sealed.clone());
    row.kv = 2;
    store
        .apply_batch(dapgw::udc::store::BatchWrite {
            members: vec![row],
            ..Default::default()
        })
        .await
        .unwrap();
    a.add_member(2, vec![G + 1], None).await.unwrap();
    assert!(store.group(G).await.unwrap().unwrap().epoch > epoch);
    let slots = store.sessions(vec![(1, G), (2, G), (3, G)]).await.unwrap();
    assert_eq!(
        slots.iter().map(has_session).collect::<Vec<_>>(),
        vec![true, false, true],
        "member 2 left group G: its session there is erased"
    );
    let row = store
        .members(vec![2])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(row.groups, vec![G + 1]);
    assert_eq!(
        row.key_source,
        KeySource::Imported(sealed),
        "the imported key stays"
    );
    assert_eq!(row.kv, 2, "the key version stays when none is named");
    h.stop().await;
}

on_both_stores!(
    re_adding_a_member_with_fewer_groups_rekeys_those_it_left,
    "readd_fewer_groups"
);

/// A refused uplink's judgement rests on the member's slot as read: if
/// another process rewrites that slot before the write (here the store is
/// given its sealed state back and the use beside it again, which moves
/// the version as any rewrite does and keeps the window), the write fails
/// (busy, retried) rather
/// than file a refusal judged on a stale slot; the retry is judged afresh.
/// A use stored meanwhile (another process accepted the member's next
/// reading) fails nothing: it only marks a session used and moves its
/// window forward, so no entry refused on the slot as read would be
/// accepted on the slot as it is now.
async fn a_refusal_judged_on_a_slot_changed_meanwhile_is_retried(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::{BatchWrite, SessionRow, Store, UseWrite};
    let h = Harness::start(store_url).await;
    let mut member = member_in_session(&h).await;
    let a = udc::build(&h.config).await.unwrap();
    let b = udc::build(&h.config).await.unwrap();
    let forged = direct_uplink(&forged(&reading(&mut member, b"1 Wh")));
    let honest = direct_uplink(&reading(&mut member, b"2 Wh"));
    let again = honest.clone();
    a.before_next_batch_write(async move {
        b.handle_direct(honest).await.unwrap();
    });
    assert!(matches!(
        a.handle_direct(forged.clone()).await,
        Err(ServiceError::BadRequest(_))
    ));
    // Now a rewrite of the slot between a's read and its write.
    let url = h.config.store_url.expose().to_owned();
    a.before_next_batch_write(async move {
        let store = dapgw::udc::store::open(&url).await.unwrap();
        let s = store.sessions(vec![(1, G)]).await.unwrap()[0]
            .clone()
            .unwrap();
        store
            .apply_batch(BatchWrite {
                sessions: vec![SessionRow {
                    member: 1,
                    group: G,
                    sid: s.sid,
                    state: s.state.clone().unwrap(),
                    round: s.round,
                    authenticated_at_ms: None,
                    version: s.version,
                    rounds: s.rounds,
                    accepted_in: None,
                    use_read: s.used,
                }],
                ..BatchWrite::default()
            })
            .await
            .unwrap();
        store
            .apply_batch(BatchWrite {
                slot_uses: vec![UseWrite {
                    member: 1,
                    group: G,
                    base: s.version + 1,
                    read: None,
                    new: s.used.unwrap(),
                }],
                ..BatchWrite::default()
            })
            .await
            .unwrap();
    });
    let err = a.handle_direct(forged.clone()).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    // The retry is judged on the slot as it is now, and refused; so is
    // the honest reading again (its window kept).
    assert!(matches!(
        a.handle_direct(forged).await,
        Err(ServiceError::BadRequest(_))
    ));
    assert!(matches!(
        a.handle_direct(again).await,
        Err(ServiceError::BadRequest(_))
    ));
    drop(a);
    h.stop().await;
}

on_both_stores!(
    a_refusal_judged_on_a_slot_changed_meanwhile_is_retried,
    "refusal_stale_slot"
);

/// Opens a round of `mode` in group `G`; gw-1's records from `cursor` on
/// until its challenge: (round, challenge, cursor after it).
async fn round_of(h: &Harness, mode: &str, cursor: u64) -> (u64, Bytes, u64) {
    let round = h
        .op(
            Method::POST,
            "/v1/admin/rounds",
            serde_json::json!({"group": G, "mode": mode, "purpose": "auth"}),
        )
        .await["round"]
        .as_u64()
        .unwrap();
    let recs = h.downlink(cursor).await;
    (round, last_group_record(&recs), recs.last().unwrap().0)
}

/// Hands `member` its records of `recs` in downlink order, as its gateway
/// does, refusals included; returns the types it accepted.
fn deliver(member: &mut Member, recs: &[(u64, u8, u32, u64, Bytes)]) -> Vec<MessageType> {
    let mut accepted = Vec::new();
    let me = member.id().0;
    for (_, _, _, _, msg) in recs.iter().filter(|r| r.3 == me) {
        let ty = msg.get(1).copied().and_then(MessageType::from_code);
        let ok = match ty {
            Some(MessageType::Confirm) => member.handle_confirm(msg).map(|o| o.persisted()).is_ok(),
            Some(MessageType::Rekey) => member.handle_rekey(msg).map(|o| o.persisted()).is_ok(),
            Some(MessageType::KeyUpdate) => {
                member.handle_key_update(msg).map(|o| o.persisted()).is_ok()
            }
            other => panic!("unexpected record {other:?}"),
        };
        if ok {
            accepted.extend(ty);
        }
    }
    accepted
}

/// A rekey or key update issued after a verdict, while the gateway has not
/// yet handed that verdict's confirms to the members, may reach a member
/// before its confirm, and a member refuses either in a session it has not
/// opened. The UDC queues the pending session's confirm again, byte for
/// byte, right before them (docs/protocol.md, "Confirm before rekey"): the
/// member ends in the new epoch and under the new key version; the
/// verdict's own copy, delivered late, is refused as stale. Also when V
/// has seen an older session in use and no longer keeps the member's.
async fn a_confirm_goes_ahead_of_a_later_rekey(store_url: Option<String>) {
    let h = Harness::start(store_url).await;
    let (mut members, r, v) = h.accepted_round(3).await;
    let held = confirms(&v);
    let epoch = Confirm::decode(&held[0].1).unwrap().epoch;
    // Member 3 revoked before the gateway delivered anything: 1 and 2 are
    // rekeyed, each right after its confirm.
    h.op(
        Method::POST,
        "/v1/admin/members/3/revoke",
        serde_json::Value::Null,
    )
    .await;
    let recs = h.downlink(r.cursor).await;
    let mut cursor = recs.last().unwrap().0;
    for id in [1u64, 2] {
        let mine: Vec<&Bytes> = recs.iter().filter(|r| r.3 == id).map(|r| &r.4).collect();
        assert_eq!(mine.len(), 2, "member {id}: {recs:?}");
        assert_eq!(*mine[0], held[(id - 1) as usize].1, "the verdict's confirm");
        assert_eq!(mine[1][1], MessageType::Rekey.code());
    }
    assert!(
        recs.iter().all(|r| r.3 != 3),
        "nothing for the revoked member"
    );
    for m in &mut members[..2] {
        assert_eq!(
            deliver(m, &recs),
            [MessageType::Confirm, MessageType::Rekey]
        );
        assert_eq!(m.session(GroupId(G)).unwrap().1, epoch + 1);
        let (_, late) = &held[(m.id().0 - 1) as usize];
        assert!(m.handle_confirm(late).is_err(), "opened already");
        assert_eq!(m.session(GroupId(G)).unwrap().1, epoch + 1);
    }

    // A psk-ecdhe round member 1 answers; its key is rotated before the
    // gateway delivers the verdict's confirm. The update is sealed in the
    // new session only (the older one is psk): the confirm goes first.
    let (round, challenge, c) = round_of(&h, "psk-ecdhe", cursor).await;
    cursor = c;
    let mut b = batch("gw-1", 2, round, answer(&mut members[..1], &challenge, b""));
    if let BatchBody::Responses { mode, .. } = &mut b.body {
        *mode = Mode::PskEcdhe;
    }
    let v = h.post_batch(&b).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    let issued = h
        .op(
            Method::POST,
            "/v1/admin/members/1/key-update",
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(issued["kv"], 2, "{issued}");
    let recs = h.downlink(cursor).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0].4, confirms(&v)[0].1, "the verdict's confirm");
    assert_eq!(
        deliver(&mut members[0], &recs),
        [MessageType::Confirm, MessageType::KeyUpdate]
    );
    assert_eq!(members[0].kv(), 2);
    cursor = recs.last().unwrap().0;

    // A session V has seen in use does not mean the member still holds it:
    // member 2 sends a reading under its first session (current at V),
    // opens round 3's confirm but never uses it, and answers rounds 4 to 6
    // whose confirms are still on their way. V keeps current, pending 6 and
    // unconfirmed 5 and 4; session 3, the member's, is gone. A revocation
    // now: the pending confirm goes first again, and the member follows.
    let up = reading(&mut members[1], b"reading");
    let v = h.post_batch(&uplink_batch(3, &[up.to_bytes()])).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    let mut last = Vec::new();
    for (i, batch_id) in (4..=7).enumerate() {
        let (round, challenge, c) = round_of(&h, "psk", cursor).await;
        cursor = c;
        let v = h
            .post_batch(&batch(
                "gw-1",
                batch_id,
                round,
                answer(&mut members[1..2], &challenge, b""),
            ))
            .await;
        assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
        last = confirms(&v);
        if i == 0 {
            members[1].handle_confirm(&last[0].1).unwrap().persisted();
        }
    }
    let epoch = members[1].session(GroupId(G)).unwrap().1;
    h.op(
        Method::POST,
        "/v1/admin/members/1/revoke",
        serde_json::Value::Null,
    )
    .await;
    let recs = h.downlink(cursor).await;
    assert_eq!(recs[0].4, last[0].1, "round 6's confirm first: {recs:?}");
    assert_eq!(
        deliver(&mut members[1], &recs),
        [MessageType::Confirm, MessageType::Rekey]
    );
    assert_eq!(members[1].session(GroupId(G)).unwrap().1, epoch + 1);
    h.stop().await;
}

on_both_stores!(a_confirm_goes_ahead_of_a_later_rekey, "confirm_ahead");

/// Root-key rotation through the operator API (docs/protocol.md, "Key
/// rotation"): refused without a psk-ecdhe session; issued in one, stored
/// and queued as a KeyUpdate the member opens; the old version accepted
/// until the member answers under the new one, refused after.
async fn key_update_through_the_operator_api(store_url: Option<String>) {
    let h = Harness::start(store_url).await;
    // `body`: none (`Null`) or the optional `{"expect_kv": N}`.
    let key_update_with = |id: u64, body: serde_json::Value| {
        let h = &h;
        async move {
            h.admin(
                Some(TOKEN),
                Method::POST,
                &format!("/v1/admin/members/{id}/key-update"),
                body,
            )
            .await
        }
    };
    let key_update = |id: u64| key_update_with(id, serde_json::Value::Null);
    let expecting = |kv: u64| key_update_with(1, serde_json::json!({ "expect_kv": kv }));
    let listed = |v: serde_json::Value, id: u64| {
        let m = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()
            .clone();
        (m["kv"].as_u64().unwrap(), m["min_kv"].as_u64().unwrap())
    };
    let (s, v) = key_update(99).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    // Registered, no session yet.
    let (mut members, cursor) = h.authenticated(2).await;
    // A psk session only: whoever holds K_i(1) could read the new key.
    let (s, v) = key_update(1).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("needs_psk_ecdhe"))
    );
    // A psk-ecdhe round, answered by both; member 1 opens its confirm.
    let (round, challenge, cursor) = round_of(&h, "psk-ecdhe", cursor).await;
    let mut b = batch("gw-1", 2, round, answer(&mut members, &challenge, b""));
    if let BatchBody::Responses { mode, .. } = &mut b.body {
        *mode = Mode::PskEcdhe;
    }
    let v = h.post_batch(&b).await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted; 2]);
    let mut cursor = cursor;
    for (id, msg) in confirms(&v) {
        members[(id - 1) as usize]
            .handle_confirm(&msg)
            .unwrap()
            .persisted();
    }
    // With the version the operator saw: a stale one issues nothing.
    let (s, v) = expecting(7).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("kv_changed"))
    );
    assert!(v["reason"].as_str().unwrap().contains("is 1"), "{v}");
    let (s, v) = key_update_with(1, serde_json::json!({ "expect": 1 })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown field: {v}");
    let (s, v) = expecting(1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Repeated (its answer lost, say): refused, nothing issued twice.
    let (s, v2) = expecting(1).await;
    assert_eq!(
        (s, v2["error"].as_str()),
        (StatusCode::CONFLICT, Some("kv_changed"))
    );
    assert!(v2["reason"].as_str().unwrap().contains("is 2"), "{v2}");
    assert_eq!(
        (&v["kv"], &v["min_kv"], &v["groups"]),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!([G])
        )
    );
    let v = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await;
    assert_eq!(listed(v, 1), (2, 1));
    // The KeyUpdate reaches member 1 only, and it opens it. The confirm
    // of the session it is sealed in goes first (the UDC has not seen that
    // session in use); member 1 opened it from the verdict already.
    let recs = h.downlink(cursor).await;
    cursor = recs.last().unwrap().0;
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs.iter().all(|r| (r.1, r.3) == (2, 1)), "{recs:?}");
    assert_eq!(deliver(&mut members[0], &recs), [MessageType::KeyUpdate]);
    assert_eq!(members[0].kv(), 2);
    // Until member 1 answers under version 2, version 1 is still accepted
    // (the update may have been lost on the way).
    let (round, challenge, c) = round_of(&h, "psk", cursor).await;
    let mut old = vec![h.real_member(1)];
    let v = h
        .post_batch(&batch("gw-1", 3, round, answer(&mut old, &challenge, b"")))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    cursor = c;
    // Member 1 answers under version 2: from then on only 2 is accepted.
    let (round, challenge, c) = round_of(&h, "psk", cursor).await;
    let v = h
        .post_batch(&batch(
            "gw-1",
            4,
            round,
            answer(&mut members[..1], &challenge, b""),
        ))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::Accepted]);
    cursor = c;
    let v = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await;
    assert_eq!(listed(v, 1), (2, 2));
    let (round, challenge, _) = round_of(&h, "psk", cursor).await;
    let mut old = vec![h.real_member(1)];
    let v = h
        .post_batch(&batch("gw-1", 5, round, answer(&mut old, &challenge, b"")))
        .await;
    assert_eq!(outcomes(&v), vec![Outcome::StaleKeyVersion]);
    // Member 1's newest session is psk now: an update sealed in its older
    // psk-ecdhe one would be refused by the member.
    let (s, v) = key_update(1).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("needs_psk_ecdhe"))
    );
    // Member 2's newest is still the psk-ecdhe one. Re-added as it is, it
    // keeps both versions; revoked, it gets none; re-added after that, the
    // stored version alone (it may have been revoked for a leaked key).
    let (s, v) = key_update(2).await;
    assert_eq!(
        (s, &v["kv"], &v["min_kv"]),
        (StatusCode::OK, &serde_json::json!(2), &serde_json::json!(1))
    );
    let add2 = serde_json::json!({"id": 2, "groups": [G]});
    h.op(Method::POST, "/v1/admin/members", add2.clone()).await;
    let v = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await;
    assert_eq!(listed(v, 2), (2, 1));
    h.op(
        Method::POST,
        "/v1/admin/members/2/revoke",
        serde_json::Value::Null,
    )
    .await;
    let (s, v) = key_update(2).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::CONFLICT, Some("revoked"))
    );
    h.op(Method::POST, "/v1/admin/members", add2).await;
    let v = h
        .op(Method::GET, "/v1/admin/members", serde_json::Value::Null)
        .await;
    assert_eq!(listed(v, 2), (2, 2));
    // Issued for members 1 and 2; confirmed by member 1's answer only.
    let text = h.metrics().await;
    let updates = |event: &str| metric(&text, "dapgw_udc_key_updates_total", &[("event", event)]);
    assert_eq!((updates("issued"), updates("confirmed")), (2.0, 1.0));
    h.stop().await;
}

on_both_stores!(key_update_through_the_operator_api, "key_update");

/// Two `Udc`s on one store: `a` re-adds member 1 (reading key version 1),
/// and before `a` writes, `b` gives member 1 a new credential (version 5).
/// `a`'s whole-row write must fail (busy) rather than put version 1 back;
/// its retry keeps version 5. (Here the group row's compare-and-set
/// already fails `a`, as does the slot's for a key update, which writes
/// the member's slot; the write's own check of the key versions it read,
/// `KeyVersionChange::Expected`, is tested on the stores in
/// tests/store.rs.)
async fn re_add_racing_a_key_version_change(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let (h, a, b, _, _) = two_udcs_in_a_round(store_url, 2).await;
    let other = b.clone();
    a.before_next_rekey_write(async move {
        other.add_member(1, vec![G], Some(5)).await.unwrap();
    });
    let err = a.add_member(1, vec![G], None).await.unwrap_err();
    assert!(matches!(err, ServiceError::Busy(_)), "{err:?}");
    let versions = |m: dapgw::udc::store::MemberRow| (m.kv, m.min_kv);
    let m = a
        .store()
        .members(vec![1])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(versions(m), (5, 5));
    a.add_member(1, vec![G], None).await.unwrap();
    let m = a
        .store()
        .members(vec![1])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(versions(m), (5, 5));
    h.stop().await;
}

on_both_stores!(re_add_racing_a_key_version_change, "re_add_race");

/// The Direct submission of member `id`'s answer (`entry`, `tag`) to round
/// `round` of `group`.
fn direct_response(entry: ResponseEntry, group: u32, round: u64, tag: [u8; 16]) -> Bytes {
    let r = Response::from_entry(entry, GroupId(group), round, tag);
    Direct::new(&DirectInner::Response(r), aggregate([&tag])).to_bytes()
}

/// `/v1/direct` takes submissions without a certificate, so a refused one
/// leaves nothing behind: no group row for a group never used, no outcome
/// for the member it names (who stays missing from the round's report).
/// And two processes judging one direct response at once both answer the
/// Verdict, byte for byte (the one whose write lost read back the other's
/// record, which is the bare Confirm, and answered that).
async fn refused_direct_submissions_leave_nothing(store_url: Option<String>) {
    use dapgw::udc::service::ServiceError;
    use dapgw::udc::store::Store;
    let (h, a, b, round, challenge) = two_udcs_in_a_round(store_url, 2).await;
    let store = a.store();
    let (entry, tag) = respond(&h, 1, &challenge);
    let stray = direct_response(entry.clone(), 0xdead_beef, round, tag);
    let err = a.handle_direct(stray).await.unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    assert!(store.group(0xdead_beef).await.unwrap().is_none());
    let mut bad = tag;
    bad[0] ^= 1;
    let forged = direct_response(entry, G, round, bad);
    let err = a.handle_direct(forged).await.unwrap_err();
    assert!(matches!(err, ServiceError::BadRequest(_)), "{err:?}");
    let rep = store.round_report(G, round).await.unwrap().unwrap();
    assert_eq!((rep.accepted, rep.unverified, rep.missing), (0, 0, 2));
    assert!(rep.rejected.is_empty(), "{:?}", rep.rejected);
    assert!(
        store
            .round_outcomes(G, round, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let (entry, tag) = respond(&h, 2, &challenge);
    let honest = direct_response(entry, G, round, tag);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (b2, first) = (b.clone(), honest.clone());
    a.before_next_batch_write(async move {
        let _ = tx.send(b2.handle_direct(first).await.unwrap());
    });
    let second = a.handle_direct(honest.clone()).await.unwrap();
    let first = rx.await.unwrap();
    assert_eq!(
        outcomes(&Verdict::decode(&first).unwrap()),
        vec![Outcome::Accepted]
    );
    assert_eq!(second, first, "the same Verdict from both processes");
    assert_eq!(
        a.handle_direct(honest).await.unwrap(),
        first,
        "and on a retry"
    );
    h.stop().await;
}

on_both_stores!(refused_direct_submissions_leave_nothing, "direct_refused");

/// A batch with a structural fault (here entries out of id order) is
/// refused before anything is read or created for it: a new group it
/// names gets no row.
#[tokio::test]
async fn a_malformed_batch_is_refused_before_any_read() {
    use dapgw::udc::store::Store;
    let (h, a, _b, round, challenge) = two_udcs_in_a_round(None, 2).await;
    let mut b = batch(
        "gw-1",
        7,
        round,
        vec![respond(&h, 2, &challenge), respond(&h, 1, &challenge)],
    );
    b.group = GroupId(0xfeed);
    let (s, body) = h
        .call(Some("gw-1"), Method::POST, "/v1/batches", b.to_bytes())
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?}");
    assert!(a.store().group(0xfeed).await.unwrap().is_none());
    h.stop().await;
}

/// A round another process closed is dropped from this process's memory
/// at its next tick (with the round's e_V in psk-ecdhe, which the close
/// erases), not kept for as long as the process runs.
async fn a_round_closed_elsewhere_leaves_this_processs_memory(store_url: Option<String>) {
    let (h, a, b, round, _) = two_udcs_in_a_round(store_url, 1).await;
    assert_eq!(a.cached_rounds().await, vec![(G, round)]);
    assert!(b.close_round(G, round).await.unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(a.close_due_rounds(now).await.unwrap(), 0);
    assert!(a.cached_rounds().await.is_empty());
    h.stop().await;
}

on_both_stores!(
    a_round_closed_elsewhere_leaves_this_processs_memory,
    "round_closed_elsewhere"
);

/// Re-adding an active member under a key version it did not hold alone
/// replaces its key: its sessions (derived from the old key, so whoever
/// has that key has them) are erased and it gets no rekey, while the
/// others are rekeyed; naming the version it already holds alone keeps
/// its session.
async fn re_adding_a_member_under_a_new_key_version_ends_its_sessions(store_url: Option<String>) {
    use dapgw::udc::store::Store;
    let (h, a, _b) = accepted_in_a_round(store_url, 3).await;
    let store = a.store();
    a.add_member(1, vec![G], Some(1)).await.unwrap();
    let cursor = h.downlink(0).await.last().unwrap().0;
    a.add_member(2, vec![G], Some(2)).await.unwrap();
    let slots = store.sessions(vec![(1, G), (2, G), (3, G)]).await.unwrap();
    assert_eq!(
        slots.iter().map(has_session).collect::<Vec<_>>(),
        vec![true, false, true],
        "member 2's sessions came from its old key"
    );
    let rekeyed = rekeyed_members(&h.downlink(cursor).await);
    assert!(!rekeyed.contains(&2), "{rekeyed:?}");
    assert!(rekeyed.contains(&1) && rekeyed.contains(&3), "{rekeyed:?}");
    let row = store
        .members(vec![2])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!((row.kv, row.min_kv), (2, 2));
    h.stop().await;
}

on_both_stores!(
    re_adding_a_member_under_a_new_key_version_ends_its_sessions,
    "readd_new_kv"
);

/// An HTTP/2 connection to the UDC as gateway `gw` (or without a
/// certificate), from local address `from`.
async fn h2_client(h: &Harness, gw: Option<&str>, from: [u8; 4]) -> h2::client::SendRequest<Bytes> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((from, 0))).unwrap();
    let tcp = sock.connect(h.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(h.tls(gw));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Starts `n` POSTs to `path` on `client`, each sending `size` bytes of
/// body and not ending it; returns the body senders and the answers to
/// come.
async fn unfinished_bodies(
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
    n: usize,
    size: usize,
) -> (
    Vec<h2::SendStream<Bytes>>,
    tokio::task::JoinSet<(StatusCode, Vec<u8>)>,
) {
    let mut answers = tokio::task::JoinSet::new();
    let mut bodies = Vec::new();
    for _ in 0..n {
        let mut client = client.clone().ready().await.unwrap();
        let req = Request::post(format!("https://localhost{path}"))
            .header("content-type", "application/vnd.dapgw")
            .body(())
            .unwrap();
        let (answer, mut body) = client.send_request(req, false).unwrap();
        body.send_data(Bytes::from(vec![0u8; size]), false).unwrap();
        bodies.push(body);
        answers.spawn(async move {
            let resp = answer.await.unwrap();
            let status = resp.status();
            let mut stream = resp.into_body();
            let mut text = Vec::new();
            while let Some(chunk) = stream.data().await {
                let chunk = chunk.unwrap();
                let _ = stream.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk);
            }
            (status, text)
        });
    }
    (bodies, answers)
}

/// The first answer of `answers` (none is complete: a refusal), bounded so
/// that without a budget the test fails instead of hanging.
async fn first_refusal(answers: &mut tokio::task::JoinSet<(StatusCode, Vec<u8>)>) {
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), answers.join_next());
    let (status, text) = first
        .await
        .expect("an answer while the bodies are held")
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let e: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(e["error"], "busy", "{e}");
}

/// Ends the bodies; every answer is then 400 (not a batch) or the 503s of
/// those already refused.
async fn end_bodies(
    bodies: Vec<h2::SendStream<Bytes>>,
    mut answers: tokio::task::JoinSet<(StatusCode, Vec<u8>)>,
) {
    for mut body in bodies {
        let _ = body.send_data(Bytes::new(), true);
    }
    while let Some(answer) = answers.join_next().await {
        let (status, _) = answer.unwrap();
        assert!(
            [StatusCode::BAD_REQUEST, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{status}"
        );
    }
}

/// Request bodies held at once are bounded: 8 of the largest bodies (or of
/// 1 MiB, the subscriptions' cap, if larger) in all, 5 of them per gateway
/// certificate, and for `/v1/direct` a budget of its own with 256 KiB per
/// source. So one gateway with many streams whose bodies it never ends
/// cannot make the UDC buffer without bound, nor take the whole budget
/// from the other gateways; one direct source cannot shut the direct path
/// for the others. Beyond a budget a request gets 503 `busy`; once the
/// held bodies are answered their bytes are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_held_at_once_are_bounded() {
    let h = Harness::start_tuned(None, |c| {
        c.max_body_bytes = dapgw::config::ByteSize(1 << 20);
        // Longer than the tests' own bound on the first answer.
        c.body_timeout_ms = 300_000;
    })
    .await;
    // 8 MiB in all, 5 MiB for gw-1: five unfinished bodies of 1000 KiB fit
    // in its share; nine would fill the whole budget.
    let gw1 = h2_client(&h, Some("gw-1"), [127, 0, 0, 1]).await;
    let (bodies, mut answers) = unfinished_bodies(&gw1, "/v1/batches", 9, 1000 << 10).await;
    first_refusal(&mut answers).await;
    // gw-2 is served meanwhile: its batch is read whole and judged. (That
    // gw-1 holds at most its share is `a_key_takes_at_most_its_share_of_the
    // _body_budget` in src/udc/server.rs: here a refused stream frees what
    // it held, so the total would not stay full without the share either.)
    let (s, body) = h
        .call(
            Some("gw-2"),
            Method::POST,
            "/v1/batches",
            vec![0u8; 60 << 10],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?}");
    end_bodies(bodies, answers).await;
    let (s, body) = h
        .call(
            Some("gw-1"),
            Method::POST,
            "/v1/batches",
            vec![0u8; 60 << 10],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body:?}");

    // Direct: 127.0.0.2 holds four bodies and is refused a fifth, while
    // 127.0.0.3 is still read.
    let direct = h2_client(&h, None, [127, 0, 0, 2]).await;
    let (bodies, mut answers) = unfinished_bodies(&direct, "/v1/direct", 5, 60 << 10).await;
    first_refusal(&mut answers).await;
    let other = h2_client(&h, None, [127, 0, 0, 3]).await;
    let (done, mut answer) = unfinished_bodies(&other, "/v1/direct", 1, 60 << 10).await;
    for mut body in done {
        body.send_data(Bytes::new(), true).unwrap();
    }
    let (status, text) = answer.join_next().await.unwrap().unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text:?}");
    end_bodies(bodies, answers).await;
    h.stop().await;
}
