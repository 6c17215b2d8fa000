-- dapgw UDC store, SQLite schema version 8: readings in arrival order.
--
-- Version 1 kept readings in a WITHOUT ROWID table keyed by (member, grp,
-- sid, ctr). A batch's readings come from members spread over the whole id
-- range, so a batch of a thousand readings dirtied about one page of that
-- table per reading (and the WAL and later the database file carried each
-- of those pages again), on top of one page per reading of
-- readings_by_time. Now the table is a rowid table written in arrival
-- order: a batch's readings fill a few pages at its end. The index keeps
-- the order a readings page follows (member, ts_ms, grp, sid, ctr), as the
-- PostgreSQL store's readings_by_key does.
--
-- The key (member, grp, sid, ctr) is no longer enforced unique here: the
-- session's replay window (uplink readings and alarms) and the slot's
-- accepted-rounds window (a read round's reading), advanced compare-and-set
-- on the slot's version in the same transaction, are what refuse a repeat,
-- as the window always did for acks; the key only ever repeated that check.
CREATE TABLE readings_v8 (
    member  INTEGER NOT NULL,
    grp     INTEGER NOT NULL,
    sid     BLOB NOT NULL,
    ctr     INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    payload BLOB NOT NULL
);

INSERT INTO readings_v8 (member, grp, sid, ctr, ts_ms, kind, payload)
SELECT member, grp, sid, ctr, ts_ms, kind, payload FROM readings ORDER BY ts_ms;

DROP TABLE readings;
ALTER TABLE readings_v8 RENAME TO readings;
CREATE INDEX readings_by_key ON readings (member, ts_ms, grp, sid, ctr);
