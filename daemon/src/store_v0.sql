-- The schema of state.db before it had a version (user_version 0), kept
-- verbatim: migration 1 starts from it.
CREATE TABLE IF NOT EXISTS departments (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    previous_spec TEXT,
    desired_running INTEGER NOT NULL DEFAULT 1,
    failed_hash TEXT,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS port_leases (
    port INTEGER PRIMARY KEY,
    department TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS restarts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    department TEXT NOT NULL,
    at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    exit_code INTEGER
);
CREATE INDEX IF NOT EXISTS restarts_by_department ON restarts(department, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    department TEXT,
    kind TEXT NOT NULL,
    reason TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_department ON events(department, seq);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
