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
    detail: String,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut checks = Vec::new();
    let config = match fleet_model::Config::locate(args.config.as_deref()) {
        Ok((config, source)) => {
            checks.push(Check {
                name: "config",
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
                ok: true,
                detail: format!(
                    "fleet-agentd {} answers on {}",
                    node.version,
                    client.socket().display()
                ),
            });
            checks.push(Check {
                name: "docker",
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
    let clock_ok = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() > 1_700_000_000)
        .unwrap_or(false);
    checks.push(Check {
        name: "clock",
        ok: clock_ok,
        detail: if clock_ok {
            "system clock looks sane".into()
        } else {
            "system clock is before 2023; enable NTP (timedatectl set-ntp true)".into()
        },
    });
    let failed = checks.iter().filter(|c| !c.ok).count();
    if args.json.json {
        crate::output::json(&checks)?;
    } else {
        for c in &checks {
            say!(
                "{} {:<12} {}",
                if c.ok { "ok  " } else { "FAIL" },
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
            ok: true,
            detail: format!("{shown} is closed to others; run doctor as root to check its content"),
        },
        Err(e) => fail(format!("{shown}: {e}")),
    }
}
