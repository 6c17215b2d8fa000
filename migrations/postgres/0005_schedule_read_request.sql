-- dapgw UDC store, PostgreSQL schema version 5: a schedule of read rounds
-- carries the read request its rounds send (bytes, at most 256; empty: the
-- meter's default reading). Schedules of version 4 had none: they keep
-- sending an empty one. Auth schedules hold an empty request.
-- (ADD COLUMN with a constant default rewrites no rows.)
ALTER TABLE schedules ADD COLUMN read_request BYTEA NOT NULL DEFAULT ''::bytea;
