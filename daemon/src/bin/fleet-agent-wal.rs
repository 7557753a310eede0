//! `fleet-agent-wal [--config PATH]`: the WAL service alone, what
//! `fleet-agentd --config PATH wal-serve` runs, in a binary that links only
//! the WAL path (no supervisor, Docker client, SQLite store or clap): its
//! .text is 9.0 MB against fleet-agentd's 17.0 MB, and the service maps
//! fewer pages of code (docs/benchmarks.md, rss13). Installed as
//! /usr/lib/fleet-agent/fleet-agent-wal, run by fleet-agent-wal.service.
//! Exit codes as fleet-agentd's: 0, 1 failure, 64 bad config or arguments.

use fleet_agentd::EXIT_CONFIG;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: fleet-agent-wal [--config PATH]\n\
    The WAL service of fleet-agent-wal.service, as `fleet-agentd wal-serve` (docs/wal.md).\n\
    --config: agent.toml (default: $FLEET_AGENT_CONFIG, then /etc/fleet-agent/agent.toml).";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Serve { config: Option<PathBuf> },
    Version,
    Help,
}

/// The command line (without the program name), or what is wrong with it.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, String> {
    let mut args = args.into_iter();
    let mut config = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            // A `--config` without its path is a usage error, not the default config.
            Some("--config") => match args.next() {
                Some(path) => config = Some(PathBuf::from(path)),
                None => return Err("--config needs a path".into()),
            },
            Some("--version") => return Ok(Invocation::Version),
            Some("--help" | "-h") => return Ok(Invocation::Help),
            _ => return Err(format!("unknown argument {}", arg.to_string_lossy())),
        }
    }
    Ok(Invocation::Serve { config })
}

fn main() -> ExitCode {
    let config = match parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Serve { config }) => config,
        Ok(Invocation::Version) => {
            println!("fleet-agent-wal {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("fleet-agent-wal: {problem}\n{USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
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

#[cfg(test)]
mod tests {
    use super::{parse, Invocation};
    use std::ffi::OsString;
    use std::path::PathBuf;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_unit_s_command_line_serves_its_config_copy() {
        assert_eq!(
            parse(args(&["--config", "/run/fleet-agent-wal/agent.toml"])),
            Ok(Invocation::Serve {
                config: Some(PathBuf::from("/run/fleet-agent-wal/agent.toml"))
            })
        );
        assert_eq!(parse(args(&[])), Ok(Invocation::Serve { config: None }));
        assert_eq!(parse(args(&["--version"])), Ok(Invocation::Version));
        assert_eq!(parse(args(&["-h"])), Ok(Invocation::Help));
    }

    #[test]
    fn a_config_flag_without_its_path_or_an_unknown_argument_is_refused() {
        assert_eq!(
            parse(args(&["--config"])),
            Err("--config needs a path".to_string())
        );
        assert_eq!(
            parse(args(&["wal-serve"])),
            Err("unknown argument wal-serve".to_string())
        );
    }
}
