-- dapgw UDC store, SQLite schema version 5: a schedule of read rounds
-- carries the read request its rounds send (bytes, at most 256; empty: the
-- meter's default reading). Schedules of version 4 had none: they keep
-- sending an empty one. Auth schedules hold an empty request.
ALTER TABLE schedules ADD COLUMN read_request BLOB NOT NULL DEFAULT x'';
