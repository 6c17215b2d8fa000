-- dapgw UDC store, PostgreSQL schema version 7: readings are indexed by
-- (member, ts_ms, grp, sid, ctr), the order a readings page follows, so a
-- page's scan starts right after its key (the `after` token). The index
-- of version 1, (member, ts_ms), made it start at the key's millisecond
-- and sort that whole millisecond for every page. The new index's prefix
-- serves every query the old one served. (SQLite needs no change: its
-- readings_by_time, on a WITHOUT ROWID table, carries the primary key
-- after ts_ms.)
-- IF NOT EXISTS: on a large store an operator can build the index
-- beforehand without blocking writers (docs/udc.md, Storage:
-- CREATE INDEX CONCURRENTLY IF NOT EXISTS readings_by_key ON readings
-- (member, ts_ms, grp, sid, ctr)), and this step then finds it built.
CREATE INDEX IF NOT EXISTS readings_by_key ON readings (member, ts_ms, grp, sid, ctr);
DROP INDEX IF EXISTS readings_by_time;
