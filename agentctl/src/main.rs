//! `agentctl`: the operator's command line on the box. Talks to fleet-agentd over
//! its unix socket. Tables for people, `--json` for scripts; exit 0 only on
//! success, 1 on failure, 64 on bad arguments.

/// `println!` that does not panic when stdout is a closed pipe (`agentctl status | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod client;
mod commands;
mod output;
mod progress;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control the fleet-agent daemon on this host",
    after_help = "Examples:
  agentctl status                       # every department, its port and health
  agentctl apply -f hr.toml --wait      # add or change a department
  agentctl logs hr -f                   # its container's output
  agentctl events -n 20                 # what happened lately
  agentctl doctor                       # what is wrong with this host
  agentctl wal status                   # the WAL archive (hosts with [wal])"
)]
pub struct Cli {
    /// Control socket (default: $FLEET_AGENT_SOCKET, /run/fleet-agent/agentctl.sock, or the embedded default's).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Node summary and one row per department.
    Status(commands::status::Args),
    /// Live CPU, memory, health and restarts of every department (like `docker stats`).
    Top(commands::top::Args),
    /// One department in depth: spec (secrets masked), container, probes, events, restarts.
    Show(commands::show::Args),
    /// Apply department specs from a TOML file or a directory of them (standalone mode).
    Apply(commands::apply::Args),
    /// Stop and remove a department's container and free its port (standalone mode).
    Delete(commands::delete::Args),
    /// Start a stopped department.
    Start(commands::control::Args),
    /// Stop a department (SIGTERM, then SIGKILL after stop_timeout); it stays stopped.
    Stop(commands::control::Args),
    /// Restart a department; also un-parks a crash-looping one.
    Restart(commands::control::Args),
    /// Go back to the department's previous spec.
    Rollback(commands::control::Args),
    /// Announce a department's next image: pulled now, kept by image collection while announced.
    Prepull(commands::prepull::Args),
    /// A department's container logs.
    Logs(commands::logs::Args),
    /// The event log; -f follows it.
    Events(commands::events::Args),
    /// The host port pool and who holds each port.
    Ports(commands::ports::Args),
    /// HAProxy backend lines (both ports, checks, agent-check) for this node's departments.
    HaproxyConfig(commands::haproxy::Args),
    /// Check Docker, config, disk, clock sync, coordinator, WAL archive and the daemon, and say what is wrong.
    Doctor(commands::doctor::Args),
    /// PostgreSQL WAL archive: push (archive_command), fetch (restore_command), status.
    #[command(subcommand)]
    Wal(commands::wal::WalCommand),
    /// Base backups of the PostgreSQL cluster: create, list, prune.
    #[command(subcommand)]
    Backup(commands::wal::BackupCommand),
    /// Restore a base backup into a new data directory, set up to replay WAL to a target time.
    Restore(commands::wal::RestoreArgs),
    /// Shell completion script (used by the package build).
    #[command(hide = true)]
    Completions(commands::generate::CompletionsArgs),
    /// Man pages (used by the package build).
    #[command(hide = true)]
    Man(commands::generate::ManArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(fleet_model::config::default_client_socket);
    let client = client::Client::new(socket);
    let result = match cli.command {
        Command::Status(args) => commands::status::run(&client, args).await,
        Command::Top(args) => commands::top::run(&client, args).await,
        Command::Show(args) => commands::show::run(&client, args).await,
        Command::Apply(args) => commands::apply::run(&client, args).await,
        Command::Delete(args) => commands::delete::run(&client, args).await,
        Command::Start(args) => commands::control::run(&client, "start", args).await,
        Command::Stop(args) => commands::control::run(&client, "stop", args).await,
        Command::Restart(args) => commands::control::run(&client, "restart", args).await,
        Command::Rollback(args) => commands::control::run(&client, "rollback", args).await,
        Command::Prepull(args) => commands::prepull::run(&client, args).await,
        Command::Logs(args) => commands::logs::run(&client, args).await,
        Command::Events(args) => commands::events::run(&client, args).await,
        Command::Ports(args) => commands::ports::run(&client, args).await,
        Command::HaproxyConfig(args) => commands::haproxy::run(&client, args).await,
        Command::Doctor(args) => commands::doctor::run(&client, args).await,
        Command::Wal(command) => {
            commands::wal::wal(&commands::wal::client(cli.socket), command).await
        }
        Command::Backup(command) => {
            commands::wal::backup(&commands::wal::client(cli.socket), command).await
        }
        Command::Restore(args) => {
            commands::wal::restore(&commands::wal::client(cli.socket), args).await
        }
        Command::Completions(args) => commands::generate::completions(args),
        Command::Man(args) => commands::generate::man(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentctl: {e:#}");
            match e.downcast_ref::<commands::wal::Exit>() {
                Some(exit) => ExitCode::from(exit.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}
