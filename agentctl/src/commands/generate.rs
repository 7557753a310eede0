//! `agentctl completions <shell>` and `agentctl man --out-dir DIR`: hidden
//! commands the package build (`packaging/build-deb.sh`) runs to generate shell
//! completions and man pages from this very CLI definition, so neither can
//! drift from the commands that exist. They never talk to the daemon.

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// Shell to write the completion script for (to stdout).
    shell: Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory for agentctl.1 and one agentctl-<command>.1 per command.
    #[arg(long)]
    out_dir: PathBuf,
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "agentctl", &mut buf);
    use std::io::Write as _;
    std::io::stdout()
        .write_all(&buf)
        .context("cannot write the completion script to stdout")
}

pub fn man(args: ManArgs) -> anyhow::Result<()> {
    use fleet_model::manpage as m;
    let root = m::Sections {
        exit_status: m::CTL_EXIT,
        environment: m::CTL_ENVIRONMENT,
        files: m::CTL_FILES,
        examples: None,
        see_also: "fleet-agentd(8), agent.toml(5), fleet-department(5)",
    };
    // One page per visible command (hidden ones, like this, get none), named
    // the git way so `man agentctl-apply` finds it.
    m::generate_to(crate::Cli::command(), "1", &root, &args.out_dir)
        .with_context(|| format!("cannot write man pages to {}", args.out_dir.display()))
}
