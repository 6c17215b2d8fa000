-- dapgw UDC store, PostgreSQL schema version 2: one sealed session slot per
-- (member, group), compare-and-set on `version` (see the SQLite migration
-- of the same number for the reasons).

CREATE TABLE sessions_v2 (
    member       BIGINT NOT NULL,
    grp          BIGINT NOT NULL,
    last_auth_ms BIGINT NOT NULL,
    sid          BYTEA,
    state        BYTEA,
    round        BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    PRIMARY KEY (member, grp)
) WITH (fillfactor = 70);  -- room for HOT updates: every round rewrites each row

INSERT INTO sessions_v2 (member, grp, last_auth_ms, sid, state, round, version)
SELECT member, grp, last_auth_ms,
       CASE WHEN cur_sid IS NULL OR cur_sid = '\x0000000000000000'::bytea THEN NULL ELSE cur_sid END,
       CASE WHEN cur_sid IS NULL OR cur_sid = '\x0000000000000000'::bytea THEN NULL ELSE cur_state END,
       coalesce(cur_round, 0), 1
FROM sessions;

DROP TABLE sessions;
ALTER TABLE sessions_v2 RENAME TO sessions;
ALTER INDEX sessions_v2_pkey RENAME TO sessions_pkey;
