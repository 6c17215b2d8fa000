-- dapgw UDC store, PostgreSQL schema version 4: round outcomes as one row
-- per batch, and each member's accepted rounds on its session slot row.
--
-- round_results: the outcomes one write (a batch's final verdict, a direct
-- submission) recorded for one round, encoded in `outcomes` as entries of
--   member u64 | kind u8 (0 accepted, 1 rejected, 2 unverified via gateway)
--   | reason length u8 | reason (UTF-8)
-- (big-endian), in batch order. Reports fold them per member: an accepted
-- outcome sticks, otherwise the latest row (by id) wins. round_outcomes
-- (version 1: one row per member) is no longer written; its rows are still
-- read by the reports, before the round_results rows.
CREATE TABLE round_results (
    id       BIGSERIAL PRIMARY KEY,
    grp      BIGINT NOT NULL,
    round    BIGINT NOT NULL,
    gateway  TEXT,                          -- NULL on the direct path
    at_ms    BIGINT NOT NULL,
    n        BIGINT NOT NULL,
    outcomes BYTEA NOT NULL
);
CREATE INDEX round_results_by_round ON round_results (grp, round, id);

-- The rounds of the group in which the member was accepted, as a window
-- over round numbers: acc_top is the newest (0: none), bit i of acc_seen
-- (bit-cast u64) says round acc_top - i was. The write that accepts a
-- member sets its round in the window, compare-and-set with the slot's
-- version: this is what makes a member accepted once per round, also
-- across UDC processes. Filled from the accepted outcomes stored so far.
ALTER TABLE sessions ADD COLUMN acc_top BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN acc_seen BIGINT NOT NULL DEFAULT 0;

UPDATE sessions s SET acc_top = x.top FROM (SELECT grp, member, max(round) AS top
    FROM round_outcomes WHERE kind = 0 GROUP BY grp, member) x
WHERE s.grp = x.grp AND s.member = x.member;
UPDATE sessions s SET acc_seen = x.seen FROM (SELECT o.grp, o.member,
    bit_or(1::bigint << (s2.acc_top - o.round)::int) AS seen
    FROM round_outcomes o JOIN sessions s2 ON s2.grp = o.grp AND s2.member = o.member
    WHERE o.kind = 0 AND s2.acc_top - o.round < 64 GROUP BY o.grp, o.member) x
WHERE s.grp = x.grp AND s.member = x.member;
