//! The gateway's member-facing API over real TLS on loopback, with a fake
//! UDC written here (tests/support): attach, uplink, downlink, bad input at
//! every endpoint, 409s, idempotent re-sends, a full spool, downlink cursors
//! across reconnects, tag requests, the drain; and the collector's batch
//! emission on tokio's paused clock.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dapgw::config::ByteSize;
use dapgw::gateway::Attached;
use dapgw::gateway::collector::{
    Collector, CollectorConfig, CollectorEvent, MIN_ROUND_WINDOW, MemberMessage, NOT_AFTER_MARGIN,
    round_window,
};
use dapgw::gateway::downlink::{Record, parse_records};
use dapgw::gateway::spool::{EntryId, NewEntry, Spool, StreamKey};
use dapgw::protocol::aggregator::{AggregatorConfig, BatchTrigger, Collected};
use dapgw::protocol::wire::{BatchBody, Confirm, GatewayId, GroupId, MemberId, Message, Mode};
use dapgw::telemetry::GatewayMetrics;
use hyper::{Method, StatusCode};
use support::*;
use tokio::sync::Notify;

const RECORD_CAP: usize = 1 << 20;

async fn setup() -> (Pki, FakeUdc, tempfile::TempDir, Gateway) {
    let pki = pki(&["gw-1", "42"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(gateway_config(&pki, udc.addr, dir.path())).await;
    (pki, udc, dir, gw)
}

/// Polls until at least one record arrives (or panics after 20 s).
async fn next_records(c: &mut Client, member: u64, groups: &[u32], after: u64) -> Vec<Record> {
    for _ in 0..40 {
        let r = c.poll(member, groups, after, 500).await;
        match r.status {
            StatusCode::OK => {
                assert_eq!(r.headers["content-type"], "application/vnd.dapgw.records");
                return parse_records(&r.body, RECORD_CAP).unwrap();
            }
            StatusCode::NO_CONTENT => assert!(r.body.is_empty()),
            s => panic!("downlink answered {s}"),
        }
    }
    panic!("no downlink records arrived");
}

/// A round end to end over HTTP/2 and HTTP/1.1: attach, the challenge
/// relayed, responses accepted (202 after the spool), one batch for the round
/// once everyone answered, confirms back as member records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_challenge_response_confirm() {
    let (pki, udc, _dir, gw) = setup().await;
    let mut m1 = Client::connect(gw.members, &pki, true).await;
    let mut m2 = Client::connect(gw.members, &pki, false).await;
    let a1 = m1.attach(1, &[7]).await;
    assert_eq!(a1.status, StatusCode::OK);
    let start = a1.json()["cursor"].as_u64().unwrap();
    assert_eq!(m2.attach(2, &[7]).await.status, StatusCode::OK);
    udc.wait_until("the subscription", |s| {
        s.subscriptions.lock().unwrap().last() == Some(&vec![7])
    })
    .await;

    let ch = challenge(7, 1).to_bytes();
    udc.push(1, 7, 0, &ch);
    let recs = next_records(&mut m1, 1, &[7], start).await;
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].audience, recs[0].group, recs[0].member), (1, 7, 0));
    assert_eq!(recs[0].message, ch);
    let after = recs[0].cursor;

    for (c, id) in [(&mut m1, 1u64), (&mut m2, 2)] {
        let r = c.post(response(id, 7, 1, b"reading").to_bytes()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        assert!(r.json()["entry"].as_u64().is_some());
    }
    udc.wait_until("the round's batch", |s| {
        s.applied.lock().unwrap().len() == 2
    })
    .await;
    let batches = udc.state.batches.lock().unwrap().clone();
    assert_eq!(batches.len(), 1, "both responses in one batch");
    assert_eq!(batches[0].len(), 2);

    for (c, id) in [(&mut m1, 1u64), (&mut m2, 2)] {
        let recs = next_records(c, id, &[7], after).await;
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].audience, recs[0].member), (2, id));
        let Message::Confirm(conf) = Message::decode(&recs[0].message).unwrap() else {
            panic!("not a confirm")
        };
        assert_eq!((conf.id, conf.round), (MemberId(id), 1));
        // Nothing else for this member: the other's confirm is not visible.
        assert_eq!(
            c.poll(id, &[7], recs[0].cursor, 50).await.status,
            StatusCode::NO_CONTENT
        );
    }
    // The confirms are pollable once the spool writer has committed the
    // verdict; the batch task counts the exchange and updates the spool
    // gauges after that, so wait for those.
    wait_metric(
        &gw,
        "dapgw_batches_total{kind=\"response\",outcome=\"ok\"}",
        1.0,
    )
    .await;
    assert_eq!(
        gw.metric("dapgw_uplink_entries_total{kind=\"response\"}")
            .await,
        2.0
    );
    assert_eq!(gw.metric("dapgw_upstream_up").await, 1.0);
    // Every attach and response was timed, and no long poll was.
    for endpoint in ["attach", "response"] {
        let timed = gw
            .metric(&format!(
                "dapgw_member_request_duration_seconds_count{{endpoint=\"{endpoint}\"}}"
            ))
            .await;
        let counted = gw
            .metric(&format!(
                "dapgw_member_requests_total{{endpoint=\"{endpoint}\",outcome=\"ok\"}}"
            ))
            .await;
        assert_eq!((timed, counted), (2.0, 2.0), "{endpoint}");
    }
    // ... and nothing else was timed: every request but the long polls.
    let (_, page) = gw.admin_get("/metrics").await;
    let page = dapgw::admin::MetricsPage::parse(&page);
    let requests = page.sum("dapgw_member_requests_total", &[]);
    let polls = page.sum("dapgw_member_requests_total", &[("endpoint", "poll")]);
    assert!(polls > 0.0, "the members long-polled");
    assert_eq!(
        page.sum("dapgw_member_request_duration_seconds_count", &[]),
        requests - polls
    );
    // The spool is empty again apart from the downlink.
    wait_metric(&gw, "dapgw_spool_entries", 0.0).await;
    gw.stop().await;
}

fn assert_refused(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "application/json");
    let j = r.json();
    assert_eq!(j["error"], code, "{j}");
    assert!(j["reason"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
}

/// Every endpoint refuses bad input with the right status and a JSON reason,
/// counts it, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_at_every_endpoint() {
    let (pki, _udc, _dir, gw) = setup().await;
    for h2 in [true, false] {
        let mut c = Client::connect(gw.members, &pki, h2).await;
        let json = Some("application/json");
        // attach
        for body in [
            "",
            "not json",
            "{\"member\": 1}",
            "{\"member\": -1, \"groups\": [1]}",
            "{\"member\": 1, \"groups\": [1], \"extra\": 2}",
            "{\"member\": 1, \"groups\": [4294967296]}",
        ] {
            let r = c.send(Method::POST, "/v1/attach", json, body).await;
            assert_refused(&r, StatusCode::BAD_REQUEST, "bad_json");
        }
        let r = c
            .send(
                Method::POST,
                "/v1/attach",
                json,
                "{\"member\": 1, \"groups\": []}",
            )
            .await;
        assert_refused(&r, StatusCode::BAD_REQUEST, "groups");
        let many: Vec<u32> = (0..300).collect();
        let r = c.attach(1, &many).await;
        assert_refused(&r, StatusCode::BAD_REQUEST, "groups");
        let r = c.send(Method::GET, "/v1/attach", None, "").await;
        assert_refused(&r, StatusCode::METHOD_NOT_ALLOWED, "method");
        assert_eq!(r.headers["allow"], "POST");
        let r = c
            .send(Method::POST, "/v1/attach", Some("text/plain"), "{}")
            .await;
        assert_refused(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "content_type");

        // uplink
        let good = uplink(5, 1, 1, b"x").to_bytes();
        for (body, code) in [
            (Bytes::new(), "decode"),
            (Bytes::from_static(b"\x01"), "decode"),
            (Bytes::from_static(b"\x02\x03"), "decode"),
            (Bytes::from_static(b"\x01\x7f"), "decode"),
            (good.slice(..good.len() - 1), "decode"),
            (Bytes::from([&good[..], b"x"].concat()), "decode"),
            (challenge(1, 1).to_bytes(), "wrong_type"),
            (
                Confirm {
                    group: GroupId(1),
                    round: 1,
                    epoch: 1,
                    id: MemberId(5),
                    sid: Default::default(),
                    w: [0; 32],
                }
                .to_bytes(),
                "wrong_type",
            ),
            (uplink(5, 1, 1, &[0u8; 1025]).to_bytes(), "too_long"),
        ] {
            let r = c.post(body).await;
            assert_refused(&r, StatusCode::BAD_REQUEST, code);
        }
        let r = c.post(Bytes::from(vec![1u8; 17 * 1024])).await;
        assert_refused(&r, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        let r = c.send(Method::GET, "/v1/uplink", None, "").await;
        assert_refused(&r, StatusCode::METHOD_NOT_ALLOWED, "method");
        let r = c
            .send(Method::POST, "/v1/uplink", Some("application/json"), good)
            .await;
        assert_refused(&r, StatusCode::UNSUPPORTED_MEDIA_TYPE, "content_type");

        // downlink
        for q in [
            "",
            "?member=x",
            "?member=1&member=1",
            "?member=1&groups=a",
            "?member=1&after=-1",
            "?member=1&bogus=1",
            "?member=1&wait_ms=soon",
        ] {
            let r = c
                .send(Method::GET, &format!("/v1/downlink{q}"), None, "")
                .await;
            assert_refused(&r, StatusCode::BAD_REQUEST, "query");
        }
        let r = c
            .send(Method::POST, "/v1/downlink?member=1", None, "")
            .await;
        assert_refused(&r, StatusCode::METHOD_NOT_ALLOWED, "method");

        // elsewhere
        let r = c.send(Method::GET, "/", None, "").await;
        assert_refused(&r, StatusCode::NOT_FOUND, "not_found");
        // The connection still works.
        assert_eq!(c.attach(1, &[1]).await.status, StatusCode::OK);
    }
    let malformed = gw
        .metric("dapgw_malformed_requests_total{endpoint=\"uplink\",reason=\"decode\"}")
        .await;
    assert_eq!(malformed, 12.0);
    assert_eq!(
        gw.metric("dapgw_malformed_requests_total{endpoint=\"uplink\",reason=\"too_large\"}")
            .await,
        4.0
    );
    assert_eq!(
        gw.metric("dapgw_member_requests_total{endpoint=\"poll\",outcome=\"malformed\"}")
            .await,
        16.0
    );
    // Nothing refused stays stored (a refused copy is discarded right
    // after the answer; the gauge follows within a housekeeping tick).
    wait_metric(&gw, "dapgw_spool_entries", 0.0).await;
    gw.stop().await;
}

/// Byte-identical re-sends are accepted again with the same entry; a
/// different message in the same slot is kept as an alternative (the gateway
/// cannot tell which one the member sealed; V judges each on its tag) up to
/// the cap, past which it is 409, and one per source (a source's second
/// different message is 409); a response for a round the gateway never
/// relayed is 409 and is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_idempotent_resends() {
    let (pki, udc, _dir, gw) = setup().await;
    udc.set_mode(UdcMode::Failing); // keep entries in the spool
    let mut c = Client::connect(gw.members, &pki, true).await;
    let first = c.post(uplink(9, 3, 1, b"one").to_bytes()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = c.post(uplink(9, 3, 1, b"one").to_bytes()).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(first.json()["entry"], again.json()["entry"]);
    // One source holds one message per slot: its second, different one is
    // refused, so it can never fill the slot's alternatives.
    let same_source = c.post(uplink(9, 3, 1, b"two").to_bytes()).await;
    assert_refused(&same_source, StatusCode::CONFLICT, "conflict");
    // Other sources (127.0.0.2..4) each get one alternative, up to the cap.
    let mut others = Vec::new();
    for (n, alt) in [&b"two"[..], b"three", b"four"].into_iter().enumerate() {
        let mut o = Client::connect_from(gw.members, &pki, true, [127, 0, 0, 2 + n as u8]).await;
        let held = o.post(uplink(9, 3, 1, alt).to_bytes()).await;
        assert_eq!(held.status, StatusCode::ACCEPTED);
        assert_ne!(held.json()["entry"], first.json()["entry"]);
        others.push(o);
    }
    let mut fifth = Client::connect_from(gw.members, &pki, true, [127, 0, 0, 9]).await;
    let other = fifth.post(uplink(9, 3, 1, b"five").to_bytes()).await;
    assert_refused(&other, StatusCode::CONFLICT, "conflict");

    let stray = c.post(response(9, 3, 77, b"").to_bytes()).await;
    assert_refused(&stray, StatusCode::CONFLICT, "round_not_open");

    // A round opened by a challenge: same response twice is fine, other
    // responses for the same (member, round) are held up to the cap.
    let ch = challenge(3, 5).to_bytes();
    udc.push(1, 3, 0, &ch);
    let mut m = Client::connect(gw.members, &pki, false).await;
    next_records(&mut m, 9, &[3], 0).await;
    let r1 = m.post(response(9, 3, 5, b"a").to_bytes()).await;
    assert_eq!(r1.status, StatusCode::ACCEPTED);
    let r2 = m.post(response(9, 3, 5, b"a").to_bytes()).await;
    assert_eq!(r2.status, StatusCode::ACCEPTED);
    assert_eq!(r1.json()["entry"], r2.json()["entry"]);
    let r_same = m.post(response(9, 3, 5, b"b").to_bytes()).await;
    assert_refused(&r_same, StatusCode::CONFLICT, "conflict");
    for (n, alt) in [&b"b"[..], b"c", b"d"].into_iter().enumerate() {
        let held = others[n].post(response(9, 3, 5, alt).to_bytes()).await;
        assert_eq!(held.status, StatusCode::ACCEPTED);
    }
    let r3 = fifth.post(response(9, 3, 5, b"e").to_bytes()).await;
    assert_refused(&r3, StatusCode::CONFLICT, "conflict");
    // Four uplinks and four responses, nothing else.
    assert_eq!(gw.metric("dapgw_spool_entries").await, 8.0);

    // Every held message reaches the UDC once: one per slot in the first
    // batches, the alternatives in follow-up batches (the fake UDC counts a
    // second message for a slot as a duplicate; a real one judges its tag).
    udc.set_mode(UdcMode::Up);
    udc.wait_until("every held entry", |s| {
        s.applied.lock().unwrap().len() == 2 && *s.duplicates.lock().unwrap() == 6
    })
    .await;
    // Resent after the batch completed: still 202, still applied once.
    let late = c.post(uplink(9, 3, 1, b"one").to_bytes()).await;
    assert_eq!(late.status, StatusCode::ACCEPTED);
    // A marker in the same stream, sent after it: batches go out in id
    // order, so once the marker is applied a stored copy of the late
    // re-send would have been applied too.
    let marker = c.post(uplink(10, 3, 1, b"marker").to_bytes()).await;
    assert_eq!(marker.status, StatusCode::ACCEPTED);
    udc.wait_until("the marker", |s| s.applied.lock().unwrap().len() == 3)
        .await;
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 6);
    let start = std::time::Instant::now();
    while gw.metric("dapgw_spool_entries").await != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the spool never emptied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.stop().await;
}

/// A backlog of many more sealed batches than the sender lists at once
/// (it lists only those it may put on the wire) drains whole once the UDC
/// is back: every entry once. (Uplinks of one stream within the replay
/// window commute, so they may arrive out of counter order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_longer_than_one_listing_drains_whole() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.batch_max_entries = 1; // a batch per uplink
    let gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    const N: u64 = 40;
    for ctr in 1..=N {
        let r = c.post(uplink(1, 1, ctr, b"x").to_bytes()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    wait_metric(&gw, "dapgw_spool_entries", N as f64).await;
    udc.set_mode(UdcMode::Up);
    udc.wait_until("the whole backlog", |s| {
        s.applied.lock().unwrap().len() == N as usize
    })
    .await;
    let mut ctrs: Vec<u64> = udc
        .state
        .batches
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| match &b.body {
            BatchBody::Uplinks { entries } => entries.iter().map(|e| e.ctr).collect(),
            BatchBody::Responses { .. } => Vec::new(),
        })
        .collect();
    ctrs.sort_unstable();
    assert_eq!(ctrs, (1..=N).collect::<Vec<_>>(), "each batch once");
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    wait_metric(&gw, "dapgw_spool_entries", 0.0).await;
    gw.stop().await;
}

/// With the UDC refusing batches the spool fills; members then get 503 with
/// Retry-After, and once the UDC is back every accepted entry arrives
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_gives_503_and_loses_nothing() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.spool_max_bytes = ByteSize(16 * 1024);
    // One client fills the whole spool: no share per source here
    // (tests/gateway_limits.rs tests the share).
    cfg.spool_max_bytes_per_source = Some(ByteSize(0));
    let gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    let mut accepted = HashSet::new();
    let mut refused = 0;
    for ctr in 1..=200u64 {
        let r = c.post(uplink(1, 1, ctr, &[ctr as u8; 64]).to_bytes()).await;
        match r.status {
            StatusCode::ACCEPTED => {
                accepted.insert((1u64, 1u32, ctr, 2u8));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_refused(&r, StatusCode::SERVICE_UNAVAILABLE, "spool_full");
                let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(secs >= 1);
                refused += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(refused > 0, "the spool never filled");
    assert!(!accepted.is_empty());
    assert_eq!(
        gw.metric("dapgw_spool_rejected_total").await,
        refused as f64
    );
    assert!(gw.metric("dapgw_spool_bytes").await <= 16.0 * 1024.0 * 2.0);

    udc.set_mode(UdcMode::Up);
    let want = accepted.clone();
    udc.wait_until("every accepted entry", move |s| {
        s.applied.lock().unwrap().is_superset(&want)
    })
    .await;
    assert_eq!(udc.applied(), accepted, "only accepted entries arrive");
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    assert!(
        gw.metric("dapgw_batches_total{kind=\"uplink\",outcome=\"error\"}")
            .await
            >= 1.0
    );
    gw.stop().await;
}

/// A downlink page the spool cannot hold as a whole (here larger than the
/// whole spool) is stored in part and the cursor moved to the last record
/// stored; refused whole, it was asked for again from the same cursor and
/// refused again, for good, and the members behind the gateway got nothing
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_page_larger_than_the_spool_is_stored_in_part() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    // 40 group messages of 48 KiB queued before the gateway starts: its
    // first pull gets them in one page of about 1.9 MiB.
    let messages: Vec<Bytes> = (1..=40u64)
        .map(|seq| {
            dapgw::protocol::wire::GroupMessage {
                group: GroupId(7),
                epoch: 1,
                seq,
                valid_through_round: u64::MAX,
                nonce: [0; 12],
                c: Bytes::from(vec![seq as u8; 48 * 1024]),
                key_id: 1,
                signature: [0; 64],
            }
            .to_bytes()
        })
        .collect();
    for m in &messages {
        udc.push(1, 7, 0, m);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.spool_max_bytes = ByteSize(1 << 20);
    let gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    assert_eq!(c.attach(42, &[7]).await.status, StatusCode::OK);
    let recs = next_records(&mut c, 42, &[7], 0).await;
    assert!(!recs.is_empty() && recs.len() < messages.len());
    for (r, m) in recs.iter().zip(&messages) {
        assert_eq!(&r.message, m);
    }
    gw.stop().await;
    // What the spool holds is a prefix, and the cursor is past none of
    // what it does not hold: the rest comes with a later pull, nothing
    // skipped. (The fake UDC's cursors are 1 to 40. The cursor is written
    // after the records it covers, so a stop in between leaves it one page
    // behind: those records are pulled again and stored once.)
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let stored = spool.downlink_items();
    let cursor = spool
        .get_meta("udc_downlink_cursor")
        .await
        .unwrap()
        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
    assert!((1..40).contains(&stored), "{stored} stored");
    assert!(cursor <= stored, "cursor {cursor} with {stored} stored");
    spool.close().await;
}

/// Members read their downlink with cursors across reconnects: every
/// record addressed to them exactly once, in order, nothing of others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_cursors_survive_reconnects() {
    let (pki, udc, _dir, gw) = setup().await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    assert_eq!(c.attach(42, &[1, 2]).await.status, StatusCode::OK);
    let mut expected = Vec::new();
    for i in 0..12u64 {
        let (aud, group, member) = match i % 4 {
            0 => (1u8, 1u32, 0u64),
            1 => (2, 1, 42),
            2 => (2, 1, 43), // someone else's
            _ => (1, 9, 0),  // a group 42 is not in
        };
        let msg = challenge(group, 100 + i).to_bytes();
        udc.push(aud, group, member, &msg);
        if member == 42 || (aud == 1 && group == 1) {
            expected.push(msg);
        }
    }
    let mut got = Vec::new();
    let mut after = 0;
    let mut h2 = false;
    while got.len() < expected.len() {
        // A fresh connection every time, alternating protocols.
        h2 = !h2;
        let mut c = Client::connect(gw.members, &pki, h2).await;
        let recs = next_records(&mut c, 42, &[1, 2], after).await;
        // Take only the first record, as a member that crashed right after.
        let first = recs[0].clone();
        assert!(first.cursor > after);
        after = first.cursor;
        got.push(first.message);
    }
    assert_eq!(got, expected);
    let mut c = Client::connect(gw.members, &pki, false).await;
    let r = c.poll(42, &[1, 2], after, 100).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // A cursor past everything this spool handed out (a replaced spool,
    // another gateway's) is refused at once, not left to wait until this
    // spool passes it; read from 0, the member gets this spool's records.
    let r = c.poll(42, &[1, 2], after + 1_000, 20_000).await;
    assert_refused(&r, StatusCode::CONFLICT, "cursor_ahead");
    let recs = next_records(&mut c, 42, &[1, 2], 0).await;
    assert_eq!(recs[0].message, expected[0]);
    gw.stop().await;
}

/// A long poll returns as soon as a record arrives, not at its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_new_records() {
    let (pki, udc, _dir, gw) = setup().await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    let poll = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let r = c.poll(5, &[4], 0, 20_000).await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    udc.push(2, 4, 5, &challenge(4, 1).to_bytes());
    let (r, took) = poll.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(took < Duration::from_secs(10), "{took:?}");
    gw.stop().await;
}

/// The UDC asks for the individual tags of chunk 0: the gateway answers from
/// the tags it kept, and completes the batch with the final verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_requests_are_answered_from_kept_tags() {
    let (pki, udc, _dir, gw) = setup().await;
    udc.set_mode(UdcMode::TagsFirst);
    let mut c = Client::connect(gw.members, &pki, true).await;
    let ups: Vec<_> = (1..=3u64).map(|ctr| uplink(8, 2, ctr, b"r")).collect();
    for u in &ups {
        assert_eq!(c.post(u.to_bytes()).await.status, StatusCode::ACCEPTED);
    }
    udc.wait_until("the tag reply", |s| s.applied.lock().unwrap().len() == 3)
        .await;
    let replies = udc.state.tag_replies.lock().unwrap().clone();
    let tags: Vec<[u8; 16]> = replies
        .iter()
        .flat_map(|r| r.chunks[0].tags.clone())
        .collect();
    let want: Vec<[u8; 16]> = ups.iter().map(|u| u.tag).collect();
    assert_eq!(tags, want);
    assert_eq!(
        gw.metric("dapgw_tag_requests_total").await,
        replies.len() as f64
    );
    gw.stop().await;
}

/// A batch the UDC refuses outright (400) becomes a dead letter: kept in
/// the spool with its exact bytes and the UDC's reason, counted in
/// `dapgw_batches_total{outcome="rejected"}` and
/// `dapgw_dead_letter_batches`, and it does not block later batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_become_dead_letters() {
    let (pki, udc, dir, gw) = setup().await;
    udc.set_mode(UdcMode::Refusing);
    let mut c = Client::connect(gw.members, &pki, true).await;
    let refused = uplink(8, 2, 1, b"refused");
    assert_eq!(
        c.post(refused.to_bytes()).await.status,
        StatusCode::ACCEPTED
    );
    let start = std::time::Instant::now();
    while gw.metric("dapgw_dead_letter_batches").await < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The exchange is counted when it returns, after the dead letter is
    // stored: wait for it.
    wait_metric(
        &gw,
        "dapgw_batches_total{kind=\"uplink\",outcome=\"rejected\"}",
        1.0,
    )
    .await;
    // Later batches go through.
    udc.set_mode(UdcMode::Up);
    assert_eq!(
        c.post(uplink(8, 2, 2, b"fine").to_bytes()).await.status,
        StatusCode::ACCEPTED
    );
    udc.wait_until("the next batch", |s| s.applied.lock().unwrap().len() == 1)
        .await;
    gw.stop().await;
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    let dead = spool.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].status, dead[0].entries), (400, 1));
    assert!(dead[0].reason.contains("refused by the test"), "{dead:?}");
    let batch = dapgw::protocol::wire::Batch::decode(&dead[0].bytes).unwrap();
    let dapgw::protocol::wire::BatchBody::Uplinks { entries } = &batch.body else {
        panic!("an uplink batch")
    };
    assert_eq!(entries[0].c, refused.c);
    assert_eq!(spool.entries(), 0);
    spool.close().await;
}

/// The same status from something between the gateway and the UDC (a
/// proxy's 413 page, not the UDC's JSON error) dead-letters nothing: the
/// batch is retried, blocks the pipeline as any failure does, and arrives
/// once the way through is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusal_is_retried_not_dead_lettered() {
    held_back_until_fixed(UdcMode::ProxyRefusing).await;
}

/// A 413 from the UDC itself (its JSON error: the batch is over its
/// `DAPGW_MAX_BODY_BYTES`) is a setting too, not the batch's content: held
/// and retried until the limit is raised, not dead-lettered with entries
/// the members were told were accepted (until session 22 it was, so a UDC
/// given the gateway's 16 KiB member limit by a shared environment file
/// dropped nearly every batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udc_body_limit_refusal_is_retried_not_dead_lettered() {
    held_back_until_fixed(UdcMode::TooLarge).await;
}

/// Every batch refused with `mode` until the UDC is back `Up`: retried,
/// never dead-lettered, applied once.
async fn held_back_until_fixed(mode: UdcMode) {
    let (pki, udc, dir, gw) = setup().await;
    udc.set_mode(mode);
    let mut c = Client::connect(gw.members, &pki, true).await;
    let up = uplink(8, 2, 1, b"through a proxy");
    assert_eq!(c.post(up.to_bytes()).await.status, StatusCode::ACCEPTED);
    udc.wait_batch_posts("the batch sent twice", 2).await;
    // The first exchange was counted before the second was sent.
    let errors = gw
        .metric("dapgw_batches_total{kind=\"uplink\",outcome=\"error\"}")
        .await;
    assert!(errors >= 1.0, "{errors}");
    assert_eq!(gw.metric("dapgw_dead_letter_batches").await, 0.0);
    udc.set_mode(UdcMode::Up);
    udc.wait_until("the batch applied", |s| {
        s.applied.lock().unwrap().len() == 1
    })
    .await;
    gw.stop().await;
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    assert!(spool.dead_letters().await.unwrap().is_empty());
    assert_eq!(spool.entries(), 0);
    spool.close().await;
}

/// A pipeline the UDC answers nothing for shows in the metrics: sealed
/// batches in `dapgw_spool_sealed_batches` while
/// `dapgw_batch_progress_timestamp_seconds` stays where it was when they
/// began to wait; once the batch is through, the count falls to 0 and the
/// time moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_pipeline_shows_in_sealed_batches_and_progress() {
    let (pki, udc, _dir, gw) = setup().await;
    const PROGRESS: &str = "dapgw_batch_progress_timestamp_seconds";
    const SEALED: &str = "dapgw_spool_sealed_batches";
    let started = gw.metric(PROGRESS).await;
    assert!(started > 1.7e9, "unix seconds at the start: {started}");
    udc.set_mode(UdcMode::Failing);
    let mut c = Client::connect(gw.members, &pki, true).await;
    let up = uplink(8, 2, 1, b"held back");
    assert_eq!(c.post(up.to_bytes()).await.status, StatusCode::ACCEPTED);
    udc.wait_batch_posts("the batch sent twice", 2).await;
    // The gauge is refreshed within a housekeeping tick (1 s); the wait
    // starts when batches began to wait (after none did), not earlier.
    wait_metric(&gw, SEALED, 1.0).await;
    let waiting_since = gw.metric(PROGRESS).await;
    assert!(waiting_since >= started, "{waiting_since} before {started}");
    // More failed exchanges move nothing.
    let posts = udc.batch_posts();
    udc.wait_batch_posts("two more failed sends", posts + 2)
        .await;
    assert_eq!(
        gw.metric(PROGRESS).await,
        waiting_since,
        "nothing got through"
    );
    udc.set_mode(UdcMode::Up);
    udc.wait_until("the batch applied", |s| {
        s.applied.lock().unwrap().len() == 1
    })
    .await;
    wait_metric(&gw, SEALED, 0.0).await;
    // Set when the sender sees the verdict stored, which a housekeeping
    // tick may report as 0 sealed batches a moment before.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gw.metric(PROGRESS).await <= waiting_since {
        assert!(
            std::time::Instant::now() < deadline,
            "progress stayed at the start"
        );
        tokio::task::yield_now().await;
    }
    gw.stop().await;
}

/// A final verdict with fewer outcomes than the batch has entries answers
/// for entries it does not name: the gateway does not complete the batch
/// (nothing leaves the spool) and sends it again until a whole verdict
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_short_of_outcomes_completes_nothing() {
    let (pki, udc, _dir, gw) = setup().await;
    udc.set_mode(UdcMode::ShortVerdict);
    let mut c = Client::connect(gw.members, &pki, true).await;
    for ctr in 1..=2 {
        let up = uplink(8, 2, ctr, b"reading");
        assert_eq!(c.post(up.to_bytes()).await.status, StatusCode::ACCEPTED);
    }
    // Answered short at least twice: the batch is sent again.
    udc.wait_batch_posts("a second short answer", 2).await;
    assert_eq!(gw.metric("dapgw_spool_entries").await, 2.0);
    udc.set_mode(UdcMode::Up);
    udc.wait_until("both readings", |s| s.applied.lock().unwrap().len() == 2)
        .await;
    wait_metric(&gw, "dapgw_spool_entries", 0.0).await;
    gw.stop().await;
}

/// A UDC that answers an empty downlink pull at once (it ignores
/// `wait_ms`) is pulled from no more than once per `MIN_EMPTY_PULL`
/// (500 ms), not in a tight loop (which makes thousands of pulls a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_downlink_answer_is_not_pulled_again_at_once() {
    let (_pki, udc, _dir, gw) = setup().await;
    udc.state
        .downlink_ignores_wait
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Ends the pull held now (the gateway may not have made it yet).
    udc.state.downlink_notify.notify_waiters();
    udc.wait_until("six pulls", |s| s.downlink_pulls.lock().unwrap().len() >= 6)
        .await;
    let pulls = udc.state.downlink_pulls.lock().unwrap().clone();
    // Pulls 2 to 6 each start at least 500 ms after the one before, so
    // the sixth arrives at least 2 s after the second started: at least
    // 1 s after the second arrived, unless that one took a second to.
    // (The first pull may have been held, answered by the knob.)
    let span = pulls[5] - pulls[1];
    assert!(
        span >= Duration::from_secs(1),
        "four pulls after empty answers came within {span:?}"
    );
    gw.stop().await;
}

/// SIGTERM-style drain: readiness is 503 at once, the listener stops
/// accepting, and `run` returns within the grace time even with the UDC
/// refusing batches; what was accepted stays in the spool and is delivered
/// by the next gateway on the same spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_within_grace_and_resume_from_spool() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    // The admin listener serves until the grace is over (the failing UDC
    // keeps the drain from ending before), so the grace is also how long
    // the probes below have to see readiness turn 503.
    cfg.drain_grace_ms = 3000;
    cfg.batch_linger_ms = 60_000; // only the drain's flush cuts the batch
    let mut gw = Gateway::start(cfg.clone()).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    for ctr in 1..=5 {
        assert_eq!(
            c.post(uplink(3, 1, ctr, b"x").to_bytes()).await.status,
            StatusCode::ACCEPTED
        );
    }
    let started = std::time::Instant::now();
    let task = gw.shutdown();
    // Probed until it turns 503, however long the gateway's task takes to
    // be scheduled on a loaded machine (bounded by 30 s of real time). The
    // admin listener closing first means the drain ended without readiness
    // ever saying 503.
    let deadline = started + Duration::from_secs(30);
    loop {
        assert!(
            tokio::net::TcpStream::connect(gw.admin).await.is_ok(),
            "the drain ended without readiness turning 503"
        );
        if gw.admin_get("/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readiness did not turn 503 within 30 s of the drain's start"
        );
        tokio::task::yield_now().await;
    }
    task.await.unwrap().unwrap();
    // Without the grace cut the drain would never end while the UDC fails
    // every batch, so a bound well above the grace time still catches its
    // absence; the 20 s margin is what a loaded 2-core CI machine needs to
    // flush, close the spool and wind down the tasks after the grace ran
    // out.
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(cfg.drain_grace_ms) + Duration::from_secs(20),
        "{took:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(gw.members).await.is_err(),
        "still accepting after the drain"
    );
    assert!(udc.applied().is_empty());

    // A new gateway on the same spool delivers the flushed batch.
    udc.set_mode(UdcMode::Up);
    cfg.batch_linger_ms = 20;
    let gw2 = Gateway::start(cfg).await;
    udc.wait_until("the spooled entries", |s| {
        s.applied.lock().unwrap().len() == 5
    })
    .await;
    assert_eq!(
        udc.state.batches.lock().unwrap().len(),
        1,
        "one flushed batch"
    );
    gw2.stop().await;
}

/// A sealed batch the sender cannot read (a damaged spool row) keeps the
/// drain waiting, as a batch the UDC refuses does: the drain ends at its
/// grace, not at once, with the batch still sealed; repaired, the next
/// gateway on the spool delivers it. (Counted as sent, the unread batch
/// ended the drain at its first pass with nothing delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_batch_that_cannot_be_read_keeps_the_drain_waiting() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.drain_grace_ms = 2_000;
    let mut gw = Gateway::start(cfg.clone()).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    let r = c.post(uplink(3, 1, 1, b"x").to_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    wait_metric(&gw, "dapgw_spool_sealed_batches", 1.0).await;
    // The row's bytes become an integer: listing the batch still works,
    // reading it fails.
    let db = rusqlite::Connection::open(dir.path().join("spool.db")).unwrap();
    let bytes: Vec<u8> = db
        .query_row("SELECT bytes FROM batches", [], |r| r.get(0))
        .unwrap();
    db.execute("UPDATE batches SET bytes = 42", []).unwrap();
    udc.set_mode(UdcMode::Up);
    let started = std::time::Instant::now();
    gw.shutdown().await.unwrap().unwrap();
    // A lower bound: the drain cannot wait less than its grace.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(cfg.drain_grace_ms),
        "the drain ended after {took:?}, before its grace"
    );
    assert!(udc.applied().is_empty());
    let sealed: i64 = db
        .query_row("SELECT count(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sealed, 1, "the batch stays sealed in the spool");
    db.execute("UPDATE batches SET bytes = ?1", [&bytes])
        .unwrap();
    drop(db);
    let gw2 = Gateway::start(cfg).await;
    udc.wait_until("the repaired batch", |s| {
        s.applied.lock().unwrap().len() == 1
    })
    .await;
    gw2.stop().await;
}

/// A member sending its body slowly when the drain starts (it may take
/// up to `DAPGW_HEADER_TIMEOUT_MS`, here longer than the grace) does not
/// hold the drain's flush: at half the grace what was acknowledged is
/// sealed and sent anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_does_not_hold_the_drains_flush() {
    use tokio::io::AsyncWriteExt;
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.drain_grace_ms = 6_000;
    cfg.header_timeout_ms = 60_000;
    cfg.batch_linger_ms = 60_000; // only the drain's flush cuts the batch
    let mut gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    assert_eq!(
        c.post(uplink(3, 1, 1, b"x").to_bytes()).await.status,
        StatusCode::ACCEPTED
    );
    // A request whose head arrived and whose body never ends.
    let mut slow = raw(gw.members, &pki, b"http/1.1", [127, 0, 0, 1])
        .await
        .unwrap();
    slow.write_all(
        b"POST /v1/uplink HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/vnd.dapgw\r\ncontent-length: 100\r\n\r\n\x01",
    )
    .await
    .unwrap();
    slow.flush().await.unwrap();
    gw.shutdown().await.unwrap().unwrap();
    assert!(
        udc.applied()
            .iter()
            .any(|&(m, g, ctr, _)| (m, g, ctr) == (3, 1, 1)),
        "the acknowledged uplink went out during the drain: {:?}",
        udc.applied()
    );
    drop(slow);
}

/// With member client certificates configured, a member may only act as the
/// id its certificate names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_certificates_bind_the_member_id() {
    let pki = pki(&["gw-1", "42"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.member_client_ca = Some(pki.ca.clone());
    let gw = Gateway::start(cfg).await;
    let (cert, key) = pki.clients["42"].clone();
    let mut c = Client::connect_as(gw.members, &pki, true, Some((&cert, &key))).await;
    assert_eq!(c.attach(42, &[1]).await.status, StatusCode::OK);
    assert_refused(&c.attach(43, &[1]).await, StatusCode::FORBIDDEN, "identity");
    assert_refused(
        &c.post(uplink(43, 1, 1, b"x").to_bytes()).await,
        StatusCode::FORBIDDEN,
        "identity",
    );
    assert_eq!(
        c.post(uplink(42, 1, 1, b"x").to_bytes()).await.status,
        StatusCode::ACCEPTED
    );
    assert_refused(
        &c.poll(43, &[1], 0, 10).await,
        StatusCode::FORBIDDEN,
        "identity",
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Collector on a paused clock
// ---------------------------------------------------------------------------

struct Bench {
    spool: Spool,
    collector: Collector,
    events: tokio::sync::mpsc::UnboundedReceiver<CollectorEvent>,
    registry: prometheus::Registry,
    _dir: tempfile::TempDir,
}

async fn collector(linger_ms: u64, deadline_ms: u64, attached: Arc<Attached>) -> Bench {
    collector_with(linger_ms, deadline_ms, attached, |_| {}).await
}

async fn collector_with(
    linger_ms: u64,
    deadline_ms: u64,
    attached: Arc<Attached>,
    tune: impl FnOnce(&mut AggregatorConfig),
) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 24).unwrap();
    let mut agg = AggregatorConfig::new(GatewayId::new("gw-1").unwrap());
    agg.uplink_linger = Duration::from_millis(linger_ms);
    agg.max_batch_entries = 4;
    tune(&mut agg);
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let registry = prometheus::Registry::new();
    let collector = Collector::start(
        spool.clone(),
        CollectorConfig {
            aggregator: agg,
            round_deadline: Duration::from_millis(deadline_ms),
        },
        attached,
        GatewayMetrics::register(&registry),
        Arc::new(Notify::new()),
        Some(tx),
    )
    .await
    .unwrap();
    Bench {
        spool,
        collector,
        events,
        registry,
        _dir: dir,
    }
}

/// `dapgw_rounds_total{outcome}` as counted in `registry`.
fn rounds_counted(registry: &prometheus::Registry, outcome: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "dapgw_rounds_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "outcome" && l.value() == outcome)
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

async fn store(spool: &Spool, msg: &MemberMessage) -> dapgw::gateway::spool::EntryId {
    let (stream, member, key, bytes) = match msg {
        MemberMessage::Response(r) => (
            StreamKey::Round {
                group: r.group.0,
                round: r.round,
            },
            r.id.0,
            r.id.0.to_be_bytes().to_vec(),
            r.to_bytes(),
        ),
        MemberMessage::Uplink(u) => (
            StreamKey::Uplink { group: u.group.0 },
            u.id.0,
            [&u.sid.0[..], &u.ctr.to_be_bytes()].concat(),
            u.to_bytes(),
        ),
    };
    spool
        .append(NewEntry {
            stream,
            member,
            sort_key: key,
            bytes,
        })
        .await
        .unwrap()
}

/// The next `Sealed` event. A seal commits after the driver moved on, so a
/// round closing meanwhile may be reported first: such events are skipped.
async fn next_sealed(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<CollectorEvent>,
) -> Option<CollectorEvent> {
    loop {
        match events.recv().await? {
            CollectorEvent::RoundClosed { .. } => continue,
            sealed => return Some(sealed),
        }
    }
}

/// What a test reads of a `Sealed` event.
struct Cut {
    entries: Vec<EntryId>,
    trigger: BatchTrigger,
    cut_at: tokio::time::Instant,
    round: Option<u64>,
    missing: Vec<MemberId>,
}

/// The next batch sealed ([`next_sealed`]); panics if the collector ended.
async fn next_cut(events: &mut tokio::sync::mpsc::UnboundedReceiver<CollectorEvent>) -> Cut {
    match next_sealed(events).await {
        Some(CollectorEvent::Sealed {
            entries,
            trigger,
            cut_at,
            round,
            missing,
            ..
        }) => Cut {
            entries,
            trigger,
            cut_at,
            round,
            missing,
        },
        _ => panic!("no batch"),
    }
}

/// Two byte-identical responses stored before either is collected share
/// one spool row. The first is refused (its round is not open yet) and the
/// row discarded; the second, collected once the round is open, must not
/// be acknowledged for the row that is gone (202 for nothing, and a batch
/// naming the row could never seal, holding every later batch back): it
/// is `Discarded`, and sent again it gets a fresh row, collected as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_sharing_a_discarded_row_is_not_acknowledged() {
    use dapgw::gateway::collector::SubmitError;
    use dapgw::protocol::aggregator::CollectError;
    let b = collector(20, 30_000, Arc::new(Attached::new())).await;
    let handle = b.collector.handle();
    let msg = MemberMessage::Response(response(1, 9, 1, b""));
    let first = store(&b.spool, &msg).await;
    let second = store(&b.spool, &msg).await;
    assert_eq!(first, second, "one row for both");
    let refused = handle.collect(msg.clone(), first).await;
    assert!(
        matches!(
            refused,
            Err(SubmitError::Refused(CollectError::UnknownRound { .. }))
        ),
        "{refused:?}"
    );
    handle.expect(GroupId(9), 1, Mode::Psk, None).await.unwrap();
    let late = handle.collect(msg.clone(), second).await;
    assert!(matches!(late, Err(SubmitError::Discarded)), "{late:?}");
    let third = store(&b.spool, &msg).await;
    assert_ne!(third, first, "a fresh row");
    assert_eq!(handle.collect(msg, third).await.unwrap(), Collected::New);
}

/// A refused message whose discard fails (the spool refuses the delete)
/// keeps its row: an identical re-send, handed that row, must be collected
/// again once the failure is known, not told to resend (503) until a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_sharing_a_row_whose_discard_failed_is_collected() {
    use dapgw::gateway::collector::SubmitError;
    let b = collector(20, 30_000, Arc::new(Attached::new())).await;
    let db = rusqlite::Connection::open(b._dir.path().join("spool.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_deletes BEFORE DELETE ON entries
         BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    let handle = b.collector.handle();
    let msg = MemberMessage::Response(response(1, 9, 1, b""));
    let first = store(&b.spool, &msg).await;
    // Refused (no round yet); its discard fails.
    assert!(handle.collect(msg.clone(), first).await.is_err());
    handle.expect(GroupId(9), 1, Mode::Psk, None).await.unwrap();
    // The re-send is handed the same row, which is still there. Until the
    // discard's failure has been reported it is told to resend; then it
    // is collected.
    let again = store(&b.spool, &msg).await;
    assert_eq!(again, first, "the row was not discarded");
    let mut outcome = handle.collect(msg.clone(), again).await;
    for _ in 0..500 {
        if !matches!(outcome, Err(SubmitError::Discarded)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        outcome = handle.collect(msg.clone(), again).await;
    }
    assert_eq!(outcome.unwrap(), Collected::New);
}

/// A byte-identical re-send of an uplink whose batch was cut but is not
/// sealed yet (the spool refuses the seal for a while), arriving after the
/// aggregator forgot it: it is a duplicate, not a new entry. Taken for new,
/// it was cut into a second batch that could never be sealed (its entry is
/// in the first) and the collector cut nothing after it. On the real clock
/// with a 300 ms window: the time passing is what is tested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_while_its_batch_waits_to_be_sealed_is_a_duplicate() {
    let window = Duration::from_millis(300);
    let b = collector_with(20, 30_000, Arc::new(Attached::new()), |agg| {
        agg.uplink_dedup_window = window;
    })
    .await;
    let db = rusqlite::Connection::open(b._dir.path().join("spool.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse_seals BEFORE INSERT ON batches
         BEGIN SELECT RAISE(ABORT, 'injected'); END;",
    )
    .unwrap();
    let handle = b.collector.handle();
    let first = MemberMessage::Uplink(uplink(1, 5, 1, b"r"));
    let id = store(&b.spool, &first).await;
    handle.collect(first.clone(), id).await.unwrap();
    // Cut after 20 ms, its seal refused and retried; then past the window.
    tokio::time::sleep(window * 2).await;
    assert!(
        b.spool
            .pending_batches(usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store(&b.spool, &first).await, id, "the stored original");
    assert_eq!(
        handle.collect(first, id).await.unwrap(),
        Collected::Duplicate
    );
    db.execute_batch("DROP TRIGGER refuse_seals").unwrap();
    let next = MemberMessage::Uplink(uplink(2, 5, 1, b"s"));
    let next_id = store(&b.spool, &next).await;
    handle.collect(next, next_id).await.unwrap();
    let mut events = b.events;
    let mut sealed = Vec::new();
    while sealed.len() < 2 {
        let cut = tokio::time::timeout(Duration::from_secs(30), next_cut(&mut events))
            .await
            .expect("the collector goes on sealing");
        sealed.push(cut.entries);
    }
    assert_eq!(sealed, vec![vec![id], vec![next_id]]);
}

/// An uplink's linger counts from its arrival at the gateway, not from
/// the spool commit it waited for: the commit's time is part of the
/// linger, not added to it, up to half the linger. With a 200 ms linger:
/// arrived 60 ms before it is collected (a slow commit), it is cut 140 ms
/// after; arrived 100 ms or more before, 100 ms after (so an overloaded
/// spool does not make every collect cut a batch of its own).
#[tokio::test(start_paused = true)]
async fn the_linger_counts_from_the_uplinks_arrival() {
    let mut b = collector(200, 30_000, Arc::new(Attached::new())).await;
    let handle = b.collector.handle();
    let ms = Duration::from_millis;
    let cases = [
        (1u64, ms(0), ms(200)),
        (2, ms(60), ms(140)),
        (3, ms(100), ms(100)),
        (4, ms(900), ms(100)),
    ];
    for (ctr, waited, cut_after) in cases {
        let msg = MemberMessage::Uplink(uplink(1, 5, ctr, b"r"));
        let arrived = tokio::time::Instant::now();
        let id = store(&b.spool, &msg).await;
        tokio::time::advance(waited).await;
        let collected_at = tokio::time::Instant::now();
        handle.collect_since(msg, id, arrived).await.unwrap();
        let Cut {
            entries,
            trigger,
            cut_at,
            ..
        } = next_cut(&mut b.events).await;
        assert_eq!(trigger, BatchTrigger::Linger, "{ctr}");
        assert_eq!(entries, vec![id], "{ctr}");
        assert_eq!(cut_at - collected_at, cut_after, "{ctr}: waited {waited:?}");
    }
}

/// Starts a collector (30 s round deadline) on `spool` as a restarted
/// gateway does: from what the spool holds.
async fn restart_collector(
    spool: &Spool,
) -> (
    Collector,
    tokio::sync::mpsc::UnboundedReceiver<CollectorEvent>,
) {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let collector = Collector::start(
        spool.clone(),
        CollectorConfig {
            aggregator: AggregatorConfig::new(GatewayId::new("gw-1").unwrap()),
            round_deadline: Duration::from_millis(30_000),
        },
        Arc::new(Attached::new()),
        GatewayMetrics::register(&prometheus::Registry::new()),
        Arc::new(Notify::new()),
        Some(tx),
    )
    .await
    .unwrap();
    (collector, events)
}

/// A response left unbatched in the spool for a round the gateway never
/// recorded (stored, then refused, and the process stopped before its
/// delete committed) goes upstream after a restart, but its round number,
/// which its sender chose, closes none of the group's rounds: one for
/// round 2^64 - 1 used to lock the group out of every later round.
#[tokio::test(start_paused = true)]
async fn a_restored_response_of_an_unrecorded_round_closes_no_round() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 24).unwrap();
    let id = store(
        &spool,
        &MemberMessage::Response(response(3, 7, u64::MAX, b"")),
    )
    .await;
    let (collector, mut events) = restart_collector(&spool).await;
    let cut = next_cut(&mut events).await;
    assert_eq!((cut.round, cut.entries), (Some(u64::MAX), vec![id]));
    // Stored first: the spool's writer is a thread of its own, and while
    // the test waits for it the paused clock would run to the deadline.
    let msg = MemberMessage::Response(response(1, 7, 5, b""));
    let entry = store(&spool, &msg).await;
    let handle = collector.handle();
    handle.expect(GroupId(7), 5, Mode::Psk, None).await.unwrap();
    assert_eq!(handle.collect(msg, entry).await.unwrap(), Collected::New);
}

/// A round recorded as open is reopened at restart with what is left of
/// its deadline, but never with more than a whole round's: a wall clock
/// that stepped back since (an NTP step, a box without a real-time clock)
/// must not hold the round's acknowledged responses that much longer.
#[tokio::test(start_paused = true)]
async fn a_restored_round_waits_no_longer_than_a_round() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 24).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    spool
        .set_open_round(
            dapgw::gateway::spool::OpenRoundRow {
                group: 7,
                round: 5,
                mode: Mode::Psk.code(),
                deadline_ms: now_ms + 86_400_000,
            },
            now_ms,
        )
        .await
        .unwrap();
    let id = store(&spool, &MemberMessage::Response(response(1, 7, 5, b""))).await;
    let started = tokio::time::Instant::now();
    let (_collector, mut events) = restart_collector(&spool).await;
    let cut = next_cut(&mut events).await;
    assert_eq!((cut.round, cut.entries), (Some(5), vec![id]));
    assert_eq!(cut.trigger, BatchTrigger::Deadline);
    assert!(
        cut.cut_at - started <= Duration::from_millis(30_000),
        "cut {:?} after the restart",
        cut.cut_at - started
    );
}

/// Uplinks linger exactly the configured time on the virtual clock, then go
/// out together; the size cap cuts at once.
#[tokio::test(start_paused = true)]
async fn batch_emission_on_a_paused_clock() {
    let mut b = collector(200, 30_000, Arc::new(Attached::new())).await;
    let msgs: Vec<MemberMessage> = (1..=3u64)
        .map(|ctr| MemberMessage::Uplink(uplink(1, 5, ctr, b"r")))
        .collect();
    let mut ids = Vec::new();
    for m in &msgs {
        ids.push(store(&b.spool, m).await);
    }
    let handle = b.collector.handle();
    let t0 = tokio::time::Instant::now();
    for (m, id) in msgs.iter().zip(&ids) {
        handle.collect(m.clone(), *id).await.unwrap();
    }
    let Cut {
        entries,
        trigger,
        cut_at,
        ..
    } = next_cut(&mut b.events).await;
    assert_eq!(trigger, BatchTrigger::Linger);
    assert_eq!(entries, ids);
    assert_eq!(
        cut_at - t0,
        Duration::from_millis(200),
        "cut exactly at the linger's end"
    );
    assert_eq!(b.spool.pending_batches(usize::MAX).await.unwrap().len(), 1);

    // Four more: the size cap (4) cuts without waiting.
    let msgs: Vec<MemberMessage> = (10..14u64)
        .map(|ctr| MemberMessage::Uplink(uplink(2, 5, ctr, b"r")))
        .collect();
    let mut ids = Vec::new();
    for m in &msgs {
        ids.push(store(&b.spool, m).await);
    }
    let t1 = tokio::time::Instant::now();
    for (m, id) in msgs.iter().zip(&ids) {
        handle.collect(m.clone(), *id).await.unwrap();
    }
    let Cut {
        trigger,
        cut_at,
        entries,
        ..
    } = next_cut(&mut b.events).await;
    assert_eq!(trigger, BatchTrigger::SizeCap);
    assert_eq!(entries.len(), 4);
    assert_eq!(cut_at, t1);
    b.collector.stop().await;
}

/// Members `ids` attached in group 7.
fn members_of_group_7(ids: &[u64]) -> Arc<Attached> {
    let attached = Arc::new(Attached::new());
    for &id in ids {
        attached.attach(id, &[7], None, 0).unwrap();
    }
    attached
}

/// A round goes out when every attached member answered, and a round with
/// someone missing goes out exactly at its deadline, naming who is missing.
#[tokio::test(start_paused = true)]
async fn rounds_close_on_all_answered_or_at_the_deadline() {
    let attached = members_of_group_7(&[1, 2]);
    let mut b = collector(200, 5_000, attached).await;
    let handle = b.collector.handle();

    // Spool writes happen before any timer is armed: on a paused clock the
    // runtime jumps to the next timer whenever it waits on the spool thread.
    let mut stored = Vec::new();
    for (id, round) in [(1u64, 1u64), (2, 1), (1, 2)] {
        let m = MemberMessage::Response(response(id, 7, round, b""));
        let e = store(&b.spool, &m).await;
        stored.push((m, e));
    }
    let mut stored = stored.into_iter();
    handle.expect(GroupId(7), 1, Mode::Psk, None).await.unwrap();
    let t0 = tokio::time::Instant::now();
    for (m, e) in stored.by_ref().take(2) {
        handle.collect(m, e).await.expect("collected");
    }
    let Cut {
        trigger,
        cut_at,
        round,
        ..
    } = next_cut(&mut b.events).await;
    assert_eq!((trigger, round), (BatchTrigger::AllAnswered, Some(1)));
    assert_eq!(cut_at, t0);

    handle.expect(GroupId(7), 2, Mode::Psk, None).await.unwrap();
    let t1 = tokio::time::Instant::now();
    let (m, e) = stored.next().unwrap();
    handle.collect(m, e).await.unwrap();
    let Cut {
        trigger,
        cut_at,
        missing,
        ..
    } = next_cut(&mut b.events).await;
    assert_eq!(trigger, BatchTrigger::Deadline);
    assert_eq!(missing, vec![MemberId(2)]);
    assert_eq!(cut_at - t1, Duration::from_millis(5_000));
    // Round 1 is complete, round 2 closed at its deadline with a member
    // missing (counted once the deadline batch is cut, not when its seal
    // commits after the round has already been counted).
    assert_eq!(rounds_counted(&b.registry, "complete"), 1.0);
    assert_eq!(rounds_counted(&b.registry, "deadline"), 1.0);
    // A late response is refused and not kept in the spool.
    let late = MemberMessage::Response(response(2, 7, 2, b""));
    let e = store(&b.spool, &late).await;
    assert!(handle.collect(late, e).await.is_err());
    // Discarded as the refusal goes out (not awaited by the collector).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b.spool.entry(e).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused copy stayed"
        );
        tokio::task::yield_now().await;
    }
    b.collector.stop().await;
}

/// The round's window: the configured deadline, or the challenge's
/// `not_after` less the margin when that is sooner (half the time left
/// when that is longer), never below the minimum.
#[test]
fn a_rounds_window_ends_before_its_not_after() {
    let thirty = Duration::from_secs(30);
    let ms = Duration::from_millis;
    assert_eq!(round_window(thirty, None, 123), thirty);
    assert_eq!(
        round_window(thirty, Some(100), 95_000),
        Duration::from_secs(5) - NOT_AFTER_MARGIN
    );
    assert_eq!(round_window(thirty, Some(1_000), 95_000), thirty);
    assert_eq!(round_window(ms(500), Some(100), 95_000), ms(500));
    // Under twice the margin left: half of it.
    assert_eq!(round_window(thirty, Some(100), 97_000), ms(1_500));
    // Closing (by this clock) within two seconds, or closed: the minimum.
    assert_eq!(round_window(thirty, Some(100), 99_000), MIN_ROUND_WINDOW);
    assert_eq!(round_window(thirty, Some(1), 5_000), MIN_ROUND_WINDOW);
    assert_eq!(round_window(thirty, Some(u64::MAX), 0), thirty);
}

/// A round whose challenge closes sooner than the configured deadline (an
/// operator's round with a duration: the challenge's `not_after`) goes out
/// before that close, less the margin, with a member missing: cut at the
/// configured 30 s, its batch would reach the UDC after the round closed
/// and every entry in it would be refused as late.
#[tokio::test(start_paused = true)]
async fn a_round_closing_sooner_goes_out_before_its_not_after() {
    let attached = members_of_group_7(&[1, 2]);
    let mut b = collector(200, 30_000, attached).await;
    let handle = b.collector.handle();
    let m = MemberMessage::Response(response(1, 7, 1, b""));
    let e = store(&b.spool, &m).await;
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let not_after = unix_now / 1000 + 6;
    let expected = Duration::from_millis(not_after * 1000 - unix_now) - NOT_AFTER_MARGIN;
    handle
        .expect(GroupId(7), 1, Mode::Psk, Some(not_after))
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    handle.collect(m, e).await.expect("collected");
    let Cut {
        trigger,
        cut_at,
        missing,
        ..
    } = next_cut(&mut b.events).await;
    assert_eq!(trigger, BatchTrigger::Deadline);
    assert_eq!(missing, vec![MemberId(2)]);
    // The collector read the wall clock a moment after `unix_now`.
    let waited = cut_at - t0;
    assert!(
        waited <= expected && waited + Duration::from_millis(100) >= expected,
        "cut after {waited:?}, expected {expected:?}"
    );
    // A round that closes (by this clock) at once still takes the answers
    // of its first second: all answered, it goes out at once.
    let mut stored = Vec::new();
    for id in [1u64, 2] {
        let m = MemberMessage::Response(response(id, 7, 2, b""));
        let e = store(&b.spool, &m).await;
        stored.push((m, e));
    }
    handle
        .expect(GroupId(7), 2, Mode::Psk, Some(unix_now / 1000))
        .await
        .unwrap();
    for (m, e) in stored {
        handle.collect(m, e).await.expect("collected");
    }
    let Cut { trigger, round, .. } = next_cut(&mut b.events).await;
    assert_eq!((trigger, round), (BatchTrigger::AllAnswered, Some(2)));
    b.collector.stop().await;
}

// ---------------------------------------------------------------------------
// `dapgw gateway` as a child process
// ---------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a TLS handshake with `addr` succeeds trusting only `ca`.
async fn handshake_ok(addr: std::net::SocketAddr, ca: &std::path::Path) -> bool {
    let roots = dapgw::tls::load_roots(ca).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(dapgw::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

/// The member-facing certificate reloads when its files change, with no
/// signal; an open connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reloads_on_file_change() {
    let pki1 = pki(&["gw-1"]);
    let pki2 = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki1).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("member.crt");
    let key = dir.path().join("member.key");
    std::fs::copy(&pki1.server_cert, &cert).unwrap();
    std::fs::copy(&pki1.server_key, &key).unwrap();
    let mut config = gateway_config(&pki1, udc.addr, &dir.path().join("spool"));
    config.tls_cert = cert.clone();
    config.tls_key = key.clone();
    let gw = Gateway::start(config).await;
    assert!(handshake_ok(gw.members, &pki1.ca).await);
    assert!(!handshake_ok(gw.members, &pki2.ca).await);
    let mut open = Client::connect(gw.members, &pki1, true).await;
    // Replaced the way cert-manager does: new files renamed over the old.
    std::fs::copy(&pki2.server_key, dir.path().join("k.tmp")).unwrap();
    std::fs::rename(dir.path().join("k.tmp"), &key).unwrap();
    std::fs::copy(&pki2.server_cert, dir.path().join("c.tmp")).unwrap();
    std::fs::rename(dir.path().join("c.tmp"), &cert).unwrap();
    let start = std::time::Instant::now();
    while !handshake_ok(gw.members, &pki2.ca).await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the changed files were not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open.attach(1, &[1]).await.status, StatusCode::OK);
    gw.stop().await;
}

/// The binary: config from the environment, ready once the UDC link is up,
/// the TLS certificate reloaded on SIGHUP without a restart, exit 0 on
/// SIGTERM within the grace time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_and_drains_on_sigterm() {
    let pki1 = pki(&["gw-1"]);
    let pki2 = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki1).await;
    let dir = tempfile::tempdir().unwrap();
    // The member-facing certificate lives in files the test replaces.
    let cert = dir.path().join("member.crt");
    let key = dir.path().join("member.key");
    std::fs::copy(&pki1.server_cert, &cert).unwrap();
    std::fs::copy(&pki1.server_key, &key).unwrap();
    let (members, admin) = (free_port(), free_port());
    let (gw_cert, gw_key) = pki1.clients["gw-1"].clone();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dapgw"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DAPGW_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("gateway")
        .env(
            "DAPGW_UPSTREAM_URL",
            format!("https://127.0.0.1:{}", udc.addr.port()),
        )
        .env("DAPGW_UPSTREAM_CA", &pki1.ca)
        .env("DAPGW_UPSTREAM_CLIENT_CERT", &gw_cert)
        .env("DAPGW_UPSTREAM_CLIENT_KEY", &gw_key)
        .env("DAPGW_GATEWAY_ID", "gw-1")
        .env("DAPGW_LISTEN", format!("127.0.0.1:{members}"))
        .env("DAPGW_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("DAPGW_TLS_CERT", &cert)
        .env("DAPGW_TLS_KEY", &key)
        .env("DAPGW_SPOOL_DIR", dir.path().join("spool"))
        .env("DAPGW_DRAIN_GRACE_MS", "2000")
        .env("DAPGW_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let members_addr: std::net::SocketAddr = format!("127.0.0.1:{members}").parse().unwrap();
    let mut ready = false;
    for _ in 0..300 {
        if dapgw::admin::probe(
            &admin_addr.to_string(),
            dapgw::admin::ProbeCheck::Ready,
            Duration::from_millis(500),
        )
        .await
        .is_ok()
        {
            ready = true;
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the gateway never became ready");
    assert!(handshake_ok(members_addr, &pki1.ca).await);
    assert!(!handshake_ok(members_addr, &pki2.ca).await);

    // An open connection keeps working across the reload.
    let mut open = Client::connect(members_addr, &pki1, true).await;
    std::fs::copy(&pki2.server_cert, &cert).unwrap();
    std::fs::copy(&pki2.server_key, &key).unwrap();
    let pid = child.id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut reloaded = false;
    for _ in 0..200 {
        if handshake_ok(members_addr, &pki2.ca).await {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP did not reload the certificate");
    assert_eq!(open.attach(1, &[1]).await.status, StatusCode::OK);
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP killed the gateway"
    );

    let started = std::time::Instant::now();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // The UDC is up, so the drain has nothing to wait for: this bound is a
    // hang guard only, sized for a loaded machine rather than for the 2 s
    // grace.
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Whether every subscription the UDC was sent so far satisfies `f`.
fn every_subscription(udc: &FakeUdc, f: impl Fn(&Vec<u32>) -> bool) -> bool {
    udc.state.subscriptions.lock().unwrap().iter().all(f)
}

/// Waits, on any clock, until the UDC's last subscription is `want`: polls
/// between yields with a real-time bound of 30 s (so a paused clock is
/// neither needed nor moved).
async fn wait_subscription(udc: &FakeUdc, want: &[u32]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while udc
        .state
        .subscriptions
        .lock()
        .unwrap()
        .last()
        .map(Vec::as_slice)
        != Some(want)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "subscription never became {want:?}: {:?}",
            udc.state.subscriptions.lock().unwrap()
        );
        tokio::task::yield_now().await;
    }
}

/// Waits, on any clock, until the gateway's metric `series` is `want`
/// (real-time bound of 30 s).
async fn wait_metric(gw: &Gateway, series: &str, want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = gw.metric(series).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} stayed {got}, not {want}"
        );
        tokio::task::yield_now().await;
    }
}

/// A member silent for longer than `DAPGW_ATTACH_TTL_S` leaves the attach
/// registry, and its group the UDC subscription; a member heard from
/// meanwhile stays. A restart drops, before anything else, the members that
/// expired while the gateway was down.
///
/// The registry's clock follows tokio's, paused here and moved by the test
/// alone (a task that keeps yielding keeps the runtime from auto-advancing
/// it), so how long each member was silent does not depend on how fast the
/// machine runs the test.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn silent_members_expire_from_the_attach_registry() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.attach_ttl_s = 2;
    let gw = Gateway::start(cfg.clone()).await;
    let spinner = tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    let mut c = Client::connect(gw.members, &pki, true).await;
    // Member 2 attaches first: if its poll did not refresh it, it would
    // expire with member 1 and the subscription would end empty.
    assert_eq!(c.attach(2, &[6]).await.status, StatusCode::OK);
    assert_eq!(c.attach(1, &[5]).await.status, StatusCode::OK);
    wait_subscription(&udc, &[5, 6]).await;
    // 1.5 s later member 2 polls; member 1 stays silent.
    tokio::time::advance(Duration::from_millis(1500)).await;
    let r = c.poll(2, &[6], 0, 0).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // At 2.5 s member 1 has been silent for longer than the TTL (the sweep
    // runs every 500 ms), member 2 for 1 s.
    tokio::time::advance(Duration::from_millis(1000)).await;
    wait_subscription(&udc, &[6]).await;
    {
        // After [5, 6]: neither [5] (member 2 gone first) nor [] (both gone).
        let subs = udc.state.subscriptions.lock().unwrap();
        let both = subs.iter().position(|s| s.as_slice() == [5, 6]).unwrap();
        assert!(
            subs[both..]
                .iter()
                .all(|s| !s.is_empty() && s.as_slice() != [5]),
            "member 2 expired although it polled: {subs:?}"
        );
    }
    // The sweep sets the gauge after removing the member from the spool.
    wait_metric(&gw, "dapgw_attached_members", 1.0).await;
    assert_eq!(gw.metric("dapgw_attach_expired_total").await, 1.0);
    spinner.abort();
    gw.stop().await;

    // While the gateway is down: member 3 was last heard from ten days ago.
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    spool
        .set_attached(3, &[8], None, now_ms - 10 * 86_400_000)
        .await
        .unwrap();
    spool.close().await;
    udc.state.subscriptions.lock().unwrap().clear();
    cfg.attach_ttl_s = 86_400;
    let gw = Gateway::start(cfg).await;
    wait_subscription(&udc, &[6]).await;
    assert!(
        every_subscription(&udc, |s| !s.contains(&8)),
        "an expired member was subscribed after the restart"
    );
    wait_metric(&gw, "dapgw_attached_members", 1.0).await;
    assert_eq!(gw.metric("dapgw_attach_expired_total").await, 1.0);
    gw.stop().await;
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let members: Vec<u64> = spool
        .attached_members()
        .await
        .unwrap()
        .iter()
        .map(|r| r.member)
        .collect();
    assert_eq!(members, vec![2]);
    spool.close().await;
}

/// Lets the gateway's tasks run at the current (paused) instant.
async fn run_now() {
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
}

/// Runs the paused clock in steps of 100 ms, for at most `limit` of
/// virtual time, until the gateway's spool is empty (true); false if it is
/// not within 30 s of real time.
///
/// The real-time bound is what lets the test pass on a loaded machine: the
/// spool's writer thread fsyncs in real time, and `limit` of virtual time
/// passes in a fraction of a real second. Past `limit` the clock stays
/// where it is and the gateway's tasks keep running, so work already under
/// way (a verdict being stored) finishes, while no timer of the gateway
/// (backoffs, request timeouts) fires later than `limit` would let it.
async fn spool_empties_within(gw: &Gateway, limit: Duration) -> bool {
    let step = Duration::from_millis(100);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut waited = Duration::ZERO;
    loop {
        if waited < limit {
            run_for(step).await;
            waited += step;
        } else {
            run_now().await;
        }
        if gw.metric("dapgw_spool_entries").await == 0.0 {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// Runs the paused clock in steps of 100 ms until `done` holds (true);
/// false if it does not within 30 s of real time.
///
/// Unlike [`spool_empties_within`] there is no bound on virtual time: the
/// conditions waited for here need a gateway timer (a backoff) to fire
/// after work the spool's writer thread does in real time, and on a loaded
/// machine that work may span any number of steps. So the clock keeps
/// running, and only conditions whose timing the test does not check
/// belong here; bounds on what happens within a virtual span are checked
/// with [`run_for`] before.
async fn clock_runs_until(done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        run_for(Duration::from_millis(100)).await;
    }
}

/// Advances the paused clock by `total` in 10 ms steps, letting every task
/// run after each step.
async fn run_for(total: Duration) {
    let step = Duration::from_millis(10);
    let mut done = Duration::ZERO;
    while done < total {
        tokio::time::advance(step).await;
        run_now().await;
        done += step;
    }
}

/// Storing a verdict that keeps failing (a trigger on the spool refuses
/// the completion record, as a disk error would) does not make the batch
/// sender re-send in a tight loop: it backs off as after an upstream error
/// and counts `dapgw_batches_total{outcome="unstored"}`. Once the failure
/// is gone the verdict is stored: nothing lost, nothing applied twice.
///
/// Time is tokio's paused clock moved by the test alone: a task that keeps
/// yielding keeps the runtime from auto-advancing it while the spool's
/// writer thread works, so re-sends within a virtual span can be counted.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn verdict_store_failure_backs_off_and_recovers() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.retry_max_ms = 1000;
    let gw = Gateway::start(cfg).await;
    let spinner = tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    let raw = rusqlite::Connection::open(dir.path().join("spool.db")).unwrap();
    raw.busy_timeout(Duration::from_secs(10)).unwrap();
    raw.execute_batch(
        "CREATE TRIGGER fail_verdict BEFORE INSERT ON completed
         BEGIN SELECT RAISE(ABORT, 'injected disk error'); END;",
    )
    .unwrap();
    let mut c = Client::connect(gw.members, &pki, true).await;
    let r = c.post(uplink(1, 1, 1, &[1; 64]).to_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    let posts = || udc.batch_posts();
    // Ten virtual seconds. With waits of at least half the window (100 ms
    // doubling to the 1 s cap): 50 + 100 + 200 + 400 ms, then 500 ms each,
    // so at most 4 + 18 re-sends after the first send. Load only makes
    // fewer (the spool's writer thread stores each failure in real time
    // while the clock runs on), so this bound holds on any machine.
    run_for(Duration::from_secs(10)).await;
    let in_window = posts();
    assert!(
        in_window <= 23,
        "re-sent {in_window} times in 10 s: no backoff"
    );
    // That the batch is re-sent at all is waited for: on a loaded machine
    // the failed stores may not have finished within the ten seconds.
    assert!(
        clock_runs_until(|| posts() >= 2).await,
        "the batch was not re-sent: {}",
        posts()
    );
    // The clock stands still from here to the next `run_for`: no backoff
    // ends, so no exchange starts.
    let posts = posts();
    // Each exchange counts one outcome (the last one may still be storing).
    let unstored = gw
        .metric("dapgw_batches_total{kind=\"uplink\",outcome=\"unstored\"}")
        .await;
    let ok = gw
        .metric("dapgw_batches_total{kind=\"uplink\",outcome=\"ok\"}")
        .await;
    assert_eq!(
        ok, 0.0,
        "an exchange whose verdict was not stored counted ok"
    );
    assert!(
        unstored >= (posts - 1) as f64 && unstored <= posts as f64,
        "{unstored} unstored of {posts} exchanges"
    );
    assert_eq!(gw.metric("dapgw_spool_entries").await, 1.0);

    // The disk recovers: the next re-send's verdict is stored.
    raw.execute_batch("DROP TRIGGER fail_verdict").unwrap();
    assert!(
        spool_empties_within(&gw, Duration::from_secs(10)).await,
        "the verdict was never stored"
    );
    let posts = udc.batch_posts();
    run_for(Duration::from_secs(5)).await;
    assert_eq!(udc.batch_posts(), posts, "a stored batch is not sent again");
    assert_eq!(udc.applied(), HashSet::from([(1u64, 1u32, 1u64, 2u8)]));
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    // Every exchange counted once: the unstored ones and the one stored.
    let outcome = |o: &str| format!("dapgw_batches_total{{kind=\"uplink\",outcome=\"{o}\"}}");
    let ok = gw.metric(&outcome("ok")).await;
    let unstored = gw.metric(&outcome("unstored")).await;
    assert_eq!(ok, 1.0);
    assert_eq!(ok + unstored, posts as f64, "{ok} ok + {unstored} unstored");
    spinner.abort();
    gw.stop().await;
}

/// A UDC that fails every batch (503) gets one request per backoff, not
/// one per batch waiting: after a failed exchange the batch sender sends
/// the lowest pending batch alone until an exchange succeeds. Once the UDC
/// is back every batch is delivered, none applied twice.
///
/// Paused clock moved by the test alone, as in
/// `verdict_store_failure_backs_off_and_recovers`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_failing_udc_gets_one_batch_per_backoff() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.retry_max_ms = 1000;
    let gw = Gateway::start(cfg).await;
    let spinner = tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
    let mut c = Client::connect(gw.members, &pki, true).await;
    // Three batches, each cut (20 ms linger) before the next uplink.
    for member in 1..=3u64 {
        let r = c.post(uplink(member, 1, 1, b"x").to_bytes()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        run_for(Duration::from_millis(100)).await;
    }
    let posts = || udc.batch_posts();
    let before = posts();
    // Ten virtual seconds: waits of at least half the window (100 ms
    // doubling to the 1 s cap) allow at most about 22 rounds, so at most
    // 22 requests with one batch per round (66 with all three). Load only
    // makes fewer (exchanges and spool work take real time while the clock
    // runs on), so this bound holds on any machine.
    run_for(Duration::from_secs(10)).await;
    let sent = posts() - before;
    assert!(
        sent <= 23,
        "{sent} requests in 10 s: more than one per backoff"
    );
    // That the UDC is retried at all is waited for, with the clock running
    // on: on a loaded machine fewer than two rounds may have fit.
    assert!(
        clock_runs_until(|| posts() - before >= 2).await,
        "no retries: {}",
        posts() - before
    );

    udc.set_mode(UdcMode::Up);
    assert!(
        spool_empties_within(&gw, Duration::from_secs(10)).await,
        "the backlog was never delivered"
    );
    assert_eq!(
        udc.applied(),
        HashSet::from([(1, 1, 1, 2), (2, 1, 1, 2), (3, 1, 1, 2)])
    );
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    spinner.abort();
    gw.stop().await;
}

/// Waits until the gateway's spool holds `n` member entries.
async fn wait_spool_entries(gw: &Gateway, n: f64) {
    for _ in 0..1500 {
        if gw.metric("dapgw_spool_entries").await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the spool never held {n} entries");
}

/// The batch sender does not wait for one verdict before sending the next
/// batch: while the UDC holds its answer to the first batch, the later ones
/// are sent, judged and their verdicts stored; the first one's verdict is
/// stored once the UDC answers. Nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_sent_while_an_earlier_verdict_is_awaited() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    // No timeout re-sends batch 1 while the test holds its answer.
    cfg.upstream_timeout_ms = 120_000;
    let gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    udc.hold_answers(true);
    let r = c.post(uplink(1, 1, 1, b"a").to_bytes()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    udc.wait_until("batch 1's answer held", |s| {
        s.held.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // Batch 1's answer stays held (until `release`); later batches are
    // answered at once. Member 2, then member 1 again in the same session
    // (which the UDC may judge before or after its first uplink).
    udc.state
        .hold_answers
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for (n, (member, ctr)) in [(2u64, 1u64), (1, 2)].into_iter().enumerate() {
        let r = c.post(uplink(member, 1, ctr, b"b").to_bytes()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        udc.wait_until("the batch at the udc", |s| {
            s.batches.lock().unwrap().len() == n + 2
        })
        .await;
    }
    // Their verdicts are stored while batch 1's is still awaited.
    // (The gauge follows the spool's commit, the count the sender.)
    wait_spool_entries(&gw, 1.0).await;
    let ok = "dapgw_batches_total{kind=\"uplink\",outcome=\"ok\"}";
    wait_metric(&gw, ok, 2.0).await;
    udc.state.release.notify_waiters();
    wait_spool_entries(&gw, 0.0).await;
    assert_eq!(
        udc.applied(),
        HashSet::from([(1, 1, 1, 2), (2, 1, 1, 2), (1, 1, 2, 2)])
    );
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    assert_eq!(udc.batch_posts(), 3);
    let ids: Vec<u64> = udc
        .state
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.batch_id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    wait_metric(&gw, ok, 3.0).await;
    gw.stop().await;
}

/// A byte-identical re-send of an uplink that is already sealed into a
/// batch, here after a restart (the aggregator remembers only unbatched
/// entries then; in a running gateway it forgets them some time after their
/// batch is cut), is answered 202 with the same entry and not batched
/// again: were it collected anew, it would be cut into a second batch that
/// can never be sealed, and nothing after it would be batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_of_a_sealed_uplink_after_a_restart_is_not_batched_again() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    udc.set_mode(UdcMode::Failing);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.drain_grace_ms = 500;
    let mut gw = Gateway::start(cfg.clone()).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    let first = uplink(1, 1, 1, b"x").to_bytes();
    let r = c.post(first.clone()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    // Sent (so sealed) and refused for now.
    udc.wait_batch_posts("the batch posted", 1).await;
    gw.shutdown().await.unwrap().unwrap();

    let gw = Gateway::start(cfg).await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    let again = c.post(first).await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, r.body, "the stored entry's id");
    let next = c.post(uplink(2, 1, 1, b"y").to_bytes()).await;
    assert_eq!(next.status, StatusCode::ACCEPTED);
    udc.set_mode(UdcMode::Up);
    wait_spool_entries(&gw, 0.0).await;
    assert_eq!(udc.applied(), HashSet::from([(1, 1, 1, 2), (2, 1, 1, 2)]));
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    gw.stop().await;
}

/// A gateway stopped while several batches are in flight (the UDC applied
/// them and holds its answers) sends all of them again after its restart
/// on the same spool: the UDC answers each from its stored verdict, nothing
/// is applied twice and the spool empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_batches_in_flight_resends_them_and_applies_none_twice() {
    let pki = pki(&["gw-1"]);
    let udc = FakeUdc::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = gateway_config(&pki, udc.addr, dir.path());
    cfg.drain_grace_ms = 500;
    let mut gw = Gateway::start(cfg.clone()).await;
    udc.hold_answers(true);
    let mut c = Client::connect(gw.members, &pki, true).await;
    for member in 1..=3u64 {
        let r = c.post(uplink(member, 1, 1, b"x").to_bytes()).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        udc.wait_until("the batch at the udc", |s| {
            s.batches.lock().unwrap().len() == member as usize
        })
        .await;
    }
    // All three are in flight together; the drain's grace runs out.
    gw.shutdown().await.unwrap().unwrap();
    let posts = udc.batch_posts();
    assert_eq!(posts, 3);
    udc.hold_answers(false);

    let gw = Gateway::start(cfg).await;
    wait_spool_entries(&gw, 0.0).await;
    assert_eq!(udc.batch_posts(), 6, "each batch sent once more");
    assert_eq!(udc.state.batches.lock().unwrap().len(), 3);
    assert_eq!(
        udc.applied(),
        HashSet::from([(1, 1, 1, 2), (2, 1, 1, 2), (3, 1, 1, 2)])
    );
    assert_eq!(*udc.state.duplicates.lock().unwrap(), 0);
    gw.stop().await;
}

/// Attaches may not take the gateway's subscription past the most groups
/// the UDC takes in one `PUT /v1/subscriptions`: past it the UDC would
/// refuse every later subscription, and groups attached after would get no
/// downlink. The attach that would is refused (503 `groups_full`), the
/// members already attached keep their subscription, and groups already
/// subscribed stay open to anyone. Eight sources fill it, each to its
/// default share (512 groups); a ninth, with room in its own share, meets
/// the gateway's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaches_cannot_take_the_subscription_past_the_udcs_cap() {
    use dapgw::protocol::MAX_SUBSCRIBED_GROUPS as MAX;
    let (pki, udc, _dir, gw) = setup().await;
    let per = 256u32;
    for m in 0..MAX as u32 / per {
        let source = [127, 0, 0, 1 + (m / 2) as u8];
        let mut c = Client::connect_from(gw.members, &pki, true, source).await;
        let groups: Vec<u32> = (m * per..(m + 1) * per).collect();
        assert_eq!(
            c.attach(u64::from(m) + 1, &groups).await.status,
            StatusCode::OK
        );
    }
    let all: Vec<u32> = (0..MAX as u32).collect();
    wait_subscription(&udc, &all).await;
    let mut c = Client::connect_from(gw.members, &pki, true, [127, 0, 0, 20]).await;
    let r = c.attach(100, &[9_999_999]).await;
    assert_refused(&r, StatusCode::SERVICE_UNAVAILABLE, "groups_full");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(c.attach(100, &[7, 4095]).await.status, StatusCode::OK);
    // Nothing past the cap was ever asked of the UDC.
    assert!(every_subscription(&udc, |s| s.len() <= MAX));
    drop(gw);
}

/// An uplink whose HTTP/2 stream the client resets while the gateway
/// stores it is still handed to the collector once stored: hyper drops a
/// reset stream's handler, and an entry committed to the spool but never
/// collected sat there, counted against the spool's bounds, until a
/// restart. The resets land at varying points (before the body is read,
/// during the spool's commit, after it); whatever was stored drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uplink_whose_stream_is_reset_mid_store_still_drains() {
    use hyper::{Request, Uri, header};
    let (pki, _udc, _dir, gw) = setup().await;
    let mut c = Client::connect(gw.members, &pki, true).await;
    assert_eq!(c.attach(9, &[3]).await.status, StatusCode::OK);
    let mut reset = 0;
    // A few streams per connection: h2 answers a burst of resets with a
    // GOAWAY (its rapid-reset guard), which is not what this test is about.
    for conn_no in 0..40u64 {
        let tls = raw(gw.members, &pki, b"h2", [127, 0, 0, 1]).await.unwrap();
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        for i in 0..5u64 {
            let ctr = conn_no * 5 + i + 1;
            let Ok(mut send) = send.clone().ready().await else {
                break;
            };
            let req = Request::builder()
                .method(Method::POST)
                .uri(Uri::from_static("https://localhost/v1/uplink"))
                .header(header::CONTENT_TYPE, "application/vnd.dapgw")
                .body(())
                .unwrap();
            let Ok((_resp, mut stream)) = send.send_request(req, false) else {
                break;
            };
            if stream
                .send_data(uplink(9, 3, ctr, b"x").to_bytes(), true)
                .is_err()
            {
                break;
            }
            // Vary where the reset lands; the race is the point here.
            match ctr % 3 {
                0 => {}
                1 => tokio::task::yield_now().await,
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            stream.send_reset(h2::Reason::CANCEL);
            reset += 1;
        }
    }
    assert!(reset >= 100, "only {reset} streams were sent and reset");
    // One uplink answered in full, so the spool gauges are current.
    assert_eq!(
        c.post(uplink(9, 3, 1_000, b"y").to_bytes()).await.status,
        StatusCode::ACCEPTED
    );
    wait_metric(&gw, "dapgw_spool_entries", 0.0).await;
    gw.stop().await;
}

/// The long polls open on one HTTP/2 connection watch at most 1,024
/// audiences (a member and each group it names) together: of four
/// concurrent polls naming 256 groups each (257 audiences), one is refused
/// 429 `poll_budget` with a Retry-After while the others wait; the budget
/// comes back when they return, and another connection has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_on_one_connection_watch_a_bounded_number_of_groups() {
    use hyper::{Request, Uri};
    let (pki, _udc, _dir, gw) = setup().await;
    let groups: Vec<String> = (1..=256).map(|g| g.to_string()).collect();
    let uri = |member: u64, wait_ms: u64| {
        format!(
            "https://localhost/v1/downlink?member={member}&groups={}&wait_ms={wait_ms}",
            groups.join(",")
        )
        .parse::<Uri>()
        .unwrap()
    };
    let tls = raw(gw.members, &pki, b"h2", [127, 0, 0, 1]).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let polls = |wait_ms: u64| {
        let mut answers = Vec::new();
        for m in 1..=4u64 {
            let req = Request::builder()
                .method(Method::GET)
                .uri(uri(m, wait_ms))
                .body(())
                .unwrap();
            let send = send.clone();
            answers.push(tokio::spawn(async move {
                let mut send = send.ready().await.unwrap();
                let (resp, _) = send.send_request(req, true).unwrap();
                let resp = resp.await.unwrap();
                let retry = resp.headers().get("retry-after").is_some();
                let mut body = resp.into_body();
                let mut got = Vec::new();
                while let Some(chunk) = body.data().await {
                    got.extend_from_slice(&chunk.unwrap());
                }
                (resp_status(&got, retry), got)
            }));
        }
        answers
    };
    fn resp_status(body: &[u8], retry: bool) -> (bool, bool) {
        let refused = serde_json::from_slice::<serde_json::Value>(body)
            .is_ok_and(|v| v["error"] == "poll_budget");
        (refused, retry)
    }
    let mut refused = 0;
    for a in polls(1_000) {
        let ((was_refused, retry), body) = a.await.unwrap();
        if was_refused {
            assert!(retry, "no Retry-After");
            refused += 1;
        } else {
            assert!(body.is_empty(), "{body:?}");
        }
    }
    assert_eq!(refused, 1, "four polls of 257 audiences on one connection");
    assert_eq!(
        gw.metric("dapgw_member_requests_total{endpoint=\"poll\",outcome=\"overloaded\"}")
            .await,
        1.0
    );
    // Three at a time fit again once those returned.
    let mut answers = polls(0);
    answers.pop().unwrap().abort();
    for a in answers {
        assert!(!a.await.unwrap().0.0, "refused after the budget came back");
    }
    // Another connection has a budget of its own.
    let mut c = Client::connect(gw.members, &pki, true).await;
    let all: Vec<u32> = (1..=256).collect();
    let r = c.poll(9, &all, 0, 0).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    gw.stop().await;
}
