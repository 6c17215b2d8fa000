-- dapgw UDC store, PostgreSQL schema version 1.
-- Conventions: u64 values are stored bit-cast into BIGINT (i64); u32 and
-- smaller fit as is. Every BYTEA named `state`, `imported_key` or `pending`
-- is sealed by the service under the storage key before it reaches the store.
-- The hot per-member tables (sessions, round_outcomes, readings) carry no
-- foreign keys: the verifier writes them only for members and rounds it has
-- just read, and a per-row FK check would cost more than the row itself.

CREATE TABLE members (
    id           BIGINT PRIMARY KEY,
    kv           BIGINT NOT NULL,
    key_source   BIGINT NOT NULL,          -- 0 derived from MS, 1 imported
    imported_key BYTEA,                      -- sealed; NULL when derived
    status       BIGINT NOT NULL,          -- 0 active, 1 revoked
    added_at_ms  BIGINT NOT NULL
);

CREATE TABLE member_groups (
    member BIGINT NOT NULL REFERENCES members(id) ON DELETE CASCADE,
    grp    BIGINT NOT NULL,
    PRIMARY KEY (member, grp)
);
CREATE INDEX member_groups_by_group ON member_groups (grp, member);

CREATE TABLE group_state (
    grp         BIGINT PRIMARY KEY,
    epoch       BIGINT NOT NULL,
    next_round  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    config_hash BYTEA NOT NULL,
    state       BYTEA NOT NULL,
    version     BIGINT NOT NULL
);

CREATE TABLE rounds (
    grp           BIGINT NOT NULL,
    round         BIGINT NOT NULL,
    opened_at_ms  BIGINT NOT NULL,
    closes_at_ms  BIGINT,
    mode          BIGINT NOT NULL,
    purpose       BIGINT NOT NULL,
    challenge     BYTEA NOT NULL,
    state         BYTEA NOT NULL,
    status        BIGINT NOT NULL,         -- 0 open, 1 closed
    localizations BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, round)
);
CREATE INDEX rounds_open ON rounds (status, grp, round);

CREATE TABLE round_outcomes (
    grp     BIGINT NOT NULL,
    round   BIGINT NOT NULL,
    member  BIGINT NOT NULL,
    kind    BIGINT NOT NULL,               -- 0 accepted, 1 rejected, 2 unverified via gateway
    reason  TEXT NOT NULL,
    gateway TEXT,                           -- NULL on the direct path
    at_ms   BIGINT NOT NULL,
    PRIMARY KEY (grp, round, member)
);

CREATE TABLE verdicts (
    gateway       TEXT NOT NULL,
    batch_id      BIGINT NOT NULL,
    batch_hash    BYTEA NOT NULL,
    verdict       BYTEA NOT NULL,
    final         BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (gateway, batch_id)
);

CREATE TABLE localizations (
    gateway       TEXT NOT NULL,
    batch_id      BIGINT NOT NULL,
    batch_hash    BYTEA NOT NULL,
    verdict       BYTEA NOT NULL,
    pending       BYTEA NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (gateway, batch_id)
);
CREATE INDEX localizations_by_expiry ON localizations (expires_at_ms);

-- One row per (member, group): the current and the previous session slot
-- (NULL sid = empty slot) with their replay windows, and the time of the
-- last successful authentication, which survives drop_all_sessions.
CREATE TABLE sessions (
    member           BIGINT NOT NULL,
    grp              BIGINT NOT NULL,
    last_auth_ms     BIGINT NOT NULL,
    cur_sid          BYTEA,
    cur_state        BYTEA,
    cur_round        BIGINT,
    cur_created_ms   BIGINT,
    cur_hi           BIGINT,
    cur_bits         BIGINT,
    prev_sid         BYTEA,
    prev_state       BYTEA,
    prev_round       BIGINT,
    prev_created_ms  BIGINT,
    prev_hi          BIGINT,
    prev_bits        BIGINT,
    PRIMARY KEY (member, grp)
) WITH (fillfactor = 70);  -- room for HOT updates: every round rewrites each row

CREATE TABLE readings (
    member  BIGINT NOT NULL,
    grp     BIGINT NOT NULL,
    sid     BYTEA NOT NULL,
    ctr     BIGINT NOT NULL,
    ts_ms   BIGINT NOT NULL,
    kind    BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (member, grp, sid, ctr)
);
CREATE INDEX readings_by_time ON readings (member, ts_ms);

CREATE TABLE group_messages (
    grp           BIGINT NOT NULL,
    seq           BIGINT NOT NULL,
    epoch         BIGINT NOT NULL,
    bytes         BYTEA NOT NULL,
    payload_hash  BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (grp, seq)
);

CREATE TABLE acks (
    grp    BIGINT NOT NULL,
    seq    BIGINT NOT NULL,
    member BIGINT NOT NULL,
    at_ms  BIGINT NOT NULL,
    PRIMARY KEY (grp, seq, member)
);

CREATE TABLE gateways (
    gateway       TEXT PRIMARY KEY,
    batches       BIGINT NOT NULL,
    entries       BIGINT NOT NULL,
    accepted      BIGINT NOT NULL,
    localizations BIGINT NOT NULL,
    unverified    BIGINT NOT NULL,
    last_batch_ms BIGINT NOT NULL
);

-- Which gateway a member is behind, and since when (rewritten only when the
-- member moves, so a batch of members that stayed writes nothing here).
CREATE TABLE member_gateway (
    member     BIGINT PRIMARY KEY,
    gateway    TEXT NOT NULL,
    seen_at_ms BIGINT NOT NULL
);

CREATE TABLE subscriptions (
    gateway TEXT NOT NULL,
    grp     BIGINT NOT NULL,
    PRIMARY KEY (gateway, grp)
);
CREATE INDEX subscriptions_by_group ON subscriptions (grp, gateway);

-- The last cursor handed out per gateway queue; writers bump it inside the
-- transaction that inserts the records, so cursors commit in order.
CREATE TABLE downlink_heads (
    gateway     TEXT PRIMARY KEY,
    last_cursor BIGINT NOT NULL
);

CREATE TABLE downlink (
    gateway       TEXT NOT NULL,
    cursor        BIGINT NOT NULL,
    audience      BIGINT NOT NULL,         -- 1 group, 2 member (as on the wire)
    grp           BIGINT NOT NULL,
    member        BIGINT NOT NULL,         -- 0 for group records
    message       BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (gateway, cursor)
);
CREATE INDEX downlink_by_age ON downlink (created_at_ms);

CREATE TABLE schedules (
    id         BIGSERIAL PRIMARY KEY,
    grp        BIGINT NOT NULL,
    every_ms   BIGINT NOT NULL,
    mode       BIGINT NOT NULL,
    purpose    BIGINT NOT NULL,
    next_at_ms BIGINT NOT NULL
);
