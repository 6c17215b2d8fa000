-- dapgw UDC store, PostgreSQL schema version 9: the oldest accepted key
-- version.
--
-- A key update (POST /v1/admin/members/{id}/key-update) moves a member's
-- root key to kv + 1 while the old version stays accepted, until the member
-- is first seen answering under the new one (docs/protocol.md, "Key
-- rotation"). `min_kv` is that oldest accepted version; NULL (every row
-- written before this version) reads as `kv`. A nullable column without a
-- default is added without rewriting the table.
ALTER TABLE members ADD COLUMN min_kv BIGINT;
