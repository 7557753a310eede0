//! The WAL service inside fleet-agentd: push (with a look-ahead uploader over
//! `archive_status/*.ready`), fetch (with prefetch outside PGDATA), status,
//! metrics and the valve. Base backups, restore and retention live in their own
//! modules and use the same target.

use crate::codec::{self, MAX_HEADER_LEN};
use crate::names;
use crate::target::{Put, Target, TargetError};
use bytes::Bytes;
use fleet_model::config::WalConfig;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

/// Records one event in the daemon's event log: (kind, message).
pub type EventSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Segments fetched ahead of the one recovery asks for.
const PREFETCH: usize = 8;
/// Under the state directory: segments fetched ahead for recovery.
const PREFETCH_DIR: &str = "wal-prefetch";
/// How long a request waits for background work on the same name (a
/// look-ahead upload, a prefetch) before doing the work itself.
const JOB_WAIT: Duration = Duration::from_secs(30);
/// Under the state directory: the clusters this host archives besides the
/// configured one (learned on the first push, or restored here), one system
/// identifier a line.
pub const CLUSTERS_FILE: &str = "wal-clusters";
/// The last verify's outcome in `state_dir`, so that its metrics (and a
/// firing FleetWalVerifyFailed) survive a restart, and so does the schedule:
/// a service restarted more often than `verify_interval` still verifies.
pub const VERIFY_FILE: &str = "wal-verify-last.json";
/// PostgreSQL's largest segment size (`initdb --wal-segsize=1024`).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// How often the schedule looks at the backup interval (at most).
const SCHEDULE_TICK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("`{0}` is not a WAL file name (24 hex digits, .history, .partial or .backup)")]
    BadName(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("`{name}` is already archived with different content (stored {stored}, pushed {pushed}); nothing was overwritten")]
    Conflict {
        name: String,
        stored: codec::Checksum,
        pushed: codec::Checksum,
    },
    #[error("`{0}` is not in the archive")]
    NotFound(String),
    #[error("archive target: {0}")]
    Target(#[from] TargetError),
    #[error("archived object `{name}` is damaged: {source}")]
    Corrupt {
        name: String,
        #[source]
        source: codec::CodecError,
    },
    #[error("the cluster's system identifier is unknown: run from the data directory, pass --system-id, or set wal.pg_wal_dir")]
    NoSystemId,
    #[error("system identifier {given} is not a cluster this host archives ({bound}); WAL of other clusters is neither stored nor served here. A cluster made anew on this host (new initdb) is admitted once wal.pg_wal_dir points at it, or after removing {file} when no pg_wal_dir is set")]
    ForeignCluster {
        given: u64,
        bound: String,
        file: String,
    },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("{0}")]
    Backup(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{calls} pushes are already under way (wal.parallel_uploads); try again shortly")]
    Busy { calls: usize },
}

impl WalError {
    /// The label of `fleet_agent_wal_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            WalError::BadName(_) | WalError::BadRequest(_) => "invalid",
            WalError::Conflict { .. } => "conflict",
            WalError::NotFound(_) => "not_found",
            WalError::Target(_) => "target",
            WalError::Corrupt { .. } => "checksum",
            WalError::NoSystemId => "invalid",
            WalError::ForeignCluster { .. } => "foreign_cluster",
            WalError::Postgres(_) => "postgres",
            WalError::Backup(_) => "backup",
            WalError::Internal(_) => "internal",
            WalError::TooLarge(_) => "invalid",
            WalError::Busy { .. } => "busy",
        }
    }
}

/// Which file, exactly: device, inode, size and modification time. PostgreSQL
/// never rewrites a finished segment in place, so the same identity means the
/// same bytes the look-ahead already archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOutcome {
    /// Uploaded by this call.
    Stored,
    /// Already in the archive with the same checksum (e.g. pushed ahead).
    AlreadyArchived,
    /// Not archived: the valve told PostgreSQL it was, to save the disk.
    Valve,
}

#[derive(Default)]
pub struct Counters {
    /// Problems in PostgreSQL's archive settings as last read, plus one (0:
    /// not read yet), so a never-read host shows no figure rather than 0.
    pub archiving_problems_plus_one: AtomicU64,
    pub segments: AtomicU64,
    pub bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub fetched: AtomicU64,
    pub prefetch_hits: AtomicU64,
    /// archive_command's pushes that succeeded, by what served them:
    /// [look-ahead, the service reading pg_wal, content sent by agentctl].
    pub push_calls: [AtomicU64; 3],
    pub valve: AtomicU64,
    pub failures: Mutex<BTreeMap<&'static str, u64>>,
    pub last_push_unix: AtomicU64,
    pub last_backup_unix: AtomicU64,
    /// The last `verify`: 1 ok / 0 not, its problem count, and when (0: never).
    pub verify_ok: AtomicU64,
    pub verify_problems: AtomicU64,
    pub verify_unix: AtomicU64,
    /// When the newest segment reached the archive: this service's last upload,
    /// or after a start the archive listing's newest segment (0: unknown; the
    /// metric is then absent rather than claiming an age it does not know).
    pub newest_archived_unix: AtomicU64,
    /// The last restore drill: 1 ok / 0 failed, its RTO, when (0: never).
    pub drill_ok: AtomicU64,
    pub drill_rto_millis: AtomicU64,
    pub drill_unix: AtomicU64,
}

pub struct WalService {
    pub config: WalConfig,
    pub target: Target,
    pub state_dir: PathBuf,
    pub events: EventSink,
    pub counters: Counters,
    /// The system identifier of the cluster in `pg_wal_dir`, if configured.
    default_sysid: Mutex<Option<u64>>,
    /// Clusters admitted besides the configured one ([`CLUSTERS_FILE`]).
    pinned: Mutex<BTreeSet<u64>>,
    /// key -> checksum (with its algorithm) of what is known to be stored (pushed or verified here).
    stored: Mutex<HashMap<String, codec::Checksum>>,
    /// Serialises work on one name; bounded by hashing names onto slots.
    slots: Vec<tokio::sync::Mutex<()>>,
    /// Look-ahead uploads under way, by key.
    uploading: Jobs,
    /// key -> identity of the pg_wal file the look-ahead archived under it.
    identities: Mutex<HashMap<String, FileId>>,
    /// Prefetches under way, by `<sysid>/<name>`.
    prefetching: Jobs,
    /// Prefetch decodes running at once: one per core. Started all at once,
    /// eight decodes share the cores and the segment recovery asks for next
    /// is ready only when nearly all of them are; the semaphore is fair
    /// (first come, first served), so the nearest segment is decoded first.
    prefetch_workers: Arc<Semaphore>,
    /// Prefetch GETs in flight: two per decode slot, so a core that finishes
    /// a decode finds the next object already fetched; fair like the decode
    /// slots, so the nearest segment's GET goes first.
    prefetch_gets: Arc<Semaphore>,
    uploads: Arc<Semaphore>,
    /// Pushes with a body in progress ([`WalService::push_permit`]).
    pub(crate) push_calls: Arc<Semaphore>,
    /// zstd contexts reused across pushes (codec::EncoderPool).
    encoders: Arc<codec::EncoderPool>,
    /// Encodes (hash and compress) running at once: one per core. They are
    /// CPU-bound, so more at once only share the cores, while each holds an
    /// encoder (its piece, output buffer and zstd context: 2.7 MiB with the
    /// 1 MiB pieces before, a quarter of the buffers with 256 KiB ones)
    /// and, to S3, the object it is making. Up to `parallel_uploads`
    /// look-ahead uploads plus archive_command's pushes used to encode at
    /// once (four encoders at the peak of a drain to S3, heaptrack: 8.4 MiB
    /// of buffers and 2.3 MiB of zstd workspaces beside 14 MiB of objects);
    /// uploads still overlap, only the encoding waits.
    encoding: Arc<Semaphore>,
    /// Bytes of S3 objects made and not yet stored ([`ByteBudget`]).
    held: ByteBudget,
    /// The cluster's segment size as seen in `pg_wal_dir`, once known.
    segment_bytes: AtomicU64,
    valve_announced: std::sync::atomic::AtomicBool,
    /// The last archive probe and when it ran: `GET /v1/wal` is also the TCP
    /// API's, so a poller must not turn every call into a write to the archive.
    probed: Mutex<Option<(std::time::Instant, ArchiveProbe)>>,
    /// The base backup or restore under way, for `GET /v1/wal`'s `progress`.
    operation: Arc<Mutex<Option<Running>>>,
    /// One restore drill at a time.
    pub(crate) drill_lock: tokio::sync::Mutex<()>,
    /// `pg_stat_archiver` as last read: `GET /v1/wal` (a poller, a dashboard,
    /// anyone with the token) never opens more than one PostgreSQL connection
    /// at a time, nor more than one per `ARCHIVER_TTL`.
    archiver: Cached<Result<crate::pg::ArchiverStats, String>>,
    /// When the archive was last listed for the newest backup while none was
    /// known, so a node without backups does not list its target per request.
    backups_listed: Mutex<Option<std::time::Instant>>,
}

/// A reading of `pg_stat_archiver` and the archive settings gives up after this.
const SETTINGS_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `pg_stat_archiver` reading is served from memory.
pub const ARCHIVER_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// How long "no backup in the archive" is believed before listing again.
const BACKUPS_LISTED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// A value computed at most once per `ttl`: callers that arrive while it is
/// being computed wait for that computation instead of starting their own.
pub struct Cached<T> {
    ttl: std::time::Duration,
    slot: tokio::sync::Mutex<Option<(std::time::Instant, T)>>,
}

impl<T: Clone> Cached<T> {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn get_or<F: std::future::Future<Output = T>>(
        &self,
        compute: impl FnOnce() -> F,
    ) -> T {
        // Held across the computation on purpose: it is this task's own
        // work, and the next callers are meant to wait for its answer.
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref() {
            if at.elapsed() < self.ttl {
                return value.clone();
            }
        }
        let value = compute().await;
        *slot = Some((std::time::Instant::now(), value.clone()));
        value
    }
}

/// A base backup or a restore while it runs.
struct Running {
    operation: &'static str,
    subject: String,
    started: std::time::Instant,
    done: Arc<AtomicU64>,
    /// 0 while unknown.
    total: Arc<AtomicU64>,
    phase: String,
}

/// Held while a long operation runs; dropping it (done, failed or
/// cancelled) takes the operation off the status.
pub struct OperationGuard {
    slot: Arc<Mutex<Option<Running>>>,
    /// Bytes moved so far; the work adds to it.
    pub done: Arc<AtomicU64>,
    /// All it will move (an estimate for a base backup), 0 while unknown.
    pub total: Arc<AtomicU64>,
}

impl OperationGuard {
    /// The step under way, in words.
    pub fn phase(&self, phase: &str) {
        if let Ok(mut slot) = self.slot.lock() {
            if let Some(running) = slot.as_mut() {
                running.phase = phase.to_string();
            }
        }
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
    }
}

pub use fleet_model::api::human_bytes;

/// Whether the archive target answered the last probe ([`Target::probe`]).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ArchiveProbe {
    pub reachable: bool,
    /// Why not, in the target's own words.
    pub error: Option<String>,
    pub latency_ms: u64,
    /// Unix time of the probe.
    pub checked_unix: u64,
}

/// How long a probe result is reused.
const PROBE_REUSE: Duration = Duration::from_secs(10);
/// A probe that takes longer than this counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether the valve may tell PostgreSQL that `name` is archived when it is
/// not: only a segment, and only past the backlog limit. A `.history` file
/// (a promotion's timeline history) or a `.backup` file is small, cannot fill
/// the disk, and without it the archive cannot follow the timeline or find the
/// backup's end, so those keep failing until the archive works.
pub fn valve_may_acknowledge(name: &str, backlog: u64, limit: u64) -> bool {
    names::classify(name) == Some(names::WalKind::Segment) && backlog > limit
}

/// What [`WalService::admit`] decides for a caller's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Admit, and pin it: the host knew no cluster and this is a push.
    Pin,
    Refuse,
}

/// `configured`: the cluster in `pg_wal_dir`; `pinned`: those learned or
/// restored here. Only a push may pin, and only on a host that knows none:
/// otherwise any caller could make itself a cluster of this host.
pub fn admission(
    configured: Option<u64>,
    pinned: &BTreeSet<u64>,
    sysid: u64,
    learn: bool,
) -> Admission {
    if configured == Some(sysid) || pinned.contains(&sysid) {
        Admission::Admit
    } else if learn && configured.is_none() && pinned.is_empty() {
        Admission::Pin
    } else {
        Admission::Refuse
    }
}

fn read_pinned(path: &Path) -> Result<BTreeSet<u64>, WalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => {
            return Err(WalError::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse::<u64>().map_err(|_| {
                WalError::Internal(format!(
                    "{}: `{l}` is not a system identifier (one number a line); fix or remove the file",
                    path.display()
                ))
            })
        })
        .collect()
}

fn write_pinned(path: &Path, ids: &BTreeSet<u64>) -> std::io::Result<()> {
    let lines: String = ids.iter().map(|id| format!("{id}\n")).collect();
    replace_file(path, lines.as_bytes())
}

/// Temp file, fsync, rename, fsync of the directory: a crash leaves the old
/// content or the new one, never a part.
fn replace_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What [`VERIFY_FILE`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
struct VerifyMark {
    ok: bool,
    problems: u64,
    unix: u64,
}

/// The kept verify result; none when absent or unreadable (it only restores
/// metrics and the schedule, so a damaged file is no reason not to start).
fn read_verify_mark(path: &Path) -> Option<VerifyMark> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "Cannot read the last verify result.");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| tracing::warn!(file = %path.display(), error = %e, "Ignoring a damaged verify result."))
        .ok()
}

/// How long after the schedule's start the first scheduled verify is due:
/// one interval after the last verify (kept across restarts), at once if that
/// is past, and one whole interval after the start when none ever ran (a
/// fresh install has archived nothing yet; verifying it at once would report
/// an empty archive as broken).
pub fn verify_due_in(interval: Duration, last_unix: u64, now_unix: u64) -> Duration {
    if last_unix == 0 {
        return interval;
    }
    interval.saturating_sub(Duration::from_secs(now_unix.saturating_sub(last_unix)))
}

pub fn wal_key(sysid: u64, name: &str) -> String {
    format!("{sysid}/wal/{name}.zst")
}

impl WalService {
    pub fn new(
        config: WalConfig,
        state_dir: &Path,
        events: EventSink,
    ) -> Result<Arc<Self>, WalError> {
        let target = Target::from_config(&config)?;
        let sysid = config
            .pg_wal_dir
            .as_ref()
            .and_then(|d| d.parent())
            .and_then(crate::pg::system_identifier_from_control);
        let parallel = config.parallel_uploads.max(1);
        // The prefetch cache is written without fsync; whatever a crash left there is dropped.
        match std::fs::remove_dir_all(state_dir.join(PREFETCH_DIR)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(error = %e, "Could not empty the WAL prefetch directory.")
            }
            _ => {}
        }
        let counters = Counters::default();
        if let Some(mark) = read_verify_mark(&state_dir.join(VERIFY_FILE)) {
            counters
                .verify_ok
                .store(u64::from(mark.ok), Ordering::Relaxed);
            counters
                .verify_problems
                .store(mark.problems, Ordering::Relaxed);
            counters.verify_unix.store(mark.unix, Ordering::Relaxed);
        }
        Ok(Arc::new(Self {
            target,
            state_dir: state_dir.to_path_buf(),
            events,
            counters,
            default_sysid: Mutex::new(sysid),
            pinned: Mutex::new(read_pinned(&state_dir.join(CLUSTERS_FILE))?),
            stored: Mutex::new(HashMap::new()),
            slots: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            uploading: Jobs::default(),
            identities: Mutex::new(HashMap::new()),
            prefetching: Jobs::default(),
            prefetch_workers: Arc::new(Semaphore::new(encodes_at_once())),
            prefetch_gets: Arc::new(Semaphore::new(2 * encodes_at_once())),
            uploads: Arc::new(Semaphore::new(parallel)),
            push_calls: Arc::new(Semaphore::new(parallel)),
            encoding: Arc::new(Semaphore::new(encodes_at_once())),
            held: ByteBudget::new(S3_HELD_BYTES),
            // As many as encode at once (`encoding`).
            encoders: Arc::new(codec::EncoderPool::new(
                config.compression_level,
                encodes_at_once(),
                config.object_checksum.into(),
            )),
            segment_bytes: AtomicU64::new(0),
            valve_announced: Default::default(),
            probed: Mutex::new(None),
            operation: Arc::new(Mutex::new(None)),
            drill_lock: tokio::sync::Mutex::new(()),
            archiver: Cached::new(ARCHIVER_TTL),
            backups_listed: Mutex::new(None),
            config,
        }))
    }

    /// A slot for one push that carries content, or [`WalError::Busy`] at
    /// once: PostgreSQL's archiver pushes one file at a time, so more calls than
    /// `parallel_uploads` in flight are not PostgreSQL, and each holds up to a
    /// compressed segment in memory. Refused calls are told to retry (503 with
    /// `Retry-After`), which agentctl honours.
    pub fn push_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, WalError> {
        self.push_calls
            .clone()
            .try_acquire_owned()
            .map_err(|_| WalError::Busy {
                calls: self.config.parallel_uploads.max(1),
            })
    }

    pub fn count_push(&self, served: PushServed) {
        self.counters.push_calls[served as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The largest body a push may carry: the cluster's segment size when
    /// `pg_wal_dir` shows it (its segment files are exactly that long; history
    /// and backup files are far smaller), else PostgreSQL's largest segment
    /// size, 1 GiB.
    pub fn push_limit(&self) -> u64 {
        let known = self.segment_bytes.load(Ordering::Relaxed);
        if known > 0 {
            return known;
        }
        let Some(dir) = &self.config.pg_wal_dir else {
            return MAX_SEGMENT_BYTES;
        };
        let found = std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                (names::classify(name) == Some(names::WalKind::Segment))
                    .then(|| e.metadata().ok().map(|m| m.len()))
                    .flatten()
                    .filter(|len| names::is_segment_size(*len))
            })
        });
        match found {
            Some(bytes) => {
                self.segment_bytes.store(bytes, Ordering::Relaxed);
                bytes
            }
            None => MAX_SEGMENT_BYTES,
        }
    }

    /// Starts the look-ahead uploader, the backup schedule and retention.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if self.config.pg_wal_dir.is_some() {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.look_ahead_loop().await }));
        }
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.schedule_loop().await }));
        let me = self.clone();
        tasks.push(tokio::spawn(async move { me.seed_newest_archived().await }));
        tasks
    }

    /// After a start, the RPO age comes from the archive itself (the newest
    /// segment's time in the listing) until this service stores one, so a
    /// restart followed by a stall is not hidden by an absent metric.
    pub async fn seed_newest_archived(&self) {
        let Some(sysid) = self.default_sysid() else {
            return;
        };
        let prefix = format!("{sysid}/wal/");
        let newest = match self.target.list(&prefix).await {
            Ok(entries) => entries
                .iter()
                .filter(|e| {
                    e.key
                        .strip_prefix(&prefix)
                        .and_then(|k| k.strip_suffix(".zst"))
                        .and_then(names::classify)
                        == Some(names::WalKind::Segment)
                })
                .filter_map(|e| e.modified.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .max(),
            Err(e) => {
                tracing::debug!(error = %e, "Cannot list the archive for the newest segment.");
                None
            }
        };
        if let Some(newest) = newest {
            // Only if no upload has set it meanwhile (that one is newer).
            let _ = self.counters.newest_archived_unix.compare_exchange(
                0,
                newest,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    pub fn default_sysid(&self) -> Option<u64> {
        if let Ok(mut guard) = self.default_sysid.lock() {
            if guard.is_none() {
                *guard = self
                    .config
                    .pg_wal_dir
                    .as_ref()
                    .and_then(|d| d.parent())
                    .and_then(crate::pg::system_identifier_from_control);
            }
            return *guard;
        }
        None
    }

    /// The trust boundary of push and fetch: the caller (PostgreSQL's user)
    /// names the cluster, so only the clusters this host runs are served.
    /// `learn`: a push on a host that knows none pins the caller's cluster.
    pub fn admit(&self, sysid: u64, learn: bool) -> Result<(), WalError> {
        let pinned = self
            .pinned
            .lock()
            .map_err(|_| WalError::Internal("WAL cluster list lock poisoned".into()))?
            .clone();
        let mut configured = self.default_sysid();
        if admission(configured, &pinned, sysid, learn) == Admission::Refuse {
            // The configured cluster may have been made anew (initdb) since it was read.
            configured = self.reread_default_sysid();
        }
        match admission(configured, &pinned, sysid, learn) {
            Admission::Admit => Ok(()),
            Admission::Pin => self.pin(sysid),
            Admission::Refuse => Err(WalError::ForeignCluster {
                given: sysid,
                bound: {
                    let all: BTreeSet<u64> = configured.into_iter().chain(pinned).collect();
                    if all.is_empty() {
                        "none yet: the first push pins one".to_string()
                    } else {
                        all.iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                },
                file: self.state_dir.join(CLUSTERS_FILE).display().to_string(),
            }),
        }
    }

    /// Admits `sysid` from now on and remembers it across restarts (a restore
    /// here, or the first push on a host without `pg_wal_dir`).
    pub fn pin(&self, sysid: u64) -> Result<(), WalError> {
        let mut pinned = self
            .pinned
            .lock()
            .map_err(|_| WalError::Internal("WAL cluster list lock poisoned".into()))?;
        if pinned.contains(&sysid) {
            return Ok(());
        }
        let mut next = pinned.clone();
        next.insert(sysid);
        let path = self.state_dir.join(CLUSTERS_FILE);
        write_pinned(&path, &next)
            .map_err(|e| WalError::Internal(format!("cannot write {}: {e}", path.display())))?;
        *pinned = next;
        tracing::info!(system_identifier = sysid, file = %path.display(), "This host now archives WAL of this cluster.");
        Ok(())
    }

    fn reread_default_sysid(&self) -> Option<u64> {
        let fresh = self
            .config
            .pg_wal_dir
            .as_ref()
            .and_then(|d| d.parent())
            .and_then(crate::pg::system_identifier_from_control);
        if let (Some(id), Ok(mut guard)) = (fresh, self.default_sysid.lock()) {
            *guard = Some(id);
        }
        fresh.or_else(|| self.default_sysid())
    }

    pub fn resolve_sysid(&self, given: Option<u64>) -> Result<u64, WalError> {
        given
            .or_else(|| self.default_sysid())
            .ok_or(WalError::NoSystemId)
    }

    pub fn fail(&self, error: &WalError) {
        if let Ok(mut f) = self.counters.failures.lock() {
            *f.entry(error.kind()).or_insert(0) += 1;
        }
    }

    fn slot(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let h = key
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        &self.slots[h % self.slots.len()]
    }

    fn remember(&self, key: &str, sha: &codec::Checksum) {
        if let Ok(mut stored) = self.stored.lock() {
            if stored.len() > 50_000 {
                stored.clear();
            }
            stored.insert(key.to_string(), sha.clone());
        }
    }

    fn known(&self, key: &str) -> Option<codec::Checksum> {
        self.stored.lock().ok().and_then(|s| s.get(key).cloned())
    }

    /// Archives one WAL file. Returns once it is durably in the target.
    pub async fn push(
        &self,
        sysid: u64,
        name: &str,
        content: Content,
    ) -> Result<PushOutcome, WalError> {
        if !names::is_valid(name) {
            return Err(WalError::BadName(name.to_string()));
        }
        let key = wal_key(sysid, name);
        let _guard = self.slot(&key).lock().await;
        let stored = match self.known(&key) {
            Some(sha) => Some(sha),
            None => self.recorded_sha(&key, name).await?,
        };
        if let Some(stored) = stored {
            // In the stored object's algorithm: an FWAL1 object is compared by SHA-256.
            let algorithm = stored.algorithm;
            let pushed = blocking(move || {
                codec::checksum_of(algorithm, content.reader())
                    .map_err(|e| WalError::Internal(e.to_string()))
            })
            .await?;
            return self.compare(&key, name, stored, pushed);
        }
        let (put, sha, size, stored_size) = self.store_new(&key, content).await?;
        match put {
            Put::Created => {
                self.remember(&key, &sha);
                self.counters.segments.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes.fetch_add(size, Ordering::Relaxed);
                self.counters
                    .stored_bytes
                    .fetch_add(stored_size, Ordering::Relaxed);
                self.counters
                    .last_push_unix
                    .store(now_unix(), Ordering::Relaxed);
                if names::classify(name) == Some(names::WalKind::Segment) {
                    self.counters
                        .newest_archived_unix
                        .store(now_unix(), Ordering::Relaxed);
                }
                Ok(PushOutcome::Stored)
            }
            Put::Exists => {
                // Stored by someone else since the check above (another host
                // archiving the same cluster): its header decides.
                let stored = self.recorded_sha(&key, name).await?.ok_or_else(|| {
                    WalError::Internal(format!("`{key}` exists in the target but cannot be read"))
                })?;
                if stored.algorithm == sha.algorithm {
                    return self.compare(&key, name, stored, sha);
                }
                // Another version is there (FWAL1 from an older agent, or a
                // host set to another object_checksum); our content is gone
                // (streamed into the refused put), so its content is hashed
                // in ours: decoding verifies it by its own algorithm first.
                let object = self.target.get(&key).await?.ok_or_else(|| {
                    WalError::Internal(format!("`{key}` exists in the target but cannot be read"))
                })?;
                let owned = name.to_string();
                let algorithm = sha.algorithm;
                let theirs = blocking(move || {
                    codec::decode(&object)
                        .map(|original| codec::checksum(algorithm, &original))
                        .map_err(|source| WalError::Corrupt {
                            name: owned,
                            source,
                        })
                })
                .await?;
                self.compare(&key, name, theirs, sha)
            }
        }
    }

    /// Hashes and compresses `content` (one pass for both: they are nearly all
    /// of an upload's CPU) into a new object under `key`: streamed into the
    /// file of a directory target, one chunk per frame for an S3 PUT. Returns the put's
    /// outcome, the checksum, the original and the stored length.
    async fn store_new(
        &self,
        key: &str,
        content: Content,
    ) -> Result<(Put, codec::Checksum, u64, u64), WalError> {
        let encoders = self.encoders.clone();
        let root = self.target.directory().map(Path::to_path_buf);
        let held = if root.is_none() {
            // An S3 PUT needs its whole object (its length and signature come
            // first), so objects are held until stored: none is started while
            // those held (or being made) reach the budget.
            Some(self.held.reserve().await)
        } else {
            None
        };
        // Released as soon as the object is made: the PUT, or the fsyncs and
        // the link of a directory target, do not hold up the next encode.
        let permit = self
            .encoding
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| WalError::Internal(e.to_string()))?;
        let Some(root) = root else {
            let (chunks, sha, size, stored) = blocking(move || {
                let encoded = encoders
                    .encode_chunks(content.reader())
                    .map_err(|e| WalError::Internal(e.to_string()));
                drop(permit);
                encoded
            })
            .await?;
            let mut held = held;
            if let Some(held) = held.as_mut() {
                self.held.made(held, stored);
            }
            let put = self.target.put_new_chunks(key, chunks).await?;
            return Ok((put, sha, size, stored));
        };
        let key = key.to_string();
        blocking(move || {
            // Only a failed write is the target's failure (and may open the
            // valve); reading the WAL file or compressing it is ours.
            let mut ours = None;
            let put = crate::target::file_put_streamed(&root, &key, |file| {
                let encoded = encoders.with(|e| e.encode_to_file(content.reader(), file));
                drop(permit);
                match encoded {
                    Ok(Ok(done)) => Ok(done),
                    Ok(Err(codec::CodecError::Write(e))) => Err(e),
                    Ok(Err(e)) | Err(e) => {
                        let text = e.to_string();
                        ours = Some(e);
                        Err(std::io::Error::other(text))
                    }
                }
            });
            match (put, ours) {
                (_, Some(e)) => Err(WalError::Internal(e.to_string())),
                (Ok((put, (sha, size, stored))), None) => Ok((put, sha, size, stored)),
                (Err(e), None) => Err(e.into()),
            }
        })
        .await
    }

    /// The checksum in the header of the object stored under `key`, if any.
    async fn recorded_sha(
        &self,
        key: &str,
        name: &str,
    ) -> Result<Option<codec::Checksum>, WalError> {
        let Some(head) = self.target.head_bytes(key, MAX_HEADER_LEN).await? else {
            return Ok(None);
        };
        codec::recorded(&head)
            .map(Some)
            .map_err(|source| WalError::Corrupt {
                name: name.to_string(),
                source,
            })
    }

    fn compare(
        &self,
        key: &str,
        name: &str,
        stored: codec::Checksum,
        pushed: codec::Checksum,
    ) -> Result<PushOutcome, WalError> {
        if stored == pushed {
            self.remember(key, &stored);
            return Ok(PushOutcome::AlreadyArchived);
        }
        let error = WalError::Conflict {
            name: name.to_string(),
            stored,
            pushed,
        };
        (self.events)("wal_conflict", &error.to_string());
        Err(error)
    }

    /// `archive_command`'s request: push, and if that fails while the valve is
    /// configured and the backlog is past it, acknowledge anyway.
    pub async fn push_from_postgres(
        &self,
        sysid: u64,
        name: &str,
        content: Content,
    ) -> Result<PushOutcome, WalError> {
        match self.push(sysid, name, content).await {
            Ok(outcome) => {
                self.valve_announced.store(false, Ordering::Relaxed);
                Ok(outcome)
            }
            Err(e) => {
                self.fail(&e);
                if matches!(e, WalError::Target(_)) {
                    if let Some(limit) = self.config.valve_backlog {
                        let backlog = self.backlog().bytes;
                        if valve_may_acknowledge(name, backlog, limit.bytes()) {
                            self.counters.valve.fetch_add(1, Ordering::Relaxed);
                            if !self.valve_announced.swap(true, Ordering::Relaxed) {
                                (self.events)(
                                    "wal_valve_open",
                                    &format!(
                                        "WAL backlog {backlog} bytes is past wal.valve_backlog ({limit}) and the archive fails ({e}); acknowledging segments WITHOUT archiving them to keep pg_wal from filling the disk. Point-in-time recovery has a gap from {name}: take a new base backup once the archive works again."
                                    ),
                                );
                            }
                            return Ok(PushOutcome::Valve);
                        }
                    }
                }
                Err(e)
            }
        }
    }

    /// `archive_command`'s fast path: the file PostgreSQL names is the very file
    /// the look-ahead archived (same identity), so it is done without sending
    /// or hashing 16 MiB again. A look-ahead upload of that name under way is
    /// waited for: the call would otherwise send the content and hash it a
    /// second time while the upload competes for the same CPU. `false`: the
    /// caller must push the content.
    pub async fn archived_by_identity(&self, sysid: u64, name: &str, id: FileId) -> bool {
        if !names::is_valid(name) {
            return false;
        }
        let key = wal_key(sysid, name);
        let archived = || {
            self.known(&key).is_some()
                && self
                    .identities
                    .lock()
                    .map(|ids| ids.get(&key) == Some(&id))
                    .unwrap_or(false)
        };
        self.uploading.wait_for(&key, archived).await
    }

    /// `archive_command`'s call for a file the look-ahead has not reached: its
    /// `.ready` appeared after the last scan, as happens to nearly every
    /// segment of a database writing steadily (the archiver calls at once, the
    /// look-ahead looks every 100 ms). When the file this service opens in
    /// `pg_wal` is the one the caller named (same identity), it is archived
    /// from there, so its 16 MiB are not also read by agentctl and sent through
    /// the socket. `None`: not this cluster's `pg_wal` file, or already being
    /// worked on: the caller sends the content.
    pub async fn archive_named(
        &self,
        sysid: u64,
        name: &str,
        id: FileId,
    ) -> Option<Result<PushOutcome, WalError>> {
        let dir = self.config.pg_wal_dir.as_ref()?;
        if !names::is_valid(name) || self.default_sysid() != Some(sysid) {
            return None;
        }
        let path = dir.join(name);
        let (file, opened) = blocking(move || open_segment(&path)).await.ok()?;
        if opened != id {
            return None;
        }
        // Content pushes and these share one cap; a caller over it sends the
        // content, whose path tells it to retry.
        let _permit = self.push_permit().ok()?;
        let key = wal_key(sysid, name);
        if !self.uploading.start(&key) {
            return None;
        }
        let outcome = self
            .push_from_postgres(sysid, name, Content::File(file))
            .await;
        if matches!(
            outcome,
            Ok(PushOutcome::Stored | PushOutcome::AlreadyArchived)
        ) {
            self.remember_identity(&key, id);
        }
        // A target failure backs the look-ahead off this name, as its own would.
        self.uploading.finish(&key, outcome.is_ok());
        Some(outcome)
    }

    /// Which `pg_wal` file was archived under `key`, for [`Self::archived_by_identity`].
    fn remember_identity(&self, key: &str, id: FileId) {
        if let Ok(mut ids) = self.identities.lock() {
            if ids.len() > 50_000 {
                ids.clear();
            }
            ids.insert(key.to_string(), id);
        }
    }

    /// Unarchived segments PostgreSQL has marked `.ready`.
    pub fn backlog(&self) -> Backlog {
        let Some(dir) = &self.config.pg_wal_dir else {
            return Backlog::default();
        };
        let mut backlog = Backlog::default();
        let Ok(entries) = std::fs::read_dir(dir.join("archive_status")) else {
            return backlog;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(wal) = name.strip_suffix(".ready") {
                backlog.count += 1;
                if names::classify(wal) == Some(names::WalKind::Segment) {
                    // The file's own size: segments are whatever the cluster
                    // was made with (initdb --wal-segsize).
                    backlog.bytes += std::fs::metadata(dir.join(wal))
                        .map(|m| m.len())
                        .unwrap_or(names::DEFAULT_SEGMENT_BYTES);
                }
                if let Ok(age) = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|m| now.duration_since(m).unwrap_or_default())
                {
                    backlog.oldest_age_seconds = backlog.oldest_age_seconds.max(age.as_secs_f64());
                }
            }
        }
        backlog
    }

    async fn look_ahead_loop(self: Arc<Self>) {
        let Some(dir) = self.config.pg_wal_dir.clone() else {
            return;
        };
        let status = dir.join("archive_status");
        // The first scan at once: after a restart with a backlog, PostgreSQL's
        // archiver is already waiting on the first segment.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let Ok(entries) = std::fs::read_dir(&status) else {
                continue;
            };
            let mut ready: Vec<String> = entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_suffix(".ready"))
                        .map(str::to_string)
                })
                .filter(|n| names::is_valid(n))
                .collect();
            if ready.is_empty() {
                continue;
            }
            ready.sort();
            let Some(sysid) = self.default_sysid() else {
                continue;
            };
            for name in ready {
                let key = wal_key(sysid, &name);
                if self.known(&key).is_some() {
                    continue;
                }
                if !self.uploading.start(&key) {
                    continue;
                }
                let Ok(permit) = self.uploads.clone().acquire_owned().await else {
                    return;
                };
                let me = self.clone();
                let path = dir.join(&name);
                tokio::spawn(async move {
                    let _permit = permit;
                    let uploaded = me.look_ahead_upload(sysid, &name, &key, &path).await;
                    me.uploading.finish(&key, uploaded);
                });
            }
        }
    }

    async fn look_ahead_upload(&self, sysid: u64, name: &str, key: &str, path: &Path) -> bool {
        let opened = {
            let path = path.to_path_buf();
            blocking(move || open_segment(&path)).await
        };
        let (file, id) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::debug!(wal = %name, error = %e, "Look-ahead cannot open the segment.");
                return false;
            }
        };
        match self.push(sysid, name, Content::File(file)).await {
            Ok(_) => {
                self.remember_identity(key, id);
                true
            }
            Err(e) => {
                tracing::debug!(wal = %name, error = %e, "Look-ahead upload failed; archive_command will retry it.");
                false
            }
        }
    }

    async fn schedule_loop(self: Arc<Self>) {
        // Wake every 10 s, or at the backup interval if that is shorter (a
        // short interval is a test's or a lab's choice; waking less often than
        // asked would silently stretch it).
        let tick = self.config.backup_interval.map_or(SCHEDULE_TICK, |i| {
            i.clamp(Duration::from_secs(1), SCHEDULE_TICK)
        });
        let mut last_retention = std::time::Instant::now();
        let mut last_drill = std::time::Instant::now();
        // tokio's clock (not std's), so a test on paused time can run the schedule.
        let mut verify_from = tokio::time::Instant::now();
        let mut verify_wait = self.config.verify_interval.map(|interval| {
            verify_due_in(
                interval,
                self.counters.verify_unix.load(Ordering::Relaxed),
                now_unix(),
            )
        });
        loop {
            tokio::time::sleep(tick).await;
            // A cluster set to archive nothing reaches /metrics (and
            // FleetWalArchivingBroken) without anyone asking for the status.
            // Bounded (`read_archiver`): a PostgreSQL that accepts and never
            // answers must not hold up the backups, verifies and drills below.
            if let Some(Ok(stats)) = self.read_archiver().await {
                self.judge_archiving(&stats);
            }
            // In this task, not one of its own: a verify then never meets a
            // scheduled retention pass deleting what it listed (which would
            // read as "listed but gone"); a backup due meanwhile waits for it.
            if let (Some(interval), Some(wait)) = (self.config.verify_interval, verify_wait) {
                if verify_from.elapsed() >= wait {
                    self.scheduled_verify().await;
                    verify_from = tokio::time::Instant::now();
                    verify_wait = Some(interval);
                }
            }
            if let Some(interval) = self.config.drill_interval {
                if last_drill.elapsed() >= interval {
                    last_drill = std::time::Instant::now();
                    // The outcome is recorded (metrics, event) by the drill itself.
                    let request = crate::drill::DrillRequest {
                        system_identifier: None,
                        restore_command: None,
                    };
                    if let Err(e) = self.drill(request).await {
                        tracing::warn!(error = %e, "Scheduled restore drill could not start.");
                    }
                }
            }
            if let Some(interval) = self.config.backup_interval {
                let last = self.last_backup_unix().await;
                if now_unix().saturating_sub(last) >= interval.as_secs() {
                    match self.create_backup().await {
                        Ok(m) => {
                            tracing::info!(backup = %m.id, "Scheduled base backup taken.");
                            // Expire right after a good backup (as pgBackRest
                            // does): the new backup is what lets older ones go,
                            // and waiting for the hourly pass keeps them an hour.
                            last_retention = std::time::Instant::now();
                            self.retention_pass(m.system_identifier.parse().ok()).await;
                        }
                        Err(e) => {
                            self.fail(&e);
                            (self.events)(
                                "wal_backup_failed",
                                &format!("scheduled base backup failed: {e}"),
                            );
                        }
                    }
                }
            }
            if last_retention.elapsed() >= Duration::from_secs(3600) {
                last_retention = std::time::Instant::now();
                self.retention_pass(None).await;
            }
        }
    }

    /// `verify` from the schedule. A broken archive is already an event and
    /// the metrics (`verify` records them); a verify that could not run at
    /// all (the target unreachable, no cluster known) is an event too, since
    /// no one is waiting for the answer, and leaves the last result standing.
    async fn scheduled_verify(&self) {
        match self.verify(self.scheduled_verify_cluster()).await {
            Ok(report) if report.ok => tracing::info!(
                segments = report.walk.segments,
                objects = report.objects_checked,
                seconds = report.seconds,
                "Scheduled verify: the archive is complete."
            ),
            Ok(_) => tracing::warn!(
                "Scheduled verify found problems in the archive (wal_verify_failed event)."
            ),
            Err(e) => {
                self.fail(&e);
                tracing::warn!(error = %e, "Scheduled verify could not run.");
                (self.events)(
                    "wal_verify_failed",
                    &format!("scheduled verify could not run: {e}"),
                );
            }
        }
    }

    /// The configured cluster; on a host without `pg_wal_dir`, the one pinned
    /// cluster if there is exactly one (the metrics have no cluster label, so
    /// with several the operator names one by hand: `--system-id`).
    fn scheduled_verify_cluster(&self) -> Option<u64> {
        self.default_sysid().or_else(|| {
            let pinned = self.pinned.lock().ok()?;
            (pinned.len() == 1)
                .then(|| pinned.iter().next().copied())
                .flatten()
        })
    }

    /// Keeps the last verify's outcome for the next start ([`VERIFY_FILE`]).
    /// A failure to write costs only that, so it is logged, not returned.
    pub(crate) fn save_verify_mark(&self) {
        let c = &self.counters;
        let mark = VerifyMark {
            ok: c.verify_ok.load(Ordering::Relaxed) == 1,
            problems: c.verify_problems.load(Ordering::Relaxed),
            unix: c.verify_unix.load(Ordering::Relaxed),
        };
        let path = self.state_dir.join(VERIFY_FILE);
        let written = serde_json::to_vec(&mark)
            .map_err(std::io::Error::other)
            .and_then(|bytes| replace_file(&path, &bytes));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "Could not keep the verify result for the next start.");
        }
    }

    /// Retention from the schedule: no one is waiting for the answer, so a
    /// failure goes to the event log (and the failure metric), not only to tracing.
    async fn retention_pass(&self, sysid: Option<u64>) {
        if let Err(e) = self.apply_retention_for(sysid, None).await {
            self.fail(&e);
            tracing::warn!(error = %e, "Retention failed.");
            (self.events)("wal_retention_failed", &format!("retention failed: {e}"));
        }
    }

    async fn last_backup_unix(&self) -> u64 {
        let known = self.counters.last_backup_unix.load(Ordering::Relaxed);
        if known > 0 {
            return known;
        }
        {
            let mut listed = self
                .backups_listed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if listed.is_some_and(|at| at.elapsed() < BACKUPS_LISTED_TTL) {
                return 0;
            }
            *listed = Some(std::time::Instant::now());
        }
        let latest = match self.default_sysid() {
            Some(sysid) => self
                .list_backups(sysid)
                .await
                .ok()
                .and_then(|l| l.last().map(|m| m.finished_unix))
                .unwrap_or(0),
            None => 0,
        };
        self.counters
            .last_backup_unix
            .store(latest, Ordering::Relaxed);
        latest
    }

    /// `restore_command`'s request: the original bytes, checksum verified;
    /// starts fetching the following segments into the prefetch directory.
    /// With `hand_off`, when the segment is already prefetched
    /// (checksum verified when it was decoded), the prefetched file's path
    /// instead of its 16 MiB: the caller (agentctl, as the cluster's user)
    /// moves it into place itself, as pgBackRest does from its spool. The
    /// file stays in the cache until the caller takes it, so a caller that
    /// gives up loses nothing; `clean_prefetch` drops it once recovery is past.
    pub async fn fetch_or_hand_off(
        self: &Arc<Self>,
        sysid: u64,
        name: &str,
        hand_off: bool,
    ) -> Result<Fetched, WalError> {
        if !names::is_valid(name) {
            return Err(WalError::BadName(name.to_string()));
        }
        let dir = self.prefetch_dir(sysid);
        let local = dir.join(name);
        // Recovery asks for segments in order, so the one asked for is often
        // being prefetched right now: wait for it rather than fetch it twice.
        self.prefetching
            .wait_for(&format!("{sysid}/{name}"), || local.exists())
            .await;
        let cached = tokio::fs::symlink_metadata(&local).await.ok();
        let (fetched, length) = match cached.as_ref().map(hand_off_decision) {
            Some(CacheEntry::Serve { length }) if hand_off => {
                // Absolute and without symlinks: agentctl runs in the data
                // directory, not in ours.
                match tokio::fs::canonicalize(&dir).await {
                    Ok(real) => (
                        Fetched::HandOff {
                            path: real.join(name),
                            length,
                        },
                        length,
                    ),
                    Err(_) => self.read_cached(&local, sysid, name).await?,
                }
            }
            Some(CacheEntry::Serve { .. }) => self.read_cached(&local, sysid, name).await?,
            Some(CacheEntry::Refuse) => {
                // Not a file we wrote (a symlink, a directory): never served.
                let _ = tokio::fs::remove_file(&local).await;
                self.fetch_content(sysid, name).await?
            }
            None => self.fetch_content(sysid, name).await?,
        };
        if matches!(fetched, Fetched::HandOff { .. }) {
            self.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.fetched.fetch_add(1, Ordering::Relaxed);
        if names::classify(name) == Some(names::WalKind::Segment) {
            self.clean_prefetch(&dir, name).await;
            // A segment is as long as the cluster's segment size, which
            // decides the names that follow it.
            let segment_bytes = length;
            for next in names::next_segments(name, PREFETCH, segment_bytes) {
                let key = format!("{sysid}/{next}");
                if tokio::fs::metadata(dir.join(&next)).await.is_ok() {
                    continue;
                }
                if !self.prefetching.start(&key) {
                    continue;
                }
                let me = self.clone();
                let dir = dir.clone();
                tokio::spawn(async move {
                    // The GET waits on the network, the decode on a core: a
                    // decode slot held through the GET left the cores idle
                    // while both slots waited for the store (to S3 the GET
                    // took longer than the decode).
                    let got = {
                        let _get = me.prefetch_gets.clone().acquire_owned().await;
                        me.target.get(&wal_key(sysid, &next)).await
                    };
                    let fetched = match got {
                        Ok(Some(object)) => {
                            let _worker = me.prefetch_workers.clone().acquire_owned().await;
                            write_prefetched(&dir, &next, object).await.is_ok()
                        }
                        _ => false,
                    };
                    me.prefetching.finish(&key, fetched);
                });
            }
        }
        Ok(fetched)
    }

    /// A prefetched segment's bytes; the cache entry goes (it is served once).
    async fn read_cached(
        &self,
        local: &Path,
        sysid: u64,
        name: &str,
    ) -> Result<(Fetched, u64), WalError> {
        match tokio::fs::read(local).await {
            Ok(c) => {
                let _ = tokio::fs::remove_file(local).await;
                self.counters.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                let length = c.len() as u64;
                Ok((Fetched::Content(c), length))
            }
            // Taken by another caller meanwhile.
            Err(_) => self.fetch_content(sysid, name).await,
        }
    }

    async fn fetch_content(&self, sysid: u64, name: &str) -> Result<(Fetched, u64), WalError> {
        let content = self
            .fetch_from_target(sysid, name)
            .await?
            .ok_or_else(|| WalError::NotFound(name.to_string()))?;
        let length = content.len() as u64;
        Ok((Fetched::Content(content), length))
    }

    async fn fetch_from_target(&self, sysid: u64, name: &str) -> Result<Option<Vec<u8>>, WalError> {
        let Some(object) = self.target.get(&wal_key(sysid, name)).await? else {
            return Ok(None);
        };
        let name = name.to_string();
        blocking(move || {
            codec::decode(&object)
                .map(Some)
                .map_err(|source| WalError::Corrupt { name, source })
        })
        .await
    }

    pub fn prefetch_dir(&self, sysid: u64) -> PathBuf {
        self.state_dir.join(PREFETCH_DIR).join(sysid.to_string())
    }

    /// Drops prefetched segments recovery has gone past.
    async fn clean_prefetch(&self, dir: &Path, current: &str) {
        let Some(pos) = names::position(current) else {
            return;
        };
        let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
            return;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().to_string();
            if names::position(&name).is_some_and(|p| p < pos) {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }

    /// Puts a long operation on the status until the guard is dropped.
    pub fn begin_operation(
        &self,
        operation: &'static str,
        subject: &str,
        total: Option<u64>,
        phase: &str,
    ) -> OperationGuard {
        let done = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(total.unwrap_or(0)));
        if let Ok(mut slot) = self.operation.lock() {
            *slot = Some(Running {
                operation,
                subject: subject.to_string(),
                started: std::time::Instant::now(),
                done: done.clone(),
                total: total.clone(),
                phase: phase.to_string(),
            });
        }
        OperationGuard {
            slot: self.operation.clone(),
            done,
            total,
        }
    }

    /// The base backup or restore under way, if any.
    pub fn progress(&self) -> Option<fleet_model::api::Progress> {
        let slot = self.operation.lock().ok()?;
        let running = slot.as_ref()?;
        let elapsed = running.started.elapsed().as_secs_f64();
        let done = running.done.load(Ordering::Relaxed);
        // An estimate (a base backup's) may be passed: never more than 100%.
        let total = running.total.load(Ordering::Relaxed);
        Some(fleet_model::api::Progress {
            operation: running.operation.to_string(),
            subject: running.subject.clone(),
            done_bytes: done,
            total_bytes: (total > 0).then(|| total.max(done)),
            bytes_per_second: if elapsed > 0.0 {
                done as f64 / elapsed
            } else {
                0.0
            },
            elapsed_seconds: elapsed,
            detail: Some(running.phase.clone()),
        })
    }

    /// Probes the archive target, or reuses a probe younger than [`PROBE_REUSE`].
    pub async fn probe_archive(&self) -> ArchiveProbe {
        let fresh = self
            .probed
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .filter(|(at, _)| at.elapsed() < PROBE_REUSE);
        if let Some((_, probe)) = fresh {
            return probe;
        }
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, self.target.probe()).await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no answer within {}",
                humantime::format_duration(PROBE_TIMEOUT)
            )),
        };
        let probe = ArchiveProbe {
            reachable: error.is_none(),
            error,
            latency_ms: started.elapsed().as_millis() as u64,
            checked_unix: now_unix(),
        };
        if let Ok(mut slot) = self.probed.lock() {
            *slot = Some((std::time::Instant::now(), probe.clone()));
        }
        probe
    }

    /// `pg_stat_archiver` and the archive settings, at most once per
    /// `ARCHIVER_TTL` and for at most `SETTINGS_READ_TIMEOUT`; None without
    /// `wal.postgres`.
    async fn read_archiver(&self) -> Option<Result<crate::pg::ArchiverStats, String>> {
        let conninfo = self.config.postgres.as_ref()?;
        Some(
            self.archiver
                .get_or(|| async {
                    match tokio::time::timeout(
                        SETTINGS_READ_TIMEOUT,
                        crate::pg::archiver_stats(conninfo),
                    )
                    .await
                    {
                        Ok(read) => read.map_err(|e| e.to_string()),
                        Err(_) => Err(format!(
                            "PostgreSQL did not answer within {} s (wal.postgres)",
                            SETTINGS_READ_TIMEOUT.as_secs()
                        )),
                    }
                })
                .await,
        )
    }

    /// Judges the settings read and keeps the count of problems for /metrics.
    fn judge_archiving(
        &self,
        stats: &crate::pg::ArchiverStats,
    ) -> fleet_model::archiving::Archiving {
        let archiving = fleet_model::archiving::judge(
            &stats.settings,
            Path::new(&format!("{}.so", fleet_model::archiving::MODULE_15)).exists(),
        );
        let problems = archiving
            .findings
            .iter()
            .filter(|f| f.severity == fleet_model::archiving::Severity::Problem)
            .count() as u64;
        self.counters
            .archiving_problems_plus_one
            .store(problems + 1, Ordering::Relaxed);
        archiving
    }

    pub async fn status(&self) -> WalStatus {
        let archive = self.probe_archive().await;
        let backlog = self.backlog();
        let archiver = self.read_archiver().await;
        let last_backup = self.last_backup_unix().await;
        WalStatus {
            target: self.target.describe(),
            archive,
            progress: self.progress(),
            system_identifier: self.default_sysid().map(|s| s.to_string()),
            pg_wal_dir: self.config.pg_wal_dir.clone(),
            ready_count: backlog.count,
            backlog_bytes: backlog.bytes,
            oldest_ready_age_seconds: backlog.oldest_age_seconds,
            archiving: archiver
                .as_ref()
                .and_then(|a| a.as_ref().ok())
                .map(|a| self.judge_archiving(a)),
            archiver: archiver.as_ref().and_then(|a| a.as_ref().ok().cloned()),
            archiver_error: archiver.and_then(|a| a.err()),
            pushed_segments: self.counters.segments.load(Ordering::Relaxed),
            pushed_bytes: self.counters.bytes.load(Ordering::Relaxed),
            stored_bytes: self.counters.stored_bytes.load(Ordering::Relaxed),
            fetched_segments: self.counters.fetched.load(Ordering::Relaxed),
            valve_acknowledged: self.counters.valve.load(Ordering::Relaxed),
            failures: self
                .counters
                .failures
                .lock()
                .map(|f| f.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default(),
            last_backup_unix: (last_backup > 0).then_some(last_backup),
            last_backup_age_seconds: (last_backup > 0)
                .then(|| now_unix().saturating_sub(last_backup)),
        }
    }

    /// Prometheus text, names under `fleet_agent_wal_`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let backlog = self.backlog();
        let c = &self.counters;
        let last_push = c.last_push_unix.load(Ordering::Relaxed);
        let lag = if backlog.count == 0 {
            0.0
        } else {
            backlog.oldest_age_seconds
        };
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "fleet_agent_wal_archive_lag_seconds",
            "Age of the oldest WAL file PostgreSQL marked ready and is not yet archived.",
            "gauge",
            format!("{lag}"),
        );
        gauge(
            "fleet_agent_wal_backlog_segments",
            "WAL files waiting in archive_status/*.ready.",
            "gauge",
            backlog.count.to_string(),
        );
        gauge(
            "fleet_agent_wal_backlog_bytes",
            "Bytes of WAL segments waiting to be archived.",
            "gauge",
            backlog.bytes.to_string(),
        );
        gauge(
            "fleet_agent_wal_shipped_segments_total",
            "WAL files uploaded to the archive target.",
            "counter",
            c.segments.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "fleet_agent_wal_shipped_bytes_total",
            "Uncompressed bytes of WAL uploaded to the archive target.",
            "counter",
            c.bytes.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "fleet_agent_wal_fetched_segments_total",
            "WAL files handed to restore_command.",
            "counter",
            c.fetched.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "fleet_agent_wal_prefetch_hits_total",
            "WAL files of fetched_segments_total that the prefetch had ready (handed off by path or read from its cache) instead of fetched from the target while restore_command waited.",
            "counter",
            c.prefetch_hits.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "fleet_agent_wal_valve_acknowledged_total",
            "WAL files acknowledged to PostgreSQL WITHOUT archiving them (the valve).",
            "counter",
            c.valve.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            "fleet_agent_wal_last_push_timestamp_seconds",
            "Unix time of the last upload (0: none since start).",
            "gauge",
            last_push.to_string(),
        );
        let problems = c.archiving_problems_plus_one.load(Ordering::Relaxed);
        if problems > 0 {
            gauge(
                "fleet_agent_wal_archiving_problems",
                "Problems in PostgreSQL's archive settings that make it archive nothing (agentctl wal status lists them; absent until they were read).",
                "gauge",
                (problems - 1).to_string(),
            );
        }
        let newest = c.newest_archived_unix.load(Ordering::Relaxed);
        if newest > 0 {
            gauge(
                "fleet_agent_wal_newest_archived_age_seconds",
                "Seconds since the newest WAL segment reached the archive (the RPO bound; archive_timeout caps it while the database writes).",
                "gauge",
                now_unix().saturating_sub(newest).to_string(),
            );
        }
        if let Some(interval) = self.config.verify_interval {
            gauge(
                "fleet_agent_wal_verify_interval_seconds",
                "wal.verify_interval: how often the WAL service verifies the archive itself (absent: by hand only).",
                "gauge",
                interval.as_secs().to_string(),
            );
        }
        let verified = c.verify_unix.load(Ordering::Relaxed);
        if verified > 0 {
            gauge(
                "fleet_agent_wal_verify_ok",
                "1 if the last verify (agentctl wal verify or wal.verify_interval) found the archive complete from the oldest kept base backup on, 0 if not.",
                "gauge",
                c.verify_ok.load(Ordering::Relaxed).to_string(),
            );
            gauge(
                "fleet_agent_wal_verify_problems",
                "Gaps, checksum failures and timeline switches without .history found by the last verify.",
                "gauge",
                c.verify_problems.load(Ordering::Relaxed).to_string(),
            );
            gauge(
                "fleet_agent_wal_verify_timestamp_seconds",
                "Unix time of the last verify.",
                "gauge",
                verified.to_string(),
            );
        }
        let drilled = c.drill_unix.load(Ordering::Relaxed);
        if drilled > 0 {
            gauge(
                "fleet_agent_wal_drill_ok",
                "1 if the last restore drill restored, replayed to the newest archived segment and answered the sanity query, 0 if not.",
                "gauge",
                c.drill_ok.load(Ordering::Relaxed).to_string(),
            );
            gauge(
                "fleet_agent_wal_drill_rto_seconds",
                "Measured recovery time of the last restore drill (download, unpack, replay, promotion, first query).",
                "gauge",
                format!("{:.3}", c.drill_rto_millis.load(Ordering::Relaxed) as f64 / 1000.0),
            );
            gauge(
                "fleet_agent_wal_drill_timestamp_seconds",
                "Unix time of the last restore drill.",
                "gauge",
                drilled.to_string(),
            );
        }
        let last_backup = c.last_backup_unix.load(Ordering::Relaxed);
        if last_backup > 0 {
            gauge(
                "fleet_agent_wal_last_base_backup_age_seconds",
                "Seconds since the newest base backup finished.",
                "gauge",
                now_unix().saturating_sub(last_backup).to_string(),
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_agent_wal_push_calls_total archive_command pushes that succeeded, by what served them: look_ahead (archived before the call), pg_wal (the service read the named file from pg_wal_dir), content (agentctl sent the bytes)."
        );
        let _ = writeln!(out, "# TYPE fleet_agent_wal_push_calls_total counter");
        for (served, count) in PUSH_SERVED.iter().zip(&c.push_calls) {
            let _ = writeln!(
                out,
                "fleet_agent_wal_push_calls_total{{served=\"{served}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fleet_agent_wal_failures_total WAL archive failures by kind."
        );
        let _ = writeln!(out, "# TYPE fleet_agent_wal_failures_total counter");
        let failures = c.failures.lock().map(|f| f.clone()).unwrap_or_default();
        for kind in [
            "invalid",
            "conflict",
            "foreign_cluster",
            "not_found",
            "target",
            "checksum",
            "postgres",
            "backup",
            "internal",
            "busy",
        ] {
            let _ = writeln!(
                out,
                "fleet_agent_wal_failures_total{{kind=\"{kind}\"}} {}",
                failures.get(kind).copied().unwrap_or(0)
            );
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Backlog {
    pub count: u64,
    pub bytes: u64,
    pub oldest_age_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WalStatus {
    pub target: String,
    /// The archive target's answer to a probe ([`WalService::probe_archive`]).
    pub archive: ArchiveProbe,
    /// The base backup or restore under way (bytes read from pg_basebackup,
    /// bytes unpacked); absent when none runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<fleet_model::api::Progress>,
    pub system_identifier: Option<String>,
    pub pg_wal_dir: Option<PathBuf>,
    pub ready_count: u64,
    pub backlog_bytes: u64,
    pub oldest_ready_age_seconds: f64,
    pub archiver: Option<crate::pg::ArchiverStats>,
    pub archiver_error: Option<String>,
    /// How PostgreSQL is set to archive, and what is wrong with it; absent
    /// without `wal.postgres` or when the cluster could not be asked.
    pub archiving: Option<fleet_model::archiving::Archiving>,
    pub pushed_segments: u64,
    pub pushed_bytes: u64,
    pub stored_bytes: u64,
    pub fetched_segments: u64,
    pub valve_acknowledged: u64,
    pub failures: BTreeMap<String, u64>,
    pub last_backup_unix: Option<u64>,
    pub last_backup_age_seconds: Option<u64>,
}

/// What served an archive_command push, as `push_calls` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushServed {
    LookAhead = 0,
    PgWal = 1,
    Content = 2,
}

const PUSH_SERVED: [&str; 3] = ["look_ahead", "pg_wal", "content"];

/// What a push reads: the bytes `archive_command` sent, or a segment the
/// look-ahead opened in `pg_wal`, read in pieces rather than loaded whole.
pub enum Content {
    Bytes(Bytes),
    File(std::fs::File),
    /// A request body read as it arrives (from a blocking thread).
    Stream(Box<dyn std::io::Read + Send>),
}

impl Content {
    fn reader(self) -> Box<dyn std::io::Read + Send> {
        match self {
            Content::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
            Content::File(file) => Box::new(file),
            Content::Stream(reader) => reader,
        }
    }
}

/// Opens a segment in `pg_wal` for the look-ahead. PostgreSQL's own files
/// only: `O_NOFOLLOW` refuses a symlink planted there, and the identity comes
/// from the opened file itself, so it names exactly what gets archived.
fn open_segment(path: &Path) -> Result<(std::fs::File, FileId), WalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| WalError::BadRequest(format!("{}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| WalError::BadRequest(format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(WalError::BadRequest(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    Ok((file, FileId::of(&meta)))
}

/// What a fetch answers with.
#[derive(Debug)]
pub enum Fetched {
    /// The original bytes, checksum verified.
    Content(Vec<u8>),
    /// The prefetched file holding them (absolute, in the prefetch directory),
    /// for the caller to move into place.
    HandOff { path: PathBuf, length: u64 },
}

#[derive(Debug, PartialEq, Eq)]
enum CacheEntry {
    Serve {
        length: u64,
    },
    /// Something the prefetch did not write: prefetch only ever renames a
    /// regular file into place, so a symlink here is someone's game.
    Refuse,
}

/// Whether a prefetch cache entry (by its `lstat`) may be served or handed off.
fn hand_off_decision(meta: &std::fs::Metadata) -> CacheEntry {
    if meta.file_type().is_file() {
        CacheEntry::Serve { length: meta.len() }
    } else {
        CacheEntry::Refuse
    }
}

/// Names with background work under way (look-ahead uploads, prefetches), so
/// that a request for one of them waits for that work instead of repeating it.
/// A name whose job failed is not started again before its back-off ends: while
/// the target is down, retrying every segment every 100 ms would spend the
/// host's CPU reading and hashing the same files.
#[derive(Default)]
struct Jobs {
    state: Mutex<JobState>,
    finished: tokio::sync::Notify,
}

#[derive(Default)]
struct JobState {
    under_way: HashSet<String>,
    /// key -> (not before, current back-off)
    failed: HashMap<String, (tokio::time::Instant, Duration)>,
}

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);

impl Jobs {
    /// `false`: a job for `key` is under way or backing off.
    fn start(&self, key: &str) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        if let Some((not_before, _)) = state.failed.get(key) {
            if tokio::time::Instant::now() < *not_before {
                return false;
            }
        }
        state.under_way.insert(key.to_string())
    }

    fn finish(&self, key: &str, succeeded: bool) {
        if let Ok(mut state) = self.state.lock() {
            state.under_way.remove(key);
            if succeeded {
                state.failed.remove(key);
            } else {
                if state.failed.len() > 50_000 {
                    state.failed.clear();
                }
                let delay = state
                    .failed
                    .get(key)
                    .map_or(RETRY_FIRST, |(_, last)| (*last * 2).min(RETRY_MAX));
                state.failed.insert(
                    key.to_string(),
                    (tokio::time::Instant::now() + delay, delay),
                );
            }
        }
        self.finished.notify_waiters();
    }

    /// Whether `done` holds, waiting (up to `JOB_WAIT`) while a job for `key` is under way.
    async fn wait_for(&self, key: &str, done: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + JOB_WAIT;
        loop {
            // Registered before the checks, so a job ending between them still wakes us.
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if done() {
                return true;
            }
            let under_way = self
                .state
                .lock()
                .map(|state| state.under_way.contains(key))
                .unwrap_or(false);
            if !under_way || tokio::time::timeout_at(deadline, finished).await.is_err() {
                return false;
            }
        }
    }
}

/// Bytes of S3 objects held in memory at once, being made, waiting for or in
/// their PUT, past which no new one is started. Objects of a `pgbench`
/// backlog were 0.1-4.5 MiB; with four uploads and archive_command's push in
/// flight they held up to 14 MiB (heaptrack), and still 13 MiB when only the
/// objects already made were counted (two more were being made). Four 1 MiB
/// objects still go at once; objects of 4 MiB go one at a time.
const S3_HELD_BYTES: u64 = 4 << 20;

/// A budget of bytes held. [`ByteBudget::reserve`] waits while those held
/// reach the limit, then counts an object at its expected size (the last
/// object's: its real size is known only once it is made) until the guard
/// drops; [`Held::actual`] corrects the count once it is made. So the bytes
/// held stay under the limit plus one object's misestimate per object in
/// the making.
struct ByteBudget {
    limit: u64,
    used: Arc<AtomicU64>,
    /// The size of the last object made, the next one's estimate.
    last: AtomicU64,
    freed: Arc<tokio::sync::Notify>,
}

struct Held {
    bytes: u64,
    used: Arc<AtomicU64>,
    freed: Arc<tokio::sync::Notify>,
}

impl Held {
    /// The object is made: count its real size instead of the estimate.
    fn actual(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.used.fetch_add(bytes - self.bytes, Ordering::SeqCst);
        } else {
            self.used.fetch_sub(self.bytes - bytes, Ordering::SeqCst);
            self.freed.notify_waiters();
        }
        self.bytes = bytes;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::SeqCst);
        self.freed.notify_waiters();
    }
}

impl ByteBudget {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Arc::new(AtomicU64::new(0)),
            last: AtomicU64::new(limit / 4),
            freed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    async fn reserve(&self) -> Held {
        let estimate = self.last.load(Ordering::Relaxed);
        loop {
            // Registered before the check, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Check and count in one step: two callers cannot both pass on the same room.
            let limit = self.limit;
            let counted = self
                .used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                    (used < limit).then_some(used + estimate)
                });
            if counted.is_ok() {
                return Held {
                    bytes: estimate,
                    used: self.used.clone(),
                    freed: self.freed.clone(),
                };
            }
            freed.await;
        }
    }

    /// Records the size of an object just made, the next estimate.
    fn made(&self, held: &mut Held, bytes: u64) {
        self.last.store(bytes, Ordering::Relaxed);
        held.actual(bytes);
    }
}

/// How many encodes (and encoders) run at once: one per core.
fn encodes_at_once() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs CPU-heavy or blocking work off the async workers.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, WalError> + Send + 'static,
) -> Result<T, WalError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| WalError::Internal(e.to_string()))?
}

/// Decodes `object` straight into a temp file, then renames it: the fetch
/// path never sees a partial or unverified file (a checksum failure, found at
/// the end, removes the temp file). Never whole in memory: decoded into a
/// 16 MiB `Vec` first, two prefetches at once held 32 MiB and wrote every
/// byte twice. No fsync: the prefetch directory is a cache that the daemon
/// empties when it starts, so a file torn by a power loss is never served.
async fn write_prefetched(dir: &Path, name: &str, object: Bytes) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let temp = dir.join(format!(".{name}.tmp"));
        let written = std::fs::File::create(&temp).and_then(|mut file| {
            codec::decode_to(&object, &mut file).map_err(std::io::Error::other)
        });
        match written {
            Ok(_) => std::fs::rename(&temp, dir.join(&name)),
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                Err(e)
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A service archiving cluster 77's [`cluster_77`] data directory under
/// `dir` into `dir/archive`, not started (no look-ahead); and its pg_wal.
#[cfg(test)]
pub(crate) fn cluster_77_service(dir: &Path) -> (Arc<WalService>, PathBuf) {
    let pg_wal = cluster_77(dir);
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).expect("archive");
    let config: WalConfig = toml::from_str(&format!(
        "target = \"file://{}\"\npg_wal_dir = \"{}\"",
        archive.display(),
        pg_wal.display()
    ))
    .expect("config");
    let service = WalService::new(config, dir, Arc::new(|_: &str, _: &str| {})).expect("service");
    (service, pg_wal)
}

/// A data directory under `dir` whose pg_control names cluster 77, with an
/// empty `pg_wal/archive_status`; returns its pg_wal.
#[cfg(test)]
pub(crate) fn cluster_77(dir: &Path) -> PathBuf {
    let pg_wal = dir.join("data/pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).expect("pg_wal");
    std::fs::create_dir_all(dir.join("data/global")).expect("global");
    let mut control = 77u64.to_ne_bytes().to_vec();
    control.resize(8192, 0);
    std::fs::write(dir.join("data/global/pg_control"), control).expect("pg_control");
    pg_wal
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `good` bytes of a segment, then fails, as a client that hangs up would.
    struct Failing {
        good: usize,
    }

    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.good == 0 {
                return Err(std::io::Error::other("client went away"));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(5);
            self.good -= n;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn a_push_streamed_to_a_directory_leaves_nothing_when_its_content_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        let config: WalConfig =
            toml::from_str(&format!("target = \"file://{}\"", archive.display())).expect("config");
        let service =
            WalService::new(config, dir.path(), Arc::new(|_: &str, _: &str| {})).expect("service");
        let name = "000000010000000000000007";
        // Past the first pieces, so part of the object was already on disk.
        let failed = service
            .push(
                7,
                name,
                Content::Stream(Box::new(Failing { good: 3 << 20 })),
            )
            .await;
        // The content's failure, not the target's: it must not open the valve.
        assert!(matches!(failed, Err(WalError::Internal(_))), "{failed:?}");
        let wal_dir = archive.join("7/wal");
        let left: Vec<_> = std::fs::read_dir(&wal_dir)
            .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "nothing under the key, no temp file: {left:?}"
        );
        // The same name then stores, and the object on disk is the whole segment.
        let segment: Vec<u8> = (0..(4 << 20) + 3).map(|i| (i % 241) as u8).collect();
        let outcome = service
            .push(7, name, Content::Bytes(Bytes::from(segment.clone())))
            .await
            .expect("push");
        assert!(matches!(outcome, PushOutcome::Stored));
        let object = std::fs::read(wal_dir.join(format!("{name}.zst"))).expect("object");
        assert_eq!(codec::decode(&object).expect("decode"), segment);
        let stored = service.counters.stored_bytes.load(Ordering::Relaxed);
        assert_eq!(
            stored,
            object.len() as u64,
            "the stored size counts the header"
        );
    }

    #[tokio::test]
    async fn a_running_operation_is_on_the_status_until_its_guard_goes() {
        let dir = tempfile::tempdir().unwrap();
        let config: WalConfig = toml::from_str(&format!(
            "target = \"file://{}\"",
            dir.path().join("archive").display()
        ))
        .unwrap();
        let service = WalService::new(config, dir.path(), Arc::new(|_: &str, _: &str| {})).unwrap();
        assert!(service.status().await.progress.is_none());
        let op = service.begin_operation("restore", "20261204T", Some(4096), "downloading");
        op.done.fetch_add(1024, Ordering::Relaxed);
        op.phase("checking and unpacking");
        let p = service
            .status()
            .await
            .progress
            .expect("progress while it runs");
        assert_eq!(
            (p.operation.as_str(), p.subject.as_str()),
            ("restore", "20261204T")
        );
        assert_eq!((p.done_bytes, p.total_bytes), (1024, Some(4096)));
        assert_eq!(p.detail.as_deref(), Some("checking and unpacking"));
        drop(op);
        assert!(service.progress().is_none());
        // A backup's total comes later, as an estimate that may be passed.
        let op = service.begin_operation("backup", "20261205T", None, "reading");
        op.done.fetch_add(100, Ordering::Relaxed);
        assert_eq!(service.progress().and_then(|p| p.total_bytes), None);
        op.total.store(80, Ordering::Relaxed);
        assert_eq!(service.progress().and_then(|p| p.total_bytes), Some(100));
        op.total.store(400, Ordering::Relaxed);
        assert_eq!(service.progress().and_then(|p| p.total_bytes), Some(400));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_status_readers_share_one_reading() {
        let cache: Arc<Cached<u32>> = Arc::new(Cached::new(std::time::Duration::from_secs(60)));
        let readings = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                let readings = readings.clone();
                tokio::spawn(async move {
                    cache
                        .get_or(|| async {
                            readings.fetch_add(1, Ordering::SeqCst);
                            // A slow PostgreSQL: everyone arrives meanwhile.
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            7
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(
            readings.load(Ordering::SeqCst),
            1,
            "one connection, not one per request"
        );
        let stale: Cached<u32> = Cached::new(std::time::Duration::ZERO);
        assert_eq!(stale.get_or(|| async { 1 }).await, 1);
        assert_eq!(
            stale.get_or(|| async { 2 }).await,
            2,
            "read again once stale"
        );
    }

    #[test]
    fn the_valve_acknowledges_segments_only() {
        let (past, limit) = (100 << 20, 40 << 20);
        assert!(valve_may_acknowledge(
            "000000010000000000000005",
            past,
            limit
        ));
        assert!(!valve_may_acknowledge(
            "000000010000000000000005",
            limit,
            limit
        ));
        for kept in [
            "00000002.history",
            "000000010000000000000002.00000028.backup",
            "000000010000000000000005.partial",
        ] {
            assert!(!valve_may_acknowledge(kept, past, limit), "{kept}");
        }
    }

    #[test]
    fn archiving_problems_reach_metrics_once_the_settings_were_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_with(dir.path(), "");
        let problems = |service: &WalService| {
            let mut text = String::new();
            service.render_metrics(&mut text);
            text.lines()
                .find_map(|l| l.strip_prefix("fleet_agent_wal_archiving_problems "))
                .map(str::to_string)
        };
        assert_eq!(problems(&service), None, "no figure before a reading");
        let stats = |mode: &str, command: &str| crate::pg::ArchiverStats {
            settings: fleet_model::archiving::ArchiveSettings {
                server_version_num: 150020,
                archive_mode: mode.into(),
                archive_command: command.into(),
                archive_library: String::new(),
                archive_timeout: "1min".into(),
            },
            ..Default::default()
        };
        service.judge_archiving(&stats("on", "agentctl wal push %p"));
        assert_eq!(problems(&service).as_deref(), Some("0"));
        service.judge_archiving(&stats("off", "agentctl wal push"));
        assert_eq!(problems(&service).as_deref(), Some("2"));
    }

    #[tokio::test]
    async fn after_a_start_the_rpo_age_comes_from_the_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        std::fs::create_dir_all(archive.join("77/wal")).expect("archive");
        std::fs::write(archive.join("77/wal/000000010000000000000003.zst"), b"x").expect("object");
        let (service, _) = cluster_77_service(dir.path());
        let mut text = String::new();
        service.render_metrics(&mut text);
        assert!(!text.contains("fleet_agent_wal_newest_archived_age_seconds"));
        service.seed_newest_archived().await;
        let mut text = String::new();
        service.render_metrics(&mut text);
        let age: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("fleet_agent_wal_newest_archived_age_seconds "))
            .and_then(|v| v.parse().ok())
            .expect("the age is exported");
        assert!(age < 600, "{age}");
    }

    #[test]
    fn a_scheduled_verify_comes_an_interval_after_the_last_or_after_the_start() {
        let day = Duration::from_secs(86400);
        assert_eq!(
            verify_due_in(day, 0, 1_000_000),
            day,
            "never verified: a whole interval"
        );
        assert_eq!(
            verify_due_in(day, 1_000_000, 1_000_000 + 3600),
            day - Duration::from_secs(3600)
        );
        assert_eq!(
            verify_due_in(day, 1_000_000, 1_000_000 + 2 * 86400),
            Duration::ZERO
        );
        // A clock set back: not before a whole interval.
        assert_eq!(verify_due_in(day, 1_000_000, 999_000), day);
    }

    /// The archive of cluster 77 with segments 1-4 (real objects) beside a
    /// pg_control naming 77; returns (pg_wal, archive's wal directory).
    fn cluster_77_archive(dir: &Path) -> (PathBuf, PathBuf) {
        let pg_wal = cluster_77(dir);
        let wal = dir.join("archive/77/wal");
        std::fs::create_dir_all(&wal).expect("archive");
        for n in 1..=4u8 {
            let (object, _, _) =
                codec::encode(&[n; 4096][..], 1, codec::Algorithm::Blake3).expect("encode");
            std::fs::write(wal.join(format!("00000001000000000000000{n}.zst")), object)
                .expect("object");
        }
        (pg_wal, wal)
    }

    fn metric(service: &WalService, name: &str) -> Option<String> {
        let mut text = String::new();
        service.render_metrics(&mut text);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_string))
    }

    /// On paused time: polls `done` once a (virtual) second for at most
    /// `seconds`; whether it came true. Paused time runs ahead while file
    /// reads are under way, so tests wait for a result, not for a fixed time.
    async fn within(seconds: u32, done: impl Fn() -> bool) -> bool {
        for _ in 0..seconds {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        done()
    }

    /// Cluster 77's archive with a verify every minute, and `extra` lines.
    fn verifying_config(dir: &Path, pg_wal: &Path, extra: &str) -> WalConfig {
        toml::from_str(&format!(
            "target = \"file://{}\"\npg_wal_dir = \"{}\"\nverify_interval = \"1m\"\n{extra}",
            dir.join("archive").display(),
            pg_wal.display()
        ))
        .expect("config")
    }

    /// The schedule reads PostgreSQL's archive settings every tick; a server
    /// that accepts and never answers must not stop the verifies after it,
    /// nor keep the status from answering.
    #[tokio::test(start_paused = true)]
    async fn a_postgres_that_never_answers_does_not_hold_up_the_schedule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pg_wal, _) = cluster_77_archive(dir.path());
        let mute = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = mute.local_addr().expect("address").port();
        // Accepts, keeps every connection open, never writes a byte.
        std::thread::spawn(move || {
            let held: Vec<_> = mute.incoming().flatten().collect();
            drop(held);
        });
        let config = verifying_config(
            dir.path(),
            &pg_wal,
            &format!("postgres = \"host=127.0.0.1 port={port} user=postgres\""),
        );
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state");
        let service =
            WalService::new(config, &state, Arc::new(|_: &str, _: &str| {})).expect("service");
        let schedule = tokio::spawn(service.clone().schedule_loop());
        let verified = || service.counters.verify_unix.load(Ordering::Relaxed) > 0;
        assert!(
            within(600, verified).await,
            "no scheduled verify within 10 minutes of a 1m schedule beside a mute PostgreSQL"
        );
        assert_eq!(
            metric(&service, "fleet_agent_wal_archiving_problems"),
            None,
            "nothing was read, so no figure"
        );
        // `GET /v1/wal` (agentctl wal status) answers too, naming the cause.
        let status = service.status().await;
        assert!(
            status
                .archiver_error
                .as_deref()
                .is_some_and(|e| e.contains("did not answer within 5 s")),
            "{:?}",
            status.archiver_error
        );
        assert!(status.archiving.is_none());
        schedule.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn verify_runs_on_its_schedule_reports_a_planted_gap_and_keeps_it_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pg_wal, wal) = cluster_77_archive(dir.path());
        let config = verifying_config(dir.path(), &pg_wal, "");
        let events: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let sink = {
            let events = events.clone();
            Arc::new(move |kind: &str, message: &str| {
                if let Ok(mut e) = events.lock() {
                    e.push((kind.to_string(), message.to_string()));
                }
            })
        };
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state");
        let service = WalService::new(config.clone(), &state, sink).expect("service");
        let schedule = tokio::spawn(service.clone().schedule_loop());
        let verified = || service.counters.verify_unix.load(Ordering::Relaxed) > 0;

        // Not at start: a fresh install has nothing to verify yet.
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!verified(), "verified before verify_interval passed");
        assert_eq!(metric(&service, "fleet_agent_wal_verify_ok"), None);
        assert_eq!(
            metric(&service, "fleet_agent_wal_verify_interval_seconds").as_deref(),
            Some("60")
        );
        assert!(
            within(600, verified).await,
            "no scheduled verify within 10 minutes of a 1m schedule"
        );
        assert_eq!(
            metric(&service, "fleet_agent_wal_verify_ok").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric(&service, "fleet_agent_wal_verify_problems").as_deref(),
            Some("0")
        );

        // A gap, planted behind the service's back: the next scheduled verify names it.
        std::fs::remove_file(wal.join("000000010000000000000003.zst")).expect("plant a gap");
        within(600, || {
            service.counters.verify_ok.load(Ordering::Relaxed) == 0
        })
        .await;
        assert_eq!(
            metric(&service, "fleet_agent_wal_verify_ok").as_deref(),
            Some("0")
        );
        assert_eq!(
            metric(&service, "fleet_agent_wal_verify_problems").as_deref(),
            Some("1")
        );
        let failed: Vec<_> = events
            .lock()
            .expect("events")
            .iter()
            .filter(|(kind, _)| kind == "wal_verify_failed")
            .map(|(_, message)| message.clone())
            .collect();
        assert!(
            failed
                .iter()
                .any(|m| m.contains("000000010000000000000003")),
            "no wal_verify_failed event naming the gap: {failed:?}"
        );
        schedule.abort();

        // A restart keeps the failed result (the alert keeps firing) and the
        // schedule (the next verify is due an interval after the last one).
        let restarted =
            WalService::new(config, &state, Arc::new(|_: &str, _: &str| {})).expect("restart");
        assert_eq!(
            metric(&restarted, "fleet_agent_wal_verify_ok").as_deref(),
            Some("0")
        );
        assert_eq!(
            metric(&restarted, "fleet_agent_wal_verify_problems").as_deref(),
            Some("1")
        );
        assert_eq!(
            restarted.counters.verify_unix.load(Ordering::Relaxed),
            service.counters.verify_unix.load(Ordering::Relaxed)
        );
    }

    fn fetch_service(dir: &Path) -> Arc<WalService> {
        service_with(dir, "")
    }

    fn service_with(dir: &Path, extra_toml: &str) -> Arc<WalService> {
        let config: WalConfig = toml::from_str(&format!(
            "target = \"file://{}\"\n{extra_toml}",
            dir.join("archive").display()
        ))
        .expect("config");
        WalService::new(config, dir, Arc::new(|_: &str, _: &str| {})).expect("service")
    }

    /// A segment's content that counts how many are being read (encoded) at once.
    struct Counted {
        left: usize,
        started: bool,
        active: Arc<AtomicU64>,
        most: Arc<AtomicU64>,
    }

    impl std::io::Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if !self.started {
                self.started = true;
                let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                // Long enough for every push started at once to get here,
                // were they all let through.
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
            if self.left == 0 {
                self.active.fetch_sub(1, Ordering::SeqCst);
                return Ok(0);
            }
            let n = buf.len().min(self.left);
            buf[..n].fill(9);
            self.left -= n;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn the_byte_budget_counts_objects_from_their_start_and_wakes_a_waiter() {
        let budget = Arc::new(ByteBudget::new(100));
        // The first estimate is a quarter of the budget.
        let mut a = budget.reserve().await;
        assert_eq!(budget.used.load(Ordering::SeqCst), 25);
        // A large object made: counted at its size, and the next one's estimate.
        budget.made(&mut a, 90);
        let mut b = budget.reserve().await;
        assert_eq!(budget.used.load(Ordering::SeqCst), 180);
        // Past the limit, the next waits, also past a few turns of the runtime.
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve().await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "started with 180 of 100 held");
        drop(a);
        // 90 held, under the limit: it starts, at the last object's size.
        let c = waiter.await.expect("started once 90 are held");
        assert_eq!(budget.used.load(Ordering::SeqCst), 180);
        // Made smaller than estimated: counted at its real size.
        budget.made(&mut b, 10);
        assert_eq!(budget.used.load(Ordering::SeqCst), 100);
        drop((b, c));
        assert_eq!(budget.used.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_pushes_encode_at_once_than_there_are_cores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_with(dir.path(), "parallel_uploads = 8\n");
        let limit = encodes_at_once() as u64;
        let (active, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let pushes: Vec<_> = (0..limit + 3)
            .map(|i| {
                let service = service.clone();
                let content = Content::Stream(Box::new(Counted {
                    left: 3 << 20,
                    started: false,
                    active: active.clone(),
                    most: most.clone(),
                }));
                tokio::spawn(async move {
                    let name = format!("0000000100000000000000{:02X}", i + 1);
                    service.push(77, &name, content).await
                })
            })
            .collect();
        for push in pushes {
            assert!(matches!(push.await.expect("task"), Ok(PushOutcome::Stored)));
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= limit, "{most} encodes at once, limit {limit}");
        assert!(most >= 1);
        assert!(service.encoders.idle() as u64 <= limit);
        assert_eq!(service.encoding.available_permits() as u64, limit);
    }

    const SEG: &str = "000000010000000000000003";

    #[tokio::test]
    async fn a_prefetched_segment_is_handed_off_by_its_absolute_path_and_kept_until_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = fetch_service(dir.path());
        let cache = service.prefetch_dir(77);
        std::fs::create_dir_all(&cache).expect("cache");
        std::fs::write(cache.join(SEG), vec![7u8; 4096]).expect("prefetched");
        let Fetched::HandOff { path, length } = service
            .fetch_or_hand_off(77, SEG, true)
            .await
            .expect("fetch")
        else {
            panic!("a prefetched segment is handed off");
        };
        assert!(path.is_absolute(), "{}", path.display());
        assert_eq!(path, cache.canonicalize().expect("real").join(SEG));
        assert_eq!(length, 4096);
        // The caller takes it; until then it stays, so a retry finds it.
        assert!(path.exists());
        assert_eq!(service.counters.prefetch_hits.load(Ordering::Relaxed), 1);
        let mut metrics = String::new();
        service.render_metrics(&mut metrics);
        assert!(
            metrics.contains("\nfleet_agent_wal_prefetch_hits_total 1\n"),
            "{metrics}"
        );
        // A caller that did not offer to take it over gets the bytes, and
        // the entry goes (served once).
        let Fetched::Content(bytes) = service
            .fetch_or_hand_off(77, SEG, false)
            .await
            .expect("fetch")
        else {
            panic!("bytes when no hand-off was offered");
        };
        assert_eq!(bytes, vec![7u8; 4096]);
        assert!(!path.exists());
    }

    /// Each `object_checksum` writes its version, absent is
    /// DEFAULT_OBJECT_CHECKSUM's; a name pushed again is compared in that
    /// algorithm, by this service (it remembers what it stored) and by a fresh
    /// one (it reads the stored object's header): the same content is
    /// archived already, other content is a conflict and overwrites nothing.
    #[tokio::test]
    async fn each_checksum_writes_its_version_and_compares_a_repeated_push_in_it() {
        use fleet_model::config::{ObjectChecksum, DEFAULT_OBJECT_CHECKSUM};
        let magic = |c: ObjectChecksum| match c {
            ObjectChecksum::Sha256 => b"FWAL1 ",
            ObjectChecksum::Blake3 => b"FWAL2 ",
            ObjectChecksum::Xxh3 => b"FWAL3 ",
        };
        for (extra, configured) in [
            ("", DEFAULT_OBJECT_CHECKSUM),
            ("object_checksum = \"sha256\"", ObjectChecksum::Sha256),
            ("object_checksum = \"blake3\"", ObjectChecksum::Blake3),
            ("object_checksum = \"xxh3\"", ObjectChecksum::Xxh3),
        ] {
            let algorithm = codec::Algorithm::from(configured);
            let dir = tempfile::tempdir().expect("tempdir");
            let service = service_with(dir.path(), extra);
            let pushed = service
                .push(77, SEG, Content::Bytes(Bytes::from(vec![5u8; 4096])))
                .await
                .expect("push");
            assert!(matches!(pushed, PushOutcome::Stored), "{pushed:?}");
            let path = dir.path().join(format!("archive/77/wal/{SEG}.zst"));
            let stored = std::fs::read(&path).expect("stored");
            assert_eq!(&stored[..6], magic(configured), "with {extra:?}");
            match service.fetch_or_hand_off(77, SEG, false).await {
                Ok(Fetched::Content(bytes)) => assert_eq!(bytes, vec![5u8; 4096]),
                other => panic!("with {extra:?}: {other:?}"),
            }
            let fresh = service_with(dir.path(), extra);
            for (who, service) in [("the pusher", &service), ("a fresh service", &fresh)] {
                let again = service
                    .push(77, SEG, Content::Bytes(Bytes::from(vec![5u8; 4096])))
                    .await;
                assert!(
                    matches!(again, Ok(PushOutcome::AlreadyArchived)),
                    "{extra:?}, {who}: {again:?}"
                );
                match service
                    .push(77, SEG, Content::Bytes(Bytes::from(vec![6u8; 4096])))
                    .await
                {
                    Err(WalError::Conflict { stored, pushed, .. }) => {
                        assert_eq!((stored.algorithm, pushed.algorithm), (algorithm, algorithm));
                        assert_eq!(stored, codec::checksum(algorithm, &[5u8; 4096]));
                        assert_eq!(pushed, codec::checksum(algorithm, &[6u8; 4096]));
                    }
                    other => panic!("{extra:?}, {who}: a conflict, got {other:?}"),
                }
            }
            assert_eq!(std::fs::read(&path).expect("kept"), stored, "{extra:?}");
        }
    }

    /// An FWAL1 object as agents before FWAL2 wrote it (SHA-256 header),
    /// built here without the encoder.
    fn fwal1_object(original: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        let mut object =
            format!("FWAL1 {}\n", hex::encode(sha2::Sha256::digest(original))).into_bytes();
        object.extend_from_slice(&zstd::encode_all(original, 1).expect("zstd"));
        object
    }

    #[tokio::test]
    async fn a_mixed_archive_of_fwal1_and_fwal2_objects_restores_verifies_and_dedups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_with(dir.path(), "object_checksum = \"blake3\"");
        let wal = dir.path().join("archive/77/wal");
        std::fs::create_dir_all(&wal).expect("archive");
        let segment = |n: u8| format!("00000001000000000000000{n}");
        // Segments 1-2 archived by an older agent, 3 by this one.
        for n in 1..=2u8 {
            let object = fwal1_object(&[n; 4096]);
            std::fs::write(wal.join(format!("{}.zst", segment(n))), object).expect("object");
        }
        let pushed = service
            .push(
                77,
                &segment(3),
                Content::Bytes(Bytes::from(vec![3u8; 4096])),
            )
            .await
            .expect("push");
        assert!(matches!(pushed, PushOutcome::Stored), "{pushed:?}");
        let stored = std::fs::read(wal.join(format!("{}.zst", segment(3)))).expect("stored");
        assert_eq!(&stored[..6], b"FWAL2 ");

        // Restore: both versions come back as they were archived.
        for n in 1..=3u8 {
            match service.fetch_or_hand_off(77, &segment(n), false).await {
                Ok(Fetched::Content(bytes)) => assert_eq!(bytes, vec![n; 4096]),
                other => panic!("{n}: bytes from the target, got {other:?}"),
            }
        }

        // Dedup against an FWAL1 object: the same content is already archived,
        // other content is refused (compared by SHA-256, the object's own).
        let again = service
            .push(
                77,
                &segment(1),
                Content::Bytes(Bytes::from(vec![1u8; 4096])),
            )
            .await
            .expect("same content");
        assert!(matches!(again, PushOutcome::AlreadyArchived), "{again:?}");
        let other = service
            .push(
                77,
                &segment(2),
                Content::Bytes(Bytes::from(vec![9u8; 4096])),
            )
            .await;
        match other {
            Err(WalError::Conflict { stored, pushed, .. }) => {
                assert_eq!(stored.algorithm, codec::Algorithm::Sha256);
                assert_eq!(pushed.algorithm, codec::Algorithm::Sha256);
            }
            other => panic!("different content over FWAL1 refused, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(wal.join(format!("{}.zst", segment(2)))).expect("kept"),
            fwal1_object(&[2u8; 4096]),
            "nothing was overwritten"
        );
        // And against an FWAL2 object, by BLAKE3.
        let again = service
            .push(
                77,
                &segment(3),
                Content::Bytes(Bytes::from(vec![3u8; 4096])),
            )
            .await
            .expect("same content");
        assert!(matches!(again, PushOutcome::AlreadyArchived), "{again:?}");
        let fresh = fetch_service(dir.path());
        match fresh
            .push(
                77,
                &segment(3),
                Content::Bytes(Bytes::from(vec![8u8; 4096])),
            )
            .await
        {
            Err(WalError::Conflict { stored, .. }) => {
                assert_eq!(stored.algorithm, codec::Algorithm::Blake3)
            }
            other => panic!("different content over FWAL2 refused, got {other:?}"),
        }

        // Verify: the mixed archive is whole; a damaged FWAL1 object is named.
        let path = wal.join(format!("{}.zst", segment(1)));
        verify_names_only_the_damaged(&service, &path, codec::Algorithm::Sha256, &segment(1)).await;
    }

    /// Verify of cluster 77 finds its 3 objects whole; then, with `object`'s
    /// body replaced by another content's (its `algorithm` header kept),
    /// fails naming `name` alone.
    async fn verify_names_only_the_damaged(
        service: &WalService,
        object: &Path,
        algorithm: codec::Algorithm,
        name: &str,
    ) {
        let report = service.verify(Some(77)).await.expect("verify");
        assert!(report.ok, "{report:?}");
        assert_eq!(report.objects_checked, 3);
        let mut damaged = std::fs::read(object).expect("stored");
        damaged.truncate(algorithm.header_len());
        damaged.extend_from_slice(&zstd::encode_all(&[6u8; 4096][..], 1).expect("zstd"));
        std::fs::write(object, damaged).expect("damage");
        let report = service.verify(Some(77)).await.expect("verify");
        assert!(!report.ok);
        assert_eq!(
            report
                .checksum_failures
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            [name],
            "{report:?}"
        );
    }

    /// An archive switched from sha256 to blake3 to xxh3: a restore replays
    /// all three versions, a push is compared in the stored object's
    /// algorithm whichever one new objects get, verify checks each.
    #[tokio::test]
    async fn a_mixed_archive_of_fwal1_fwal2_and_fwal3_objects_restores_verifies_and_dedups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service_with(dir.path(), "object_checksum = \"xxh3\"");
        let wal = dir.path().join("archive/77/wal");
        std::fs::create_dir_all(&wal).expect("archive");
        let segment = |n: u8| format!("00000001000000000000000{n}");
        let object_path = |n: u8| wal.join(format!("{}.zst", segment(n)));
        // 1 by an agent before FWAL2, 2 with blake3, 3 by this one (xxh3).
        std::fs::write(object_path(1), fwal1_object(&[1u8; 4096])).expect("object");
        let (fwal2, _, _) =
            codec::encode(&[2u8; 4096][..], 1, codec::Algorithm::Blake3).expect("encode");
        std::fs::write(object_path(2), fwal2).expect("object");
        let pushed = service
            .push(
                77,
                &segment(3),
                Content::Bytes(Bytes::from(vec![3u8; 4096])),
            )
            .await
            .expect("push");
        assert!(matches!(pushed, PushOutcome::Stored), "{pushed:?}");
        let magics: Vec<Vec<u8>> = (1..=3u8)
            .map(|n| std::fs::read(object_path(n)).expect("stored")[..6].to_vec())
            .collect();
        assert_eq!(magics, [b"FWAL1 ", b"FWAL2 ", b"FWAL3 "]);

        // Restore through a fresh service (nothing remembered), as a PITR does.
        let restorer = fetch_service(dir.path());
        for n in 1..=3u8 {
            match restorer.fetch_or_hand_off(77, &segment(n), true).await {
                Ok(Fetched::Content(bytes)) => assert_eq!(bytes, vec![n; 4096]),
                Ok(Fetched::HandOff { path, .. }) => {
                    assert_eq!(std::fs::read(&path).expect("prefetched"), vec![n; 4096])
                }
                other => panic!("{n}: the segment, got {other:?}"),
            }
        }

        // Pushed again to an xxh3 service: each compared in its object's own algorithm.
        for (n, algorithm) in [
            (1u8, codec::Algorithm::Sha256),
            (2, codec::Algorithm::Blake3),
            (3, codec::Algorithm::Xxh3),
        ] {
            let fresh = service_with(dir.path(), "object_checksum = \"xxh3\"");
            let again = fresh
                .push(77, &segment(n), Content::Bytes(Bytes::from(vec![n; 4096])))
                .await;
            assert!(
                matches!(again, Ok(PushOutcome::AlreadyArchived)),
                "{n}: {again:?}"
            );
            match fresh
                .push(
                    77,
                    &segment(n),
                    Content::Bytes(Bytes::from(vec![9u8; 4096])),
                )
                .await
            {
                Err(WalError::Conflict { stored, pushed, .. }) => {
                    assert_eq!((stored.algorithm, pushed.algorithm), (algorithm, algorithm))
                }
                other => panic!("{n}: a conflict in {algorithm}, got {other:?}"),
            }
        }

        // Verify: whole; then a damaged FWAL3 object is named.
        verify_names_only_the_damaged(
            &service,
            &object_path(3),
            codec::Algorithm::Xxh3,
            &segment(3),
        )
        .await;
    }

    #[tokio::test]
    async fn a_segment_not_prefetched_comes_as_bytes_and_a_missing_one_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = fetch_service(dir.path());
        let original = vec![5u8; 8192];
        let (object, _, _) =
            codec::encode(&original[..], 1, codec::Algorithm::Blake3).expect("encode");
        let objects = dir.path().join("archive/77/wal");
        std::fs::create_dir_all(&objects).expect("archive");
        std::fs::write(objects.join(format!("{SEG}.zst")), object).expect("object");
        match service.fetch_or_hand_off(77, SEG, true).await {
            Ok(Fetched::Content(bytes)) => assert_eq!(bytes, original),
            other => panic!("bytes from the target, got {other:?}"),
        }
        assert!(matches!(
            service
                .fetch_or_hand_off(77, "000000010000000000000009", true)
                .await,
            Err(WalError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_decodes_into_the_file_it_hands_off_and_keeps_no_damaged_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = fetch_service(dir.path());
        let objects = dir.path().join("archive/77/wal");
        std::fs::create_dir_all(&objects).expect("archive");
        // 1 MiB segments (initdb --wal-segsize=1), each its own content, over several pieces.
        let names = [SEG, "000000010000000000000004", "000000010000000000000005"];
        let segment = |i: usize| -> Vec<u8> {
            (0..(1usize << 20))
                .map(|b| ((b * (i + 3)) % 251) as u8)
                .collect()
        };
        for (i, name) in names.iter().enumerate() {
            let (mut object, _, _) =
                codec::encode(&segment(i)[..], 1, codec::Algorithm::Blake3).expect("encode");
            if i == 2 {
                // A damaged object: its recorded checksum no longer matches.
                object[10] = if object[10] == b'0' { b'1' } else { b'0' };
            }
            std::fs::write(objects.join(format!("{name}.zst")), object).expect("object");
        }
        match service.fetch_or_hand_off(77, SEG, true).await {
            Ok(Fetched::Content(bytes)) => assert_eq!(bytes, segment(0)),
            other => panic!("the first one from the target, got {other:?}"),
        }
        // Waits for its prefetch, then hands off the file it decoded into.
        match service.fetch_or_hand_off(77, names[1], true).await {
            Ok(Fetched::HandOff { path, length }) => {
                assert_eq!(length, 1 << 20);
                assert_eq!(std::fs::read(&path).expect("prefetched"), segment(1));
            }
            other => panic!("a hand-off, got {other:?}"),
        }
        let damaged = service.fetch_or_hand_off(77, names[2], true).await;
        assert!(
            matches!(damaged, Err(WalError::Corrupt { .. })),
            "{damaged:?}"
        );
        let left: Vec<_> = std::fs::read_dir(service.prefetch_dir(77))
            .expect("cache")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("05"))
            .collect();
        assert!(
            left.is_empty(),
            "nothing of the damaged one stays: {left:?}"
        );
    }

    #[tokio::test]
    async fn a_symlink_in_the_prefetch_directory_is_never_handed_off_or_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = fetch_service(dir.path());
        let cache = service.prefetch_dir(77);
        std::fs::create_dir_all(&cache).expect("cache");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not WAL").expect("secret");
        std::os::unix::fs::symlink(&secret, cache.join(SEG)).expect("symlink");
        assert!(matches!(
            service.fetch_or_hand_off(77, SEG, true).await,
            Err(WalError::NotFound(_))
        ));
        assert!(std::fs::symlink_metadata(cache.join(SEG)).is_err());
        assert!(secret.exists());
    }

    #[test]
    fn only_regular_files_in_the_cache_are_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").expect("file");
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let lstat = |p: &Path| std::fs::symlink_metadata(p).expect("lstat");
        assert_eq!(
            hand_off_decision(&lstat(&file)),
            CacheEntry::Serve { length: 3 }
        );
        assert_eq!(hand_off_decision(&lstat(&link)), CacheEntry::Refuse);
        assert_eq!(hand_off_decision(&lstat(dir.path())), CacheEntry::Refuse);
    }

    #[test]
    fn only_this_hosts_clusters_are_admitted() {
        let none = BTreeSet::new();
        let pinned: BTreeSet<u64> = [7].into();
        // The configured cluster, and those pinned here.
        assert_eq!(admission(Some(1), &none, 1, false), Admission::Admit);
        assert_eq!(admission(None, &pinned, 7, false), Admission::Admit);
        assert_eq!(admission(Some(1), &pinned, 7, true), Admission::Admit);
        // Another cluster, by push or fetch, once the host knows one.
        assert_eq!(admission(Some(1), &none, 2, true), Admission::Refuse);
        assert_eq!(admission(None, &pinned, 2, true), Admission::Refuse);
        assert_eq!(admission(Some(1), &pinned, 2, false), Admission::Refuse);
        // A host that knows none: the first push pins, a fetch learns nothing.
        assert_eq!(admission(None, &none, 3, true), Admission::Pin);
        assert_eq!(admission(None, &none, 3, false), Admission::Refuse);
    }

    #[test]
    fn pinned_clusters_survive_a_restart_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLUSTERS_FILE);
        assert!(read_pinned(&path).unwrap().is_empty());
        write_pinned(&path, &[5, 9].into()).unwrap();
        assert_eq!(read_pinned(&path).unwrap(), [5, 9].into());
        std::fs::write(&path, "5\nnine\n").unwrap();
        let err = read_pinned(&path).unwrap_err().to_string();
        assert!(err.contains(CLUSTERS_FILE) && err.contains("nine"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_job_backs_off_and_a_waiter_wakes_when_it_ends() {
        let jobs = Arc::new(Jobs::default());
        assert!(jobs.start("a"));
        assert!(!jobs.start("a"), "one job per name at a time");

        let waiter = {
            let jobs = jobs.clone();
            tokio::spawn(async move { jobs.wait_for("a", || false).await })
        };
        tokio::task::yield_now().await;
        jobs.finish("a", false);
        assert!(
            !waiter.await.unwrap(),
            "woken by the end of the job, not done"
        );

        assert!(!jobs.start("a"), "backing off after a failure");
        tokio::time::sleep(RETRY_FIRST + Duration::from_millis(50)).await;
        assert!(jobs.start("a"), "retried once the back-off ended");
        jobs.finish("a", false);
        tokio::time::sleep(RETRY_FIRST + Duration::from_millis(50)).await;
        assert!(!jobs.start("a"), "the second back-off is longer");
        tokio::time::sleep(RETRY_FIRST).await;
        assert!(jobs.start("a"));
        jobs.finish("a", true);
        assert!(jobs.start("a"), "a success clears the back-off");
        assert!(jobs.wait_for("b", || true).await);
        assert!(
            !jobs.wait_for("b", || false).await,
            "nothing under way: no wait"
        );
    }
}
