-- dapgw UDC store, SQLite schema version 1.
-- Conventions: u64 values are stored bit-cast into INTEGER (i64); u32 and
-- smaller fit as is. Every BLOB named `state`, `imported_key` or `pending`
-- is sealed by the service under the storage key before it reaches the store.
-- The hot per-member tables (sessions, round_outcomes, readings) carry no
-- foreign keys: the verifier writes them only for members and rounds it has
-- just read, and a per-row FK check would cost more than the row itself.

CREATE TABLE members (
    id           INTEGER PRIMARY KEY,
    kv           INTEGER NOT NULL,
    key_source   INTEGER NOT NULL,          -- 0 derived from MS, 1 imported
    imported_key BLOB,                      -- sealed; NULL when derived
    status       INTEGER NOT NULL,          -- 0 active, 1 revoked
    added_at_ms  INTEGER NOT NULL
);

CREATE TABLE member_groups (
    member INTEGER NOT NULL REFERENCES members(id) ON DELETE CASCADE,
    grp    INTEGER NOT NULL,
    PRIMARY KEY (member, grp)
) WITHOUT ROWID;
CREATE INDEX member_groups_by_group ON member_groups (grp, member);

CREATE TABLE group_state (
    grp         INTEGER PRIMARY KEY,
    epoch       INTEGER NOT NULL,
    next_round  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    config_hash BLOB NOT NULL,
    state       BLOB NOT NULL,
    version     INTEGER NOT NULL
);

CREATE TABLE rounds (
    grp           INTEGER NOT NULL,
    round         INTEGER NOT NULL,
    opened_at_ms  INTEGER NOT NULL,
    closes_at_ms  INTEGER,
    mode          INTEGER NOT NULL,
    purpose       INTEGER NOT NULL,
    challenge     BLOB NOT NULL,
    state         BLOB NOT NULL,
    status        INTEGER NOT NULL,         -- 0 open, 1 closed
    localizations INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, round)
) WITHOUT ROWID;
CREATE INDEX rounds_open ON rounds (status, grp, round);

CREATE TABLE round_outcomes (
    grp     INTEGER NOT NULL,
    round   INTEGER NOT NULL,
    member  INTEGER NOT NULL,
    kind    INTEGER NOT NULL,               -- 0 accepted, 1 rejected, 2 unverified via gateway
    reason  TEXT NOT NULL,
    gateway TEXT,                           -- NULL on the direct path
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (grp, round, member)
) WITHOUT ROWID;

CREATE TABLE verdicts (
    gateway       TEXT NOT NULL,
    batch_id      INTEGER NOT NULL,
    batch_hash    BLOB NOT NULL,
    verdict       BLOB NOT NULL,
    final         INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, batch_id)
) WITHOUT ROWID;

CREATE TABLE localizations (
    gateway       TEXT NOT NULL,
    batch_id      INTEGER NOT NULL,
    batch_hash    BLOB NOT NULL,
    verdict       BLOB NOT NULL,
    pending       BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, batch_id)
) WITHOUT ROWID;
CREATE INDEX localizations_by_expiry ON localizations (expires_at_ms);

-- One row per (member, group): the current and the previous session slot
-- (NULL sid = empty slot) with their replay windows, and the time of the
-- last successful authentication, which survives drop_all_sessions.
CREATE TABLE sessions (
    member           INTEGER NOT NULL,
    grp              INTEGER NOT NULL,
    last_auth_ms     INTEGER NOT NULL,
    cur_sid          BLOB,
    cur_state        BLOB,
    cur_round        INTEGER,
    cur_created_ms   INTEGER,
    cur_hi           INTEGER,
    cur_bits         INTEGER,
    prev_sid         BLOB,
    prev_state       BLOB,
    prev_round       INTEGER,
    prev_created_ms  INTEGER,
    prev_hi          INTEGER,
    prev_bits        INTEGER,
    PRIMARY KEY (member, grp)
) WITHOUT ROWID;

CREATE TABLE readings (
    member  INTEGER NOT NULL,
    grp     INTEGER NOT NULL,
    sid     BLOB NOT NULL,
    ctr     INTEGER NOT NULL,
    ts_ms   INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (member, grp, sid, ctr)
) WITHOUT ROWID;
CREATE INDEX readings_by_time ON readings (member, ts_ms);

CREATE TABLE group_messages (
    grp           INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    epoch         INTEGER NOT NULL,
    bytes         BLOB NOT NULL,
    payload_hash  BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;

CREATE TABLE acks (
    grp    INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    member INTEGER NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (grp, seq, member)
) WITHOUT ROWID;

CREATE TABLE gateways (
    gateway       TEXT PRIMARY KEY,
    batches       INTEGER NOT NULL,
    entries       INTEGER NOT NULL,
    accepted      INTEGER NOT NULL,
    localizations INTEGER NOT NULL,
    unverified    INTEGER NOT NULL,
    last_batch_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Which gateway a member is behind, and since when (rewritten only when the
-- member moves, so a batch of members that stayed writes nothing here).
CREATE TABLE member_gateway (
    member     INTEGER PRIMARY KEY,
    gateway    TEXT NOT NULL,
    seen_at_ms INTEGER NOT NULL
);

CREATE TABLE subscriptions (
    gateway TEXT NOT NULL,
    grp     INTEGER NOT NULL,
    PRIMARY KEY (gateway, grp)
) WITHOUT ROWID;
CREATE INDEX subscriptions_by_group ON subscriptions (grp, gateway);

-- The last cursor handed out per gateway queue; writers bump it inside the
-- transaction that inserts the records, so cursors commit in order.
CREATE TABLE downlink_heads (
    gateway     TEXT PRIMARY KEY,
    last_cursor INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE downlink (
    gateway       TEXT NOT NULL,
    cursor        INTEGER NOT NULL,
    audience      INTEGER NOT NULL,         -- 1 group, 2 member (as on the wire)
    grp           INTEGER NOT NULL,
    member        INTEGER NOT NULL,         -- 0 for group records
    message       BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, cursor)
) WITHOUT ROWID;
CREATE INDEX downlink_by_age ON downlink (created_at_ms);

CREATE TABLE schedules (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    grp        INTEGER NOT NULL,
    every_ms   INTEGER NOT NULL,
    mode       INTEGER NOT NULL,
    purpose    INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL
);
