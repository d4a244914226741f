-- "latest" for a whole group, not for each member: the head + 1 when the group's first member
-- started at `latest` with no start noted. Every member starts the lanes it finds without a
-- position there, so a member that joins later does not skip what a topic created meanwhile
-- (matching the group's pattern) received before it joined.
CREATE TABLE eventlog_group_starts (
    group_name   TEXT PRIMARY KEY,
    start_offset INTEGER NOT NULL,
    created_at   INTEGER NOT NULL  -- ms since the epoch
) WITHOUT ROWID;
