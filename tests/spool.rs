//! The gateway spool as its callers see it: durability across SIGKILL,
//! backpressure when full, duplicate rules, batches across restarts, downlink
//! cursors and concurrent appenders.
#![cfg(feature = "service")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dapgw::gateway::spool::{
    Audience, DownlinkItem, EntryId, FULL_RETRY_AFTER, NewEntry, OpenRoundRow, ROW_OVERHEAD, Spool,
    SpoolError, StreamKey,
};

const ROUND: StreamKey = StreamKey::Round {
    group: 7,
    round: 42,
};
const UPLINK: StreamKey = StreamKey::Uplink { group: 7 };
const BIG: u64 = 1 << 30;

fn response(member: u64, body: &[u8]) -> NewEntry {
    NewEntry {
        stream: ROUND,
        member,
        sort_key: member.to_be_bytes().to_vec(),
        bytes: Bytes::copy_from_slice(body),
    }
}

fn uplink(member: u64, sid: [u8; 8], ctr: u64, body: &[u8]) -> NewEntry {
    let mut sort_key = sid.to_vec();
    sort_key.extend_from_slice(&ctr.to_be_bytes());
    NewEntry {
        stream: UPLINK,
        member,
        sort_key,
        bytes: Bytes::copy_from_slice(body),
    }
}

fn item(audience: Audience, kind: u8, body: &[u8]) -> DownlinkItem {
    DownlinkItem {
        audience,
        kind,
        bytes: Bytes::copy_from_slice(body),
    }
}

/// The body the kill-9 child appends for a member, so the parent can check
/// the bytes, not only the id.
fn child_body(member: u64) -> Vec<u8> {
    let mut b = b"reading of member ".to_vec();
    b.extend_from_slice(&member.to_be_bytes());
    b.resize(100, 0xA5);
    b
}

const CHILD_ENV: &str = "DAPGW_SPOOL_KILL_CHILD_DIR";

/// Helper process for `acked_entries_survive_sigkill`: appends forever from
/// many tasks and prints every acknowledged id. Run only by that test.
#[ignore = "helper process, started by acked_entries_survive_sigkill"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        eprintln!("{CHILD_ENV} not set: this is a helper for acked_entries_survive_sigkill");
        return;
    };
    let spool = Spool::open(Path::new(&dir), BIG).unwrap();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let spool = spool.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let member = t * 1_000_000 + i;
                let id = spool
                    .append(NewEntry {
                        stream: ROUND,
                        member,
                        sort_key: member.to_be_bytes().to_vec(),
                        bytes: Bytes::from(child_body(member)),
                    })
                    .await
                    .unwrap();
                let mut line = format!("ack {} {member}\n", id.get());
                if i % 50 == 0 {
                    let b = spool.next_batch_id().await.unwrap();
                    line.push_str(&format!("batch {b}\n"));
                }
                // One short write per line: a pipe never splits it.
                let mut o = out.lock().unwrap();
                o.write_all(line.as_bytes()).unwrap();
                o.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Appends in a child process, SIGKILLs it mid-stream (group commits in
/// flight), reopens: every acknowledged entry is there with its bytes, and
/// batch ids continue above every id the child was handed.
#[test]
fn acked_entries_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "kill9_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut max_batch = 0u64;
    let mut parse = |line: &str, acked: &mut BTreeMap<u64, u64>| {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["ack", id, member] => {
                if let (Ok(id), Ok(member)) = (id.parse(), member.parse()) {
                    acked.insert(id, member);
                }
            }
            ["batch", b] => {
                if let Ok(b) = b.parse::<u64>() {
                    max_batch = max_batch.max(b);
                }
            }
            _ => {}
        }
    };
    while acked.len() < 3000 {
        let line = lines
            .next()
            .expect("child exited before 3000 acks")
            .unwrap();
        parse(&line, &mut acked);
    }
    // Child::kill is SIGKILL on Unix: no destructor, no clean shutdown.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "child must have been killed");
    // Acks already in the pipe were acknowledged before the kill, too.
    for line in lines.map_while(Result::ok) {
        parse(&line, &mut acked);
    }
    assert!(max_batch > 0);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spool = Spool::open(dir.path(), BIG).unwrap();
        let stored = spool.unbatched(ROUND).await.unwrap();
        let by_id: BTreeMap<u64, _> = stored.iter().map(|e| (e.id.get(), e)).collect();
        for (id, member) in &acked {
            let e = by_id
                .get(id)
                .unwrap_or_else(|| panic!("acked entry {id} lost"));
            assert_eq!(e.member, *member);
            assert_eq!(e.bytes, child_body(*member));
        }
        assert!(stored.len() >= acked.len());
        assert_eq!(spool.entries(), stored.len() as u64);
        let next = spool.next_batch_id().await.unwrap();
        assert!(next > max_batch, "batch id {next} reused (max {max_batch})");
        // New entries get ids above every id handed out before the crash.
        let fresh = spool.append(response(u64::MAX, b"after")).await.unwrap();
        assert!(fresh.get() > *acked.keys().last().unwrap());
        spool.close().await;
    });
}

#[tokio::test]
async fn full_spool_pushes_back_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let body = [1u8; 100];
    let per = 100 + 8 + ROW_OVERHEAD;
    let spool = Spool::open(dir.path(), per * 10).unwrap();
    let mut ids = Vec::new();
    for m in 0..10 {
        ids.push(spool.append(response(m, &body)).await.unwrap());
    }
    assert_eq!(spool.bytes(), per * 10);
    match spool.append(response(10, &body)).await {
        Err(SpoolError::Full { retry_after }) => assert_eq!(retry_after, FULL_RETRY_AFTER),
        other => panic!("expected Full, got {other:?}"),
    }
    // Nothing stored, nothing dropped.
    assert_eq!(spool.entries(), 10);
    assert_eq!(spool.unbatched(ROUND).await.unwrap().len(), 10);
    // A re-send of a stored entry is still answered while full.
    assert_eq!(spool.append(response(3, &body)).await.unwrap(), ids[3]);
    // Downlink from the UDC is bounded by the same budget.
    assert!(matches!(
        spool
            .push_downlink(vec![item(Audience::Group(7), 1, b"ch")], 0)
            .await,
        Err(SpoolError::Full { .. })
    ));

    // Sealing is never refused, even over the limit; completing frees space.
    let b = spool.next_batch_id().await.unwrap();
    spool
        .seal_batch(b, &ids[..5], Bytes::from_static(b"batch"), vec![[0; 16]; 5])
        .await
        .unwrap();
    assert!(spool.bytes() > spool.max_bytes());
    assert!(matches!(
        spool.append(response(10, &body)).await,
        Err(SpoolError::Full { .. })
    ));
    spool
        .complete_batch(b, b"verdict", vec![], 0)
        .await
        .unwrap();
    assert_eq!(spool.entries(), 5);
    spool.append(response(10, &body)).await.unwrap();
    assert_eq!(spool.entries(), 6);
    // An entry that can never fit is told apart from a full spool.
    assert!(matches!(
        spool.append(response(11, &vec![0; 4096])).await,
        Err(SpoolError::TooLarge { .. })
    ));
    spool.close().await;
}

#[tokio::test]
async fn resend_is_idempotent_and_alternatives_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let a = spool.append(response(1, b"resp-1")).await.unwrap();
    assert_eq!(spool.append(response(1, b"resp-1")).await.unwrap(), a);
    // A different response in the same slot is kept as an alternative (the
    // gateway cannot tell which one the member sealed), up to the cap.
    let alt = spool.append(response(1, b"resp-X")).await.unwrap();
    assert!(alt > a);
    assert_eq!(spool.append(response(1, b"resp-X")).await.unwrap(), alt);
    spool.append(response(1, b"resp-Y")).await.unwrap();
    spool.append(response(1, b"resp-Z")).await.unwrap();
    assert!(matches!(
        spool.append(response(1, b"resp-W")).await,
        Err(SpoolError::Conflict)
    ));
    // Same member, next round: a new slot.
    let mut next_round = response(1, b"resp-X");
    next_round.stream = StreamKey::Round {
        group: 7,
        round: 43,
    };
    assert_ne!(spool.append(next_round).await.unwrap(), a);

    let sid = *b"session1";
    let u = spool.append(uplink(1, sid, 1, b"up-1")).await.unwrap();
    assert_eq!(spool.append(uplink(1, sid, 1, b"up-1")).await.unwrap(), u);
    for alt in [&b"up-A"[..], b"up-B", b"up-C"] {
        spool.append(uplink(1, sid, 1, alt)).await.unwrap();
    }
    assert!(matches!(
        spool.append(uplink(1, sid, 1, b"up-D")).await,
        Err(SpoolError::Conflict)
    ));
    let u2 = spool.append(uplink(1, sid, 2, b"up-2")).await.unwrap();
    assert!(u2 > u);
    // Another member may use the same (sid, ctr) bytes.
    spool.append(uplink(2, sid, 1, b"up-1")).await.unwrap();
    assert_eq!(spool.entries(), 11);

    // Still idempotent after a restart, and while the entry sits in a batch.
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(spool.entries(), 11);
    let b = spool.next_batch_id().await.unwrap();
    spool
        .seal_batch(b, &[a], Bytes::from_static(b"B"), vec![[1; 16]])
        .await
        .unwrap();
    assert_eq!(spool.append(response(1, b"resp-1")).await.unwrap(), a);
    assert!(matches!(
        spool.append(response(1, b"resp-W")).await,
        Err(SpoolError::Conflict)
    ));
    let ups: Vec<EntryId> = spool
        .unbatched(UPLINK)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ups.len(), 6);
    assert!(ups.windows(2).all(|w| w[0] < w[1]), "insertion order");
    spool.close().await;
}

#[tokio::test]
async fn batch_ids_are_monotonic_across_reopen_and_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let a = spool.next_batch_id().await.unwrap();
    let b = spool.next_batch_id().await.unwrap();
    assert!(b > a);
    // b is abandoned (never sealed).
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let c = spool.next_batch_id().await.unwrap();
    assert!(c > b, "{c} after {b}");
    // Only ids handed out can be sealed.
    let e = spool.append(response(1, b"x")).await.unwrap();
    assert!(matches!(
        spool
            .seal_batch(c + 1, &[e], Bytes::from_static(b"B"), vec![[0; 16]])
            .await,
        Err(SpoolError::UnknownBatch(_))
    ));
    spool.close().await;
}

#[tokio::test]
async fn pending_batch_survives_reopen_with_identical_bytes_and_tags() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let mut ids = Vec::new();
    for m in 0..4 {
        ids.push(spool.append(response(m, &[m as u8; 30])).await.unwrap());
    }
    let late = spool.append(response(9, b"late")).await.unwrap();
    let tags: Vec<[u8; 16]> = (0..4u8).map(|i| [i; 16]).collect();
    let batch_bytes = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<u8>>());
    let b1 = spool.next_batch_id().await.unwrap();
    let b2 = spool.next_batch_id().await.unwrap();
    // Sealed out of order; listed in batch-id order.
    spool
        .seal_batch(
            b2,
            &ids[2..],
            Bytes::from_static(b"second"),
            tags[2..].to_vec(),
        )
        .await
        .unwrap();
    spool
        .seal_batch(b1, &ids[..2], batch_bytes.clone(), tags[..2].to_vec())
        .await
        .unwrap();
    // Re-sealing the same content is a no-op; different content is refused,
    // and an entry cannot sit in two batches.
    spool
        .seal_batch(b1, &ids[..2], batch_bytes.clone(), tags[..2].to_vec())
        .await
        .unwrap();
    assert!(matches!(
        spool
            .seal_batch(
                b1,
                &ids[..2],
                Bytes::from_static(b"other"),
                tags[..2].to_vec()
            )
            .await,
        Err(SpoolError::BatchConflict(_))
    ));
    let b3 = spool.next_batch_id().await.unwrap();
    assert!(matches!(
        spool
            .seal_batch(b3, &[ids[0]], Bytes::from_static(b"dup"), vec![[0; 16]])
            .await,
        Err(SpoolError::EntryInBatch { .. })
    ));
    // The failed seal left nothing behind: b3's entries and row are absent.
    assert!(spool.entry(ids[0]).await.unwrap().unwrap().batch_id == Some(b1));
    let bytes_before = spool.bytes();
    spool.close().await;

    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(spool.bytes(), bytes_before, "accounting recomputed on open");
    let pending = spool.pending_batches(usize::MAX).await.unwrap();
    assert_eq!(
        pending.iter().map(|p| p.batch_id).collect::<Vec<_>>(),
        vec![b1, b2]
    );
    assert_eq!(pending[0].bytes, batch_bytes);
    assert_eq!(pending[0].entry_count, 2);
    // A bounded listing gives the lowest ids.
    let first = spool.pending_batches(1).await.unwrap();
    assert_eq!(first.iter().map(|p| p.batch_id).collect::<Vec<_>>(), [b1]);
    // The sender's listing: ids only, then one batch's bytes when needed.
    assert_eq!(spool.pending_batch_ids(usize::MAX).await.unwrap(), [b1, b2]);
    assert_eq!(spool.pending_batch_ids(1).await.unwrap(), [b1]);
    let one = spool.pending_batch(b2).await.unwrap().unwrap();
    assert_eq!(one, pending[1]);
    assert_eq!(spool.pending_batch(b3).await.unwrap(), None);
    assert_eq!(spool.batch_tags(b1).await.unwrap(), tags[..2].to_vec());
    assert_eq!(spool.batch_tags(b2).await.unwrap(), tags[2..].to_vec());
    assert!(matches!(
        spool.batch_tags(b3).await,
        Err(SpoolError::UnknownBatch(_))
    ));
    // Only the unbatched entry is left for the collector.
    let unbatched = spool.unbatched(ROUND).await.unwrap();
    assert_eq!(unbatched.len(), 1);
    assert_eq!(unbatched[0].id, late);
    assert_eq!(spool.unbatched_streams().await.unwrap(), vec![ROUND]);
    spool.close().await;
}

#[tokio::test]
async fn complete_batch_drops_entries_and_queues_downlink_together() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let empty = spool.bytes();
    let a = spool.append(response(1, b"r1")).await.unwrap();
    let b = spool.append(response(2, b"r2")).await.unwrap();
    let id = spool.next_batch_id().await.unwrap();
    spool
        .seal_batch(
            id,
            &[a, b],
            Bytes::from_static(b"batch"),
            vec![[1; 16], [2; 16]],
        )
        .await
        .unwrap();
    let confirms = vec![
        item(Audience::Member(1), 7, b"confirm-1"),
        item(Audience::Member(2), 7, b"confirm-2"),
    ];
    let cursors = spool
        .complete_batch(id, b"verdict", confirms, 1_000)
        .await
        .unwrap();
    assert_eq!(cursors.len(), 2);
    assert!(spool.entry(a).await.unwrap().is_none());
    assert!(spool.entry(b).await.unwrap().is_none());
    assert!(spool.pending_batches(usize::MAX).await.unwrap().is_empty());
    assert!(
        spool
            .pending_batch_ids(usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(spool.pending_batch(id).await.unwrap(), None);
    assert_eq!(spool.entries(), 0);
    let seen = spool.read_downlink(1, &[7], 0, 100).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].bytes[..], b"confirm-1");
    // Repeating the verdict queues nothing again; a different one is refused.
    assert!(
        spool
            .complete_batch(
                id,
                b"verdict",
                vec![item(Audience::Member(1), 7, b"x")],
                2_000
            )
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        spool.complete_batch(id, b"other", vec![], 2_000).await,
        Err(SpoolError::BatchConflict(_))
    ));
    assert!(matches!(
        spool.complete_batch(id + 1, b"v", vec![], 2_000).await,
        Err(SpoolError::UnknownBatch(_))
    ));
    // After a restart the same holds, and everything but the downlink items
    // and the completion record is freed.
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(spool.downlink_items(), 2);
    assert_eq!(
        spool.bytes(),
        empty + 2 * (9 + 32 + ROW_OVERHEAD) + (32 + ROW_OVERHEAD)
    );
    assert!(matches!(
        spool
            .seal_batch(id, &[a], Bytes::new(), vec![[0; 16]])
            .await,
        Err(SpoolError::BatchConflict(_))
    ));
    let pruned = spool
        .prune_downlink_older_than(1_000 + 60_000, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(pruned.rows, 3);
    assert_eq!(spool.bytes(), empty);
    spool.close().await;
}

#[tokio::test]
async fn downlink_cursors_route_and_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let mut watch = spool.subscribe_downlink();
    assert_eq!(*watch.borrow_and_update(), 0);
    let c = spool
        .push_downlink(
            vec![
                item(Audience::Group(7), 1, b"challenge g7"),
                item(Audience::Group(8), 1, b"challenge g8"),
                item(Audience::Member(100), 7, b"confirm m100"),
                item(Audience::Member(200), 7, b"confirm m200"),
            ],
            10,
        )
        .await
        .unwrap();
    assert!(c.windows(2).all(|w| w[0] < w[1]));
    // The long-poll side wakes without sleeping.
    watch.changed().await.unwrap();
    assert_eq!(*watch.borrow_and_update(), c[3]);
    assert_eq!(spool.last_cursor(), c[3]);

    let m100 = spool.read_downlink(100, &[7], 0, 100).await.unwrap();
    let got: Vec<&[u8]> = m100.iter().map(|r| &r.bytes[..]).collect();
    assert_eq!(got, vec![&b"challenge g7"[..], b"confirm m100"]);
    assert_eq!(m100[0].kind, 1);
    assert_eq!(m100[1].kind, 7);
    // Limit, then resume from the last cursor seen.
    let first = spool.read_downlink(100, &[7], 0, 1).await.unwrap();
    assert_eq!(first.len(), 1);
    let rest = spool
        .read_downlink(100, &[7], first[0].cursor, 100)
        .await
        .unwrap();
    assert_eq!(rest, m100[1..].to_vec());

    // The UDC re-sends: same cursor, nothing new, no wake-up.
    let again = spool
        .push_downlink(vec![item(Audience::Member(100), 7, b"confirm m100")], 20)
        .await
        .unwrap();
    assert_eq!(again, vec![c[2]]);
    assert!(!watch.has_changed().unwrap());
    assert!(
        spool
            .read_downlink(100, &[7], m100[1].cursor, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // The same bytes for another audience are a separate item.
    let other = spool
        .push_downlink(vec![item(Audience::Member(300), 7, b"confirm m100")], 20)
        .await
        .unwrap();
    assert!(other[0] > c[3]);

    // A reconnecting member with its cursor sees only what is new.
    let new = spool
        .push_downlink(vec![item(Audience::Group(7), 8, b"group message")], 30)
        .await
        .unwrap();
    let after = spool
        .read_downlink(100, &[7], m100[1].cursor, 100)
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].cursor, new[0]);
    // Hostile cursors and limits are harmless.
    assert!(
        spool
            .read_downlink(100, &[7], u64::MAX, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        spool.read_downlink(100, &[0; 300], 0, 1).await,
        Err(SpoolError::Invalid(_))
    ));

    // A member's own items go once it has read past them; pruning by cursor
    // keeps later items; cursors stay monotonic after a restart.
    assert_eq!(
        spool.ack_downlink(100, m100[1].cursor).await.unwrap().rows,
        1
    );
    assert_eq!(
        spool.read_downlink(100, &[7], 0, 100).await.unwrap().len(),
        2
    );
    assert_eq!(spool.prune_downlink(c[3]).await.unwrap().rows, 3);
    let left = spool.read_downlink(300, &[7], 0, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|r| r.cursor).collect::<Vec<_>>(),
        vec![other[0], new[0]]
    );
    spool.prune_downlink(u64::MAX).await.unwrap();
    assert_eq!(spool.downlink_items(), 0);
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(spool.last_cursor(), new[0]);
    let next = spool
        .push_downlink(vec![item(Audience::Group(7), 1, b"challenge g7")], 40)
        .await
        .unwrap();
    assert!(next[0] > new[0]);
    spool.close().await;
}

#[tokio::test]
async fn meta_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(spool.get_meta("udc_cursor").await.unwrap(), None);
    spool
        .set_meta("udc_cursor", &7u64.to_be_bytes())
        .await
        .unwrap();
    spool
        .set_meta("udc_cursor", &9u64.to_be_bytes())
        .await
        .unwrap();
    assert!(matches!(
        spool.set_meta("k", &[0; 5000]).await,
        Err(SpoolError::Invalid(_))
    ));
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(
        spool.get_meta("udc_cursor").await.unwrap(),
        Some(9u64.to_be_bytes().to_vec())
    );
    spool.close().await;
}

/// One source holds at most one message per slot; a byte-identical
/// re-send from it is still the same entry, and other sources fill the
/// rest of the slot up to the cap. Entries without a source are not limited.
#[tokio::test]
async fn one_source_cannot_fill_a_slots_alternatives() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let a = [1u8; 16];
    let first = spool
        .append_from(uplink(5, [1; 8], 1, b"x"), a)
        .await
        .unwrap();
    assert_eq!(
        spool
            .append_from(uplink(5, [1; 8], 1, b"x"), a)
            .await
            .unwrap(),
        first
    );
    assert!(matches!(
        spool.append_from(uplink(5, [1; 8], 1, b"y"), a).await,
        Err(SpoolError::Conflict)
    ));
    // Another slot of the same member from the same source is fine.
    spool
        .append_from(uplink(5, [1; 8], 2, b"y"), a)
        .await
        .unwrap();
    for (n, body) in [&b"y"[..], b"z", b"w"].into_iter().enumerate() {
        spool
            .append_from(uplink(5, [1; 8], 1, body), [2 + n as u8; 16])
            .await
            .unwrap();
    }
    assert!(matches!(
        spool.append_from(uplink(5, [1; 8], 1, b"v"), [9; 16]).await,
        Err(SpoolError::Conflict)
    ));
    // An IPv6 source is its /64: a second address of the same /64 is the
    // same source for the slot, one of another /64 is not.
    spool
        .append_from(uplink(6, [1; 8], 1, b"a"), addr("2001:db8::1"))
        .await
        .unwrap();
    assert!(matches!(
        spool
            .append_from(uplink(6, [1; 8], 1, b"b"), addr("2001:db8::2"))
            .await,
        Err(SpoolError::Conflict)
    ));
    spool
        .append_from(uplink(6, [1; 8], 1, b"b"), addr("2001:db8:0:1::2"))
        .await
        .unwrap();
    spool.close().await;
}

/// The attach registry and the open rounds survive a reopen; a round past
/// its deadline is not listed, and is forgotten when the next one comes.
#[tokio::test]
async fn attach_registry_and_open_rounds_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    spool
        .set_attached(u64::MAX, &[1, 7], None, 10)
        .await
        .unwrap();
    spool.set_attached(3, &[7], None, 10).await.unwrap();
    spool
        .set_attached(3, &[8, 9], Some([0xfe; 16]), 20)
        .await
        .unwrap();
    assert!(matches!(
        spool.set_attached(4, &vec![1; 300], None, 10).await,
        Err(SpoolError::Invalid(_))
    ));
    let round = |round, deadline_ms| OpenRoundRow {
        group: 7,
        round,
        mode: 2,
        deadline_ms,
    };
    spool.set_open_round(round(1, 1_000), 500).await.unwrap();
    spool.set_open_round(round(2, 5_000), 500).await.unwrap();
    spool.close().await;

    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert_eq!(
        spool
            .attached_members()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.member, r.groups, r.seen_ms, r.source))
            .collect::<Vec<_>>(),
        vec![
            (3, vec![8, 9], 20, Some([0xfe; 16])),
            (u64::MAX, vec![1, 7], 10, None)
        ]
    );
    assert_eq!(
        spool.open_rounds(2_000).await.unwrap(),
        vec![round(2, 5_000)]
    );
    assert_eq!(spool.open_rounds(0).await.unwrap().len(), 2);
    spool.set_open_round(round(3, 9_000), 2_000).await.unwrap();
    assert_eq!(
        spool.open_rounds(0).await.unwrap(),
        vec![round(2, 5_000), round(3, 9_000)]
    );
    // Round numbers are the UDC's u64: two above 2^63 stay apart and
    // come back as they were, in order.
    let high = 1u64 << 63;
    spool
        .set_open_round(round(high + 2, 9_000), 2_000)
        .await
        .unwrap();
    spool
        .set_open_round(round(high + 1, 9_000), 2_000)
        .await
        .unwrap();
    spool
        .set_open_round(round(u64::MAX, 9_000), 2_000)
        .await
        .unwrap();
    assert_eq!(
        spool.open_rounds(0).await.unwrap(),
        vec![
            round(2, 5_000),
            round(3, 9_000),
            round(high + 1, 9_000),
            round(high + 2, 9_000),
            round(u64::MAX, 9_000)
        ]
    );
    spool.close().await;
}

#[tokio::test]
async fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    assert!(matches!(
        Spool::open(dir.path(), BIG),
        Err(SpoolError::Locked(_))
    ));
    spool.clone().close().await;
    // Closed: other handles are told so, and the directory is free again.
    assert!(matches!(
        spool.append(response(1, b"x")).await,
        Err(SpoolError::Closed)
    ));
    Spool::open(dir.path(), BIG).unwrap().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_acked_and_present() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..40u64 {
                let member = t * 1000 + i;
                let e = if i % 2 == 0 {
                    response(member, &member.to_be_bytes())
                } else {
                    uplink(member, [t as u8; 8], i, &member.to_be_bytes())
                };
                ids.push((spool.append(e).await.unwrap(), member));
            }
            ids
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), 64 * 40);
    let mut ids: Vec<EntryId> = acked.iter().map(|(id, _)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), acked.len(), "distinct ids");
    assert_eq!(spool.entries(), acked.len() as u64);
    spool.close().await;
    let spool = Spool::open(dir.path(), BIG).unwrap();
    let mut stored = spool.unbatched(ROUND).await.unwrap();
    stored.extend(spool.unbatched(UPLINK).await.unwrap());
    let by_id: BTreeMap<EntryId, _> = stored.iter().map(|e| (e.id, e)).collect();
    for (id, member) in acked {
        let e = by_id[&id];
        assert_eq!(e.member, member);
        assert_eq!(&e.bytes[..], &member.to_be_bytes());
    }
    spool.close().await;
}

/// A source address as the server passes it (IPv4 as IPv4-mapped IPv6).
fn addr(ip: &str) -> [u8; 16] {
    match ip.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// What `source` holds as the spool counts it.
async fn held(spool: &Spool, source: &str) -> u64 {
    spool.source_usage(source.parse().unwrap()).await.unwrap().0
}

/// Every held count and the number of sources, then the same after a
/// reopen (which recounts from the stored entries): the in-memory counts
/// must be exactly what the tables say.
async fn reopen_keeps_shares(spool: Spool, dir: &Path, share: u64, sources: &[&str]) -> Spool {
    let mut before = Vec::new();
    for s in sources {
        before.push(held(&spool, s).await);
    }
    let tracked = spool
        .source_usage(sources[0].parse().unwrap())
        .await
        .unwrap()
        .1;
    spool.close().await;
    let spool = Spool::open_with_source_share(dir, BIG, share).unwrap();
    let mut after = Vec::new();
    for s in sources {
        after.push(held(&spool, s).await);
    }
    assert_eq!(before, after, "per-source bytes after a restart");
    let again = spool
        .source_usage(sources[0].parse().unwrap())
        .await
        .unwrap()
        .1;
    assert_eq!(tracked, again, "sources tracked after a restart");
    spool
}

/// One source (an IPv4 address, an IPv6 /64) holds at most its share of
/// the spool in entries the UDC has not answered, while other sources are
/// still served; its count stays exact through discard, verdict,
/// dead letter, failed appends and a restart, and a source that holds
/// nothing is forgotten.
#[tokio::test]
async fn each_source_holds_at_most_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let body = [7u8; 100];
    let per = (body.len() + 16) as u64 + ROW_OVERHEAD;
    let share = 3 * per;
    let spool = Spool::open_with_source_share(dir.path(), BIG, share).unwrap();
    let (a, b) = ("127.0.0.1", "127.0.0.2");
    let mut a_ids = Vec::new();
    for ctr in 1..=3 {
        let id = spool
            .append_from(uplink(1, [1; 8], ctr, &body), addr(a))
            .await
            .unwrap();
        a_ids.push(id);
    }
    assert_eq!(held(&spool, a).await, share);
    let over = spool
        .append_from(uplink(1, [1; 8], 4, &body), addr(a))
        .await;
    match over {
        Err(SpoolError::SourceFull { retry_after }) => assert_eq!(retry_after, FULL_RETRY_AFTER),
        other => panic!("expected SourceFull, got {other:?}"),
    }
    // A byte-for-byte re-send is still the same entry at the share.
    assert_eq!(
        spool
            .append_from(uplink(1, [1; 8], 2, &body), addr(a))
            .await
            .unwrap(),
        a_ids[1]
    );
    // Another source is served; entries without a source count for none.
    let b_id = spool
        .append_from(uplink(2, [2; 8], 1, &body), addr(b))
        .await
        .unwrap();
    spool.append(uplink(3, [3; 8], 1, &body)).await.unwrap();
    assert_eq!((held(&spool, a).await, held(&spool, b).await), (share, per));
    assert_eq!(spool.entries(), 5);

    // An IPv6 source is its /64.
    let (v6a, v6b, v6c) = ("2001:db8::1", "2001:db8::ffff:2", "2001:db8:0:1::1");
    for ctr in 1..=3 {
        spool
            .append_from(uplink(4, [4; 8], ctr, &body), addr(v6a))
            .await
            .unwrap();
    }
    assert!(matches!(
        spool
            .append_from(uplink(5, [5; 8], 1, &body), addr(v6b))
            .await,
        Err(SpoolError::SourceFull { .. })
    ));
    spool
        .append_from(uplink(5, [5; 8], 1, &body), addr(v6c))
        .await
        .unwrap();
    assert_eq!(held(&spool, v6b).await, share);

    // A discarded entry gives its bytes back.
    assert!(spool.discard_unbatched(a_ids[2]).await.unwrap());
    assert_eq!(held(&spool, a).await, 2 * per);
    let a3 = spool
        .append_from(uplink(1, [1; 8], 5, &body), addr(a))
        .await
        .unwrap();

    // A failed append (the INSERT fails) leaves the count as it was, and so
    // does a group whose whole transaction is lost.
    let raw = rusqlite::Connection::open(dir.path().join("spool.db")).unwrap();
    raw.busy_timeout(Duration::from_secs(10)).unwrap();
    raw.execute_batch(
        "CREATE TRIGGER fail_entry BEFORE INSERT ON entries WHEN NEW.member = 666
         BEGIN SELECT RAISE(ABORT, 'injected'); END;
         CREATE TRIGGER lose_group BEFORE INSERT ON downlink WHEN NEW.kind = 254
         BEGIN SELECT RAISE(ROLLBACK, 'injected'); END;",
    )
    .unwrap();
    assert!(spool.discard_unbatched(a3).await.unwrap());
    assert!(matches!(
        spool
            .append_from(uplink(666, [6; 8], 1, &body), addr(a))
            .await,
        Err(SpoolError::Storage(_))
    ));
    assert_eq!(held(&spool, a).await, 2 * per);
    let (lost, appended) = tokio::join!(
        spool.push_downlink(vec![item(Audience::Group(1), 254, b"lost")], 0),
        spool.append_from(uplink(7, [7; 8], 1, &body), addr(b)),
    );
    assert!(lost.is_err());
    let b_now = held(&spool, b).await;
    match appended {
        // The append went into the lost group: not counted.
        Err(_) => assert_eq!(b_now, per),
        // It committed in a group of its own before.
        Ok(_) => assert_eq!(b_now, 2 * per),
    }
    raw.execute_batch("DROP TRIGGER fail_entry; DROP TRIGGER lose_group;")
        .unwrap();
    let sources = [a, b, v6a, v6c];
    let spool = reopen_keeps_shares(spool, dir.path(), share, &sources).await;

    // A verdict frees the bytes of the entries it answers; a dead letter too.
    let stored_b = spool.unbatched(UPLINK).await.unwrap();
    let (answered, refused): (Vec<_>, Vec<_>) = stored_b
        .iter()
        .map(|e| e.id)
        .partition(|id| a_ids[..2].contains(id) || *id == b_id);
    let verdict = spool.next_batch_id().await.unwrap();
    spool
        .seal_batch(
            verdict,
            &answered,
            Bytes::from_static(b"batch 1"),
            vec![[0; 16]; answered.len()],
        )
        .await
        .unwrap();
    let dead = spool.next_batch_id().await.unwrap();
    spool
        .seal_batch(
            dead,
            &refused,
            Bytes::from_static(b"batch 2"),
            vec![[0; 16]; refused.len()],
        )
        .await
        .unwrap();
    // Sealed but unanswered still counts.
    assert_eq!(held(&spool, a).await, 2 * per);
    spool
        .complete_batch(verdict, b"verdict", Vec::new(), 0)
        .await
        .unwrap();
    assert_eq!(held(&spool, a).await, 0);
    assert!(held(&spool, b).await <= per);
    let spool = reopen_keeps_shares(spool, dir.path(), share, &sources).await;
    spool
        .dead_letter_batch(dead, 400, "refused", 0)
        .await
        .unwrap();
    for s in sources {
        assert_eq!(held(&spool, s).await, 0, "{s}");
    }
    assert_eq!(spool.entries(), 0);
    // Nobody holds anything: no source is tracked any more.
    assert_eq!(spool.source_usage(a.parse().unwrap()).await.unwrap().1, 0);
    let spool = reopen_keeps_shares(spool, dir.path(), share, &sources).await;
    spool.close().await;
}
