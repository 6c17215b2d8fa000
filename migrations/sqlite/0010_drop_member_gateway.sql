-- dapgw UDC store, schema version 10: drop `member_gateway`.
--
-- Version 1 created a member -> gateway map that no UDC version ever wrote
-- (the batch write's list of members seen was never filled) and nothing
-- read. It is dropped rather than kept as an empty table that suggests a
-- feature. A process older than version 10 still running on a shared
-- PostgreSQL store never touches the table, so it keeps working.
DROP TABLE IF EXISTS member_gateway;
