//! The member downlink: the last hop of `udc -> gateway -> member`.
//!
//! ```text
//! upstream --push_downlink--> [spool] --read_downlink(member, groups, after)--> GET /v1/downlink
//!                                |  commits wake the polls of the audiences they touched
//! ```
//!
//! A member long-polls with the last cursor it processed; it gets every item
//! after it that is addressed to it (its own confirms, rekeys and key
//! updates) or to one of its groups (challenges, group messages), in cursor
//! order. Cursors are strictly increasing and the read is `cursor > after`,
//! so a member that reconnects with its last cursor misses nothing and gets
//! nothing twice, as long as the spool retains the item
//! ([`super::DOWNLINK_RETENTION`]).

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;

use super::server::PollQuery;
use super::spool::{DownlinkRecord, Spool, SpoolError};
use crate::protocol::wire::MessageType;
use crate::telemetry::{DownlinkKind, GatewayMetrics};

/// `wait_ms` when the member names none.
pub(crate) const DEFAULT_WAIT_MS: u64 = 25_000;

/// Longest long poll; a larger `wait_ms` is capped to it.
pub(crate) const MAX_WAIT_MS: u64 = 30_000;

/// Most records read for one answer.
const READ_LIMIT: usize = 256;

/// Records beyond this many body bytes wait for the next poll (one record
/// always goes, whatever its size).
const BODY_BUDGET: usize = 1 << 20;

/// Audience codes of the records framing.
const AUDIENCE_GROUP: u8 = 1;
const AUDIENCE_MEMBER: u8 = 2;

/// Waits until the spool holds items for the member after `q.after`, up to
/// `q.wait` (or until the drain starts), and returns them (empty: none).
///
/// The poll registers with the spool for its member and groups before it
/// reads, and is woken only by commits that stored an item for one of them
/// (not by every item for anyone): an idle member costs no query while
/// others' items arrive.
pub(crate) async fn poll(
    spool: &Spool,
    q: &PollQuery,
    mut drain: watch::Receiver<bool>,
) -> Result<Vec<DownlinkRecord>, SpoolError> {
    let deadline = Instant::now() + q.wait;
    let watch = spool.watch_downlink(q.member, &q.groups);
    // A member that has read up to the latest cursor has nothing to read
    // until a wake-up (published after the cursor, so none is missed).
    let mut read = spool.last_cursor() > q.after;
    loop {
        if read {
            let records = spool
                .read_downlink(q.member, &q.groups, q.after, READ_LIMIT)
                .await?;
            if !records.is_empty() {
                return Ok(records);
            }
        }
        if *drain.borrow_and_update() {
            return Ok(Vec::new());
        }
        tokio::select! {
            () = watch.notified() => read = true,
            changed = drain.changed() => {
                if changed.is_err() {
                    return Ok(Vec::new());
                }
                read = false;
            }
            () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
        }
    }
}

/// Drops `member`'s own items up to `through` in the background (it read
/// past them). Only called for members authenticated by certificate.
pub(crate) fn ack(spool: Spool, member: u64, through: u64) {
    tokio::spawn(async move {
        if let Err(e) = spool.ack_downlink(member, through).await {
            tracing::debug!(error = %e, "downlink ack not stored");
        }
    });
}

/// Frames records for `member` (docs/gateway.md, "Records"):
/// `cursor u64 | audience u8 | group u32 | member u64 | message vec32`.
/// Confirms, rekeys and key updates are the member's own; challenges and
/// group messages are its group's. Every downlink message type starts its
/// body with the group id, so it is read from there.
pub(crate) fn encode_records(
    member: u64,
    records: &[DownlinkRecord],
    metrics: &GatewayMetrics,
) -> Bytes {
    let mut out = BytesMut::new();
    for (i, r) in records.iter().enumerate() {
        if i > 0 && out.len() + r.bytes.len() > BODY_BUDGET {
            break;
        }
        let kind = MessageType::from_code(r.kind);
        let personal = matches!(
            kind,
            Some(MessageType::Confirm | MessageType::Rekey | MessageType::KeyUpdate)
        );
        let group = r
            .bytes
            .get(2..6)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes);
        out.put_u64(r.cursor);
        if personal {
            out.put_u8(AUDIENCE_MEMBER);
            out.put_u32(group);
            out.put_u64(member);
        } else {
            out.put_u8(AUDIENCE_GROUP);
            out.put_u32(group);
            out.put_u64(0);
        }
        out.put_u32(u32::try_from(r.bytes.len()).unwrap_or(u32::MAX));
        out.put_slice(&r.bytes);
        let label = match kind {
            Some(MessageType::Challenge) => Some(DownlinkKind::Challenge),
            Some(MessageType::Confirm) => Some(DownlinkKind::Confirm),
            Some(MessageType::GroupMessage) => Some(DownlinkKind::Group),
            Some(MessageType::Rekey) => Some(DownlinkKind::Rekey),
            Some(MessageType::KeyUpdate) => Some(DownlinkKind::KeyUpdate),
            _ => None,
        };
        if let Some(l) = label {
            metrics.downlink_messages.get(l).inc();
        }
    }
    out.freeze()
}

/// One record of a downlink body, as a member (or a test) reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position; pass the last one processed as `after`.
    pub cursor: u64,
    /// 1 = group, 2 = member.
    pub audience: u8,
    /// The group.
    pub group: u32,
    /// The member (0 for group records).
    pub member: u64,
    /// A complete wire message.
    pub message: Bytes,
}

/// Why a records body does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// The body ends inside a record.
    #[error("records body truncated")]
    Truncated,
    /// A message length is over the cap.
    #[error("record message longer than {0} bytes")]
    TooLong(usize),
    /// An audience code other than 1 or 2.
    #[error("invalid record audience")]
    Audience,
}

/// Parses a records body (member side and the gateway's upstream side).
/// Each message is at most `max_message` bytes; messages share `body`'s
/// memory.
pub fn parse_records(body: &Bytes, max_message: usize) -> Result<Vec<Record>, RecordsError> {
    const HEAD: usize = 8 + 1 + 4 + 8 + 4;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let head = body.get(pos..pos + HEAD).ok_or(RecordsError::Truncated)?;
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_be_bytes(b)
        };
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&head[o..o + 4]);
            u32::from_be_bytes(b)
        };
        let cursor = u64_at(0);
        let audience = head[8];
        if audience != AUDIENCE_GROUP && audience != AUDIENCE_MEMBER {
            return Err(RecordsError::Audience);
        }
        let group = u32_at(9);
        let member = u64_at(13);
        let len = usize::try_from(u32_at(21)).unwrap_or(usize::MAX);
        if len > max_message {
            return Err(RecordsError::TooLong(max_message));
        }
        let start = pos + HEAD;
        let end = start.checked_add(len).ok_or(RecordsError::Truncated)?;
        if end > body.len() {
            return Err(RecordsError::Truncated);
        }
        out.push(Record {
            cursor,
            audience,
            group,
            member,
            message: body.slice(start..end),
        });
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let metrics = GatewayMetrics::register(&Registry::new());
        let confirm = Bytes::from_static(&[1, 7, 0, 0, 0, 9, 1, 2, 3]);
        let challenge = Bytes::from_static(&[1, 1, 0, 0, 0, 4]);
        let recs = vec![
            DownlinkRecord {
                cursor: 3,
                kind: 7,
                bytes: confirm.clone(),
            },
            DownlinkRecord {
                cursor: 5,
                kind: 1,
                bytes: challenge.clone(),
            },
        ];
        let body = encode_records(42, &recs, &metrics);
        let parsed = parse_records(&body, 1024).unwrap();
        assert_eq!(
            parsed,
            vec![
                Record {
                    cursor: 3,
                    audience: 2,
                    group: 9,
                    member: 42,
                    message: confirm
                },
                Record {
                    cursor: 5,
                    audience: 1,
                    group: 4,
                    member: 0,
                    message: challenge
                },
            ]
        );
        assert_eq!(
            parse_records(&body.slice(..body.len() - 1), 1024),
            Err(RecordsError::Truncated)
        );
        assert_eq!(parse_records(&body, 4), Err(RecordsError::TooLong(4)));
        let mut bad = BytesMut::from(&body[..]);
        bad[8] = 3;
        assert_eq!(
            parse_records(&bad.freeze(), 1024),
            Err(RecordsError::Audience)
        );
    }
}
