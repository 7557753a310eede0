//! The sections clap_mangen does not write (EXIT STATUS, ENVIRONMENT, FILES,
//! EXAMPLES, SEE ALSO) of the fleet-agentd(8) and agentctl(1) pages, as roff.
//! The binaries render the generated parts around them; the content here is
//! the one place these facts are written for the man pages.

/// One `.TP` entry: the term and its text.
pub type Entry = (&'static str, &'static str);

/// The hand-written sections of one page.
#[derive(Debug, Clone, Default)]
pub struct Sections {
    pub exit_status: &'static [Entry],
    pub environment: &'static [Entry],
    pub files: &'static [Entry],
    /// Lines shown as they are (`.nf`), normally the command's `after_help`.
    pub examples: Option<String>,
    pub see_also: &'static str,
}

/// Escapes roff's special characters: backslashes, hyphens, and a `.` or `'`
/// that would start a request at the beginning of a line.
pub fn escape(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace('\\', "\\e").replace('-', "\\-");
            if line.starts_with(['.', '\'']) {
                format!("\\&{line}")
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn entries(out: &mut String, title: &str, list: &[Entry]) {
    if list.is_empty() {
        return;
    }
    out.push_str(&format!(".SH \"{title}\"\n"));
    for (term, text) in list {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            escape(term),
            escape(text)
        ));
    }
}

impl Sections {
    pub fn roff(&self) -> String {
        let mut out = String::new();
        entries(&mut out, "EXIT STATUS", self.exit_status);
        entries(&mut out, "ENVIRONMENT", self.environment);
        entries(&mut out, "FILES", self.files);
        if let Some(examples) = &self.examples {
            // after_help has its own "Examples:" heading for --help; what comes
            // before it (wal push's exit codes) becomes NOTES.
            let (notes, body) = examples
                .split_once("Examples:")
                .unwrap_or(("", examples.as_str()));
            if !notes.trim().is_empty() {
                out.push_str(&format!(".SH NOTES\n{}\n", escape(notes.trim())));
            }
            let body = body.trim_matches('\n');
            out.push_str(".SH EXAMPLES\n.nf\n");
            out.push_str(&escape(body));
            out.push_str("\n.fi\n");
        }
        if !self.see_also.is_empty() {
            out.push_str(&format!(".SH \"SEE ALSO\"\n{}\n", escape(self.see_also)));
        }
        out
    }
}

pub const DAEMON_EXIT: &[Entry] = &[
    ("0", "Success (the daemon stopped on SIGTERM, or the command did its work)."),
    ("1", "Failure: the daemon could not run (Docker or a socket unusable at start, state.db refused as written by a newer version), or a command failed."),
    ("64", "Bad arguments or a refused configuration: check-config found a problem, or agent.toml, a token or a TLS file is invalid (each refusal names the file, line and key)."),
];

pub const DAEMON_ENVIRONMENT: &[Entry] = &[
    ("FLEET_AGENT_CONFIG", "Path of agent.toml when --config is not given (then /etc/fleet-agent/agent.toml, then the embedded default)."),
    ("RUST_LOG", "A tracing filter that overrides log.level (fleet_agentd=debug)."),
    ("NOTIFY_SOCKET, WATCHDOG_USEC", "Set by systemd (Type=notify, WatchdogSec=): readiness, STATUS= lines and the watchdog."),
    ("JOURNAL_STREAM", "Set by systemd: log.format = \"auto\" then logs to the journal."),
    ("STATE_DIRECTORY", "Set by systemd's StateDirectory=: where wal-serve keeps its caches."),
];

pub const DAEMON_FILES: &[Entry] = &[
    ("/etc/fleet-agent/agent.toml", "The configuration (agent.toml(5)); root:fleet-agent 0640."),
    ("/etc/fleet-agent/departments.d/*.toml", "Hand-written department specs (fleet-department(5)); read only, reloaded on systemctl reload."),
    ("/var/lib/fleet-agent/applied.d/", "Specs sent with agentctl apply (0600)."),
    ("/var/lib/fleet-agent/state.db", "Intent and history (SQLite, a schema version migrated at start; state.db.schema-vN is the copy from before a migration, state.db.corrupt-* one moved aside as unreadable)."),
    ("/run/fleet-agent/agentctl.sock", "The control socket agentctl talks to."),
    ("/run/fleet-agent-wal/wal.sock", "The WAL service's socket (fleet-agent-wal.service)."),
    ("/usr/lib/fleet-agent/fleet-agent-wal", "What fleet-agent-wal.service runs: the wal-serve command alone (--config PATH), without the rest of fleet-agentd's code."),
    ("/usr/share/doc/fleet-agent/", "README.Debian, the guides (install, upgrading, WAL, runbook) and example configurations."),
];

pub const CTL_EXIT: &[Entry] = &[
    ("0", "Success."),
    ("1", "Failure: the daemon refused or failed the request, or is not reachable; doctor: a check failed. For wal fetch: the file is not in the archive (recovery ends normally on it)."),
    ("2", "wal push/fetch: a refused name or file (not a WAL file name, a symlink, unreadable)."),
    ("3", "wal push: a different file is already archived under this name."),
    ("4", "wal push/fetch: the daemon (or fleet-agent-wal) is not reachable."),
    ("5", "wal push/fetch: the archive target failed; PostgreSQL keeps the segment and retries."),
    ("6", "wal push/fetch: any other failure."),
    ("64", "Bad arguments."),
];

pub const CTL_ENVIRONMENT: &[Entry] = &[
    ("FLEET_AGENT_SOCKET", "The control socket when --socket is not given (default /run/fleet-agent/agentctl.sock)."),
    ("FLEET_AGENT_WAL_SOCKET", "The WAL socket for wal, backup and restore (default /run/fleet-agent-wal/wal.sock when it exists, else the control socket)."),
];

pub const CTL_FILES: &[Entry] = &[
    ("/run/fleet-agent/agentctl.sock", "fleet-agentd's control socket; root and members of the fleet-agent group may use every command."),
    ("/run/fleet-agent-wal/wal.sock", "fleet-agent-wal's socket (postgres may only push and fetch)."),
    ("/etc/fleet-agent/departments.d/", "Hand-written specs: agentctl apply and delete refuse their ids (edit the file, then systemctl reload fleet-agentd)."),
];

/// Writes the page of `cmd` and one per visible subcommand, nested the git way
/// (`agentctl-wal-push.1`), into `out_dir`: clap_mangen's sections, then
/// `root` on the top page; every page shows its `after_help` as EXAMPLES.
#[cfg(feature = "man")]
pub fn generate_to(
    cmd: clap::Command,
    section: &str,
    root: &Sections,
    out_dir: &std::path::Path,
) -> std::io::Result<()> {
    fn page(
        cmd: &clap::Command,
        section: &str,
        sections: &Sections,
        out_dir: &std::path::Path,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            page(sub, section, &Sections::default(), out_dir)?;
        }
        let mut sections = sections.clone();
        if sections.examples.is_none() {
            sections.examples = cmd.get_after_help().map(|h| h.to_string());
        }
        let man = clap_mangen::Man::new(cmd.clone()).section(section);
        let mut out = Vec::new();
        man.render_title(&mut out)?;
        man.render_name_section(&mut out)?;
        man.render_synopsis_section(&mut out)?;
        man.render_description_section(&mut out)?;
        if cmd.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut out)?;
        }
        if cmd.get_subcommands().any(|c| !c.is_hide_set()) {
            man.render_subcommands_section(&mut out)?;
        }
        out.extend_from_slice(sections.roff().as_bytes());
        if cmd.get_version().is_some() || cmd.get_long_version().is_some() {
            man.render_version_section(&mut out)?;
        }
        std::fs::write(out_dir.join(man.get_filename()), out)
    }
    std::fs::create_dir_all(out_dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    page(&cmd, section, root, out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_rendered_and_escaped() {
        let text = Sections {
            exit_status: CTL_EXIT,
            environment: CTL_ENVIRONMENT,
            files: CTL_FILES,
            examples: Some(
                "Exit status: 0 ok.\n\nExamples:\n  agentctl wal push pg_wal/0001\n.hidden".into(),
            ),
            see_also: "fleet-agentd(8)",
        }
        .roff();
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH \"ENVIRONMENT\"",
            ".SH \"FILES\"",
            ".SH EXAMPLES",
        ] {
            assert!(text.contains(section), "{section} missing:\n{text}");
        }
        assert!(text.contains("\\fBFLEET_AGENT_SOCKET\\fR"));
        assert!(text.contains("agentctl wal push"));
        assert!(!text.contains("Examples:"));
        assert!(text.contains(".SH NOTES\nExit status: 0 ok.\n"), "{text}");
        assert!(text.contains("\n\\&.hidden\n"), "{text}");
        assert!(text.contains("fleet\\-agentd(8)"));
    }
}
