-- dapgw UDC store, SQLite schema version 7: the recovery floor.
--
-- One row. `dapgw udc recover --restored-from-backup` raises `floor` (a
-- bit-cast u64) in the transaction that raises every counter of the
-- restored store (docs/udc.md, "Restoring a backup"). A group created
-- afterwards starts its round, epoch and message seq above the floor, and a
-- gateway queue started afterwards hands out its first cursor above it, so
-- a group or gateway first used after the backup (no row in the restored
-- store to raise) never repeats a number members or gateways already hold.
-- `recoveries` counts the recoveries run on this store's line of history,
-- `recovered_at_ms` says when the last one ran (NULL: never),
-- `newest_record_ms` the newest time the store recorded anything at when
-- it ran (about when its backup was taken; NULL: never, or an empty store).
CREATE TABLE recovery (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    floor           INTEGER NOT NULL,
    recoveries      INTEGER NOT NULL,
    recovered_at_ms INTEGER,
    newest_record_ms INTEGER
);
INSERT INTO recovery (id, floor, recoveries, recovered_at_ms, newest_record_ms)
    VALUES (1, 0, 0, NULL, NULL);
