//! `agentctl doctor`: checks what usually goes wrong and says how to fix it.
//! Each check prints one line; the exit code is 1 if any failed.

use super::JsonFlag;
use crate::client::Client;
use fleet_model::api::{CoordinatorStatus, NodeStatus};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Config file to check (default: as the daemon finds it).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    json: JsonFlag,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// Passed without proof (doctor could not look); never fails the run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    warn: bool,
    detail: String,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let config = match fleet_model::Config::locate(args.config.as_deref()) {
        Ok((config, source)) => {
            checks.push(Check {
                name: "config",
                warn: false,
                ok: true,
                detail: match source {
                    fleet_model::config::ConfigSource::File(p) => {
                        format!("{} is valid", p.display())
                    }
                    fleet_model::config::ConfigSource::EmbeddedDefault => {
                        "no config file; the embedded default is in use".into()
                    }
                },
            });
            Some(config)
        }
        Err(e) => {
            checks.push(Check {
                name: "config",
                warn: false,
                ok: false,
                detail: format!("{e}; fix it, then run `fleet-agentd check-config`"),
            });
            None
        }
    };
    match client.get::<NodeStatus>("/v1/node").await {
        Ok(node) => {
            checks.push(Check {
                name: "daemon",
                warn: false,
                ok: true,
                detail: format!(
                    "fleet-agentd {} answers on {}",
                    node.version,
                    client.socket().display()
                ),
            });
            checks.push(Check {
                name: "docker",
                warn: false,
                ok: node.docker_reachable,
                detail: if node.docker_reachable {
                    "the daemon reaches the Docker engine".into()
                } else {
                    "the daemon cannot reach Docker; check `systemctl status docker` and [docker] socket".into()
                },
            });
            if let Some(d) = &node.desired_state {
                checks.push(Check {
                    name: "desired state",
                    warn: false,
                    ok: d.valid,
                    detail: match &d.problem {
                        None => format!(
                            "{} and the applied specs were accepted at the last load",
                            config
                                .as_ref()
                                .map(|c| c.departments_dir.display().to_string())
                                .unwrap_or_else(|| "departments_dir".into())
                        ),
                        Some(problem) => format!(
                            "refused, the departments keep their last applied specs and stay supervised: {problem}. Fix the file named, then `systemctl reload fleet-agentd`"
                        ),
                    },
                });
            }
            if let Some(r) = &node.state_rebuilt {
                checks.push(Check {
                    name: "state",
                    warn: false,
                    ok: false,
                    detail: format!(
                        "at start state.db was {}{}, so the daemon rebuilt the node from Docker's labels ({} department(s) recovered{}); operator stops and restart history from before are gone. Check the departments with `agentctl status`{}; this clears at the next daemon restart",
                        if r.reason == "corrupt" { "unreadable" } else { "missing" },
                        r.moved_to
                            .as_deref()
                            .map(|p| format!(" (kept as {p})"))
                            .unwrap_or_default(),
                        r.recovered.len(),
                        if r.not_recovered.is_empty() {
                            String::new()
                        } else {
                            format!("; left as they are: {}", r.not_recovered.join("; "))
                        },
                        if r.moved_to.is_some() {
                            ", then inspect or delete the kept file"
                        } else {
                            ""
                        }
                    ),
                });
            }
            if let Some(c) = &node.coordinator {
                checks.push(coordinator_check(c, config.as_ref()));
                if let Some(r) = &c.last_refusal {
                    checks.push(Check {
                        name: "desired state",
                        warn: false,
                        ok: false,
                        detail: format!(
                            "the node refused the coordinator's document{}: {}; it keeps revision {}. Fix the document on the coordinator",
                            r.revision.map(|v| format!(" (revision {v})")).unwrap_or_default(),
                            r.reason,
                            node.applied_revision
                                .map(|v| v.to_string())
                                .unwrap_or_else(|| "none".into())
                        ),
                    });
                }
            }
        }
        Err(e) => checks.push(Check {
            name: "daemon",
            warn: false,
            ok: false,
            detail: format!("{e:#}"),
        }),
    }
    if let Some(path) = config
        .as_ref()
        .and_then(|c| c.coordinator.as_ref())
        .and_then(|c| c.token_file.as_deref())
    {
        checks.push(token_check(path));
    }
    if let Some(config) = &config {
        let (free, total) = disk_space(&config.state_dir);
        let ok = total == 0 || free * 10 >= total;
        checks.push(Check {
            name: "disk",
            ok,
            warn: false,
            detail: if total == 0 {
                format!("{} does not exist yet", config.state_dir.display())
            } else {
                format!(
                    "{} free of {} at {}{}",
                    crate::output::bytes(free),
                    crate::output::bytes(total),
                    config.state_dir.display(),
                    if ok { "" } else { "; free some space" }
                )
            },
        });
    }
    checks.extend(archive_checks(client, config.as_ref()).await);
    checks.push(clock_check(&read_clock().await));
    let failed = checks.iter().filter(|c| !c.ok).count();
    if args.json.json {
        crate::output::json(&checks)?;
    } else {
        for c in &checks {
            say!(
                "{} {:<12} {}",
                match (c.ok, c.warn) {
                    (false, _) => "FAIL",
                    (true, true) => "warn",
                    (true, false) => "ok  ",
                },
                c.name,
                c.detail
            );
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn disk_space(path: &std::path::Path) -> (u64, u64) {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => (
            s.blocks_available() * s.fragment_size(),
            s.blocks() * s.fragment_size(),
        ),
        Err(_) => (0, 0),
    }
}

/// Whether the daemon reaches its coordinator, from what the daemon last saw:
/// the age of the last completed sync against three poll intervals (when the
/// daemon calls it stale).
fn coordinator_check(c: &CoordinatorStatus, config: Option<&fleet_model::Config>) -> Check {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let poll = config
        .and_then(|c| c.coordinator.as_ref())
        .map(|c| c.poll_interval);
    let age = c.last_success_at.map(|at| (now - at).max(0) as u64);
    let why = c
        .last_error
        .as_deref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    let detail = match (age, c.stale) {
        (Some(age), false) => format!(
            "{} reached, last sync {} ago{}",
            c.url,
            crate::output::duration(age),
            poll.map(|p| format!(", polled every {}", humantime::format_duration(p)))
                .unwrap_or_default()
        ),
        (None, false) => format!("{} not synced yet since the daemon started{why}", c.url),
        (Some(age), true) => format!(
            "{} not reached for {} ({} failed syncs){why}; the node keeps enforcing its last desired state. Check the URL, the network and the token",
            c.url,
            crate::output::duration(age),
            c.consecutive_failures
        ),
        (None, true) => format!(
            "{} never reached since the daemon started ({} failed syncs){why}; the node keeps enforcing its last desired state. Check the URL, the network and the token",
            c.url, c.consecutive_failures
        ),
    };
    Check {
        name: "coordinator",
        warn: false,
        ok: !c.stale,
        detail,
    }
}

/// `[coordinator] token_file` as the daemon reads it: present, no group write
/// and no access for others (the package's layout is root:fleet-agent 0640),
/// holding a token line. The daemon reads it before every sync, so a broken
/// file fails the next one.
fn token_check(path: &std::path::Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let fail = |detail: String| Check {
        name: "coord. token",
        warn: false,
        ok: false,
        detail,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return fail(format!(
                "{shown}: {e}; create it (mode 0640, group fleet-agent) with the token the coordinator issued"
            ))
        }
    };
    if meta.permissions().mode() & 0o037 != 0 {
        return fail(format!(
            "{shown} is open to others (group write or any access for others) and the daemon refuses it; run `chmod 640 {shown}`"
        ));
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let has_token = text
                .lines()
                .map(str::trim)
                .any(|l| !l.is_empty() && !l.starts_with('#'));
            if has_token {
                Check {
                    name: "coord. token",
                    warn: false,
                    ok: true,
                    detail: format!("{shown} holds a token and is closed to others"),
                }
            } else {
                fail(format!(
                    "{shown} holds no token; put the coordinator's token on its first line"
                ))
            }
        }
        // A group member running doctor may not read a 0600 file the daemon
        // owns, which says nothing about the daemon.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check {
            name: "coord. token",
            warn: false,
            ok: true,
            detail: format!("{shown} is closed to others; run doctor as root to check its content"),
        },
        Err(e) => fail(format!("{shown}: {e}")),
    }
}

/// The WAL archive as the WAL service last probed it (`GET /v1/wal`, on the
/// daemon's socket: the daemon relays it from fleet-agent-wal.service when
/// `wal.socket` is set), then, from the same answer, how PostgreSQL is set to
/// archive. None when this node archives no WAL.
async fn archive_checks(client: &Client, config: Option<&fleet_model::Config>) -> Vec<Check> {
    let Some(wal) = config.and_then(|c| c.wal.as_ref()) else {
        return Vec::new();
    };
    let status = client.get::<serde_json::Value>("/v1/wal").await;
    let archiving = status
        .as_ref()
        .ok()
        .and_then(|s| serde_json::from_value(s["archiving"].clone()).ok())
        .map(|a| archiving_verdict(&a));
    let mut checks = vec![archive_verdict(&wal.target, wal.socket.is_some(), status)];
    checks.extend(archiving);
    checks
}

/// Fails on what makes PostgreSQL archive nothing; a trap passes as `warn`.
fn archiving_verdict(a: &fleet_model::archiving::Archiving) -> Check {
    use fleet_model::archiving::Severity;
    let worst = a.findings.iter().map(|f| f.severity).min();
    let mut detail = format!(
        "PostgreSQL archives through {}",
        super::wal::archiving_line(a)
    );
    for f in &a.findings {
        detail.push_str(&format!(
            "; {}: {}",
            super::wal::severity_word(f.severity),
            f.text
        ));
    }
    Check {
        name: "pg archiving",
        ok: worst != Some(Severity::Problem),
        warn: worst == Some(Severity::Warning),
        detail,
    }
}

fn archive_verdict(
    target: &str,
    separate_unit: bool,
    status: anyhow::Result<serde_json::Value>,
) -> Check {
    let fail = |detail: String| Check {
        name: "archive",
        warn: false,
        ok: false,
        detail,
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return fail(format!(
                "the WAL service does not answer ({e:#}); {}",
                if separate_unit {
                    "check `systemctl status fleet-agent-wal` and `journalctl -u fleet-agent-wal`"
                } else {
                    "check `systemctl status fleet-agentd` and the [wal] table"
                }
            ))
        }
    };
    let archive = &status["archive"];
    let reachable = archive["reachable"].as_bool();
    let target = status["target"].as_str().unwrap_or(target);
    match reachable {
        Some(true) => Check {
            name: "archive",
            warn: false,
            ok: true,
            detail: format!(
                "{target} answers (probe took {} ms)",
                archive["latency_ms"].as_u64().unwrap_or(0)
            ),
        },
        Some(false) => {
            let why = archive["error"].as_str().unwrap_or("no reason given");
            let fix = if target.starts_with("s3://") {
                "check [wal.s3] endpoint and region, the bucket, the credentials file, the ca_file if the store has a private CA (a TLS or certificate error: wal.s3.ca_file must hold the CA that signed the endpoint's certificate) and the network to the store"
            } else {
                "check that the directory exists, is mounted and is writable by the WAL service's user (postgres under fleet-agent-wal.service)"
            };
            fail(format!(
                "{target} is not reachable: {why}; WAL is not being archived, {fix}, then run `agentctl wal status`"
            ))
        }
        None => fail(format!(
            "the WAL service did not report on {target}; it may be older than this agentctl: upgrade fleet-agent and restart it"
        )),
    }
}

/// What the host says about its clock's synchronisation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClockSync {
    /// `timedatectl show`: `NTP` (a sync service is enabled) and
    /// `NTPSynchronized` (the kernel's clock is not marked unsynchronised).
    Timedated { ntp: Option<bool>, synced: bool },
    /// `chronyc tracking` on a host without timedated: its leap status.
    Chrony { leap_status: String },
    /// Nothing could tell; why.
    Unknown(String),
}

struct Clock {
    /// Seconds since the Unix epoch, 0 if before it.
    now_unix: u64,
    sync: ClockSync,
}

/// timedatectl first (systemd-timesyncd, chrony and ntpd all clear the
/// kernel's unsynchronised flag, which is what timedated reports); chronyc on
/// a host without timedated or D-Bus.
async fn read_clock() -> Clock {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let timedatectl = query(
        "timedatectl",
        &["show", "--property=NTP", "--property=NTPSynchronized"],
    )
    .await;
    let sync = match timedatectl.as_deref().map(parse_timedatectl) {
        Ok(Some(sync)) => sync,
        other => {
            let why = match other {
                Err(e) => e.clone(),
                _ => "timedatectl gave no NTPSynchronized".into(),
            };
            match query("chronyc", &["-n", "tracking"]).await {
                Ok(out) => match parse_chrony(&out) {
                    Some(sync) => sync,
                    None => {
                        ClockSync::Unknown(format!("{why}; chronyc tracking gave no leap status"))
                    }
                },
                // systemd-timesyncd touches this on every synchronisation,
                // readable without D-Bus.
                Err(_) if std::path::Path::new(TIMESYNCD_SYNCHRONIZED).exists() => {
                    ClockSync::Timedated {
                        ntp: Some(true),
                        synced: true,
                    }
                }
                Err(e) => ClockSync::Unknown(format!("{why}; {e}")),
            }
        }
    };
    Clock { now_unix, sync }
}

/// Runs a read-only query command with a short deadline, its stdout or why not.
async fn query(program: &str, args: &[&str]) -> Result<String, String> {
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("`{program}` gave no answer within 5s"))?
    .map_err(|e| format!("`{program}`: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            err.lines().last().unwrap_or("").trim()
        ))
    }
}

fn parse_timedatectl(out: &str) -> Option<ClockSync> {
    let value = |key: &str| {
        out.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim() == "yes")
    };
    Some(ClockSync::Timedated {
        ntp: value("NTP"),
        synced: value("NTPSynchronized")?,
    })
}

fn parse_chrony(out: &str) -> Option<ClockSync> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "Leap status")
        .map(|(_, v)| ClockSync::Chrony {
            leap_status: v.trim().to_string(),
        })
}

const TIMESYNCD_SYNCHRONIZED: &str = "/run/systemd/timesync/synchronized";

/// Wall clocks before this (2023-11-14) are certainly wrong: the build is newer.
const SANE_AFTER_UNIX: u64 = 1_700_000_000;

fn clock_check(clock: &Clock) -> Check {
    let fail = |detail: String| Check {
        name: "clock",
        warn: false,
        ok: false,
        detail,
    };
    if clock.now_unix < SANE_AFTER_UNIX {
        return fail(
            "the system clock is before 2023; set it and enable NTP: `timedatectl set-ntp true`"
                .into(),
        );
    }
    match &clock.sync {
        ClockSync::Timedated { synced: true, .. } => Check {
            name: "clock",
            warn: false,
            ok: true,
            detail: "synchronized with NTP (timedatectl: NTPSynchronized=yes)".into(),
        },
        ClockSync::Timedated { ntp: Some(false), .. } => fail(
            "not synchronized and no NTP service is enabled (timedatectl: NTP=no); run `timedatectl set-ntp true` (systemd-timesyncd) or install chrony".into(),
        ),
        ClockSync::Timedated { .. } => fail(
            "not synchronized yet although NTP is enabled (timedatectl: NTPSynchronized=no); check `timedatectl timesync-status` (or `chronyc sources`) and that UDP port 123 reaches the NTP servers".into(),
        ),
        ClockSync::Chrony { leap_status } if leap_status != "Not synchronised" => Check {
            name: "clock",
            warn: false,
            ok: true,
            detail: format!("synchronized by chrony (leap status: {leap_status})"),
        },
        ClockSync::Chrony { .. } => fail(
            "chrony runs but has not synchronized (leap status: Not synchronised); check `chronyc sources` and that UDP port 123 reaches the NTP servers".into(),
        ),
        // A host without timedated's D-Bus (a container, a minimal system)
        // need not be wrong: say so without failing the run.
        ClockSync::Unknown(why) => Check {
            name: "clock",
            ok: true,
            warn: true,
            detail: format!(
                "cannot tell whether the clock is synchronized ({why}); on a systemd host install systemd-timesyncd and run `timedatectl set-ntp true`, or install chrony"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn clock(sync: ClockSync) -> Check {
        clock_check(&Clock {
            now_unix: NOW,
            sync,
        })
    }

    #[test]
    fn timedatectl_output_is_read() {
        assert_eq!(
            parse_timedatectl("NTP=yes\nNTPSynchronized=no\n"),
            Some(ClockSync::Timedated {
                ntp: Some(true),
                synced: false
            })
        );
        assert_eq!(
            parse_timedatectl("NTPSynchronized=yes\n"),
            Some(ClockSync::Timedated {
                ntp: None,
                synced: true
            })
        );
        assert_eq!(parse_timedatectl(""), None);
        assert_eq!(
            parse_chrony("Reference ID    : 7F7F0101 ()\nLeap status     : Not synchronised\n"),
            Some(ClockSync::Chrony {
                leap_status: "Not synchronised".into()
            })
        );
    }

    #[test]
    fn a_synchronized_clock_passes() {
        for sync in [
            ClockSync::Timedated {
                ntp: Some(true),
                synced: true,
            },
            ClockSync::Chrony {
                leap_status: "Normal".into(),
            },
        ] {
            let c = clock(sync.clone());
            assert!(c.ok, "{sync:?}: {}", c.detail);
        }
    }

    #[test]
    fn an_unsynchronized_clock_fails_and_names_the_fix() {
        let cases = [
            (
                ClockSync::Timedated {
                    ntp: Some(false),
                    synced: false,
                },
                "timedatectl set-ntp true",
            ),
            (
                ClockSync::Timedated {
                    ntp: Some(true),
                    synced: false,
                },
                "UDP port 123",
            ),
            (
                ClockSync::Chrony {
                    leap_status: "Not synchronised".into(),
                },
                "chronyc sources",
            ),
        ];
        for (sync, fix) in cases {
            let c = clock(sync.clone());
            assert!(!c.ok, "{sync:?}");
            assert!(c.detail.contains(fix), "{sync:?}: {}", c.detail);
        }
        let unknown = clock(ClockSync::Unknown("no timedatectl".into()));
        assert!(unknown.ok && unknown.warn && unknown.detail.contains("install chrony"));
        let before = clock_check(&Clock {
            now_unix: 1_000_000_000,
            sync: ClockSync::Timedated {
                ntp: Some(true),
                synced: true,
            },
        });
        assert!(!before.ok && before.detail.contains("before 2023"));
    }

    #[test]
    fn pg_archiving_fails_on_a_problem_warns_on_a_trap_and_passes_a_hint() {
        use fleet_model::archiving::{judge, ArchiveSettings, MODULE_15};
        let on = |command: &str, library: &str| {
            archiving_verdict(&judge(
                &ArchiveSettings {
                    server_version_num: 150020,
                    archive_mode: "on".into(),
                    archive_command: command.into(),
                    archive_library: library.into(),
                    archive_timeout: "1min".into(),
                },
                true,
            ))
        };
        let module = on("", MODULE_15);
        assert!(module.ok && !module.warn, "{}", module.detail);
        assert_eq!(
            module.detail,
            format!("PostgreSQL archives through archive_library {MODULE_15} (PostgreSQL 15)")
        );
        let hint = on("agentctl wal push %p", "");
        assert!(hint.ok && !hint.warn);
        assert!(
            hint.detail
                .contains("; hint: on PostgreSQL 15, archive_library"),
            "{}",
            hint.detail
        );
        let both = on("agentctl wal push %p", MODULE_15);
        assert!(both.ok && both.warn, "{}", both.detail);
        let broken = on("agentctl wal push", "");
        assert!(!broken.ok, "{}", broken.detail);
        assert!(broken
            .detail
            .contains("PROBLEM: archive_command runs agentctl wal push without %p"));
    }

    #[test]
    fn an_archive_that_answers_passes_and_one_that_does_not_names_the_fix() {
        let ok = archive_verdict(
            "file:///a",
            true,
            Ok(
                serde_json::json!({"target": "file:///a", "archive": {"reachable": true, "latency_ms": 3}}),
            ),
        );
        assert!(ok.ok, "{}", ok.detail);
        let down = archive_verdict(
            "s3://b/p",
            true,
            Ok(
                serde_json::json!({"target": "s3://b/p", "archive": {"reachable": false, "error": "connection refused"}}),
            ),
        );
        assert!(!down.ok);
        assert!(
            down.detail.contains("connection refused") && down.detail.contains("[wal.s3]"),
            "{}",
            down.detail
        );
        let gone = archive_verdict("file:///a", true, Err(anyhow::anyhow!("503")));
        assert!(
            !gone.ok && gone.detail.contains("systemctl status fleet-agent-wal"),
            "{}",
            gone.detail
        );
    }
}
