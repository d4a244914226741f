-- Offsets without AUTOINCREMENT. AUTOINCREMENT rewrites its sqlite_sequence row on every
-- insert: one more page in the WAL per commit, a third of a one-event append's cost. Offsets
-- still never repeat: the offset floor remembers the largest offset a delete removed from the
-- top of the table, and appends take max(largest id, floor) + 1.

CREATE TABLE eventlog_offset_floor (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    offset   INTEGER NOT NULL
);

INSERT INTO eventlog_offset_floor (only_row, offset)
VALUES (1, (SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'eventlog_events'));

CREATE TABLE eventlog_events_new (
    id         INTEGER PRIMARY KEY,
    topic      TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    key        TEXT,
    payload    TEXT NOT NULL,
    headers    TEXT,
    created_at INTEGER NOT NULL,
    dedupe_key TEXT
);

INSERT INTO eventlog_events_new (id, topic, partition, key, payload, headers, created_at, dedupe_key)
SELECT id, topic, partition, key, payload, headers, created_at, dedupe_key
FROM eventlog_events ORDER BY id;

DROP TABLE eventlog_events;

ALTER TABLE eventlog_events_new RENAME TO eventlog_events;

DELETE FROM sqlite_sequence WHERE name IN ('eventlog_events', 'eventlog_events_new');

CREATE INDEX eventlog_events_lane ON eventlog_events (topic, partition, id);
CREATE UNIQUE INDEX eventlog_events_dedupe ON eventlog_events (topic, dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- Only a delete of the newest event raises the floor (rows are deleted one at a time, so a
-- delete of everything raises it at its last row). Any delete, ours or a person's, counts.
CREATE TRIGGER eventlog_events_keep_floor AFTER DELETE ON eventlog_events
WHEN OLD.id > coalesce((SELECT max(id) FROM eventlog_events), 0)
BEGIN
    UPDATE eventlog_offset_floor SET offset = max(offset, OLD.id) WHERE only_row = 1;
END;
