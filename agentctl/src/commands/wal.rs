//! `agentctl wal push|fetch|status`, `agentctl backup create|list|prune` and
//! `agentctl restore`. `wal push %p` is PostgreSQL's `archive_command` and
//! `wal fetch %f %p` its `restore_command`: both are thin clients of the daemon
//! and exit with a code from 1 to 125 on failure (PostgreSQL treats higher
//! codes and signals as fatal for the archiver or recovery).

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use anyhow::{Context, Result};
use fleet_model::api::{ErrorBody, WAL_HAND_OFF_LENGTH, WAL_HAND_OFF_PATH, WAL_HAND_OFF_REQUEST};
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A failure with the exit code it must produce.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Exit codes of `wal push` / `wal fetch`.
pub mod code {
    /// fetch: the file is not in the archive (recovery ends normally on it).
    pub const NOT_FOUND: u8 = 1;
    /// A refused name or file (not a WAL name, a symlink, unreadable).
    pub const REFUSED: u8 = 2;
    /// push: a different file is archived under this name.
    pub const CONFLICT: u8 = 3;
    /// The daemon is not reachable.
    pub const NO_DAEMON: u8 = 4;
    /// The archive target failed; PostgreSQL keeps the segment and retries.
    pub const TARGET: u8 = 5;
    /// Anything else.
    pub const OTHER: u8 = 6;
}

fn exit(code: u8, message: impl Into<String>) -> anyhow::Error {
    Exit {
        code,
        message: message.into(),
    }
    .into()
}

#[derive(clap::Subcommand)]
pub enum WalCommand {
    /// archive_command: hand one WAL file to the daemon; exit 0 once it is durably archived.
    #[command(
        after_help = "Exit status: 0 archived (or already archived, identical), 2 refused file,
3 a different file is archived under this name, 4 daemon not reachable,
5 archive target failed (PostgreSQL retries), 6 anything else.

Examples:
  archive_command = 'agentctl wal push %p'     # postgresql.conf"
    )]
    Push {
        /// The file (`%p`, relative to the data directory PostgreSQL runs this in).
        path: PathBuf,
        /// The cluster's system identifier (default: read from ./global/pg_control).
        #[arg(long)]
        system_id: Option<u64>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// restore_command: write the archived file `name` to `dest`; exit 1 if it is not archived.
    #[command(
        after_help = "Exit status: 0 written, 1 not in the archive (recovery ends there), 2 refused
name, 4 daemon not reachable, 5 archive target failed, 6 anything else.

Examples:
  restore_command = 'agentctl wal fetch %f %p'   # set by agentctl restore"
    )]
    Fetch {
        /// The WAL file name (`%f`).
        name: String,
        /// Where to write it (`%p`).
        dest: PathBuf,
        #[arg(long)]
        system_id: Option<u64>,
    },
    /// Walk the archive from the oldest kept base backup to the newest segment:
    /// gaps, timeline switches, checksum failures (every object is read). Exit 1 on a problem.
    Verify {
        /// The cluster (default: the configured one).
        #[arg(long)]
        system_id: Option<u64>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Restore drill: restore the newest base backup into a scratch directory, replay
    /// all archived WAL on a throwaway PostgreSQL, run a sanity query, report the RTO,
    /// clean up. Exit 1 if it fails (the report names a missing segment).
    Drill {
        /// The cluster (default: the configured one, else the only one in the archive).
        #[arg(long)]
        system_id: Option<u64>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Archiver state: PostgreSQL's counters, the .ready backlog, what was shipped.
    Status {
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(clap::Subcommand)]
pub enum BackupCommand {
    /// Take a base backup now (pg_basebackup, compressed, streamed to the target).
    Create {
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Base backups in the archive, oldest first.
    List {
        #[arg(long)]
        system_id: Option<u64>,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Apply retention now: delete what the recovery window no longer needs.
    Prune {
        /// Recovery window (default: wal.recovery_window, 7d).
        #[arg(long)]
        window: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agentctl backup list
  agentctl restore --to /var/lib/postgresql/15/restored --target-time '2026-12-03 11:22:02.144437+00'
  agentctl restore --to /srv/pg-copy                  # replay all archived WAL")]
pub struct RestoreArgs {
    /// New (or empty) data directory to restore into; it keeps its owner.
    #[arg(long)]
    to: PathBuf,
    /// Recover up to this time: RFC 3339 with any offset (2026-12-03T11:22:02Z) or what
    /// PostgreSQL's `SELECT now()` prints (2026-12-03 11:22:02.144437+00); default: all archived WAL.
    #[arg(long)]
    target_time: Option<String>,
    /// A specific base backup id (default: the newest finished before the target time).
    #[arg(long)]
    backup: Option<String>,
    /// The cluster (default: the configured one, else the only one in the archive).
    #[arg(long)]
    system_id: Option<u64>,
    #[command(flatten)]
    json: JsonFlag,
}

/// The socket of the WAL service: `--socket` if given, else
/// `$FLEET_AGENT_WAL_SOCKET`, else the packaged WAL unit's socket if it exists
/// (fleet-agent-wal.service runs the service as the PostgreSQL user), else the
/// daemon's own socket (a fleet-agentd that runs the WAL service itself).
pub fn client(explicit: Option<PathBuf>) -> Client {
    use fleet_model::config::{default_client_socket, SYSTEM_WAL_SOCKET_PATH, WAL_SOCKET_ENV};
    let socket = explicit
        .or_else(|| {
            std::env::var_os(WAL_SOCKET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            let system = Path::new(SYSTEM_WAL_SOCKET_PATH);
            system.exists().then(|| system.to_path_buf())
        })
        .unwrap_or_else(default_client_socket);
    Client::new(socket)
}

/// The system identifier from `global/pg_control` under the current directory
/// (PostgreSQL runs archive and restore commands in the data directory).
fn local_system_id() -> Option<u64> {
    let bytes = std::fs::read("global/pg_control").ok()?;
    let first: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(first))
}

/// How long a push waits on a busy WAL service before it gives up (exit 5,
/// PostgreSQL retries the segment).
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

fn error_text(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| format!("fleet-agentd answered {status}"))
}

fn code_for(status: StatusCode) -> u8 {
    match status {
        StatusCode::NOT_FOUND => code::NOT_FOUND,
        StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN => code::REFUSED,
        StatusCode::CONFLICT => code::CONFLICT,
        StatusCode::SERVICE_UNAVAILABLE => code::TARGET,
        _ => code::OTHER,
    }
}

fn sys_query(id: Option<u64>) -> String {
    id.map(|i| format!("system_id={i}")).unwrap_or_default()
}

pub async fn wal(client: &Client, command: WalCommand) -> Result<()> {
    match command {
        WalCommand::Push {
            path,
            system_id,
            json,
        } => push(client, &path, system_id.or_else(local_system_id), json.json).await,
        WalCommand::Fetch {
            name,
            dest,
            system_id,
        } => fetch(client, &name, &dest, system_id.or_else(local_system_id)).await,
        WalCommand::Status { json } => status(client, json.json).await,
        WalCommand::Verify { system_id, json } => verify(client, system_id, json.json).await,
        WalCommand::Drill { system_id, json } => drill(client, system_id, json.json).await,
    }
}

/// The `restore_command` a restored cluster gets: this agentctl, on this socket.
fn own_restore_command(client: &Client) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find agentctl's own path")?;
    let socket = std::fs::canonicalize(client.socket()).unwrap_or(client.socket().to_path_buf());
    Ok(format!(
        "{} --socket {} wal fetch %f %p",
        shell_word(&exe.to_string_lossy()),
        shell_word(&socket.to_string_lossy())
    ))
}

async fn drill(client: &Client, system_id: Option<u64>, json: bool) -> Result<()> {
    let request = serde_json::json!({
        "system_identifier": system_id.map(|i| i.to_string()),
        "restore_command": own_restore_command(client)?,
    });
    let report: Value = with_progress(
        client,
        "restore drill",
        json,
        client.post(Method::POST, "/v1/wal/drill", &request),
    )
    .await?;
    let ok = report["ok"].as_bool().unwrap_or(false);
    if json {
        output::json(&report)?;
    } else {
        let s = |k: &str| report[k].as_str().unwrap_or("-").to_string();
        say!("cluster:            {}", s("system_identifier"));
        say!("base backup:        {}", s("backup"));
        say!(
            "replayed to:        {} (archive ends at {})",
            s("replayed_to"),
            s("expected_end")
        );
        say!(
            "RTO:                {:.1}s (restore {:.1}s, replay {:.1}s)",
            report["rto_seconds"].as_f64().unwrap_or(0.0),
            report["restore_seconds"].as_f64().unwrap_or(0.0),
            report["replay_seconds"].as_f64().unwrap_or(0.0)
        );
        if let Some(missing) = report["missing_segment"].as_str() {
            say!("MISSING:            {missing}");
        }
        if let Some(error) = report["error"].as_str() {
            say!("FAILED:             {error}");
        } else {
            say!("result:             ok");
        }
    }
    if ok {
        Ok(())
    } else {
        Err(exit(1, "the restore drill failed (see above)"))
    }
}

async fn verify(client: &Client, system_id: Option<u64>, json: bool) -> Result<()> {
    let report: Value = with_progress(
        client,
        "verify",
        json,
        client.post(
            Method::POST,
            &format!("/v1/wal/verify?{}", sys_query(system_id)),
            &serde_json::json!({}),
        ),
    )
    .await?;
    let ok = report["ok"].as_bool().unwrap_or(false);
    if json {
        output::json(&report)?;
    } else {
        let s = |k: &str| report[k].as_str().unwrap_or("-").to_string();
        say!("cluster:            {}", s("system_identifier"));
        say!("from base backup:   {}", s("base_backup"));
        say!(
            "segments:           {} .. {} ({} present)",
            s("from"),
            s("to"),
            report["segments"]
        );
        say!("objects checked:    {}", report["objects_checked"]);
        for gap in report["gaps"].as_array().into_iter().flatten() {
            say!("GAP:                {}", gap.as_str().unwrap_or("?"));
        }
        for f in report["checksum_failures"].as_array().into_iter().flatten() {
            say!(
                "CHECKSUM:           {}: {}",
                f["name"].as_str().unwrap_or("?"),
                f["error"].as_str().unwrap_or("?")
            );
        }
        for t in report["timeline_switches"].as_array().into_iter().flatten() {
            say!(
                "timeline switch:    {} -> {} at {}{}",
                t["from"],
                t["to"],
                t["at"].as_str().unwrap_or("?"),
                if t["history_archived"].as_bool().unwrap_or(false) {
                    ""
                } else {
                    " (NO .history archived)"
                }
            );
        }
        say!("result:             {}", if ok { "ok" } else { "PROBLEMS" });
    }
    if ok {
        Ok(())
    } else {
        Err(exit(1, "the archive has problems (see above)"))
    }
}

async fn push(client: &Client, path: &Path, system_id: Option<u64>, json: bool) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| exit(code::REFUSED, format!("{}: no file name", path.display())))?
        .to_string();
    // O_NOFOLLOW: a symlink in place of a segment is refused, never followed.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| exit(code::REFUSED, format!("{}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| exit(code::REFUSED, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(exit(
            code::REFUSED,
            format!("{}: not a regular file", path.display()),
        ));
    }
    let mut query = format!("name={}", urlencode(&name));
    if let Some(id) = system_id {
        query.push_str(&format!("&{}", sys_query(Some(id))));
    }
    // Fast path: the daemon's look-ahead has usually archived this very file
    // already; ask by identity before reading and sending 16 MiB.
    {
        use std::os::unix::fs::MetadataExt;
        let identity = format!(
            "{query}&dev={}&ino={}&size={}&mtime_ns={}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
        );
        let (status, body) = client
            .exchange(
                Method::POST,
                &format!("/v1/wal/push?{identity}"),
                Some(Bytes::new()),
                "application/octet-stream",
            )
            .await
            .map_err(|e| exit(code::NO_DAEMON, format!("{e:#}")))?;
        if status.is_success() {
            if json {
                say!("{}", String::from_utf8_lossy(&body));
            }
            return Ok(());
        }
        if status != StatusCode::PRECONDITION_FAILED {
            return Err(exit(code_for(status), error_text(status, &body)));
        }
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    std::io::Read::read_to_end(&mut file, &mut content)
        .map_err(|e| exit(code::REFUSED, format!("{}: {e}", path.display())))?;
    let content = Bytes::from(content);
    // A busy service (more pushes in flight than it takes) answers 503 with
    // Retry-After; waiting here keeps PostgreSQL's archiver from counting a
    // failure and backing off for a minute. A target failure has no such header.
    let deadline = std::time::Instant::now() + BUSY_PATIENCE;
    let (status, body) = loop {
        let response = client
            .send_typed(
                Method::POST,
                &format!("/v1/wal/push?{query}"),
                Some(content.clone()),
                "application/octet-stream",
            )
            .await
            .map_err(|e| exit(code::NO_DAEMON, format!("{e:#}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| exit(code::NO_DAEMON, format!("reading the answer: {e}")))?;
        match retry_after {
            Some(secs) if status == StatusCode::SERVICE_UNAVAILABLE => {
                let wait = Duration::from_secs(secs.clamp(1, 5));
                if std::time::Instant::now() + wait > deadline {
                    break (status, body);
                }
                tokio::time::sleep(wait).await;
            }
            _ => break (status, body),
        }
    };
    if !status.is_success() {
        return Err(exit(code_for(status), error_text(status, &body)));
    }
    if json {
        say!("{}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// Names go into the query string; valid WAL names need no escaping, anything
/// else is escaped so the daemon sees (and refuses) exactly what was given.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn fetch(client: &Client, name: &str, dest: &Path, system_id: Option<u64>) -> Result<()> {
    let query = sys_query(system_id);
    let path = format!("/v1/wal/fetch/{}?{query}", urlencode(name));
    // Temp file beside the destination, then rename: PostgreSQL never sees a
    // partial segment. No fsync: recovery reads the file at once, PostgreSQL
    // makes durable what it keeps, and after a crash it asks for it again.
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.fleet-tmp",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")
    ));
    let mut response = fetch_request(client, &path, true).await?;
    if let Some((offered, length)) = offered_hand_off(response.headers(), name) {
        // Taking the prefetched file over saves the daemon reading 16 MiB,
        // sending it through the socket and this process writing it again.
        // When that is not possible (another user's file, a path this
        // process cannot see), the bytes come the old way.
        if take_over(&offered, length, dest, &temp).is_ok() {
            return Ok(());
        }
        response = fetch_request(client, &path, false).await?;
    }
    let failed = |e: String| {
        let _ = std::fs::remove_file(&temp);
        exit(code::OTHER, format!("{}: {e}", dest.display()))
    };
    // The body goes to the file as it arrives rather than being gathered
    // into one 16 MiB buffer first.
    let mut file = std::fs::File::create(&temp).map_err(|e| failed(e.to_string()))?;
    while let Some(frame) = response.body_mut().frame().await {
        let frame = frame.map_err(|e| failed(format!("the daemon's answer broke off: {e}")))?;
        if let Some(chunk) = frame.data_ref() {
            file.write_all(chunk).map_err(|e| failed(e.to_string()))?;
        }
    }
    drop(file);
    std::fs::rename(&temp, dest).map_err(|e| failed(e.to_string()))
}

/// One fetch request; a refusal becomes the documented exit code.
async fn fetch_request(
    client: &Client,
    path: &str,
    hand_off: bool,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    let extra = hand_off.then_some((WAL_HAND_OFF_REQUEST, "1"));
    let response = client
        .send_with_header(Method::GET, path, extra)
        .await
        .map_err(|e| exit(code::NO_DAEMON, format!("{e:#}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(exit(code_for(status), error_text(status, &body)));
    }
    Ok(response)
}

/// The prefetched file the daemon offers instead of the bytes, if it offers
/// one that can be the segment asked for: an absolute path whose last part
/// is exactly that name, and its length.
fn offered_hand_off(headers: &hyper::HeaderMap, name: &str) -> Option<(PathBuf, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(
        headers.get(WAL_HAND_OFF_PATH)?.as_bytes(),
    ));
    let length = headers
        .get(WAL_HAND_OFF_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (path.is_absolute() && path.file_name()? == name).then_some((path, length))
}

#[derive(Debug, PartialEq, Eq)]
enum TakeOver {
    /// Move the file into place (the daemon's cache entry goes with it).
    Rename,
    /// Copy it: another name links to it, which PostgreSQL must not write
    /// through when it recycles the segment.
    Copy,
    Refuse(&'static str),
}

/// What to do with the opened (O_NOFOLLOW) file, from its `fstat`.
fn take_over_plan(is_file: bool, links: u64, length: u64, offered_length: u64) -> TakeOver {
    if !is_file {
        TakeOver::Refuse("not a regular file")
    } else if length != offered_length {
        TakeOver::Refuse("not the length the daemon announced")
    } else if links != 1 {
        TakeOver::Copy
    } else {
        TakeOver::Rename
    }
}

/// A rename that failed with this error may still be done as a copy: another
/// file system (EXDEV), a cache directory this user may read but not change.
fn copy_after_rename_error(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EXDEV | libc::EACCES | libc::EPERM | libc::EROFS | libc::EBUSY)
    )
}

/// Moves (or copies) the prefetched `source` to `dest` through `temp`, so
/// that `dest` appears complete. The file is opened without following a
/// symlink and checked; a rename is path-based, so what arrived at `temp` is
/// compared (device, inode) with what was checked before `dest` is touched.
fn take_over(source: &Path, offered_length: u64, dest: &Path, temp: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why: &str| std::io::Error::other(format!("{}: {why}", source.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(source)?;
    let meta = file.metadata()?;
    let plan = take_over_plan(
        meta.file_type().is_file(),
        meta.nlink(),
        meta.len(),
        offered_length,
    );
    match plan {
        TakeOver::Refuse(why) => return Err(refused(why)),
        TakeOver::Rename => match std::fs::rename(source, temp) {
            Ok(()) => {
                let moved = std::fs::symlink_metadata(temp);
                let same = moved.as_ref().is_ok_and(|m| {
                    m.file_type().is_file() && (m.dev(), m.ino()) == (meta.dev(), meta.ino())
                });
                if !same {
                    let _ = std::fs::remove_file(temp);
                    return Err(refused("replaced while it was taken over"));
                }
                return std::fs::rename(temp, dest).inspect_err(|_| {
                    let _ = std::fs::remove_file(temp);
                });
            }
            Err(e) if copy_after_rename_error(e.raw_os_error()) => {}
            Err(e) => return Err(e),
        },
        TakeOver::Copy => {}
    }
    // std's copy uses copy_file_range between two files (a reflink or an
    // in-kernel copy), so the bytes do not pass through this process.
    let copied = (|| {
        let mut out = std::fs::File::create(temp)?;
        let n = std::io::copy(&mut &file, &mut out)?;
        if n != offered_length {
            return Err(refused("shorter than announced"));
        }
        drop(out);
        std::fs::rename(temp, dest)
    })();
    match copied {
        Ok(()) => {
            // Served: the cache entry may go (the daemon drops it later otherwise).
            let _ = std::fs::remove_file(source);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(temp);
            Err(e)
        }
    }
}

/// `archive_library /usr/lib/.../fleet_archive (PostgreSQL 15)`.
pub fn archiving_line(a: &fleet_model::archiving::Archiving) -> String {
    use fleet_model::archiving::Via;
    match a.via {
        Via::ArchiveLibrary => format!("archive_library {} (PostgreSQL {})", a.setting, a.major),
        Via::ArchiveCommand if a.setting == fleet_model::archiving::NOT_SHOWN => {
            format!("archive_command {} (PostgreSQL {})", a.setting, a.major)
        }
        Via::ArchiveCommand => format!("archive_command '{}' (PostgreSQL {})", a.setting, a.major),
        Via::Nothing => format!("nothing (PostgreSQL {})", a.major),
    }
}

pub fn severity_word(severity: fleet_model::archiving::Severity) -> &'static str {
    use fleet_model::archiving::Severity;
    match severity {
        Severity::Problem => "PROBLEM",
        Severity::Warning => "warning",
        Severity::Hint => "hint",
    }
}

async fn status(client: &Client, json: bool) -> Result<()> {
    let status: Value = client.get("/v1/wal").await?;
    if json {
        return output::json(&status);
    }
    let s = |k: &str| match &status[k] {
        Value::Null => "-".to_string(),
        Value::String(v) => v.clone(),
        other => other.to_string(),
    };
    say!("target:             {}", s("target"));
    let archive = &status["archive"];
    match archive["reachable"].as_bool() {
        Some(true) => say!(
            "archive:            answers (probe took {} ms)",
            archive["latency_ms"].as_u64().unwrap_or(0)
        ),
        // The probe's own error is the operator's first clue (a refused
        // certificate, a wrong bucket): the text view must not hide it.
        Some(false) => say!(
            "archive:            NOT REACHABLE: {}",
            archive["error"].as_str().unwrap_or("no reason given")
        ),
        None => {}
    }
    say!("system identifier:  {}", s("system_identifier"));
    say!(
        "backlog:            {} file(s) ready, {} bytes, oldest {:.0}s",
        s("ready_count"),
        s("backlog_bytes"),
        status["oldest_ready_age_seconds"].as_f64().unwrap_or(0.0)
    );
    say!(
        "shipped:            {} segment(s), {} bytes ({} stored)",
        s("pushed_segments"),
        s("pushed_bytes"),
        s("stored_bytes")
    );
    let archiver = &status["archiver"];
    if archiver.is_object() {
        say!(
            "pg_stat_archiver:   archived {}, failed {}, last {}",
            archiver["archived_count"],
            archiver["failed_count"],
            archiver["last_archived_wal"].as_str().unwrap_or("-")
        );
    } else {
        say!(
            "pg_stat_archiver:   {}",
            status["archiver_error"]
                .as_str()
                .unwrap_or("not configured (wal.postgres)")
        );
    }
    if let Ok(a) =
        serde_json::from_value::<fleet_model::archiving::Archiving>(status["archiving"].clone())
    {
        say!("archiving via:      {}", archiving_line(&a));
        for f in &a.findings {
            say!("  {}: {}", severity_word(f.severity), f.text);
        }
    }
    say!("failures:           {}", status["failures"]);
    say!(
        "last base backup:   {}",
        status["last_backup_age_seconds"]
            .as_u64()
            .map(|a| format!("{} ago", output::duration(a)))
            .unwrap_or_else(|| "none".into())
    );
    // The base backup or restore under way (what `backup create` and
    // `restore` draw): seen here from another shell, or when one was
    // scheduled rather than asked for.
    if let Ok(p) = serde_json::from_value::<fleet_model::api::Progress>(status["progress"].clone())
    {
        say!(
            "progress:           {} {}: {}",
            p.operation,
            p.subject,
            p.line()
        );
    }
    if status["valve_acknowledged"].as_u64().unwrap_or(0) > 0 {
        say!(
            "VALVE:              {} segment(s) acknowledged without archiving; take a new base backup",
            s("valve_acknowledged")
        );
    }
    Ok(())
}

/// Waits for a long request, showing the WAL service's `progress` for it
/// (`GET /v1/wal`, once a second): a bar on a terminal, plain lines otherwise
/// (none beside `--json`).
async fn with_progress<T>(
    client: &Client,
    what: &str,
    json: bool,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let mut view = crate::progress::ProgressView::beside_json(json);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            result = &mut call => break result,
            _ = ticker.tick() => {
                // A status that fails to come is no reason to stop waiting.
                if let Ok(status) = client.get::<Value>("/v1/wal").await {
                    if let Ok(p) = serde_json::from_value::<fleet_model::api::Progress>(status["progress"].clone()) {
                        view.update(what, &p);
                    }
                }
            }
        }
    };
    view.done(what);
    result
}

pub async fn backup(client: &Client, command: BackupCommand) -> Result<()> {
    match command {
        BackupCommand::Create { json } => {
            let manifest: Value = with_progress(
                client,
                "base backup",
                json.json,
                client.post(Method::POST, "/v1/wal/backups", &serde_json::json!({})),
            )
            .await?;
            if json.json {
                return output::json(&manifest);
            }
            say!(
                "base backup {} taken: {} bytes ({} compressed), WAL from {}",
                manifest["id"].as_str().unwrap_or("?"),
                manifest["bytes"],
                manifest["compressed_bytes"],
                manifest["start_wal"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        BackupCommand::List { system_id, json } => {
            let list: Vec<Value> = client
                .get(&format!("/v1/wal/backups?{}", sys_query(system_id)))
                .await?;
            if json.json {
                return output::json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|m| {
                    vec![
                        m["id"].as_str().unwrap_or("?").to_string(),
                        m["finished_at"].as_str().unwrap_or("?").to_string(),
                        m["start_wal"].as_str().unwrap_or("?").to_string(),
                        m["bytes"].to_string(),
                        m["compressed_bytes"].to_string(),
                    ]
                })
                .collect();
            output::table(
                &["ID", "FINISHED", "START WAL", "BYTES", "COMPRESSED"],
                &rows,
            );
            Ok(())
        }
        BackupCommand::Prune { window, json } => {
            let query = window
                .map(|w| format!("?window={}", urlencode(&w)))
                .unwrap_or_default();
            let report: Value = client
                .post(
                    Method::POST,
                    &format!("/v1/wal/retention{query}"),
                    &serde_json::json!({}),
                )
                .await?;
            if json.json {
                return output::json(&report);
            }
            say!(
                "kept {} base backup(s) and {} WAL file(s); deleted {} base backup(s) and {} WAL file(s)",
                report["kept_backups"].as_array().map(|a| a.len()).unwrap_or(0),
                report["kept_wal"],
                report["deleted_backups"].as_array().map(|a| a.len()).unwrap_or(0),
                report["deleted_wal"]
            );
            Ok(())
        }
    }
}

/// Single-quotes a word for the shell PostgreSQL runs restore_command in.
fn shell_word(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-=".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub async fn restore(client: &Client, args: RestoreArgs) -> Result<()> {
    let to = if args.to.is_absolute() {
        args.to.clone()
    } else {
        std::env::current_dir()?.join(&args.to)
    };
    let restore_command = own_restore_command(client)?;
    let request = serde_json::json!({
        "to": to,
        "target_time": args.target_time,
        "backup": args.backup,
        "system_identifier": args.system_id.map(|i| i.to_string()),
        "restore_command": restore_command,
    });
    let report: Value = with_progress(
        client,
        "restore",
        args.json.json,
        client.post(Method::POST, "/v1/wal/restore", &request),
    )
    .await?;
    if args.json.json {
        return output::json(&report);
    }
    say!(
        "restored base backup {} into {} ({} bytes); start PostgreSQL on it to replay WAL{}",
        report["backup"].as_str().unwrap_or("?"),
        to.display(),
        report["bytes"],
        args.target_time
            .map(|t| format!(" up to {t}"))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(path: &str, length: &str) -> hyper::HeaderMap {
        let mut headers = hyper::HeaderMap::new();
        headers.insert(WAL_HAND_OFF_PATH, path.parse().expect("value"));
        headers.insert(WAL_HAND_OFF_LENGTH, length.parse().expect("value"));
        headers
    }

    const SEG: &str = "000000010000000000000003";

    #[test]
    fn only_an_absolute_path_to_the_segment_asked_for_is_taken() {
        let good = format!("/var/lib/fleet-agent-wal/wal-prefetch/77/{SEG}");
        assert_eq!(
            offered_hand_off(&offer(&good, "16777216"), SEG),
            Some((PathBuf::from(&good), 16 << 20))
        );
        // Another name, a relative path, no usable length, no offer at all.
        assert_eq!(
            offered_hand_off(&offer(&good, "16777216"), "000000010000000000000004"),
            None
        );
        assert_eq!(
            offered_hand_off(&offer(&format!("wal-prefetch/77/{SEG}"), "1"), SEG),
            None
        );
        assert_eq!(offered_hand_off(&offer(&good, "many"), SEG), None);
        assert_eq!(offered_hand_off(&hyper::HeaderMap::new(), SEG), None);
    }

    #[test]
    fn a_file_is_moved_when_it_is_the_only_link_copied_when_not_refused_when_odd() {
        assert_eq!(take_over_plan(true, 1, 100, 100), TakeOver::Rename);
        assert_eq!(take_over_plan(true, 2, 100, 100), TakeOver::Copy);
        assert!(matches!(
            take_over_plan(false, 1, 100, 100),
            TakeOver::Refuse(_)
        ));
        assert!(matches!(
            take_over_plan(true, 1, 99, 100),
            TakeOver::Refuse(_)
        ));
        assert!(copy_after_rename_error(Some(libc::EXDEV)));
        assert!(copy_after_rename_error(Some(libc::EACCES)));
        assert!(!copy_after_rename_error(Some(libc::ENOENT)));
        assert!(!copy_after_rename_error(None));
    }

    #[test]
    fn a_taken_over_file_appears_complete_at_dest_and_leaves_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join(SEG);
        std::fs::write(&source, vec![3u8; 5000]).expect("source");
        let dest = dir.path().join("RECOVERYXLOG");
        let temp = dir.path().join(".RECOVERYXLOG.fleet-tmp");
        take_over(&source, 5000, &dest, &temp).expect("taken over");
        assert_eq!(std::fs::read(&dest).expect("dest"), vec![3u8; 5000]);
        assert!(!source.exists() && !temp.exists());
    }

    #[test]
    fn a_hard_linked_file_is_copied_not_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join(SEG);
        std::fs::write(&source, vec![4u8; 3000]).expect("source");
        let other = dir.path().join("other");
        std::fs::hard_link(&source, &other).expect("link");
        let dest = dir.path().join("RECOVERYXLOG");
        let temp = dir.path().join(".RECOVERYXLOG.fleet-tmp");
        take_over(&source, 3000, &dest, &temp).expect("copied");
        assert_eq!(std::fs::read(&dest).expect("dest"), vec![4u8; 3000]);
        // PostgreSQL may write to the segment it keeps: not through `other`.
        use std::os::unix::fs::MetadataExt;
        let (d, o) = (
            std::fs::metadata(&dest).expect("dest"),
            std::fs::metadata(&other).expect("other"),
        );
        assert_ne!(d.ino(), o.ino());
        assert!(!temp.exists());
    }

    #[test]
    fn a_file_on_another_file_system_is_copied_and_leaves_the_cache() {
        use std::os::unix::fs::MetadataExt;
        // /dev/shm is a tmpfs on Linux hosts; the temp dir is usually on disk.
        let Ok(other_fs) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("no /dev/shm: the cross-file-system copy is not exercised");
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        if std::fs::metadata(other_fs.path()).expect("shm").dev()
            == std::fs::metadata(dir.path()).expect("tmp").dev()
        {
            eprintln!("/dev/shm and the temp dir share a file system: not exercised");
            return;
        }
        let source = other_fs.path().join(SEG);
        std::fs::write(&source, vec![9u8; 70_000]).expect("source");
        let dest = dir.path().join("RECOVERYXLOG");
        let temp = dir.path().join(".RECOVERYXLOG.fleet-tmp");
        take_over(&source, 70_000, &dest, &temp).expect("copied across");
        assert_eq!(std::fs::read(&dest).expect("dest"), vec![9u8; 70_000]);
        assert!(!source.exists() && !temp.exists());
    }

    #[test]
    fn a_symlink_or_a_wrong_length_is_refused_and_dest_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not WAL").expect("secret");
        let source = dir.path().join(SEG);
        std::os::unix::fs::symlink(&secret, &source).expect("symlink");
        let dest = dir.path().join("RECOVERYXLOG");
        let temp = dir.path().join(".RECOVERYXLOG.fleet-tmp");
        assert!(take_over(&source, 7, &dest, &temp).is_err());
        assert!(!dest.exists() && !temp.exists());
        std::fs::remove_file(&source).expect("unlink");
        std::fs::write(&source, vec![1u8; 10]).expect("source");
        assert!(take_over(&source, 11, &dest, &temp).is_err());
        assert!(!dest.exists() && source.exists());
        // Gone meanwhile (cleaned by the daemon): an error, so the bytes are asked for.
        assert!(take_over(&dir.path().join("gone"), 10, &dest, &temp).is_err());
    }
}
