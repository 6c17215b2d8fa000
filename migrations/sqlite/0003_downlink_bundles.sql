-- dapgw UDC store, SQLite schema version 3: one downlink row may carry
-- several records of one queue (the confirms of one batch), so a batch of
-- 1,000 members writes one row instead of 1,000.
-- A row holds `n` records with cursors `cursor - n + 1 ..= cursor` (the key
-- is the row's last cursor). n = 1: the record is in audience, grp, member
-- and message, as in version 2. n > 1: audience, grp and member are 0 and
-- `message` holds the records framed one after the other as
-- audience u8 | group u32 | member u64 | length u32 | message (big-endian).
ALTER TABLE downlink ADD COLUMN n INTEGER NOT NULL DEFAULT 1;
