//! `agentctl doctor`: checks what usually goes wrong and says how to fix it.
//! Each check prints one line; the exit code is 1 if any failed.

use super::JsonFlag;
use crate::client::Client;
use fleet_model::api::NodeStatus;
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
            if let Some(c) = &node.coordinator {
                checks.push(Check {
                    name: "coordinator",
                    ok: !c.stale,
                    detail: if c.stale {
                        format!(
                            "{} not reached recently ({}); the node keeps its last desired state",
                            c.url,
                            c.last_error.clone().unwrap_or_default()
                        )
                    } else {
                        format!("{} reached", c.url)
                    },
                });
            }
        }
        Err(e) => checks.push(Check {
            name: "daemon",
            ok: false,
            detail: format!("{e:#}"),
        }),
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
