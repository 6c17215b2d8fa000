-- dapgw UDC store, schema version 10: drop `member_gateway`.
--
-- Version 1 created a member -> gateway map that no UDC version ever wrote
-- (the batch write's list of members seen was never filled) and nothing
-- read. It is dropped rather than kept as an empty table that suggests a
-- feature. A UDC process older than version 10 still running on this file
-- prepares its insert with every gateway batch and fails them from now on:
-- stop it before starting the new one (an older binary refuses to open the
-- file afterwards, as after any migration).
DROP TABLE IF EXISTS member_gateway;
