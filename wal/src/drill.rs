//! The restore drill (`agentctl wal drill`): restore the newest base backup into
//! a scratch directory, replay every archived segment, start a throwaway
//! PostgreSQL on it (no TCP, no archiving), run a sanity query, record the
//! measured RTO and the outcome, and clean up. A backup nobody has restored is
//! a hope; this makes it a measurement.

use crate::backup::RestoreRequest;
use crate::names;
use crate::service::{now_unix, WalError, WalService};
use crate::verify::{split, walk};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Under the state directory: the drills' scratch data directories.
pub const DRILL_DIR: &str = "wal-drill";
/// How long the throwaway server may take to replay and promote.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    pub system_identifier: Option<String>,
    /// The `restore_command` the throwaway server uses (agentctl passes its own
    /// path and socket); absent (the schedule): [`default_restore_command`].
    #[serde(default)]
    pub restore_command: Option<String>,
}

/// The agentctl installed beside this binary, finding the socket as it always
/// does (`$FLEET_AGENT_WAL_SOCKET`, the WAL unit's socket, the daemon's).
pub fn default_restore_command() -> String {
    let agentctl = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("agentctl")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/bin/agentctl"));
    format!("{} wal fetch %f %p", agentctl.display())
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct DrillReport {
    pub system_identifier: String,
    pub backup: Option<String>,
    pub ok: bool,
    /// From the start of the drill to the sanity query's answer: download,
    /// unpack, replay, promotion, first query.
    pub rto_seconds: f64,
    pub restore_seconds: f64,
    pub replay_seconds: f64,
    /// The newest segment in the archive, which replay must reach.
    pub expected_end: Option<String>,
    /// The last segment replay applied.
    pub replayed_to: Option<String>,
    /// The first segment replay needed and did not get.
    pub missing_segment: Option<String>,
    pub sanity: Option<String>,
    pub error: Option<String>,
}

/// The configuration the throwaway server runs with instead of the cluster's
/// own: reachable only on a socket inside the scratch directory, never
/// archiving (it must not push its new timeline into the archive it tests), no
/// hot standby (so the original's max_connections and friends do not matter and
/// `pg_ctl -w` returns once recovery has ended and it has promoted).
fn drill_conf(scratch: &Path) -> String {
    format!(
        "listen_addresses = ''\nport = 5432\nunix_socket_directories = '{dir}'\n\
         hba_file = '{dir}/drill_hba.conf'\nident_file = '{dir}/drill_ident.conf'\n\
         archive_mode = off\nhot_standby = off\nmax_connections = 10\nshared_buffers = '32MB'\n\
         shared_preload_libraries = ''\nfsync = off\nlogging_collector = off\n",
        dir = scratch.display()
    )
}

struct Owner {
    uid: u32,
    gid: u32,
}

/// The PostgreSQL user to run the throwaway server as: ourselves, unless we are
/// root (PostgreSQL refuses to run as root), then `wal.postgres_user`.
fn server_owner(user: &str) -> Result<Option<Owner>, WalError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| WalError::Internal(format!("looking up user {user}: {e}")))?
        .ok_or_else(|| WalError::Internal(format!("wal.postgres_user `{user}` does not exist")))?;
    Ok(Some(Owner {
        uid: found.uid.as_raw(),
        gid: found.gid.as_raw(),
    }))
}

fn pg_command(bin: &Path, program: &str, owner: &Option<Owner>, cwd: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin.join(program));
    cmd.current_dir(cwd);
    if let Some(o) = owner {
        cmd.uid(o.uid).gid(o.gid);
    }
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<String, WalError> {
    let out = cmd
        .output()
        .map_err(|e| WalError::Internal(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(WalError::Internal(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The last lines of the throwaway server's log, for the report.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl WalService {
    fn drill_parent(&self) -> PathBuf {
        self.config
            .drill_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join(DRILL_DIR))
    }

    /// Runs one drill; the report says how it went (an `Err` only for a
    /// request that cannot start, e.g. a second drill at once).
    pub async fn drill(&self, request: DrillRequest) -> Result<DrillReport, WalError> {
        let Ok(_running) = self.drill_lock.try_lock() else {
            return Err(WalError::BadRequest(
                "a restore drill is already running".into(),
            ));
        };
        let began = Instant::now();
        let given = match &request.system_identifier {
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                WalError::BadRequest(format!("system identifier `{s}` is not a number"))
            })?),
            None => None,
        };
        let sysid = self.restore_sysid(given).await?;
        let scratch = self.drill_parent().join(format!("{sysid}-{}", now_unix()));
        let mut report = DrillReport {
            system_identifier: sysid.to_string(),
            ..Default::default()
        };
        let outcome = self
            .drill_steps(sysid, &scratch, &request, &mut report, began)
            .await;
        if let Err(e) = outcome {
            report.error = Some(e.to_string());
        }
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        report.ok = report.error.is_none();
        if report.ok {
            report.rto_seconds = report.rto_seconds.max(0.0);
        }
        let c = &self.counters;
        c.drill_ok.store(u64::from(report.ok), Ordering::Relaxed);
        c.drill_rto_millis
            .store((report.rto_seconds * 1000.0) as u64, Ordering::Relaxed);
        c.drill_unix.store(now_unix(), Ordering::Relaxed);
        if report.ok {
            (self.events)(
                "wal_drill_ok",
                &format!(
                    "restore drill of cluster {sysid}: base backup {} restored and replayed to {} in {:.1}s (RTO), sanity query answered",
                    report.backup.as_deref().unwrap_or("-"),
                    report.replayed_to.as_deref().unwrap_or("-"),
                    report.rto_seconds
                ),
            );
        } else {
            (self.events)(
                "wal_drill_failed",
                &format!(
                    "restore drill of cluster {sysid} failed: {}",
                    report.error.as_deref().unwrap_or("?")
                ),
            );
        }
        Ok(report)
    }

    async fn drill_steps(
        &self,
        sysid: u64,
        scratch: &Path,
        request: &DrillRequest,
        report: &mut DrillReport,
        began: Instant,
    ) -> Result<(), WalError> {
        let backups = self.list_backups(sysid).await?;
        let newest = backups
            .last()
            .ok_or_else(|| WalError::NotFound(format!("a base backup of cluster {sysid}")))?;
        report.backup = Some(newest.id.clone());
        let segment_bytes = newest.wal_segment_bytes;
        // What replay must reach: the newest archived segment.
        let prefix = format!("{sysid}/wal/");
        let archived: Vec<String> = self
            .target
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|e| {
                e.key
                    .strip_prefix(&prefix)
                    .and_then(|k| k.strip_suffix(".zst"))
                    .map(str::to_string)
            })
            .collect();
        let chain = walk(&archived, Some(&newest.start_wal), segment_bytes);
        report.expected_end = chain.to.clone();

        let owner = server_owner(&self.config.postgres_user)?;
        let parent = self.drill_parent();
        std::fs::create_dir_all(&parent)
            .map_err(|e| WalError::Internal(format!("{}: {e}", parent.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The server's user must reach its directory inside ours.
            let _ = std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o711));
        }
        std::fs::create_dir(scratch)
            .map_err(|e| WalError::Internal(format!("{}: {e}", scratch.display())))?;
        if let Some(o) = &owner {
            std::os::unix::fs::chown(scratch, Some(o.uid), Some(o.gid))
                .map_err(|e| WalError::Internal(format!("{}: {e}", scratch.display())))?;
        }
        let data = scratch.join("data");
        std::fs::create_dir(&data)
            .map_err(|e| WalError::Internal(format!("{}: {e}", data.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700));
        }
        if let Some(o) = &owner {
            std::os::unix::fs::chown(&data, Some(o.uid), Some(o.gid))
                .map_err(|e| WalError::Internal(format!("{}: {e}", data.display())))?;
        }
        self.restore(RestoreRequest {
            to: data.clone(),
            target_time: None,
            system_identifier: Some(sysid.to_string()),
            backup: Some(newest.id.clone()),
            restore_command: request
                .restore_command
                .clone()
                .unwrap_or_else(default_restore_command),
        })
        .await?;
        report.restore_seconds = began.elapsed().as_secs_f64();

        for (file, text) in [
            ("drill.conf", drill_conf(scratch)),
            ("drill_hba.conf", "local all all trust\n".to_string()),
            ("drill_ident.conf", String::new()),
        ] {
            let path = scratch.join(file);
            std::fs::write(&path, text)
                .map_err(|e| WalError::Internal(format!("{}: {e}", path.display())))?;
            if let Some(o) = &owner {
                let _ = std::os::unix::fs::chown(&path, Some(o.uid), Some(o.gid));
            }
        }
        let version = std::fs::read_to_string(data.join("PG_VERSION"))
            .map_err(|e| WalError::Internal(format!("PG_VERSION of the restored tree: {e}")))?;
        let bin = match &self.config.pg_bin_dir {
            Some(dir) => dir.clone(),
            None => PathBuf::from(format!("/usr/lib/postgresql/{}/bin", version.trim())),
        };
        let log = scratch.join("drill.log");
        let mut start = pg_command(&bin, "pg_ctl", &owner, scratch);
        start
            .args(["-w", "-t", &REPLAY_TIMEOUT.as_secs().to_string(), "-l"])
            .arg(&log)
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!("-c config_file={}/drill.conf", scratch.display()))
            .arg("start");
        let started = crate::service::blocking(move || run(start, "pg_ctl start")).await;
        let result = match started {
            Ok(_) => {
                self.drill_query(&bin, &owner, scratch, segment_bytes, report, began)
                    .await
            }
            Err(e) => Err(WalError::Internal(format!(
                "{e}; server log: {}",
                log_tail(&log)
            ))),
        };
        let mut stop = pg_command(&bin, "pg_ctl", &owner, scratch);
        stop.args(["-w", "-m", "immediate", "-D"])
            .arg(&data)
            .arg("stop");
        let _ = crate::service::blocking(move || run(stop, "pg_ctl stop").map(|_| ())).await;
        result
    }

    /// The sanity query, and whether replay reached the newest archived segment.
    async fn drill_query(
        &self,
        bin: &Path,
        owner: &Option<Owner>,
        scratch: &Path,
        segment_bytes: u64,
        report: &mut DrillReport,
        began: Instant,
    ) -> Result<(), WalError> {
        // pg_ctl may return while recovery still runs (no hot standby: no
        // connections until it has promoted); ask until it answers, as long as
        // the server lives.
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        let user = self.config.postgres_user.clone();
        let answer = loop {
            let mut psql = pg_command(bin, "psql", owner, scratch);
            psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(scratch)
                .args(["-p", "5432", "-U", &user, "-d", "postgres", "-c"])
                .arg(
                    "SELECT pg_is_in_recovery(), pg_walfile_name(pg_last_wal_replay_lsn()), \
                     (SELECT count(*) FROM pg_database), (SELECT count(*) FROM pg_class)",
                );
            match crate::service::blocking(move || run(psql, "the sanity query")).await {
                Ok(answer) => break answer,
                Err(e) => {
                    let mut status = pg_command(bin, "pg_ctl", owner, scratch);
                    status.arg("-D").arg(scratch.join("data")).arg("status");
                    let alive =
                        crate::service::blocking(move || run(status, "pg_ctl status").map(|_| ()))
                            .await
                            .is_ok();
                    if !alive || Instant::now() > deadline {
                        return Err(WalError::Internal(format!(
                            "{e}; server log: {}",
                            log_tail(&scratch.join("drill.log"))
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        report.replay_seconds = began.elapsed().as_secs_f64() - report.restore_seconds;
        report.rto_seconds = began.elapsed().as_secs_f64();
        report.sanity = Some(answer.clone());
        let fields: Vec<&str> = answer.split('|').collect();
        let (Some(&"f"), Some(replayed)) = (fields.first(), fields.get(1)) else {
            return Err(WalError::Internal(format!(
                "the sanity query answered `{answer}`, not a promoted server"
            )));
        };
        if fields
            .get(2)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            == 0
        {
            return Err(WalError::Internal(format!(
                "the sanity query found no database: `{answer}`"
            )));
        }
        report.replayed_to = Some(replayed.to_string());
        let reached = split(replayed, segment_bytes).map(|(_, p)| p);
        let expected = report
            .expected_end
            .as_deref()
            .and_then(|e| split(e, segment_bytes))
            .map(|(_, p)| p);
        if let (Some(reached), Some(expected)) = (reached, expected) {
            if reached < expected {
                // Recovery asked for the segment after the last one it applied
                // and was told it is not archived.
                // Named on the archived timeline (the promoted server's own
                // name for it carries the new timeline it just created).
                let next = names::next_segments(replayed, 1, segment_bytes)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                let tli = report
                    .expected_end
                    .as_deref()
                    .and_then(|e| e.get(..8))
                    .unwrap_or("");
                let missing = format!("{tli}{}", next.get(8..).unwrap_or(""));
                report.missing_segment = Some(missing.clone());
                return Err(WalError::NotFound(format!(
                    "WAL segment {missing}: replay stopped at {replayed}, the archive goes on to {}",
                    report.expected_end.as_deref().unwrap_or("?")
                )));
            }
        }
        Ok(())
    }
}
