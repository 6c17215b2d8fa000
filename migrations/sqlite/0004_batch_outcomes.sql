-- dapgw UDC store, SQLite schema version 4: round outcomes as one row per
-- batch, and each member's accepted rounds on its session slot row.
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
    id      INTEGER PRIMARY KEY,
    grp     INTEGER NOT NULL,
    round   INTEGER NOT NULL,
    gateway TEXT,                           -- NULL on the direct path
    at_ms   INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    outcomes BLOB NOT NULL
);
CREATE INDEX round_results_by_round ON round_results (grp, round, id);

-- The rounds of the group in which the member was accepted, as a window
-- over round numbers: acc_top is the newest (0: none), bit i of acc_seen
-- (bit-cast u64) says round acc_top - i was. The write that accepts a
-- member sets its round in the window, compare-and-set with the slot's
-- version: this is what makes a member accepted once per round, also
-- across UDC processes. Filled from the accepted outcomes stored so far.
ALTER TABLE sessions ADD COLUMN acc_top INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN acc_seen INTEGER NOT NULL DEFAULT 0;

-- A temporary index for the two fills: round_outcomes is keyed by
-- (grp, round, member), so without it each session row scans every
-- outcome of its group (members x rounds per row).
CREATE INDEX round_outcomes_accepted_fill ON round_outcomes (grp, member, round)
    WHERE kind = 0;
UPDATE sessions SET acc_top = coalesce((SELECT max(o.round) FROM round_outcomes o INDEXED BY round_outcomes_accepted_fill
    WHERE o.grp = sessions.grp AND o.member = sessions.member AND o.kind = 0), 0);
UPDATE sessions SET acc_seen = coalesce((SELECT sum(1 << (sessions.acc_top - o.round))
    FROM round_outcomes o INDEXED BY round_outcomes_accepted_fill WHERE o.grp = sessions.grp AND o.member = sessions.member
    AND o.kind = 0 AND sessions.acc_top - o.round < 64), 0)
WHERE acc_top > 0;
DROP INDEX round_outcomes_accepted_fill;
