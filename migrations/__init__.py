"""The schema, as numbered SQL files applied in order by eventlog._db.migrate."""
