//! `fleet-agent-wal [--config PATH]`: the WAL service alone, what
//! `fleet-agentd --config PATH wal-serve` runs, in a binary that links only
//! the WAL path (no supervisor, Docker client, SQLite store or clap): its
//! .text is 9.0 MB against fleet-agentd's 17.0 MB, and the service maps
//! fewer pages of code (docs/benchmarks.md, rss13). Installed as
//! /usr/lib/fleet-agent/fleet-agent-wal, run by fleet-agent-wal.service.
//! Exit codes as fleet-agentd's: 0, 1 failure, 64 bad config or arguments.

use fleet_agentd::EXIT_CONFIG;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: fleet-agent-wal [--config PATH]\n\
    The WAL service of fleet-agent-wal.service, as `fleet-agentd wal-serve` (docs/wal.md).\n\
    --config: agent.toml (default: $FLEET_AGENT_CONFIG, then /etc/fleet-agent/agent.toml).";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let mut config: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            // A `--config` without its path is a usage error, not the default config.
            Some("--config") => match args.next() {
                Some(path) => config = Some(PathBuf::from(path)),
                None => {
                    eprintln!("fleet-agent-wal: --config needs a path\n{USAGE}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            Some("--version") => {
                println!("fleet-agent-wal {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let (config, source) = match fleet_model::Config::locate(config.as_deref()) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("fleet-agent-wal: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    fleet_agentd::logging::init(&config.log.level, &config.log.format);
    fleet_agentd::run_to_exit("fleet-agent-wal", fleet_agentd::wal_serve(config, source))
}
