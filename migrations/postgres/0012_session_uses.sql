-- dapgw UDC store, PostgreSQL schema version 12: session uses beside the
-- sealed slots (see the SQLite migration of the same number for the
-- reasons and the rules).

CREATE TABLE session_uses (
    member BIGINT NOT NULL,
    grp    BIGINT NOT NULL,
    base   BIGINT NOT NULL,
    sid    BYTEA NOT NULL,
    top    BIGINT NOT NULL,
    seen   BIGINT NOT NULL,
    PRIMARY KEY (member, grp)
) WITH (fillfactor = 70);  -- room for HOT updates: every reading rewrites its row
