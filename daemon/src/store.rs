//! The SQLite store (`state.db`, WAL mode; intent with synchronous=FULL, history
//! with NORMAL): what the daemon
//! *intends* (applied specs, the previous spec for rollback, operator stops, port
//! leases, the applied revision) and what happened (restart history, the
//! append-only event log). What actually runs is read from Docker's labels, never
//! from here.

use fleet_model::api::{Event, RestartRecord};
use fleet_model::spec::HashKey;
use fleet_model::DepartmentSpec;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database holds an unreadable spec for `{id}`: {message}")]
    Corrupt { id: String, message: String },
    #[error("state database failed its integrity check: {0}")]
    Unreadable(String),
    #[error(
        "{path} has schema version {found}, written by a newer fleet-agentd that made it \
unusable for binaries knowing versions below {needs}; this one knows up to {known}. \
Install the newer package again, or move state.db aside (the daemon then rebuilds \
from Docker's labels; see docs/install.md, Upgrading)"
    )]
    TooNew {
        path: String,
        found: u32,
        known: u32,
        needs: u32,
    },
    #[error("state database migration to schema version {version} failed: {source}")]
    Migration {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create state directory {path}: {source}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One department as the store remembers it.
#[derive(Debug, Clone)]
pub struct StoredDepartment {
    pub spec: DepartmentSpec,
    pub previous: Option<DepartmentSpec>,
    pub desired_running: bool,
    /// Container hash of an update that failed and was rolled back, so the same
    /// bad spec is not tried again in a loop.
    pub failed_hash: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
    origin: Origin,
    hash_key: HashKey,
}

/// The key of an in-memory store (tests only: it has no state directory).
pub const TEST_HASH_KEY: [u8; 32] = [0x5a; 32];

/// The file of the node's spec-hash key, beside `state.db` but not in it.
pub const HASH_KEY_FILE: &str = "spec-hash.key";

/// How `state.db` was found when the daemon opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An existing, readable database.
    Existing,
    /// There was none (a first start, or one deleted): created empty.
    Created,
    /// It could not be read (garbage, truncated, not a database): moved aside
    /// to `moved_to`, kept for inspection, and a new one created.
    MovedAside { moved_to: PathBuf, error: String },
}

/// One step of the schema, applied in order; `PRAGMA user_version` holds the
/// last one applied. A migration only ever adds (tables, columns with a
/// default, indexes) unless `breaks_older` says otherwise, so that the
/// previous .deb still runs on a migrated file (a rollback).
pub struct Migration {
    pub version: u32,
    pub sql: &'static str,
    /// Binaries that know only earlier versions cannot use the file once this
    /// has run (a dropped or renamed column, a changed meaning): they refuse it
    /// instead of misreading it.
    pub breaks_older: bool,
}

/// Version 0 is the unversioned schema of the first releases; version 1 is
/// that same schema (`IF NOT EXISTS`, so a v0 file only gains the history
/// table) plus the record of which binary applied which migration; version 2
/// adds the image collector's records.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: concat!(
            include_str!("store_v0.sql"),
            "CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL,
    applied_by TEXT NOT NULL
);"
        ),
        breaks_older: false,
    },
    Migration {
        version: 2,
        // Image collection (imagegc.rs): what the agent pulled for which
        // department, and the next images announced for pre-pull.
        sql: "CREATE TABLE IF NOT EXISTS pulled_images (
    reference TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    department TEXT NOT NULL,
    pulled_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS announced_images (
    department TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    announced_at INTEGER NOT NULL
);",
        breaks_older: false,
    },
];

/// The newest schema version this binary knows.
pub fn schema_version() -> u32 {
    latest(MIGRATIONS)
}

fn latest(migrations: &[Migration]) -> u32 {
    migrations.last().map_or(0, |m| m.version)
}

/// `meta` key: the lowest schema version a binary must know to use the file
/// (the newest applied migration with `breaks_older`).
const COMPATIBLE_FROM: &str = "schema_compatible_from";

/// Events and restart rows kept; older ones are trimmed so the file stays small.
const EVENTS_KEPT: i64 = 50_000;
const RESTARTS_KEPT_PER_DEPARTMENT: i64 = 200;

impl Store {
    /// Opens `state_dir/state.db`. A database that cannot be read is never a
    /// reason to stop supervising: it is moved aside (with its `-wal`/`-shm`
    /// files) as `state.db.corrupt-<unix seconds>` and a new one is created;
    /// `origin()` says which happened, so the supervisor can rebuild from
    /// Docker's labels and say so loudly.
    ///
    /// The schema is brought up to this binary's version first (`MIGRATIONS`,
    /// each in its own transaction, after a copy of the file as
    /// `state.db.schema-v<old>`). A file from a newer binary is used as it is
    /// when that binary's migrations left it readable to this one, and
    /// refused (`StoreError::TooNew`, never moved aside) when they did not.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(state_dir, MIGRATIONS)
    }

    pub(crate) fn open_with(
        state_dir: &Path,
        migrations: &[Migration],
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.display().to_string(),
            source,
        })?;
        restrict_dir(state_dir);
        let hash_key =
            load_hash_key(&state_dir.join(HASH_KEY_FILE)).map_err(|source| StoreError::Dir {
                path: state_dir.join(HASH_KEY_FILE).display().to_string(),
                source,
            })?;
        let path = state_dir.join("state.db");
        let existed = path.exists();
        match Self::open_file(&path, existed, migrations) {
            Ok(conn) => Ok(Self {
                conn: Mutex::new(conn),
                hash_key,
                origin: if existed {
                    Origin::Existing
                } else {
                    Origin::Created
                },
            }),
            // A newer binary's file is intact: moving it aside would lose
            // what that binary could still read after going forward again.
            // A failed migration is rolled back whole and says nothing about
            // the file, only about this binary.
            Err(error @ (StoreError::TooNew { .. } | StoreError::Migration { .. })) => Err(error),
            Err(error) if existed => {
                let moved_to = move_aside(&path, now_secs()).map_err(|source| StoreError::Dir {
                    path: path.display().to_string(),
                    source,
                })?;
                tracing::error!(
                    error = %error,
                    moved_to = %moved_to.display(),
                    "state.db is unreadable; moved it aside and starting with a new one, rebuilt from Docker's labels."
                );
                let conn = Self::open_file(&path, false, migrations)?;
                Ok(Self {
                    conn: Mutex::new(conn),
                    hash_key,
                    origin: Origin::MovedAside {
                        moved_to,
                        error: error.to_string(),
                    },
                })
            }
            Err(error) => Err(error),
        }
    }

    /// Opens and checks one database file: the schema, SQLite's own
    /// `quick_check`, and every stored spec parses (what start-up reads).
    fn open_file(
        path: &Path,
        existed: bool,
        migrations: &[Migration],
    ) -> Result<Connection, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(StoreError::Unreadable(check));
        }
        migrate(&mut conn, path, existed, migrations)?;
        let probe = Self {
            conn: Mutex::new(conn),
            origin: Origin::Existing,
            hash_key: HashKey::from_bytes([0; 32]),
        };
        probe.departments()?;
        probe.leases()?;
        Ok(probe.conn.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        let mut conn = Connection::open_in_memory()?;
        migrate(&mut conn, Path::new(":memory:"), false, MIGRATIONS)?;
        Ok(Self {
            conn: Mutex::new(conn),
            origin: Origin::Created,
            hash_key: HashKey::from_bytes(TEST_HASH_KEY),
        })
    }

    /// The node's key for spec hashes (`DepartmentSpec::container_hash`).
    pub fn hash_key(&self) -> &HashKey {
        &self.hash_key
    }

    /// Runs `write` with `synchronous=NORMAL`, which in WAL mode commits
    /// without an fsync. Only for the event log and the restart history:
    /// records of what happened, not intent. A power loss may drop the last
    /// few (SQLite stays consistent, and the next FULL commit makes them
    /// durable anyway), and in exchange a restart no longer waits for the
    /// disk, nor do the other departments' tasks behind the same connection.
    fn write_record<T>(
        &self,
        write: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let result = write(&mut conn);
        // Intent written after this must be durable again.
        conn.pragma_update(None, "synchronous", "FULL")?;
        result
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (every
        // write is a transaction), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn departments(&self) -> Result<Vec<StoredDepartment>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, spec, previous_spec, desired_running, failed_hash FROM departments ORDER BY id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, bool>(3)?,
                row.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, spec, previous, desired_running, failed_hash) = row?;
            let spec = parse_spec(&id, &spec)?;
            let previous = previous.map(|p| parse_spec(&id, &p)).transpose()?;
            out.push(StoredDepartment {
                spec,
                previous,
                desired_running,
                failed_hash,
            });
        }
        Ok(out)
    }

    /// Saves a new spec, keeping the one it replaces as `previous` when it differs.
    pub fn put_spec(&self, spec: &DepartmentSpec) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt {
            id: spec.id.clone(),
            message: e.to_string(),
        })?;
        let conn = self.conn();
        let existing: Option<String> = conn
            .query_row(
                "SELECT spec FROM departments WHERE id = ?1",
                [&spec.id],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            Some(old) if old == json => {}
            // An announcement only (`next_image`): the previous spec, the
            // rollback and an image collection keeps, stays.
            Some(old)
                if serde_json::from_str::<DepartmentSpec>(&old)
                    .is_ok_and(|o| o.differs_only_in_next_image(spec)) =>
            {
                conn.execute(
                    "UPDATE departments SET spec = ?2, updated_at = ?3 WHERE id = ?1",
                    params![spec.id, json, now_secs()],
                )?;
            }
            Some(old) => {
                conn.execute(
                    "UPDATE departments SET spec = ?2, previous_spec = ?3, updated_at = ?4 WHERE id = ?1",
                    params![spec.id, json, old, now_secs()],
                )?;
            }
            None => {
                conn.execute(
                    "INSERT INTO departments (id, spec, desired_running, updated_at) VALUES (?1, ?2, 1, ?3)",
                    params![spec.id, json, now_secs()],
                )?;
            }
        }
        Ok(())
    }

    /// Puts the previous spec back after a failed update; the failed one becomes
    /// the new `previous` so an operator can see and retry it.
    pub fn roll_back(&self, id: &str, failed_hash: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE departments SET spec = previous_spec, previous_spec = spec, failed_hash = ?2, updated_at = ?3
             WHERE id = ?1 AND previous_spec IS NOT NULL",
            params![id, failed_hash, now_secs()],
        )?;
        Ok(())
    }

    pub fn set_failed_hash(&self, id: &str, hash: Option<&str>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE departments SET failed_hash = ?2 WHERE id = ?1",
            params![id, hash],
        )?;
        Ok(())
    }

    pub fn set_desired_running(&self, id: &str, running: bool) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE departments SET desired_running = ?2 WHERE id = ?1",
            params![id, running],
        )?;
        Ok(())
    }

    pub fn delete_department(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM departments WHERE id = ?1", [id])?;
        tx.execute("DELETE FROM port_leases WHERE department = ?1", [id])?;
        tx.execute("DELETE FROM announced_images WHERE department = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Remembers that the agent pulled `reference` for `department` and got
    /// image `image_id`: the only images image collection may ever remove.
    pub fn record_pulled(
        &self,
        reference: &str,
        image_id: &str,
        department: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO pulled_images (reference, image_id, department, pulled_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(reference) DO UPDATE SET image_id = ?2, department = ?3, pulled_at = ?4",
            params![reference, image_id, department, now_secs()],
        )?;
        Ok(())
    }

    pub fn pulled_images(&self) -> Result<Vec<crate::imagegc::Pulled>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT reference, image_id, department FROM pulled_images ORDER BY reference",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(crate::imagegc::Pulled {
                reference: row.get(0)?,
                image_id: row.get(1)?,
                department: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn forget_pulled(&self, reference: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM pulled_images WHERE reference = ?1",
            [reference],
        )?;
        Ok(())
    }

    /// The department's next image, announced ahead of its update (pre-pull):
    /// image collection keeps it while it is announced.
    pub fn announce_image(&self, department: &str, image: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO announced_images (department, image, announced_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(department) DO UPDATE SET image = ?2, announced_at = ?3",
            params![department, image, now_secs()],
        )?;
        Ok(())
    }

    pub fn clear_announcement(&self, department: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM announced_images WHERE department = ?1",
            [department],
        )?;
        Ok(())
    }

    /// (department, image) pairs.
    pub fn announced_images(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT department, image FROM announced_images ORDER BY department")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn leases(&self) -> Result<Vec<(u16, String)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT port, department FROM port_leases ORDER BY port")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, u16>(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn set_lease(&self, department: &str, port: u16) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM port_leases WHERE department = ?1",
            [department],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO port_leases (port, department) VALUES (?1, ?2)",
            params![port, department],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn record_restart(
        &self,
        department: &str,
        reason: &str,
        exit_code: Option<i64>,
    ) -> Result<(), StoreError> {
        self.record_restart_at(department, now_secs(), reason, exit_code)
    }

    /// A restart at `at` (Unix seconds): one a daemon before this one made,
    /// rebuilt from Docker's events after the store was lost.
    pub fn record_restart_at(
        &self,
        department: &str,
        at: i64,
        reason: &str,
        exit_code: Option<i64>,
    ) -> Result<(), StoreError> {
        self.write_record(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO restarts (department, at, reason, exit_code) VALUES (?1, ?2, ?3, ?4)",
                params![department, at, reason, exit_code],
            )?;
            tx.execute(
                "DELETE FROM restarts WHERE department = ?1 AND id NOT IN
                   (SELECT id FROM restarts WHERE department = ?1 ORDER BY id DESC LIMIT ?2)",
                params![department, RESTARTS_KEPT_PER_DEPARTMENT],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn restart_history(
        &self,
        department: &str,
        limit: usize,
    ) -> Result<Vec<RestartRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, reason, exit_code FROM restarts WHERE department = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![department, limit as i64], |r| {
            Ok(RestartRecord {
                at: r.get(0)?,
                reason: r.get(1)?,
                exit_code: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Restarts per department and reason, all time (kept rows), for metrics.
    pub fn restart_count(&self, department: &str) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM restarts WHERE department = ?1",
            [department],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    pub fn append_event(
        &self,
        department: Option<&str>,
        kind: &str,
        reason: Option<&str>,
        message: &str,
    ) -> Result<Event, StoreError> {
        let at_ms = now_millis();
        let seq = self.write_record(|conn| {
            conn.execute(
                "INSERT INTO events (at_ms, department, kind, reason, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![at_ms, department, kind, reason, message],
            )?;
            let seq = conn.last_insert_rowid();
            if seq % 1000 == 0 {
                conn.execute("DELETE FROM events WHERE seq <= ?1", [seq - EVENTS_KEPT])?;
            }
            Ok(seq)
        })?;
        Ok(Event {
            seq,
            at_ms,
            department: department.map(str::to_string),
            kind: kind.to_string(),
            reason: reason.map(str::to_string),
            message: message.to_string(),
        })
    }

    pub fn events_after(
        &self,
        after: i64,
        department: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, department, kind, reason, message FROM events
             WHERE seq > ?1 AND (?2 IS NULL OR department = ?2) ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, department, limit as i64], row_to_event)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Events with `after < seq <= upto`, at or after `since_ms`, of one department
    /// or all: the oldest `limit` of them, or with `newest` the newest `limit`;
    /// oldest first either way.
    pub fn events_matching(
        &self,
        range: (i64, i64),
        department: Option<&str>,
        since_ms: Option<i64>,
        limit: usize,
        newest: bool,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let order = if newest { "DESC" } else { "ASC" };
        let mut stmt = conn.prepare(&format!(
            "SELECT seq, at_ms, department, kind, reason, message FROM events
             WHERE seq > ?1 AND seq <= ?2 AND (?3 IS NULL OR department = ?3)
               AND (?4 IS NULL OR at_ms >= ?4)
             ORDER BY seq {order} LIMIT ?5"
        ))?;
        let rows = stmt.query_map(
            params![range.0, range.1, department, since_ms, limit as i64],
            row_to_event,
        )?;
        let mut events: Vec<Event> = rows.collect::<Result<_, _>>()?;
        if newest {
            events.reverse();
        }
        Ok(events)
    }

    /// The newest `limit` events of one department, oldest first.
    pub fn recent_events(&self, department: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, department, kind, reason, message FROM events
             WHERE department = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![department, limit as i64], row_to_event)?;
        let mut events: Vec<Event> = rows.collect::<Result<_, _>>()?;
        events.reverse();
        Ok(events)
    }

    pub fn last_event_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Brings the file at `path` to the newest version of `migrations`, or checks
/// that a newer file is still usable by a binary that knows them.
fn migrate(
    conn: &mut Connection,
    path: &Path,
    existed: bool,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = latest(migrations);
    if found > known {
        let needs = compatible_from(conn)?;
        if needs > known {
            return Err(StoreError::TooNew {
                path: path.display().to_string(),
                found,
                known,
                needs,
            });
        }
        tracing::warn!(
            found,
            known,
            "state.db was migrated by a newer fleet-agentd; using it as it is (its migrations keep it readable to this version)."
        );
        return Ok(());
    }
    if found == known {
        return Ok(());
    }
    // A copy from before the migration, for going back to the previous
    // package after a migration that older binaries cannot use.
    let tables: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |r| r.get(0),
    )?;
    if existed && tables > 0 {
        let copy = path.with_file_name(format!(
            "{}.schema-v{found}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "state.db".into())
        ));
        let _ = std::fs::remove_file(&copy);
        conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])?;
    }
    for m in migrations.iter().filter(|m| m.version > found) {
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(m.sql)?;
            tx.execute(
                "INSERT OR REPLACE INTO schema_migrations (version, applied_at, applied_by)
                 VALUES (?1, ?2, ?3)",
                params![
                    m.version,
                    now_secs(),
                    concat!("fleet-agentd ", env!("CARGO_PKG_VERSION"))
                ],
            )?;
            if m.breaks_older {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![COMPATIBLE_FROM, m.version.to_string()],
                )?;
            }
            // user_version lives in the file header and is written by this
            // transaction: a crash leaves the old version with the old schema.
            tx.pragma_update(None, "user_version", m.version)?;
            tx.commit()
        };
        step(conn).map_err(|source| StoreError::Migration {
            version: m.version,
            source,
        })?;
    }
    if existed {
        tracing::info!(from = found, to = known, "state.db schema migrated.");
    }
    Ok(())
}

fn compatible_from(conn: &Connection) -> Result<u32, StoreError> {
    let has_meta: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(0);
    }
    let value: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [COMPATIBLE_FROM],
            |r| r.get(0),
        )
        .optional()?;
    // Unparsable means a binary this one cannot understand wrote it.
    Ok(value.map_or(0, |v| v.trim().parse().unwrap_or(u32::MAX)))
}

/// One applied migration: its version, when (unix seconds) and by which binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: u32,
    pub applied_at: i64,
    pub applied_by: String,
}

impl Store {
    /// The schema version of the open file and the migrations applied to it.
    pub fn schema(&self) -> Result<(u32, Vec<AppliedMigration>), StoreError> {
        let conn = self.conn();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let mut stmt = conn.prepare(
            "SELECT version, applied_at, applied_by FROM schema_migrations ORDER BY version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AppliedMigration {
                version: r.get(0)?,
                applied_at: r.get(1)?,
                applied_by: r.get(2)?,
            })
        })?;
        Ok((version, rows.collect::<Result<_, _>>()?))
    }
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        department: r.get(2)?,
        kind: r.get(3)?,
        reason: r.get(4)?,
        message: r.get(5)?,
    })
}

fn parse_spec(id: &str, json: &str) -> Result<DepartmentSpec, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        message: e.to_string(),
    })
}

/// Renames `state.db` (and its `-wal`/`-shm` companions, which belong to it)
/// to `state.db.corrupt-<at>[-N]`; returns the new path of the database.
fn move_aside(path: &Path, at: i64) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state.db".into());
    let mut target = path.with_file_name(format!("{name}.corrupt-{at}"));
    let mut n = 1;
    while target.exists() {
        target = path.with_file_name(format!("{name}.corrupt-{at}-{n}"));
        n += 1;
    }
    for suffix in ["-wal", "-shm"] {
        let companion = path.with_file_name(format!("{name}{suffix}"));
        if companion.exists() {
            let moved = target.with_file_name(format!(
                "{}{suffix}",
                target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            std::fs::rename(&companion, moved)?;
        }
    }
    std::fs::rename(path, &target)?;
    Ok(target)
}

/// The store holds secrets: keep the directory to its owner.
fn restrict_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mut perms = meta.permissions();
        if perms.mode() & 0o077 != 0 {
            perms.set_mode(0o750);
            let _ = std::fs::set_permissions(dir, perms);
        }
    }
}

pub fn now_secs() -> i64 {
    now_millis() / 1000
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads the node's spec-hash key, or creates it (0600, written whole then
/// renamed) on the first start. It lives in its own file so that losing or
/// moving aside `state.db` keeps every container's hash checkable: the store
/// is rebuilt from the labels and the containers are adopted. A file that
/// does not hold a key is moved aside like a garbage store and a new key made
/// (the containers are then replaced once, as their hashes cannot be checked).
pub fn load_hash_key(path: &Path) -> std::io::Result<HashKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            if let Some(key) = HashKey::parse(&text) {
                return Ok(key);
            }
            let aside = path.with_extension(format!("key.corrupt-{}", now_secs()));
            tracing::error!(
                key = %path.display(),
                moved_to = %aside.display(),
                "The spec-hash key file holds no key; moved it aside and made a new one (containers whose hash cannot be checked are replaced once)."
            );
            std::fs::rename(path, &aside)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = HashKey::from_bytes(rand::random());
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{}\n", key.to_hex()).as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, image: &str) -> DepartmentSpec {
        DepartmentSpec::from_toml("t", &format!("id = \"{id}\"\nimage = \"{image}\"\n")).unwrap()
    }

    #[test]
    fn put_keeps_previous_and_roll_back_swaps() {
        let store = Store::open_in_memory().unwrap();
        store.put_spec(&spec("hr", "a:1")).unwrap();
        store.put_spec(&spec("hr", "a:1")).unwrap();
        assert!(store.departments().unwrap()[0].previous.is_none());
        store.put_spec(&spec("hr", "a:2")).unwrap();
        let d = &store.departments().unwrap()[0];
        assert_eq!(d.spec.image, "a:2");
        assert_eq!(d.previous.as_ref().unwrap().image, "a:1");
        store.roll_back("hr", "abc").unwrap();
        let d = &store.departments().unwrap()[0];
        assert_eq!(d.spec.image, "a:1");
        assert_eq!(d.failed_hash.as_deref(), Some("abc"));
    }

    #[test]
    fn leases_are_one_per_department() {
        let store = Store::open_in_memory().unwrap();
        store.set_lease("hr", 8001).unwrap();
        store.set_lease("hr", 8002).unwrap();
        store.set_lease("it", 8001).unwrap();
        assert_eq!(
            store.leases().unwrap(),
            vec![(8001, "it".to_string()), (8002, "hr".to_string())]
        );
        store.delete_department("hr").unwrap();
        assert_eq!(store.leases().unwrap().len(), 1);
    }

    #[test]
    fn the_spec_hash_key_outlives_a_lost_or_garbage_state_db() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap().hash_key().clone();
        let file = dir.path().join(HASH_KEY_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(dir.path().join("state.db")).unwrap();
        let after_loss = Store::open(dir.path()).unwrap();
        assert_eq!(after_loss.hash_key().bytes(), first.bytes());
        drop(after_loss);
        std::fs::write(dir.path().join("state.db"), b"garbage, not a database").unwrap();
        let moved = Store::open(dir.path()).unwrap();
        assert!(matches!(moved.origin(), Origin::MovedAside { .. }));
        assert_eq!(moved.hash_key().bytes(), first.bytes());
        // Another node's directory has another key.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            Store::open(other.path()).unwrap().hash_key().bytes(),
            first.bytes()
        );
        // A key file that holds no key is replaced, not trusted.
        std::fs::write(&file, "not hex").unwrap();
        let renewed = load_hash_key(&file).unwrap();
        assert_ne!(renewed.bytes(), first.bytes());
    }

    #[test]
    fn garbage_is_moved_aside_and_a_new_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.origin(), &Origin::Created);
        store.put_spec(&spec("hr", "a:1")).unwrap();
        drop(store);
        assert_eq!(Store::open(dir.path()).unwrap().origin(), &Origin::Existing);

        let garbage: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(dir.path().join("state.db"), &garbage).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let Origin::MovedAside { moved_to, .. } = store.origin().clone() else {
            panic!("garbage was opened as {:?}", store.origin());
        };
        assert!(moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.db.corrupt-"));
        assert_eq!(
            std::fs::read(&moved_to).unwrap(),
            garbage,
            "kept for inspection"
        );
        assert!(store.departments().unwrap().is_empty());
        store.put_spec(&spec("hr", "a:2")).unwrap();
        drop(store);
        assert_eq!(Store::open(dir.path()).unwrap().origin(), &Origin::Existing);
    }

    #[test]
    fn an_unparsable_spec_counts_as_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_spec(&spec("hr", "a:1")).unwrap();
        store
            .conn()
            .execute("UPDATE departments SET spec = 'not json'", [])
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(store.origin(), Origin::MovedAside { .. }));
    }

    #[test]
    fn events_have_increasing_sequence() {
        let store = Store::open_in_memory().unwrap();
        let a = store
            .append_event(Some("hr"), "created", None, "a")
            .unwrap();
        let b = store.append_event(None, "node", None, "b").unwrap();
        assert!(b.seq > a.seq);
        assert_eq!(store.events_after(a.seq, None, 10).unwrap().len(), 1);
        assert_eq!(store.recent_events("hr", 10).unwrap().len(), 1);
    }

    #[test]
    fn events_matching_takes_the_newest_or_oldest_in_range() {
        let store = Store::open_in_memory().unwrap();
        let seqs: Vec<i64> = (0..5)
            .map(|i| {
                let dept = if i % 2 == 0 { "hr" } else { "it" };
                store.append_event(Some(dept), "k", None, "m").unwrap().seq
            })
            .collect();
        let last = seqs[4];
        let newest = store
            .events_matching((0, last), Some("hr"), None, 2, true)
            .unwrap();
        assert_eq!(
            newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [seqs[2], seqs[4]]
        );
        let oldest = store
            .events_matching((0, last), None, None, 2, false)
            .unwrap();
        assert_eq!(
            oldest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [seqs[0], seqs[1]]
        );
        let bounded = store
            .events_matching((0, seqs[1]), None, None, 10, true)
            .unwrap();
        assert_eq!(bounded.len(), 2);
        let future = store
            .events_matching((0, last), None, Some(i64::MAX), 10, true)
            .unwrap();
        assert!(future.is_empty());
    }

    /// A state.db written by the code before schema versions (commit 957e8dd):
    /// departments hr (with a previous spec) and it (stopped), two leases, a
    /// restart, two events and the applied revision.
    const V0_FILE: &[u8] = include_bytes!("../testdata/state-v0.db");

    fn v0_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.db"), V0_FILE).unwrap();
        dir
    }

    fn user_version(path: &Path) -> u32 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    fn assert_v0_content(store: &Store) {
        let departments = store.departments().unwrap();
        let ids: Vec<&str> = departments.iter().map(|d| d.spec.id.as_str()).collect();
        assert_eq!(ids, ["hr", "it"]);
        assert_eq!(departments[0].spec.image, "fleet-test-agent:2");
        assert_eq!(
            departments[0].previous.as_ref().map(|p| p.image.as_str()),
            Some("fleet-test-agent:1")
        );
        assert!(departments[0].desired_running);
        assert!(!departments[1].desired_running);
        assert_eq!(
            store.leases().unwrap(),
            vec![(8001, "hr".to_string()), (8002, "it".to_string())]
        );
        let restarts = store.restart_history("hr", 10).unwrap();
        assert_eq!(restarts.len(), 1);
        assert_eq!(restarts[0].exit_code, Some(3));
        assert_eq!(store.last_event_seq().unwrap(), 2);
        assert_eq!(
            store.meta("applied_revision").unwrap().as_deref(),
            Some("7")
        );
    }

    /// MIGRATIONS plus one more: what the next release adding a column looks like.
    fn with_next(sql: &'static str, breaks_older: bool) -> Vec<Migration> {
        let mut list: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|m| Migration {
                version: m.version,
                sql: m.sql,
                breaks_older: m.breaks_older,
            })
            .collect();
        list.push(Migration {
            version: schema_version() + 1,
            sql,
            breaks_older,
        });
        list
    }

    #[test]
    fn a_v0_file_is_migrated_keeping_everything_and_copied_first() {
        let dir = v0_dir();
        let path = dir.path().join("state.db");
        assert_eq!(user_version(&path), 0);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.origin(), &Origin::Existing);
        assert_v0_content(&store);
        let (version, history) = store.schema().unwrap();
        assert_eq!(version, schema_version());
        assert_eq!(history.len(), MIGRATIONS.len());
        assert!(history[0].applied_by.starts_with("fleet-agentd "));
        // The copy from before is the v0 file, still usable by the old code.
        let copy = dir.path().join("state.db.schema-v0");
        assert_eq!(user_version(&copy), 0);
        let old: i64 = Connection::open(&copy)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM departments", [], |r| r.get(0))
            .unwrap();
        assert_eq!(old, 2);
        store.put_spec(&spec("ops", "a:1")).unwrap();
        drop(store);

        std::fs::remove_file(&copy).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.departments().unwrap().len(), 3);
        assert!(!copy.exists(), "an up-to-date file is not copied again");
    }

    #[test]
    fn a_new_file_starts_at_the_newest_version_without_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema().unwrap().0, schema_version());
        drop(store);
        assert_eq!(user_version(&dir.path().join("state.db")), schema_version());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".schema-v")), "{names:?}");
        assert_eq!(
            Store::open_in_memory().unwrap().schema().unwrap().0,
            schema_version()
        );
    }

    #[test]
    fn an_added_column_breaks_neither_the_upgrade_nor_the_rollback() {
        let dir = v0_dir();
        let next = with_next(
            "ALTER TABLE departments ADD COLUMN note TEXT NOT NULL DEFAULT '';",
            false,
        );
        // The next release migrates v0 straight to its newest version.
        let store = Store::open_with(dir.path(), &next).unwrap();
        assert_eq!(store.schema().unwrap().0, schema_version() + 1);
        assert_v0_content(&store);
        store.put_spec(&spec("ops", "a:1")).unwrap();
        drop(store);

        // Back to this release (the previous .deb): the file is newer than it
        // knows, but readable, so it is used as it is and not migrated down.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.origin(), &Origin::Existing);
        assert_eq!(store.schema().unwrap().0, schema_version() + 1);
        assert_v0_content_plus(&store, "ops");
        store.put_spec(&spec("ops", "a:2")).unwrap();
        store.set_lease("ops", 8003).unwrap();
        store.append_event(Some("ops"), "k", None, "m").unwrap();
        drop(store);

        // And forward again: the next release finds its column and the rows
        // the older binary wrote (with the column's default).
        let store = Store::open_with(dir.path(), &next).unwrap();
        let ops = store
            .departments()
            .unwrap()
            .into_iter()
            .find(|d| d.spec.id == "ops")
            .unwrap();
        assert_eq!(ops.spec.image, "a:2");
        let note: String = store
            .conn()
            .query_row("SELECT note FROM departments WHERE id = 'ops'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(note, "");
    }

    fn assert_v0_content_plus(store: &Store, extra: &str) {
        let ids: Vec<String> = store
            .departments()
            .unwrap()
            .into_iter()
            .map(|d| d.spec.id)
            .collect();
        assert_eq!(ids, ["hr", "it", extra]);
    }

    #[test]
    fn a_file_a_newer_binary_made_unusable_is_refused_and_left_in_place() {
        let dir = v0_dir();
        // What it changes does not matter here, only that it says older
        // binaries must not use the file afterwards.
        let next = with_next("CREATE TABLE departments_v2 (id TEXT PRIMARY KEY);", true);
        drop(Store::open_with(dir.path(), &next).unwrap());

        let error = match Store::open(dir.path()) {
            Ok(_) => panic!("a file this binary cannot use was opened"),
            Err(e) => e,
        };
        let StoreError::TooNew {
            found,
            known,
            needs,
            ..
        } = &error
        else {
            panic!("expected TooNew, got {error}");
        };
        assert_eq!(
            (*found, *known, *needs),
            (schema_version() + 1, schema_version(), schema_version() + 1)
        );
        let message = error.to_string();
        assert!(message.contains("newer fleet-agentd"), "{message}");
        assert!(message.contains("move state.db aside"), "{message}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"state.db".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("corrupt")), "{names:?}");
        // The binary that made it still opens it.
        assert_v0_content(&Store::open_with(dir.path(), &next).unwrap());
    }

    #[test]
    fn a_failing_migration_rolls_back_whole_and_leaves_the_file_in_place() {
        let dir = v0_dir();
        drop(Store::open(dir.path()).unwrap());
        let next = with_next(
            "ALTER TABLE departments ADD COLUMN note TEXT; SELECT * FROM no_such_table;",
            false,
        );
        let error = match Store::open_with(dir.path(), &next) {
            Ok(_) => panic!("a failing migration was reported as applied"),
            Err(e) => e,
        };
        assert!(
            matches!(error, StoreError::Migration { version, .. } if version == schema_version() + 1),
            "{error}"
        );
        let path = dir.path().join("state.db");
        assert_eq!(user_version(&path), schema_version());
        let has_note: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('departments') WHERE name = 'note'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(has_note, 0, "the failed step left its column behind");
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.origin(), &Origin::Existing);
        assert_v0_content(&store);
    }
}
