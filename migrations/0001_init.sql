-- The log's own tables carry an eventlog_ prefix: the file may hold an application's
-- tables too (the transactional outbox appends in the application's transaction).

CREATE TABLE eventlog_topics (
    name           TEXT PRIMARY KEY,
    partitions     INTEGER NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
    created_at      INTEGER NOT NULL,              -- ms since the epoch
    -- events = how many of the topic's events have offsets <= counted_through. Appenders
    -- fold the tail in every few thousand offsets and prune subtracts what it deletes, so an
    -- append writes no counter row and stats only ever counts a short tail.
    events          INTEGER NOT NULL DEFAULT 0,
    counted_through INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- AUTOINCREMENT: an offset is never reused, even after pruning empties the table.
CREATE TABLE eventlog_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    key        TEXT,
    payload    TEXT NOT NULL,
    headers    TEXT,
    created_at INTEGER NOT NULL,
    dedupe_key TEXT
);

-- Every read walks one lane (topic, partition) in offset order. There is no time index:
-- created_at grows with the offset, so a time is found by bisecting a lane.
CREATE INDEX eventlog_events_lane ON eventlog_events (topic, partition, id);
CREATE UNIQUE INDEX eventlog_events_dedupe ON eventlog_events (topic, dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- One committed position per group and lane. inflight_* names the batch being handled:
-- found set when a lane is taken, it means its last owner died mid-batch.
CREATE TABLE eventlog_group_offsets (
    group_name    TEXT NOT NULL,
    topic         TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    position      INTEGER NOT NULL,
    inflight_from INTEGER,
    inflight_to   INTEGER,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (group_name, topic, partition)
) WITHOUT ROWID;

-- Attempts are written before a retried (or crash-suspect) event's handler runs.
CREATE TABLE eventlog_attempts (
    group_name      TEXT NOT NULL,
    event_offset    INTEGER NOT NULL,
    topic           TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at INTEGER,
    last_failed_at  INTEGER,
    error_type      TEXT,
    error_message   TEXT,
    error_traceback TEXT,
    -- chosen before the dead-letter line is written: a member dying between that write and
    -- the commit leaves it here, and the next owner finds its line instead of adding one
    dead_letter_id  TEXT,
    PRIMARY KEY (group_name, event_offset)
) WITHOUT ROWID;

-- Events sent back from the dead-letter file to one group.
CREATE TABLE eventlog_redeliveries (
    group_name     TEXT NOT NULL,
    event_offset   INTEGER NOT NULL,
    dead_letter_id TEXT NOT NULL,
    requested_at   INTEGER NOT NULL,
    PRIMARY KEY (group_name, event_offset)
) WITHOUT ROWID;
