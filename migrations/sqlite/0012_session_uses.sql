-- dapgw UDC store, schema version 12: session uses beside the sealed slots.
--
-- An accepted uplink changes two things in its member's session slot: the
-- session it came under is now the one in use, and that session's replay
-- window moved. Until version 11 both were sealed into `sessions.state`, so
-- every reading resealed and rewrote the whole slot (four sessions' keys).
-- From version 12 the UDC stores them here, one narrow row per (member,
-- group): `sid` was seen in use and its window is `top` / `seen`. A row
-- applies to the slot only while the slot's `version` is still `base`; any
-- write of the slot folds the use into the sealed state and moves the
-- version, which leaves the row stale (the next use overwrites it).
--
-- Binaries older than version 12 would ignore this table and judge uplinks
-- against windows that are behind, accepting replays: the version number
-- makes them refuse the store, as for version 11.

CREATE TABLE session_uses (
    member INTEGER NOT NULL,
    grp    INTEGER NOT NULL,
    base   INTEGER NOT NULL,
    sid    BLOB NOT NULL,
    top    INTEGER NOT NULL,
    seen   INTEGER NOT NULL,
    PRIMARY KEY (member, grp)
) WITHOUT ROWID;
