-- dapgw UDC store, SQLite schema version 2: one sealed session slot per
-- (member, group), compare-and-set on `version`.
-- The verifier keeps up to four sessions per pair (in use, newest unused,
-- two older unused), each with its replay window and downlink counter; the
-- whole slot is sealed into `state`. Version 1 spread it over "current" and
-- "previous" columns whose replay-window columns were never the truth.
-- `sid` is the newest session's id (NULL = empty slot); `round` the round
-- that created it. Version 1's current slot already held the whole sealed
-- slot (same row identity as AAD), so it carries over as is.

CREATE TABLE sessions_v2 (
    member       INTEGER NOT NULL,
    grp          INTEGER NOT NULL,
    last_auth_ms INTEGER NOT NULL,
    sid          BLOB,
    state        BLOB,
    round        INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    PRIMARY KEY (member, grp)
) WITHOUT ROWID;

INSERT INTO sessions_v2 (member, grp, last_auth_ms, sid, state, round, version)
SELECT member, grp, last_auth_ms,
       CASE WHEN cur_sid IS NULL OR cur_sid = zeroblob(8) THEN NULL ELSE cur_sid END,
       CASE WHEN cur_sid IS NULL OR cur_sid = zeroblob(8) THEN NULL ELSE cur_state END,
       coalesce(cur_round, 0), 1
FROM sessions;

DROP TABLE sessions;
ALTER TABLE sessions_v2 RENAME TO sessions;
