//! Chunk aggregates and localization, shared by response and uplink batches.
//!
//! Data flow: the kind-specific screening (`round.rs`, `session.rs`) turns
//! each batch entry into a [`Screened`] value: a candidate for acceptance or
//! set aside with a reason, and the tag V recomputed for it (none when V
//! cannot know the key: unknown member or session). This module compares
//! the chunk aggregates, decides which chunks need their individual tags,
//! and after the tag reply (or its expiry) turns every entry into a final
//! [`Outcome`]. It never sees a key.

use std::collections::BTreeMap;

use crate::protocol::suite::{aggregate, ct_eq16};
use crate::protocol::wire::{ChunkTags, Outcome};

/// One entry after screening.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Screened {
    /// `None`: a candidate for acceptance; `Some(reason)`: set aside.
    pub(crate) set_aside: Option<Outcome>,
    /// The tag V recomputed; `None` when V does not know the entry's key, so
    /// its chunk can only be checked entry by entry.
    pub(crate) tag: Option<[u8; 16]>,
}

impl Screened {
    fn is_candidate(&self) -> bool {
        self.set_aside.is_none()
    }
}

/// Where the individual tags of failing chunks come from in this pass.
#[derive(Debug)]
pub(crate) enum TagSource<'a> {
    /// First pass: none yet; failing chunks are requested.
    FirstPass {
        /// At most this many chunks are requested.
        max_requested: usize,
    },
    /// The gateway answered a request for `requested`.
    Reply {
        /// The chunks that were requested.
        requested: &'a [u32],
        /// What the gateway returned.
        tags: &'a [ChunkTags],
    },
    /// The tag request expired unanswered.
    Expired,
}

/// The result of one pass.
#[derive(Debug)]
pub(crate) enum Assessment {
    /// The verdict can be made: one outcome per entry (`Accepted` for
    /// entries still to be finalized by the caller).
    Final(Judgement),
    /// Ask the gateway for the tags of these chunks (strictly increasing).
    NeedTags(Vec<u32>),
}

/// Per-entry outcomes of a finished assessment, and what localization did.
#[derive(Debug)]
pub(crate) struct Judgement {
    /// One per entry, in batch order.
    pub(crate) outcomes: Vec<Outcome>,
    /// Entries accepted on their individual tag (after localization).
    pub(crate) localized: u32,
}

/// Judges a batch from its screened entries and aggregates.
///
/// A chunk whose recomputed aggregate matches accepts all its candidates. A
/// chunk that fails and holds no candidate needs no localization (nothing in
/// it could be accepted). A failing chunk with candidates is localized: its
/// candidates are accepted exactly when the gateway returns a tag equal to
/// the recomputed one; otherwise they are unverified via gateway.
pub(crate) fn assess(
    screened: &[Screened],
    chunk_size: usize,
    aggregates: &[[u8; 16]],
    source: TagSource<'_>,
) -> Assessment {
    let mut outcomes: Vec<Outcome> = screened
        .iter()
        .map(|s| s.set_aside.unwrap_or(Outcome::Accepted))
        .collect();
    let mut failing = Vec::new();
    for (k, (chunk, expected)) in screened.chunks(chunk_size).zip(aggregates).enumerate() {
        if !chunk.iter().any(Screened::is_candidate) || chunk_matches(chunk, expected) {
            continue;
        }
        failing.push(k);
    }
    if failing.is_empty() {
        return Assessment::Final(Judgement {
            outcomes,
            localized: 0,
        });
    }

    let mut localized = 0;
    match source {
        TagSource::FirstPass { max_requested } => {
            let request: Vec<u32> = failing
                .iter()
                .take(max_requested.max(1))
                .filter_map(|&k| u32::try_from(k).ok())
                .collect();
            return Assessment::NeedTags(request);
        }
        TagSource::Reply { requested, tags } => {
            let answers = answers_by_chunk(tags);
            for &k in &failing {
                let range = k * chunk_size..((k + 1) * chunk_size).min(screened.len());
                let answer = u32::try_from(k)
                    .ok()
                    .filter(|k32| requested.binary_search(k32).is_ok())
                    .and_then(|k32| answers.get(&k32).copied().flatten())
                    .filter(|t| t.len() == range.len());
                for (i, s) in range.clone().zip(&screened[range.clone()]) {
                    if !s.is_candidate() {
                        continue;
                    }
                    let ok = match (answer, s.tag) {
                        (Some(returned), Some(mine)) => ct_eq16(&returned[i - range.start], &mine),
                        _ => false,
                    };
                    if ok {
                        localized += 1;
                    } else {
                        outcomes[i] = Outcome::UnverifiedViaGateway;
                    }
                }
            }
        }
        TagSource::Expired => {
            for &k in &failing {
                let range = k * chunk_size..((k + 1) * chunk_size).min(screened.len());
                for i in range {
                    if screened[i].is_candidate() {
                        outcomes[i] = Outcome::UnverifiedViaGateway;
                    }
                }
            }
        }
    }
    Assessment::Final(Judgement {
        outcomes,
        localized,
    })
}

/// Whether every tag of the chunk is known and their aggregate equals the
/// gateway's (constant-time comparison).
fn chunk_matches(chunk: &[Screened], expected: &[u8; 16]) -> bool {
    if chunk.iter().any(|s| s.tag.is_none()) {
        return false;
    }
    let mine = aggregate(chunk.iter().filter_map(|s| s.tag.as_ref()));
    ct_eq16(&mine, expected)
}

/// The tags the gateway returned, by chunk. A chunk answered twice is
/// ambiguous and counts as unanswered (`None`).
fn answers_by_chunk(tags: &[ChunkTags]) -> BTreeMap<u32, Option<&[[u8; 16]]>> {
    let mut map = BTreeMap::new();
    for c in tags {
        map.entry(c.chunk)
            .and_modify(|v| *v = None)
            .or_insert(Some(c.tags.as_slice()));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(tag: u8) -> Screened {
        Screened {
            set_aside: None,
            tag: Some([tag; 16]),
        }
    }

    fn aggs(tags: &[&[u8]]) -> Vec<[u8; 16]> {
        tags.iter()
            .map(|c| aggregate(c.iter().map(|t| [*t; 16]).collect::<Vec<_>>().iter()))
            .collect()
    }

    #[test]
    fn matching_chunks_accept_candidates_and_keep_reasons() {
        let mut s = vec![cand(1), cand(2), cand(3)];
        s[1].set_aside = Some(Outcome::Revoked);
        let a = aggs(&[&[1, 2], &[3]]);
        let Assessment::Final(j) = assess(&s, 2, &a, TagSource::FirstPass { max_requested: 4 })
        else {
            panic!("expected final")
        };
        assert_eq!(
            j.outcomes,
            [Outcome::Accepted, Outcome::Revoked, Outcome::Accepted]
        );
    }

    #[test]
    fn failing_chunks_are_requested_bounded_and_judged_per_tag() {
        let s: Vec<_> = (1..=6).map(cand).collect();
        // Chunks [1,2] [3,4] [5,6]; the first and last aggregates are wrong.
        let mut a = aggs(&[&[1, 2], &[3, 4], &[5, 6]]);
        a[0][0] ^= 1;
        a[2][0] ^= 1;
        let Assessment::NeedTags(req) =
            assess(&s, 2, &a, TagSource::FirstPass { max_requested: 1 })
        else {
            panic!("expected a tag request")
        };
        assert_eq!(req, [0], "bounded to one chunk");
        // The reply forges entry 1's tag; chunk 2 was never requested.
        let reply = [ChunkTags {
            chunk: 0,
            tags: vec![[1; 16], [9; 16]],
        }];
        let source = TagSource::Reply {
            requested: &req,
            tags: &reply,
        };
        let Assessment::Final(j) = assess(&s, 2, &a, source) else {
            panic!()
        };
        use Outcome::*;
        assert_eq!(
            j.outcomes,
            [
                Accepted,
                UnverifiedViaGateway,
                Accepted,
                Accepted,
                UnverifiedViaGateway,
                UnverifiedViaGateway
            ]
        );
        assert_eq!(j.localized, 1);
    }

    #[test]
    fn unknown_key_fails_its_chunk_but_not_the_honest_entries() {
        let s = vec![
            cand(1),
            Screened {
                set_aside: Some(Outcome::UnknownMember),
                tag: None,
            },
        ];
        // Even the right aggregate cannot be checked without every tag.
        let a = aggs(&[&[1, 7]]);
        let Assessment::NeedTags(req) =
            assess(&s, 2, &a, TagSource::FirstPass { max_requested: 8 })
        else {
            panic!()
        };
        let reply = [ChunkTags {
            chunk: 0,
            tags: vec![[1; 16], [7; 16]],
        }];
        let Assessment::Final(j) = assess(
            &s,
            2,
            &a,
            TagSource::Reply {
                requested: &req,
                tags: &reply,
            },
        ) else {
            panic!()
        };
        assert_eq!(j.outcomes, [Outcome::Accepted, Outcome::UnknownMember]);
        // Expiry: the honest entry is unverified, never accepted blindly.
        let Assessment::Final(j) = assess(&s, 2, &a, TagSource::Expired) else {
            panic!()
        };
        assert_eq!(
            j.outcomes,
            [Outcome::UnverifiedViaGateway, Outcome::UnknownMember]
        );
    }

    #[test]
    fn wrong_count_or_duplicate_answers_leave_entries_unverified() {
        let s = vec![cand(1), cand(2)];
        let a = vec![[0u8; 16]];
        let req = [0u32];
        for reply in [
            vec![ChunkTags {
                chunk: 0,
                tags: vec![[1; 16]],
            }],
            vec![
                ChunkTags {
                    chunk: 0,
                    tags: vec![[1; 16], [2; 16]],
                },
                ChunkTags {
                    chunk: 0,
                    tags: vec![[1; 16], [2; 16]],
                },
            ],
        ] {
            let Assessment::Final(j) = assess(
                &s,
                2,
                &a,
                TagSource::Reply {
                    requested: &req,
                    tags: &reply,
                },
            ) else {
                panic!()
            };
            assert_eq!(j.outcomes, [Outcome::UnverifiedViaGateway; 2]);
        }
        // A chunk with no candidate is never requested.
        let s = vec![Screened {
            set_aside: Some(Outcome::AlreadyAccepted),
            tag: Some([1; 16]),
        }];
        assert!(matches!(
            assess(&s, 1, &a, TagSource::FirstPass { max_requested: 8 }),
            Assessment::Final(_)
        ));
    }
}
