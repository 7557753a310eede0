//! `fleet-agentd`: the node daemon. `fleet-agentd [--config PATH]` runs it;
//! `fleet-agentd check-config [--config-only]` validates the config and the
//! desired state.
//! Exit codes: 0 ok, 1 failure, 64 bad config or arguments.

use clap::{Parser, Subcommand};
use fleet_agentd::EXIT_CONFIG;
use fleet_model::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "fleet-agentd",
    version,
    about = "fleet-agent node daemon: runs department containers from a desired state",
    after_help = "Examples:
  fleet-agentd check-config                  # what the unit's ExecStartPre checks, and every spec
  fleet-agentd config show                   # the effective configuration, secrets masked
  fleet-agentd --config ./agent.toml --log-format text   # in the foreground, for a trial
  sudo systemctl reload fleet-agentd         # re-read departments.d after editing a spec
  journalctl -u fleet-agentd -f              # what the daemon does"
)]
struct Cli {
    /// Config file (default: $FLEET_AGENT_CONFIG, then /etc/fleet-agent/agent.toml, then the embedded default).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format: auto (journald under systemd, else text), text, json, journald.
    #[arg(long, global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the config, the files the WAL service reads ([wal.s3] ca_file,
    /// also for wal.postgres_user), and (standalone) the whole desired state
    /// as the daemon would judge it: spec files, capacity, ports, memory admission.
    #[command(after_help = "Examples:
  fleet-agentd check-config
  fleet-agentd check-config --config-only --config /etc/fleet-agent/agent.toml
  sudo -u fleet-agent fleet-agentd check-config   # as the unit runs it")]
    CheckConfig {
        /// Check agent.toml and the files it names (tokens, TLS) only: what the
        /// daemon needs to start (the unit's ExecStartPre; [wal.s3] ca_file only
        /// without wal.socket, when fleet-agentd runs the WAL service itself).
        #[arg(long)]
        config_only: bool,
    },
    /// Run only the WAL service ([wal]) on its own socket, as the PostgreSQL user
    /// (fleet-agent-wal.service; docs/wal.md).
    WalServe,
    /// The configuration: the effective one, or the generated reference.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Open state.db as the daemon does (migrating it to this version's schema)
    /// and print its schema version, the migrations applied, the departments
    /// and port leases it remembers. Run it as the daemon's user.
    #[command(after_help = "Examples:
  sudo -u fleet-agent fleet-agentd state     # after an upgrade: the schema and what was kept")]
    State,
    /// Write the man page fleet-agentd.8 (used by the package build).
    #[command(hide = true)]
    Man {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (every key, defaults filled in) as TOML;
    /// passwords in connection strings and URLs are masked.
    Show,
    /// Print the reference of every key with its default, generated from the
    /// configuration types (what docs/agent.toml.md and agent.toml(5) are).
    #[command(after_help = "Examples:
  fleet-agentd config reference > docs/agent.toml.md
  fleet-agentd config reference --spec > docs/department-spec.md
  fleet-agentd config reference --format man | man -l -")]
    Reference {
        /// The department spec instead of agent.toml.
        #[arg(long)]
        spec: bool,
        /// markdown or man.
        #[arg(long, default_value = "markdown", value_parser = ["markdown", "man"])]
        format: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Before the config is looked for: a build host's config is irrelevant.
    if let Some(Command::Man { out_dir }) = &cli.command {
        return write_man_page(out_dir);
    }
    if let Some(Command::Config(ConfigCommand::Reference { spec, format })) = &cli.command {
        use fleet_model::reference as r;
        let version = env!("CARGO_PKG_VERSION");
        let text = match (*spec, format.as_str()) {
            (false, "man") => r::config_man_page(version),
            (true, "man") => r::spec_man_page(version),
            (false, _) => r::config_markdown(),
            (true, _) => r::spec_markdown(),
        };
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    let (mut config, source) = match Config::locate(cli.config.as_deref()) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("fleet-agentd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(format) = cli.log_format {
        config.log.format = format;
        if let Err(problems) = config.validate() {
            eprintln!(
                "fleet-agentd: --log-format: {}",
                fleet_model::spec::join_fields(&problems)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Man { out_dir } => write_man_page(&out_dir),
        Command::Config(ConfigCommand::Show) => match config.redacted().to_toml() {
            Ok(text) => {
                match &source {
                    fleet_model::config::ConfigSource::File(path) => {
                        println!("# effective configuration from {}", path.display())
                    }
                    fleet_model::config::ConfigSource::EmbeddedDefault => {
                        println!("# effective configuration: the embedded default (no file)")
                    }
                }
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("fleet-agentd: cannot render the configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Config(ConfigCommand::Reference { .. }) => ExitCode::SUCCESS,
        Command::State => print_state(&config.state_dir),
        Command::CheckConfig { config_only } => match fleet_agentd::check_config(
            &config,
            &source,
            if config_only {
                fleet_agentd::CheckScope::ConfigOnly
            } else {
                fleet_agentd::CheckScope::Everything
            },
        ) {
            Ok(lines) => {
                for line in lines {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in problems {
                    eprintln!("fleet-agentd: {p}");
                }
                ExitCode::from(EXIT_CONFIG)
            }
        },
        command @ (Command::Run | Command::WalServe) => {
            fleet_agentd::logging::init(&config.log.level, &config.log.format);
            fleet_agentd::run_to_exit("fleet-agentd", async {
                match command {
                    Command::WalServe => fleet_agentd::wal_serve(config, source).await,
                    _ => fleet_agentd::run(config, source).await,
                }
            })
        }
    }
}

fn print_state(state_dir: &std::path::Path) -> ExitCode {
    use fleet_agentd::store::Store;
    let summary = Store::open(state_dir).and_then(|store| {
        let (version, migrations) = store.schema()?;
        let departments = store.departments()?;
        let leases = store.leases()?;
        Ok((
            store.origin().clone(),
            version,
            migrations,
            departments,
            leases,
        ))
    });
    match summary {
        Ok((origin, version, migrations, departments, leases)) => {
            println!("state.db: {}", state_dir.join("state.db").display());
            println!("origin: {origin:?}");
            println!(
                "schema: version {version} (this binary knows up to {})",
                fleet_agentd::store::schema_version()
            );
            for m in migrations {
                println!(
                    "migration: {} applied at {} by {}",
                    m.version, m.applied_at, m.applied_by
                );
            }
            for d in departments {
                println!(
                    "department: {} {} {}",
                    d.spec.id,
                    d.spec.image,
                    if d.desired_running {
                        "running"
                    } else {
                        "stopped"
                    }
                );
            }
            for (port, department) in leases {
                println!("lease: {port} {department}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-agentd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// fleet-agentd(8) and a page per subcommand (fleet-agentd-check-config(8),
/// ...), generated from the CLI definition above so they cannot drift, with
/// the exit codes, environment and files of fleet_model::manpage.
fn write_man_page(out_dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    use fleet_model::manpage as m;
    let root = m::Sections {
        exit_status: m::DAEMON_EXIT,
        environment: m::DAEMON_ENVIRONMENT,
        files: m::DAEMON_FILES,
        examples: None,
        see_also: "agentctl(1), agent.toml(5), fleet-department(5), systemctl(1), journalctl(1)",
    };
    match m::generate_to(Cli::command(), "8", &root, out_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "fleet-agentd: cannot write the man pages to {}: {e}",
                out_dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
