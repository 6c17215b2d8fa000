-- dapgw UDC store, PostgreSQL schema version 6: a registry version.
--
-- registry_version holds one counter that every change to the member
-- registry (members, member_groups) raises, through the statement triggers
-- below, in the same transaction as the change. A UDC process keeps the
-- member records it has read in memory and re-reads them only when the
-- counter it reads with a batch differs from the one its copy was read at
-- (docs/udc.md, "Registry cache"); with several UDC processes on one
-- store, a change made by any of them reaches the others this way.

CREATE TABLE registry_version (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    v  BIGINT NOT NULL
);
INSERT INTO registry_version (id, v) VALUES (1, 1);

CREATE FUNCTION dapgw_bump_registry_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE registry_version SET v = v + 1 WHERE id = 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER members_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON members
    FOR EACH STATEMENT EXECUTE FUNCTION dapgw_bump_registry_version();
CREATE TRIGGER member_groups_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON member_groups
    FOR EACH STATEMENT EXECUTE FUNCTION dapgw_bump_registry_version();
