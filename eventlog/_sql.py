"""Every SQL statement eventlog runs, named for its intent. Values are always parameters."""

from __future__ import annotations

# -- connection -------------------------------------------------------------------------------

# journal_size_limit: after a checkpoint resets the WAL, it is truncated back to this size.
PRAGMAS = (
    "PRAGMA busy_timeout = {busy_timeout_ms}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = {synchronous}",
    "PRAGMA foreign_keys = ON",
    "PRAGMA journal_size_limit = 67108864",
)

# Writers start every transaction with the write lock: a deferred transaction that upgrades
# later can fail with SQLITE_BUSY without waiting for the busy handler.
BEGIN_WRITE = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"

DATA_VERSION = "PRAGMA data_version"
CHECKPOINT_TRUNCATE = "PRAGMA wal_checkpoint(TRUNCATE)"
CHECKPOINT_PASSIVE = "PRAGMA wal_checkpoint(PASSIVE)"
# Any read: the first one opens (and on a fresh file creates) the -wal file.
OPEN_WAL = "SELECT count(*) FROM sqlite_schema"
# Appenders checkpoint on their own schedule, after the wake-ups and outside the write lock
# (_db.Checkpointer); SQLite's checkpoint inside a committing statement, which would hold
# the lock and delay the wake-ups through an fsync, is left as a backstop at 16 MiB.
AUTOCHECKPOINT_BACKSTOP = "PRAGMA wal_autocheckpoint = 4096"
INTEGRITY_CHECK = "PRAGMA integrity_check"
QUICK_CHECK = "PRAGMA quick_check"

# -- schema -----------------------------------------------------------------------------------

CREATE_SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS eventlog_schema ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
)
SCHEMA_TABLE_EXISTS = (
    "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'eventlog_schema'"
)
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM eventlog_schema"
RECORD_MIGRATION = "INSERT INTO eventlog_schema (version, name, applied_at) VALUES (?, ?, ?)"
# A migration that rebuilds one of our tables (create, copy, drop, rename) drops the triggers
# an application put on it; the runner puts them back. Legacy rename semantics keep SQLite from
# rejecting the rename over an application's view of the table (which would name a table that,
# mid-migration, does not exist).
APP_TRIGGERS_ON_OUR_TABLES = (
    "SELECT name, sql FROM sqlite_schema WHERE type = 'trigger'"
    " AND name NOT LIKE 'eventlog!_%' ESCAPE '!' AND tbl_name LIKE 'eventlog!_%' ESCAPE '!'"
)
TRIGGER_EXISTS = "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name = ?"
LEGACY_RENAME_ON = "PRAGMA legacy_alter_table = ON"
LEGACY_RENAME_OFF = "PRAGMA legacy_alter_table = OFF"

# -- topics -----------------------------------------------------------------------------------

CREATE_TOPIC = (
    "INSERT INTO eventlog_topics (name, partitions, created_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name) DO NOTHING"
)
CREATE_TOPIC_RETURNING = CREATE_TOPIC + " RETURNING name"
TOPIC_PARTITIONS = "SELECT partitions FROM eventlog_topics WHERE name = ?"
TOPIC_COUNTS = "SELECT partitions, counted_through FROM eventlog_topics WHERE name = ?"
ALL_TOPIC_PARTITIONS = "SELECT name, partitions FROM eventlog_topics ORDER BY name"
COUNT_LANE_RANGE = (
    "SELECT count(*) FROM eventlog_events WHERE topic = ? AND partition = ? AND id > ? AND id <= ?"
)
FOLD_TOPIC_COUNT = (
    "UPDATE eventlog_topics SET events = events + ?, counted_through = ? WHERE name = ?"
)
COUNT_PRUNED = "UPDATE eventlog_topics SET events = max(events - ?, 0) WHERE name = ?"
LIST_TOPICS = (
    "SELECT name, partitions, created_at, events, counted_through FROM eventlog_topics"
    " ORDER BY name"
)
# Rides eventlog_events_lane: one index probe per partition, never a scan.
FIRST_OFFSET_IN_LANE = "SELECT min(id) FROM eventlog_events WHERE topic = ? AND partition = ?"
LAST_OFFSET_IN_LANE = "SELECT max(id) FROM eventlog_events WHERE topic = ? AND partition = ?"
LAST_EVENT_IN_LANE = (
    "SELECT id, created_at FROM eventlog_events WHERE topic = ? AND partition = ?"
    " ORDER BY id DESC LIMIT 1"
)
# One probe of the bisection that finds a time in a lane.
LANE_EVENT_FROM = (
    "SELECT id, created_at FROM eventlog_events WHERE topic = ? AND partition = ? AND id >= ?"
    " ORDER BY id LIMIT 1"
)

# -- events -----------------------------------------------------------------------------------

# The next offset: one past the newest event or past the floor that deletes left behind, so an
# offset is never handed out twice (see migrations/0002).
NEXT_OFFSET = (
    "(SELECT max(coalesce((SELECT max(id) FROM eventlog_events), 0), offset) + 1"
    " FROM eventlog_offset_floor)"
)


def _insert_event(offset: str, key: bool, headers: bool) -> str:
    # An absent key or headers is a NULL literal, not a bound None: sqlite3 sends a bound
    # None through its adapter lookup, which costs more than the rest of the row's binding.
    return (
        "INSERT INTO eventlog_events (id, topic, partition, key, payload, headers, created_at)"
        f" VALUES ({offset}, ?, ?, {'?' if key else 'NULL'}, ?, {'?' if headers else 'NULL'}, ?)"
    )


# One statement per shape of event: index 2 * (a key is bound) + (headers are bound).
INSERT_EVENT = tuple(_insert_event(NEXT_OFFSET, k, h) for k in (False, True) for h in (False, True))
# A batch with its offsets chosen by the writer holding the write lock.
INSERT_EVENTS_AT = tuple(_insert_event("?", k, h) for k in (False, True) for h in (False, True))
# A retried producer's dedupe key hits the partial unique index and inserts nothing.
INSERT_EVENT_DEDUPED = (
    "INSERT INTO eventlog_events"
    " (id, topic, partition, key, payload, headers, created_at, dedupe_key)"
    f" VALUES ({NEXT_OFFSET}, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (topic, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id"
)
OFFSET_OF_DEDUPE_KEY = "SELECT id FROM eventlog_events WHERE topic = ? AND dedupe_key = ?"
# The largest offset ever handed out, even when every event was pruned.
HEAD_OFFSET = f"SELECT {NEXT_OFFSET} - 1"

EVENT_COLUMNS = "id, topic, partition, key, payload, headers, created_at"
READ_LANE_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id > ? ORDER BY id LIMIT ?"
)
# The same, bounded above: a reader merging lanes reads none past the page's cutoff.
READ_LANE_BETWEEN = (
    f"SELECT {EVENT_COLUMNS} FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?"
)
# A lane's next offset after a position: one index seek.
LANE_NEXT_OFFSET = (
    "SELECT id FROM eventlog_events WHERE topic = ? AND partition = ? AND id > ?"
    " ORDER BY id LIMIT 1"
)
READ_EVENT = f"SELECT {EVENT_COLUMNS} FROM eventlog_events WHERE id = ?"
LANE_HAS_AFTER = (
    "SELECT 1 FROM eventlog_events WHERE topic = ? AND partition = ? AND id > ? LIMIT 1"
)
COUNT_LANE_AFTER = (
    "SELECT count(*) FROM eventlog_events WHERE topic = ? AND partition = ? AND id > ?"
)

# -- consumer groups --------------------------------------------------------------------------

GROUP_LANE = (
    "SELECT position, inflight_from, inflight_to FROM eventlog_group_offsets"
    " WHERE group_name = ? AND topic = ? AND partition = ?"
)
START_GROUP_LANE = (
    "INSERT INTO eventlog_group_offsets (group_name, topic, partition, position, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
# max(): a commit never moves a position backwards by accident (a stale batch, a retry).
COMMIT_GROUP_LANE = (
    "UPDATE eventlog_group_offsets SET position = max(position, ?), inflight_from = ?,"
    " inflight_to = ?, updated_at = ? WHERE group_name = ? AND topic = ? AND partition = ?"
)
# Replay moves positions on purpose, backwards too; only with no live member.
SET_GROUP_LANE = (
    "INSERT INTO eventlog_group_offsets (group_name, topic, partition, position, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_name, topic, partition) DO UPDATE SET"
    " position = excluded.position, inflight_from = NULL, inflight_to = NULL,"
    " updated_at = excluded.updated_at"
)
LIST_GROUP_LANES = (
    "SELECT group_name, topic, partition, position, inflight_from, inflight_to, updated_at"
    " FROM eventlog_group_offsets ORDER BY group_name, topic, partition"
)
GROUP_LANES = (
    "SELECT group_name, topic, partition, position, inflight_from, inflight_to, updated_at"
    " FROM eventlog_group_offsets WHERE group_name = ? ORDER BY topic, partition"
)
DELETE_GROUP_OFFSETS = "DELETE FROM eventlog_group_offsets WHERE group_name = ?"
# Every table a group leaves rows in: a file restored without its sidecar folder still knows
# a group that only noted its start, or only has requeued dead letters waiting.
GROUP_NAMES = (
    "SELECT group_name FROM eventlog_group_offsets"
    " UNION SELECT group_name FROM eventlog_group_starts"
    " UNION SELECT group_name FROM eventlog_attempts"
    " UNION SELECT group_name FROM eventlog_redeliveries"
)
NOTE_GROUP_START = (
    "INSERT INTO eventlog_group_starts (group_name, start_offset, created_at) VALUES (?, ?, ?)"
    " ON CONFLICT (group_name) DO NOTHING"
)
GROUP_START = "SELECT start_offset FROM eventlog_group_starts WHERE group_name = ?"
DELETE_GROUP_START = "DELETE FROM eventlog_group_starts WHERE group_name = ?"
DELETE_GROUP_ATTEMPTS = "DELETE FROM eventlog_attempts WHERE group_name = ?"
DELETE_GROUP_REDELIVERIES = "DELETE FROM eventlog_redeliveries WHERE group_name = ?"
MIN_GROUP_POSITION = (
    "SELECT group_name, min(position) FROM eventlog_group_offsets"
    " WHERE topic = ? GROUP BY group_name"
)

LANE_ATTEMPTS = (
    "SELECT event_offset, attempts FROM eventlog_attempts"
    " WHERE group_name = ? AND topic = ? AND partition = ? AND event_offset > ?"
    " AND event_offset <= ?"
)
EVENT_ATTEMPT = (
    "SELECT attempts, first_failed_at, last_failed_at, error_type, error_message,"
    " error_traceback, dead_letter_id FROM eventlog_attempts"
    " WHERE group_name = ? AND event_offset = ?"
)
# Only if unset: the id of the first try to park this failure episode stands.
CHOOSE_DEAD_LETTER_ID = (
    "INSERT INTO eventlog_attempts (group_name, event_offset, topic, partition, attempts,"
    " dead_letter_id) VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (group_name, event_offset)"
    " DO UPDATE SET dead_letter_id = coalesce(dead_letter_id, excluded.dead_letter_id)"
    " RETURNING dead_letter_id"
)
# Written before a suspect event's handler runs, so a crash inside it still counts.
START_ATTEMPT = (
    "INSERT INTO eventlog_attempts (group_name, event_offset, topic, partition, attempts)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_name, event_offset) DO UPDATE SET"
    " attempts = max(attempts, excluded.attempts)"
)
RECORD_FAILURE = (
    "UPDATE eventlog_attempts SET first_failed_at = coalesce(first_failed_at, ?),"
    " last_failed_at = ?, error_type = ?, error_message = ?, error_traceback = ?"
    " WHERE group_name = ? AND event_offset = ?"
)
CLEAR_ATTEMPTS = "DELETE FROM eventlog_attempts WHERE group_name = ? AND event_offset = ?"
CLEAR_LANE_ATTEMPTS_AFTER = (
    "DELETE FROM eventlog_attempts"
    " WHERE group_name = ? AND topic = ? AND partition = ? AND event_offset > ?"
)
GROUP_ATTEMPTS = (
    "SELECT event_offset, topic, partition, attempts, last_failed_at, error_type, error_message"
    " FROM eventlog_attempts WHERE group_name = ? ORDER BY event_offset"
)

# A request for an event whose redelivery is still pending (or running) takes it over: the
# run that finishes deletes only the request it was for (DONE_REDELIVERY), so this one runs.
REQUEST_REDELIVERY = (
    "INSERT INTO eventlog_redeliveries (group_name, event_offset, dead_letter_id, requested_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (group_name, event_offset) DO UPDATE"
    " SET dead_letter_id = excluded.dead_letter_id, requested_at = excluded.requested_at"
)
EVENT_EXISTS = "SELECT 1 FROM eventlog_events WHERE id = ?"
# A group's pending requests with their events' lanes (NULL: pruned), without payloads: read
# at every rebalance, where a member takes those of its own lanes.
PENDING_REDELIVERIES = (
    "SELECT r.event_offset, r.dead_letter_id, e.topic, e.partition"
    " FROM eventlog_redeliveries r LEFT JOIN eventlog_events e ON e.id = r.event_offset"
    " WHERE r.group_name = ? ORDER BY r.event_offset"
)
DONE_REDELIVERY = (
    "DELETE FROM eventlog_redeliveries"
    " WHERE group_name = ? AND event_offset = ? AND dead_letter_id = ?"
)

# -- retention --------------------------------------------------------------------------------

PRUNE_LANE_BEFORE = "DELETE FROM eventlog_events WHERE topic = ? AND partition = ? AND id <= ?"

# -- operations (cli) -------------------------------------------------------------------------
# Statements of the operator tools (_stats, _retention, _replay, _backup, _doctor). Only appended
# to.

MAX_EVENT_ID = "SELECT max(id) FROM eventlog_events"
# Capped count: an index walk of at most ? entries, so stats stays fast on any log.
COUNT_LANE_AFTER_CAPPED = (
    "SELECT count(*) FROM (SELECT 1 FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id > ? LIMIT ?)"
)
# Replay's --shift-by counts events within the lane (offsets are shared by all topics).
LANE_OFFSET_BACK = (
    "SELECT id FROM eventlog_events WHERE topic = ? AND partition = ? AND id <= ?"
    " ORDER BY id DESC LIMIT 1 OFFSET ?"
)
LANE_OFFSET_FORWARD = (
    "SELECT id FROM eventlog_events WHERE topic = ? AND partition = ? AND id > ?"
    " ORDER BY id LIMIT 1 OFFSET ?"
)
LANE_NEWEST_IDS = (
    "SELECT id FROM eventlog_events WHERE topic = ? AND partition = ? AND id < ?"
    " ORDER BY id DESC LIMIT ?"
)
GROUP_POSITIONS_IN_TOPIC = (
    "SELECT group_name, partition, position FROM eventlog_group_offsets WHERE topic = ?"
)
# Every requeued event of a lane up to an offset (REDELIVERIES_IN_TOPIC has each group's
# first only): what a forced prune takes that those groups have not handled.
REDELIVERED_IN_LANE_UPTO = (
    "SELECT count(DISTINCT r.event_offset) FROM eventlog_redeliveries r"
    " JOIN eventlog_events e ON e.id = r.event_offset"
    " WHERE e.topic = ? AND e.partition = ? AND r.event_offset <= ?"
)
REDELIVERIES_IN_TOPIC = (
    "SELECT r.group_name, e.partition, min(r.event_offset) FROM eventlog_redeliveries r"
    " JOIN eventlog_events e ON e.id = r.event_offset WHERE e.topic = ?"
    " GROUP BY r.group_name, e.partition"
)
PENDING_REDELIVERY_COUNT = "SELECT count(*) FROM eventlog_redeliveries WHERE group_name = ?"
# One chunk of a prune, oldest first: short write transactions, so producers never wait
# long. RETURNING: only events at or below the topic's counted_through leave its counter.
PRUNE_LANE_CHUNK = (
    "DELETE FROM eventlog_events WHERE id IN (SELECT id FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id <= ? ORDER BY id LIMIT ?) RETURNING id"
)
# Starts the read transaction a backup copies from: one snapshot, so concurrent commits
# neither restart the copy nor leak into it.
BACKUP_SNAPSHOT = "SELECT count(*) FROM sqlite_schema"

# -- web --------------------------------------------------------------------------------------
# Statements of eventlog/web (the dashboard's browse view). Only appended to.

# Browsing a lane between two offsets, either way: (after, through], oldest or newest first.
READ_LANE_RANGE = (
    f"SELECT {EVENT_COLUMNS} FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?"
)
READ_LANE_RANGE_DESC = (
    f"SELECT {EVENT_COLUMNS} FROM eventlog_events"
    " WHERE topic = ? AND partition = ? AND id > ? AND id <= ? ORDER BY id DESC LIMIT ?"
)
