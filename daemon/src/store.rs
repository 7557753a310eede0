//! The SQLite store (`state.db`, WAL mode; intent with synchronous=FULL, history
//! with NORMAL): what the daemon
//! *intends* (applied specs, the previous spec for rollback, operator stops, port
//! leases, the applied revision) and what happened (restart history, the
//! append-only event log). What actually runs is read from Docker's labels, never
//! from here.

use fleet_model::api::{Event, RestartRecord};
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
}

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

const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS pulled_images (
    reference TEXT PRIMARY KEY,
    image_id TEXT NOT NULL,
    department TEXT NOT NULL,
    pulled_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS announced_images (
    department TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    announced_at INTEGER NOT NULL
);
";

/// Events and restart rows kept; older ones are trimmed so the file stays small.
const EVENTS_KEPT: i64 = 50_000;
const RESTARTS_KEPT_PER_DEPARTMENT: i64 = 200;

impl Store {
    /// Opens `state_dir/state.db`. A database that cannot be read is never a
    /// reason to stop supervising: it is moved aside (with its `-wal`/`-shm`
    /// files) as `state.db.corrupt-<unix seconds>` and a new one is created;
    /// `origin()` says which happened, so the supervisor can rebuild from
    /// Docker's labels and say so loudly.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.display().to_string(),
            source,
        })?;
        restrict_dir(state_dir);
        let path = state_dir.join("state.db");
        let existed = path.exists();
        match Self::open_file(&path) {
            Ok(conn) => Ok(Self {
                conn: Mutex::new(conn),
                origin: if existed {
                    Origin::Existing
                } else {
                    Origin::Created
                },
            }),
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
                let conn = Self::open_file(&path)?;
                Ok(Self {
                    conn: Mutex::new(conn),
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
    fn open_file(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(StoreError::Unreadable(check));
        }
        let probe = Self {
            conn: Mutex::new(conn),
            origin: Origin::Existing,
        };
        probe.departments()?;
        probe.leases()?;
        Ok(probe.conn.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            origin: Origin::Created,
        })
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
        self.write_record(|conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO restarts (department, at, reason, exit_code) VALUES (?1, ?2, ?3, ?4)",
                params![department, now_secs(), reason, exit_code],
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
}
