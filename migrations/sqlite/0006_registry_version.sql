-- dapgw UDC store, SQLite schema version 6: a registry version.
--
-- registry_version holds one counter that every change to the member
-- registry (members, member_groups) raises, through the triggers below, in
-- the same transaction as the change. A UDC process keeps the member
-- records it has read in memory and re-reads them only when the counter
-- it reads with a batch differs from the one its copy was read at
-- (docs/udc.md, "Registry cache"). Triggers, not code in each write path,
-- so that no path that changes the registry can forget to raise it.

CREATE TABLE registry_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    v  INTEGER NOT NULL
);
INSERT INTO registry_version (id, v) VALUES (1, 1);

CREATE TRIGGER members_ins_version AFTER INSERT ON members
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
CREATE TRIGGER members_upd_version AFTER UPDATE ON members
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
CREATE TRIGGER members_del_version AFTER DELETE ON members
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
CREATE TRIGGER member_groups_ins_version AFTER INSERT ON member_groups
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
CREATE TRIGGER member_groups_upd_version AFTER UPDATE ON member_groups
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
CREATE TRIGGER member_groups_del_version AFTER DELETE ON member_groups
BEGIN UPDATE registry_version SET v = v + 1 WHERE id = 1; END;
