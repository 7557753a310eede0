//! Base backups (pg_basebackup as a tar stream, zstd-compressed, with a JSON
//! manifest), restore to a directory with recovery settings, and retention.
//!
//! Layout under the target: `<sysid>/backups/<id>/base.tar.zst` then
//! `<sysid>/backups/<id>/manifest.json`. The manifest is written last and
//! deleted first, so a backup is listed only when it is whole.

use crate::names;
use crate::service::{blocking, now_unix, WalError, WalService};
use crate::target::Put;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub system_identifier: String,
    pub started_at: String,
    pub finished_at: String,
    pub started_unix: u64,
    pub finished_unix: u64,
    /// When the backup finished, in microseconds since the epoch: the base for
    /// a target time must have finished before it, to the microsecond as
    /// target times are (absent in older manifests: see [`Manifest::finished_micros`]).
    #[serde(default)]
    pub finished_unix_micros: Option<u64>,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    /// The first WAL segment a restore of this backup needs.
    pub start_wal: String,
    /// The cluster's `wal_segment_size` when the backup was taken (manifests
    /// written before this field: PostgreSQL's default, 16 MiB).
    #[serde(default = "default_segment_bytes")]
    pub wal_segment_bytes: u64,
    /// Uncompressed tar bytes.
    pub bytes: u64,
    pub compressed_bytes: u64,
    /// SHA-256 of `base.tar.zst`, checked before a restore unpacks it.
    pub sha256: String,
}

/// What `create_backup` makes ids of (an RFC 3339 time without separators,
/// `20261203T135501123Z`): letters and digits only, so an id is one path segment.
fn is_backup_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A manifest is used only for the backup at its own key, of its own cluster.
fn check_manifest(m: &Manifest, key_id: &str, sysid: u64) -> Result<(), &'static str> {
    if m.id != key_id {
        return Err("its id differs from the directory it is in");
    }
    if m.system_identifier != sysid.to_string() {
        return Err("its system_identifier differs from the cluster directory it is in");
    }
    if names::classify(&m.start_wal) != Some(names::WalKind::Segment) {
        return Err("its start_wal is not a WAL segment name");
    }
    Ok(())
}

impl Manifest {
    /// When the backup finished. For a manifest with whole seconds only, the
    /// end of that second: a backup is never taken as finished earlier than
    /// it did.
    pub fn finished_micros(&self) -> u64 {
        self.finished_unix_micros.unwrap_or_else(|| {
            self.finished_unix
                .saturating_add(1)
                .saturating_mul(1_000_000)
        })
    }
}

/// The base for recovery to `target_micros` (since the epoch): the newest
/// backup that finished strictly before it; without a target, the newest.
pub fn choose_base(backups: &[Manifest], target_micros: Option<i64>) -> Option<&Manifest> {
    backups.iter().rev().find(|m| {
        target_micros.is_none_or(|t| i64::try_from(m.finished_micros()).is_ok_and(|f| f < t))
    })
}

fn default_segment_bytes() -> u64 {
    names::DEFAULT_SEGMENT_BYTES
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub to: PathBuf,
    /// RFC 3339 with any offset or PostgreSQL's timestamptz text
    /// (`2026-12-03 11:22:02.144437+00`); absent: replay all archived WAL.
    pub target_time: Option<String>,
    pub system_identifier: Option<String>,
    /// Base backup id; default: the newest one that finished before target_time.
    pub backup: Option<String>,
    /// The `restore_command` to write (agentctl passes its own path and socket).
    pub restore_command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup: String,
    pub to: PathBuf,
    pub target_time: Option<String>,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RetentionReport {
    pub window_seconds: u64,
    pub kept_backups: Vec<String>,
    pub deleted_backups: Vec<String>,
    pub deleted_wal: usize,
    pub kept_wal: usize,
    pub oldest_needed_wal: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn backups_prefix(sysid: u64) -> String {
    format!("{sysid}/backups/")
}

/// Parses `write-ahead log start point: 0/2000028 on timeline 1` and the end point.
fn parse_points(stderr: &str) -> (Option<(String, u32)>, Option<String>) {
    let mut start = None;
    let mut end = None;
    for line in stderr.lines() {
        if let Some(rest) = line.split("write-ahead log start point: ").nth(1) {
            let mut parts = rest.split_whitespace();
            let lsn = parts.next().unwrap_or_default().to_string();
            let tli = rest
                .split("on timeline ")
                .nth(1)
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(1);
            start = Some((lsn, tli));
        }
        if let Some(rest) = line.split("write-ahead log end point: ").nth(1) {
            end = rest.split_whitespace().next().map(str::to_string);
        }
    }
    (start, end)
}

struct Counting<R> {
    inner: R,
    count: u64,
    /// The same count, for `GET /v1/wal`'s progress while the work runs.
    shared: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        self.shared.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Runs pg_basebackup into a compressed local file; returns (bytes, compressed, sha, stderr).
fn run_basebackup(
    conninfo: &str,
    out: &Path,
    level: i32,
    timeout: Duration,
    max_rate: Option<u64>,
    counters: Counters,
) -> Result<(u64, u64, String, String), WalError> {
    let (conninfo, password) = crate::pg::split_password(conninfo)
        .map_err(|e| WalError::Backup(format!("wal.postgres: {e}")))?;
    // --progress: the server sizes the data directory first, and
    // pg_basebackup reports that estimate on stderr, the backup's total.
    let mut args = vec![
        "-d",
        &conninfo,
        "-D",
        "-",
        "-F",
        "t",
        "-X",
        "fetch",
        "-c",
        "fast",
        "-v",
        "-w",
        "--progress",
    ];
    // pg_basebackup counts kB/s; config validation keeps it in its range.
    let rate = max_rate.map(|r| format!("--max-rate={}k", (r / 1024).max(32)));
    if let Some(rate) = &rate {
        args.push(rate);
    }
    run_backup_program(
        std::ffi::OsStr::new("pg_basebackup"),
        &args,
        password.as_deref(),
        out,
        level,
        timeout,
        counters,
    )
}

/// Bytes moved so far and the total (0 while unknown), as the operation's
/// progress on the status reads them.
#[derive(Default)]
struct Counters {
    moved: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    /// The cluster's WAL segment size, added to the server's estimate
    /// ([`expected_total`]).
    wal_bytes: u64,
    /// Names the step under way ([`backup_step`]).
    step: Option<StepFn>,
}

type StepFn = Box<dyn Fn(&str) + Send>;

/// The step a message of pg_basebackup (`-v`, PostgreSQL 10 to 17) begins,
/// for the progress: with `-c fast` the server first checkpoints, which after
/// heavy writes takes seconds to minutes with no byte sent, and "0B, reading"
/// then reads like a hang.
fn backup_step(line: &str) -> Option<&'static str> {
    if line.contains("waiting for checkpoint") {
        Some("waiting for the server's checkpoint")
    } else if line.contains("checkpoint completed") {
        Some("reading from pg_basebackup")
    } else {
        None
    }
}

/// The total of a `--progress` line of pg_basebackup (`  1234/56789 kB (2%),
/// 0/1 tablespace (...)`), in bytes.
fn progress_total(line: &str) -> Option<u64> {
    let (sizes, _) = line.trim_start().split_once(" kB (")?;
    let (_, total) = sizes.split_once('/')?;
    total.trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// What a base backup will stream, from the server's estimate: the estimate
/// covers the data directory only, and `-X fetch` appends the WAL from the
/// start point to the end point, at least the one segment holding the start
/// point (more if the cluster wrote a lot meanwhile). Without it a bar stood at
/// 100% for the whole last segment (measured: 82.4 MiB estimated, 98.5 MiB
/// streamed with 16 MiB segments).
fn expected_total(estimate: u64, segment_bytes: u64) -> u64 {
    estimate.saturating_add(segment_bytes)
}

/// The body of [`run_basebackup`], for any program writing a tar to stdout
/// and pg_basebackup's `--progress` lines to stderr. It never waits for a child that may still be writing: on a local write
/// error (disk full) the pipe is closed and the child killed, and a watchdog
/// kills it once `timeout` has passed, so a scheduled backup cannot hang.
fn run_backup_program(
    program: &std::ffi::OsStr,
    args: &[&str],
    password: Option<&str>,
    out: &Path,
    level: i32,
    timeout: Duration,
    Counters {
        moved,
        total,
        wal_bytes,
        step,
    }: Counters,
) -> Result<(u64, u64, String, String), WalError> {
    let mut command = std::process::Command::new(program);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let mut child = command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| WalError::Backup(format!("cannot run {}: {e}", program.to_string_lossy())))?;
    let name = program.to_string_lossy().into_owned();
    // Until the child is waited for below its pid cannot be reused, so the
    // watchdog's kill can only reach this child.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let timed_out = timed_out.clone();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout)
            {
                timed_out.store(true, Ordering::Relaxed);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        })
    };
    let stderr = child.stderr.take();
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr {
            for line in std::io::BufReader::new(s).lines().map_while(Result::ok) {
                // Progress lines (one a second) are not kept for messages.
                // Only the first line's total is the server's estimate: later
                // ones grow to the bytes done once those pass it (WAL), and
                // the estimate already has the WAL added.
                if let Some(t) = progress_total(&line) {
                    let _ = total.compare_exchange(
                        0,
                        expected_total(t, wal_bytes),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    continue;
                }
                if let (Some(step), Some(name)) = (&step, backup_step(&line)) {
                    step(name);
                }
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    });
    let result = copy_compressed(&mut child, out, level, moved);
    // On a failed write the child may be blocked on a full pipe: stop it
    // before waiting. After success this is a no-op on an exited child.
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = done.send(());
    let _ = watchdog.join();
    let stderr_text = stderr_thread.join().unwrap_or_default();
    if timed_out.load(Ordering::Relaxed) {
        return Err(WalError::Backup(format!(
            "{name} did not finish within {} and was killed (wal.backup_timeout): {}",
            humantime::format_duration(timeout),
            stderr_text.trim()
        )));
    }
    let (bytes, compressed, sha) = result?;
    let status = status.map_err(|e| WalError::Backup(format!("{name}: {e}")))?;
    if !status.success() {
        return Err(WalError::Backup(format!(
            "{name} failed ({status}): {}",
            stderr_text.trim()
        )));
    }
    Ok((bytes, compressed, sha, stderr_text))
}

/// The child's stdout, zstd-compressed, into `out` (fsynced); the pipe is
/// closed when this returns, whatever happened.
fn copy_compressed(
    child: &mut std::process::Child,
    out: &Path,
    level: i32,
    done: Arc<AtomicU64>,
) -> Result<(u64, u64, String), WalError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| WalError::Backup("the backup program has no stdout".into()))?;
    let io_err = |e: std::io::Error| WalError::Backup(format!("{}: {e}", out.display()));
    let file = std::fs::File::create(out).map_err(io_err)?;
    let hashing = Hashing {
        inner: file,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::new(hashing, level).map_err(io_err)?;
    let mut reader = Counting {
        inner: stdout,
        count: 0,
        shared: done,
    };
    std::io::copy(&mut reader, &mut encoder).map_err(io_err)?;
    let hashing = encoder.finish().map_err(io_err)?;
    hashing.inner.sync_all().map_err(io_err)?;
    Ok((
        reader.count,
        hashing.count,
        hex::encode(hashing.hasher.finalize()),
    ))
}

impl WalService {
    pub async fn create_backup(&self) -> Result<Manifest, WalError> {
        let conninfo = self.config.postgres.clone().ok_or_else(|| {
            WalError::Backup("wal.postgres (a libpq connection string) is not set".into())
        })?;
        let sysid = crate::pg::system_identifier(&conninfo)
            .await
            .map_err(|e| WalError::Postgres(e.to_string()))?;
        // Names follow from LSNs only with the cluster's own segment size.
        let segment_bytes = crate::pg::wal_segment_bytes(&conninfo)
            .await
            .map_err(|e| WalError::Postgres(e.to_string()))?;
        if !names::is_segment_size(segment_bytes) {
            return Err(WalError::Postgres(format!(
                "wal_segment_size is {segment_bytes} bytes, not a power of two from 1 MiB to 1 GiB"
            )));
        }
        let started = SystemTime::now();
        let id = humantime::format_rfc3339_millis(started)
            .to_string()
            .replace(['-', ':', '.'], "");
        let temp_dir = self.state_dir.join("wal-backup-tmp");
        tokio::fs::create_dir_all(&temp_dir)
            .await
            .map_err(|e| WalError::Backup(format!("{}: {e}", temp_dir.display())))?;
        let local = temp_dir.join(format!("{id}.tar.zst"));
        let level = self.config.compression_level;
        // The total comes once pg_basebackup has reported the server's estimate.
        let op = Arc::new(self.begin_operation("backup", &id, None, "starting pg_basebackup"));
        let (bytes, compressed, sha, stderr) = {
            let local = local.clone();
            let timeout = self.config.backup_timeout;
            let max_rate = self.config.backup_max_rate.map(|r| r.bytes());
            let running = op.clone();
            let counters = Counters {
                moved: op.done.clone(),
                total: op.total.clone(),
                wal_bytes: segment_bytes,
                step: Some(Box::new(move |name: &str| running.phase(name))),
            };
            blocking(move || run_basebackup(&conninfo, &local, level, timeout, max_rate, counters))
                .await
        }
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&local);
        })?;
        let finished = SystemTime::now();
        let (start, end) = parse_points(&stderr);
        let (start_lsn, timeline) = start.ok_or_else(|| {
            WalError::Backup(format!(
                "pg_basebackup did not report its start point: {}",
                stderr.trim()
            ))
        })?;
        let start_wal = names::segment_for_lsn(timeline, &start_lsn, segment_bytes)
            .ok_or_else(|| WalError::Backup(format!("bad start point {start_lsn}")))?;
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let manifest = Manifest {
            id: id.clone(),
            system_identifier: sysid.to_string(),
            started_at: rfc3339(started),
            finished_at: rfc3339(finished),
            started_unix: secs(started),
            finished_unix: secs(finished),
            finished_unix_micros: finished
                .duration_since(UNIX_EPOCH)
                .ok()
                .and_then(|d| u64::try_from(d.as_micros()).ok()),
            timeline,
            start_lsn,
            end_lsn: end.unwrap_or_default(),
            start_wal,
            wal_segment_bytes: segment_bytes,
            bytes,
            compressed_bytes: compressed,
            sha256: sha,
        };
        op.phase(&format!(
            "uploading {} compressed",
            crate::service::human_bytes(compressed)
        ));
        let base = format!("{}{id}/", backups_prefix(sysid));
        let uploaded = self
            .target
            .put_file(&format!("{base}base.tar.zst"), &local)
            .await;
        let _ = tokio::fs::remove_file(&local).await;
        if uploaded? == Put::Exists {
            return Err(WalError::Backup(format!("backup {id} exists already")));
        }
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| WalError::Internal(e.to_string()))?;
        self.target
            .put_new(&format!("{base}manifest.json"), json.into())
            .await?;
        self.counters
            .last_backup_unix
            .store(manifest.finished_unix, Ordering::Relaxed);
        (self.events)(
            "wal_backup_created",
            &format!(
                "base backup {id} of cluster {sysid}: {bytes} bytes ({compressed} compressed), WAL from {}",
                manifest.start_wal
            ),
        );
        Ok(manifest)
    }

    /// Whole backups (with a manifest), oldest first.
    pub async fn list_backups(&self, sysid: u64) -> Result<Vec<Manifest>, WalError> {
        let entries = self.target.list(&backups_prefix(sysid)).await?;
        let mut out = Vec::new();
        let prefix = backups_prefix(sysid);
        for entry in entries.iter().filter(|e| e.key.ends_with("/manifest.json")) {
            // Keys are derived from where the manifest lies, never from what it
            // says: a manifest planted in a shared bucket must not steer
            // retention's deletes or a restore outside its own directory.
            let Some(id) = entry
                .key
                .strip_prefix(&prefix)
                .and_then(|k| k.strip_suffix("/manifest.json"))
                .filter(|id| is_backup_id(id))
            else {
                tracing::warn!(key = %entry.key, "Ignoring a backup manifest at an unexpected key.");
                continue;
            };
            if let Some(bytes) = self.target.get(&entry.key).await? {
                match serde_json::from_slice::<Manifest>(&bytes) {
                    Ok(m) => match check_manifest(&m, id, sysid) {
                        Ok(()) => out.push(m),
                        Err(why) => {
                            tracing::warn!(key = %entry.key, why, "Ignoring a backup manifest.")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "Unreadable backup manifest.")
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.finished_unix, &a.id).cmp(&(b.finished_unix, &b.id)));
        Ok(out)
    }

    pub async fn restore(&self, request: RestoreRequest) -> Result<RestoreReport, WalError> {
        let began = std::time::Instant::now();
        let given = match &request.system_identifier {
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                WalError::BadRequest(format!("system identifier `{s}` is not a number"))
            })?),
            None => None,
        };
        let target = match &request.target_time {
            Some(t) => Some(
                crate::times::TargetTime::parse(t)
                    .map_err(|e| WalError::BadRequest(e.to_string()))?,
            ),
            None => None,
        };
        check_restore_target(&request.to)?;
        let sysid = self.restore_sysid(given).await?;
        let target_micros = target.map(|t| t.unix_micros());
        let pg_target = target.map(|t| t.to_postgres());
        let backups = self.list_backups(sysid).await?;
        let chosen = match &request.backup {
            Some(id) => backups.iter().find(|m| &m.id == id).cloned(),
            None => choose_base(&backups, target_micros).cloned(),
        }
        .ok_or_else(|| {
            WalError::NotFound(match &request.target_time {
                Some(t) => format!("a base backup of cluster {sysid} finished before {t}"),
                None => format!("a base backup of cluster {sysid}"),
            })
        })?;
        let to = request.to.clone();
        let temp_dir = self.state_dir.join("wal-backup-tmp");
        tokio::fs::create_dir_all(&temp_dir)
            .await
            .map_err(|e| WalError::Backup(format!("{}: {e}", temp_dir.display())))?;
        let local = temp_dir.join(format!("restore-{}.tar.zst", chosen.id));
        let key = format!("{}{}/base.tar.zst", backups_prefix(sysid), chosen.id);
        let op = Arc::new(self.begin_operation(
            "restore",
            &chosen.id,
            Some(chosen.bytes),
            &format!(
                "downloading {} compressed",
                crate::service::human_bytes(chosen.compressed_bytes)
            ),
        ));
        if !self.target.get_to_file(&key, &local).await? {
            return Err(WalError::NotFound(key));
        }
        let manifest = chosen.clone();
        let target_time = pg_target;
        let command = request.restore_command.clone();
        let unpack_to = to.clone();
        let running = op.clone();
        let unpacked = blocking(move || {
            unpack(
                &local,
                &unpack_to,
                &manifest,
                target_time.as_deref(),
                &command,
                running.done.clone(),
                &|phase| running.phase(phase),
            )
            .inspect(|_| {
                let _ = std::fs::remove_file(&local);
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&local);
            })
        })
        .await?;
        // Recovery in the restored directory fetches this cluster's WAL.
        self.pin(sysid)?;
        (self.events)(
            "wal_restore",
            &format!(
                "restored base backup {} into {}{}",
                chosen.id,
                to.display(),
                request
                    .target_time
                    .as_deref()
                    .map(|t| format!(" for recovery to {t}"))
                    .unwrap_or_default()
            ),
        );
        Ok(RestoreReport {
            backup: chosen.id,
            to,
            target_time: request.target_time,
            bytes: unpacked,
            seconds: began.elapsed().as_secs_f64(),
        })
    }

    /// The cluster a restore is for: the one given, else the configured
    /// cluster's (`pg_wal_dir`), else the only cluster in the archive. With
    /// several and none named, the error lists them.
    pub(crate) async fn restore_sysid(&self, given: Option<u64>) -> Result<u64, WalError> {
        if let Some(id) = given.or_else(|| self.default_sysid()) {
            return Ok(id);
        }
        let clusters = self.clusters().await?;
        match clusters.as_slice() {
            [one] => Ok(*one),
            [] => Err(WalError::NotFound(format!(
                "any cluster's WAL or base backup in {}",
                self.target.describe()
            ))),
            several => Err(WalError::BadRequest(format!(
                "{} holds {} clusters; name one with --system-id: {}",
                self.target.describe(),
                several.len(),
                several
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// System identifiers with anything archived (`<sysid>/...` at the top).
    pub async fn clusters(&self) -> Result<Vec<u64>, WalError> {
        let mut ids: Vec<u64> = self
            .target
            .top_level()
            .await?
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// Deletes what the recovery window no longer needs. `window` overrides the config.
    pub async fn apply_retention(
        &self,
        window: Option<Duration>,
    ) -> Result<RetentionReport, WalError> {
        self.apply_retention_for(None, window).await
    }

    /// Retention for cluster `sysid` (default: the configured cluster's). The
    /// schedule passes the cluster it has just backed up, which is known even
    /// without `pg_wal_dir`.
    pub async fn apply_retention_for(
        &self,
        sysid: Option<u64>,
        window: Option<Duration>,
    ) -> Result<RetentionReport, WalError> {
        let window = window.unwrap_or(self.config.recovery_window);
        let sysid = self.resolve_sysid(sysid)?;
        let backups = self.list_backups(sysid).await?;
        let mut report = RetentionReport {
            window_seconds: window.as_secs(),
            ..Default::default()
        };
        if backups.is_empty() {
            // Without a base backup every WAL file may still be the only copy
            // of something: delete nothing.
            return Ok(report);
        }
        let cutoff = now_unix().saturating_sub(window.as_secs());
        // The newest backup that finished before the window starts is the base
        // for the oldest point inside it; everything older can go.
        let base_index = backups
            .iter()
            .rposition(|m| m.finished_unix < cutoff)
            .unwrap_or(0);
        let oldest_needed = backups[base_index].start_wal.clone();
        let Some(needed_pos) = names::position(&oldest_needed) else {
            return Err(WalError::Internal(format!("bad start_wal {oldest_needed}")));
        };
        for (i, m) in backups.iter().enumerate() {
            if i < base_index {
                let base = format!("{}{}/", backups_prefix(sysid), m.id);
                self.target.delete(&format!("{base}manifest.json")).await?;
                self.target.delete(&format!("{base}base.tar.zst")).await?;
                report.deleted_backups.push(m.id.clone());
            } else {
                report.kept_backups.push(m.id.clone());
            }
        }
        let wal_prefix = format!("{sysid}/wal/");
        for entry in self.target.list(&wal_prefix).await? {
            let name = entry
                .key
                .strip_prefix(&wal_prefix)
                .and_then(|k| k.strip_suffix(".zst"))
                .unwrap_or_default();
            let old = names::segment_of(name)
                .and_then(names::position)
                .is_some_and(|p| p < needed_pos);
            if old {
                self.target.delete(&entry.key).await?;
                report.deleted_wal += 1;
            } else {
                report.kept_wal += 1;
            }
        }
        report.oldest_needed_wal = Some(oldest_needed);
        if !report.deleted_backups.is_empty() || report.deleted_wal > 0 {
            (self.events)(
                "wal_retention",
                &format!(
                    "retention ({}s window): deleted {} base backup(s) and {} WAL file(s); oldest WAL kept {}",
                    window.as_secs(),
                    report.deleted_backups.len(),
                    report.deleted_wal,
                    report.oldest_needed_wal.as_deref().unwrap_or("-")
                ),
            );
        }
        Ok(report)
    }
}

fn unpack(
    local: &Path,
    to: &Path,
    manifest: &Manifest,
    target_time: Option<&str>,
    restore_command: &str,
    done: Arc<AtomicU64>,
    phase: &dyn Fn(&str),
) -> Result<u64, WalError> {
    let err = |e: std::io::Error| {
        // Under fleet-agent-wal.service only some paths are writable.
        let hint = if e.raw_os_error() == Some(libc::EROFS) {
            "; the WAL service may write only under /var/lib/postgresql: restore there, or add the path with `systemctl edit fleet-agent-wal` ([Service] ReadWritePaths=...)"
        } else {
            ""
        };
        WalError::Backup(format!("restore into {}: {e}{hint}", to.display()))
    };
    // Check the whole download before unpacking anything. The steps are named
    // on the progress: checking and syncing move no counted bytes, and a
    // restore's tail is mostly the fsync of the whole tree.
    phase("checking the download's SHA-256");
    let mut file = std::fs::File::open(local).map_err(err)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(err)?;
    let actual = hex::encode(hasher.finalize());
    if actual != manifest.sha256 {
        return Err(WalError::Backup(format!(
            "base backup {} is damaged: sha256 {actual}, manifest says {}",
            manifest.id, manifest.sha256
        )));
    }
    std::fs::create_dir_all(to).map_err(err)?;
    // A symlinked --to: everything below works on the directory it names (a
    // chown of the link alone would leave the tree root's).
    let to = &std::fs::canonicalize(to).map_err(err)?;
    let owner = std::fs::metadata(to).map_err(err)?;
    phase("unpacking");
    let decoder =
        zstd::stream::read::Decoder::new(std::fs::File::open(local).map_err(err)?).map_err(err)?;
    let mut counting = Counting {
        inner: decoder,
        count: 0,
        shared: done,
    };
    let mut archive = tar::Archive::new(&mut counting);
    archive.set_preserve_permissions(true);
    archive.unpack(to).map_err(err)?;
    // The tar reader stops at the end-of-archive blocks; the padding after
    // them is part of the backup's size, and a progress stuck at 99% (and a
    // report a few hundred bytes short of the manifest) is read as a fault.
    std::io::copy(&mut counting, &mut std::io::sink()).map_err(err)?;
    let bytes = counting.count;
    let quote = |s: &str| s.replace('\'', "''");
    let mut settings = format!(
        "\n# Written by fleet-agent when restoring base backup {}.\nrestore_command = '{}'\n",
        manifest.id,
        quote(restore_command)
    );
    if let Some(t) = target_time {
        settings.push_str(&format!(
            "recovery_target_time = '{}'\nrecovery_target_action = 'promote'\n",
            quote(t)
        ));
    }
    let mut conf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(to.join("postgresql.auto.conf"))
        .map_err(err)?;
    conf.write_all(settings.as_bytes()).map_err(err)?;
    std::fs::write(to.join("recovery.signal"), b"").map_err(err)?;
    // The data directory belongs to whoever owns the directory the operator
    // named (the PostgreSQL user). Run as that user (fleet-agent-wal.service)
    // everything unpacked is theirs already (with their own group, whatever
    // group the directory has), and chown is not even allowed there (the
    // unit's system call filter); run as root, hand it over.
    use std::os::unix::fs::MetadataExt;
    let written = std::fs::metadata(to.join("recovery.signal")).map_err(err)?;
    if written.uid() != owner.uid() {
        chown_tree(to, owner.uid(), owner.gid()).map_err(|e| {
            WalError::Backup(format!(
                "restore into {}: cannot give the tree to uid {} gid {}: {e}",
                to.display(),
                owner.uid(),
                owner.gid()
            ))
        })?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    phase("syncing to disk");
    sync_tree(to).map_err(err)?;
    if let Some(parent) = to.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(bytes)
}

/// `--to` must be absolute and a new or empty directory. A directory that
/// cannot be read is refused, not taken for empty.
fn check_restore_target(to: &Path) -> Result<(), WalError> {
    if !to.is_absolute() {
        return Err(WalError::BadRequest("--to must be an absolute path".into()));
    }
    match std::fs::read_dir(to) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(WalError::BadRequest(format!(
                "{} is not empty; restore into a new or empty directory",
                to.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(WalError::BadRequest(format!(
            "cannot tell whether {} is empty: {e}; restore into a new or empty directory",
            to.display()
        ))),
    }
}

/// fsync of every file and directory under `path` (directories after their
/// entries), so a restored data directory and its recovery settings survive a
/// crash right after the restore reports success. Symlinks (tablespaces) are
/// not followed; their directory entry is synced with their parent.
fn sync_tree(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
        std::fs::File::open(path)?.sync_all()
    } else if meta.is_file() {
        std::fs::File::open(path)?.sync_all()
    } else {
        Ok(())
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn service(archive: &Path, state: &Path) -> Arc<WalService> {
        let config: fleet_model::config::WalConfig =
            toml::from_str(&format!("target = \"file://{}\"", archive.display())).expect("config");
        WalService::new(config, state, Arc::new(|_: &str, _: &str| {})).expect("service")
    }

    fn restore_to(to: &Path, system_id: Option<&str>) -> RestoreRequest {
        RestoreRequest {
            to: to.to_path_buf(),
            target_time: Some("2026-12-03 11:22:02.144437+00".into()),
            system_identifier: system_id.map(str::to_string),
            backup: None,
            restore_command: "true".into(),
        }
    }

    #[test]
    fn the_base_for_a_time_finished_before_it_to_the_microsecond() {
        let mut early = manifest("a", 100);
        early.finished_unix_micros = Some(100_200_000);
        let mut late = manifest("b", 100);
        late.finished_unix_micros = Some(100_900_000);
        let both = [early, late];
        let id = |t: i64| choose_base(&both, Some(t)).map(|m| m.id.clone());
        // Same second: the backup that finished at .9 is no base for .5.
        assert_eq!(id(100_500_000).as_deref(), Some("a"));
        assert_eq!(id(100_900_001).as_deref(), Some("b"));
        assert_eq!(id(100_900_000).as_deref(), Some("a"));
        assert_eq!(id(100_100_000), None);
        // Seconds only (older manifests): taken as finished at the second's end.
        let old = [manifest("c", 100)];
        assert_eq!(
            choose_base(&old, Some(100_500_000)).map(|m| m.id.as_str()),
            None
        );
        assert_eq!(
            choose_base(&old, Some(101_500_000)).map(|m| m.id.as_str()),
            Some("c")
        );
    }

    #[tokio::test]
    async fn restore_refuses_a_to_it_cannot_read_before_any_download() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        std::fs::create_dir_all(archive.join("7001/backups")).expect("mkdir");
        // read_dir fails (ENOTDIR): not "empty".
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        let wal = service(&archive, &dir.path().join("state"));
        let err = wal
            .restore(restore_to(&file, Some("7001")))
            .await
            .expect_err("not a directory");
        assert!(
            matches!(&err, WalError::BadRequest(m) if m.contains("cannot tell whether") && m.contains("a-file")),
            "{err}"
        );
    }

    /// A base backup of `files` as `create_backup` stores it, and its manifest.
    fn tar_zst(dir: &Path, files: &[(&str, &[u8])]) -> (PathBuf, Manifest) {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            builder
                .append_data(&mut header, name, *content)
                .expect("tar");
        }
        let tar = builder.into_inner().expect("tar");
        let compressed = zstd::encode_all(&tar[..], 1).expect("zstd");
        let path = dir.join("base.tar.zst");
        std::fs::write(&path, &compressed).expect("write");
        let mut m = manifest("20261203T000000000Z", 1);
        m.sha256 = hex::encode(Sha256::digest(&compressed));
        m.bytes = tar.len() as u64;
        (path, m)
    }

    #[test]
    fn a_symlinked_to_is_handed_over_whole() {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(1)
            != 0
        {
            return; // chown to another user needs root
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (local, m) = tar_zst(
            dir.path(),
            &[("PG_VERSION", b"15\n"), ("global/pg_control", b"c")],
        );
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::chown(&real, Some(65534), Some(65534)).expect("chown");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        unpack(&local, &link, &m, None, "true", Default::default(), &|_| {}).expect("unpack");
        for path in [
            "PG_VERSION",
            "global",
            "global/pg_control",
            "recovery.signal",
            "postgresql.auto.conf",
        ] {
            let meta = std::fs::symlink_metadata(real.join(path)).expect(path);
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{path}");
        }
    }

    #[test]
    fn an_unpack_names_its_steps_on_the_progress_and_counts_the_tar() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (local, m) = tar_zst(dir.path(), &[("PG_VERSION", b"15\n")]);
        let phases = std::sync::Mutex::new(Vec::new());
        let done = Arc::new(AtomicU64::new(0));
        let bytes = unpack(
            &local,
            &dir.path().join("to"),
            &m,
            None,
            "true",
            done.clone(),
            &|p| phases.lock().expect("lock").push(p.to_string()),
        )
        .expect("unpack");
        // The fsync of the tree is the tail of a restore, with every byte done:
        // it has a step of its own rather than "unpacking" at 100%.
        assert_eq!(
            *phases.lock().expect("lock"),
            [
                "checking the download's SHA-256",
                "unpacking",
                "syncing to disk"
            ]
        );
        assert_eq!(bytes, m.bytes, "the whole tar, padding included");
        assert_eq!(done.load(Ordering::Relaxed), bytes);
    }

    /// A stand-in for pg_basebackup: a shell script.
    fn backup_program(script: &str) -> (std::ffi::OsString, Vec<String>) {
        ("sh".into(), vec!["-c".into(), script.into()])
    }

    #[test]
    fn pg_basebackups_progress_lines_give_the_total_and_stay_out_of_its_messages() {
        // PostgreSQL 15's lines, verbose (with the file) and not.
        assert_eq!(
            progress_total("  1234/160342 kB (0%), 0/1 tablespace (...ase/5/16397)"),
            Some(160342 * 1024)
        );
        assert_eq!(
            progress_total("160350/160350 kB (100%), 1/1 tablespace"),
            Some(160350 * 1024)
        );
        assert_eq!(
            progress_total("pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1"),
            None
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (program, args) = backup_program(
            "echo 'pg_basebackup: initiating base backup, waiting for checkpoint to complete' >&2; \
             echo 'pg_basebackup: checkpoint completed' >&2; \
             echo 'pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1' >&2; \
             echo '     0/2048 kB (0%), 0/1 tablespace' >&2; printf tar-bytes; \
             echo '  2048/2048 kB (100%), 1/1 tablespace' >&2; \
             echo '  3072/3072 kB (100%), 1/1 tablespace' >&2",
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (done, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (steps_tx, steps) = std::sync::mpsc::channel();
        let (bytes, _, _, stderr) = run_backup_program(
            &program,
            &args,
            None,
            &dir.path().join("b.tar.zst"),
            1,
            Duration::from_secs(60),
            Counters {
                moved: done.clone(),
                total: total.clone(),
                wal_bytes: 16 << 20,
                step: Some(Box::new(move |name: &str| {
                    let _ = steps_tx.send(name.to_string());
                })),
            },
        )
        .expect("backup");
        assert_eq!((bytes, done.load(Ordering::Relaxed)), (9, 9));
        // The first line's estimate and the WAL segment -X fetch appends; the
        // last line's total (pg_basebackup's own count, past its estimate)
        // does not add the segment a second time.
        assert_eq!(total.load(Ordering::Relaxed), (2048 << 10) + (16 << 20));
        assert!(
            stderr.contains("start point") && !stderr.contains(" kB ("),
            "{stderr}"
        );
        // The checkpoint has a step of its own, then the reading.
        assert_eq!(
            steps.try_iter().collect::<Vec<_>>(),
            [
                "waiting for the server's checkpoint",
                "reading from pg_basebackup"
            ]
        );
    }

    #[test]
    fn a_full_disk_fails_the_backup_instead_of_hanging() {
        // Writes forever; /dev/full refuses every write (ENOSPC).
        let (program, args) = backup_program("exec cat /dev/zero");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let began = std::time::Instant::now();
        let err = run_backup_program(
            &program,
            &args,
            None,
            Path::new("/dev/full"),
            1,
            Duration::from_secs(60),
            Default::default(),
        )
        .expect_err("no space");
        assert!(err.to_string().contains("/dev/full"), "{err}");
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn a_stalled_backup_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (program, args) = backup_program("echo started >&2; exec sleep 600");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let began = std::time::Instant::now();
        let err = run_backup_program(
            &program,
            &args,
            None,
            &dir.path().join("b.tar.zst"),
            1,
            Duration::from_secs(1),
            Default::default(),
        )
        .expect_err("timeout");
        let text = err.to_string();
        assert!(
            text.contains("did not finish within 1s") && text.contains("wal.backup_timeout"),
            "{text}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{:?}",
            began.elapsed()
        );
    }

    fn manifest(id: &str, finished_unix: u64) -> Manifest {
        Manifest {
            id: id.into(),
            system_identifier: "7001".into(),
            started_at: String::new(),
            finished_at: String::new(),
            started_unix: finished_unix,
            finished_unix,
            finished_unix_micros: None,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            end_lsn: String::new(),
            start_wal: "000000010000000000000002".into(),
            wal_segment_bytes: names::DEFAULT_SEGMENT_BYTES,
            bytes: 0,
            compressed_bytes: 0,
            sha256: String::new(),
        }
    }

    #[tokio::test]
    async fn a_planted_manifest_cannot_make_retention_delete_outside_the_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        let put = |key: &str, m: &Manifest| {
            let path = archive.join(key);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, serde_json::to_vec(m).expect("json")).expect("write");
        };
        // What an attacker can reach: files beside the archive.
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(&victim).expect("mkdir");
        std::fs::write(victim.join("manifest.json"), b"keep").expect("write");
        std::fs::write(victim.join("base.tar.zst"), b"keep").expect("write");
        put(
            "7001/backups/planted/manifest.json",
            &manifest("../../../victim", 1),
        );
        put(
            "7001/backups/20261203T000000000Z/manifest.json",
            &manifest("20261203T000000000Z", 2),
        );
        std::fs::write(
            archive.join("7001/backups/20261203T000000000Z/base.tar.zst"),
            b"x",
        )
        .expect("write");
        let wal = service(&archive, &dir.path().join("state"));
        let listed = wal.list_backups(7001).await.expect("list");
        assert_eq!(
            listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            vec!["20261203T000000000Z"]
        );
        wal.apply_retention_for(Some(7001), Some(Duration::ZERO))
            .await
            .expect("retention");
        assert!(victim.join("manifest.json").exists() && victim.join("base.tar.zst").exists());
        assert!(!is_backup_id("a/b") && !is_backup_id("..") && !is_backup_id(""));
    }

    #[tokio::test]
    async fn restore_needs_no_system_id_for_one_cluster_and_lists_several() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("archive");
        let to = dir.path().join("restored");
        std::fs::create_dir_all(archive.join("7001/wal")).expect("mkdir");
        // Not clusters: hidden temp entries, other names, plain files.
        std::fs::create_dir_all(archive.join(".tmp")).expect("mkdir");
        std::fs::create_dir_all(archive.join("notes")).expect("mkdir");
        std::fs::write(archive.join("123"), b"").expect("write");
        let wal = service(&archive, &dir.path().join("state"));
        assert_eq!(wal.clusters().await.expect("clusters"), vec![7001]);
        // One cluster: chosen without --system-id (and then no base backup of it).
        let err = wal
            .restore(restore_to(&to, None))
            .await
            .expect_err("no backup");
        assert!(
            matches!(&err, WalError::NotFound(m) if m.contains("cluster 7001")),
            "{err}"
        );

        std::fs::create_dir_all(archive.join("7002/backups")).expect("mkdir");
        let err = wal
            .restore(restore_to(&to, None))
            .await
            .expect_err("ambiguous");
        let text = err.to_string();
        assert!(
            matches!(err, WalError::BadRequest(_))
                && text.contains("7001, 7002")
                && text.contains("--system-id"),
            "{text}"
        );
        // Named: that one.
        let err = wal
            .restore(restore_to(&to, Some("7002")))
            .await
            .expect_err("no backup");
        assert!(err.to_string().contains("cluster 7002"), "{err}");
    }

    #[tokio::test]
    async fn restore_refuses_a_target_time_without_an_offset_before_any_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = service(&dir.path().join("archive"), &dir.path().join("state"));
        let mut request = restore_to(&dir.path().join("restored"), Some("1"));
        request.target_time = Some("2026-12-03 11:22:02".into());
        let err = wal.restore(request).await.expect_err("refused");
        assert!(err.to_string().contains("SELECT now()"), "{err}");
    }

    #[test]
    fn parses_pg_basebackup_points() {
        let text = "pg_basebackup: initiating base backup, waiting for checkpoint to complete\npg_basebackup: checkpoint completed\npg_basebackup: write-ahead log start point: 0/5000028 on timeline 1\npg_basebackup: write-ahead log end point: 0/5000100\n";
        let (start, end) = super::parse_points(text);
        assert_eq!(start, Some(("0/5000028".to_string(), 1)));
        assert_eq!(end.as_deref(), Some("0/5000100"));
    }
}
