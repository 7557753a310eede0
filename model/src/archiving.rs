//! How PostgreSQL is set to archive, judged from its settings: a cluster whose
//! `archive_mode` is off, whose `archive_command` lacks `%p`, or that names
//! this package's PostgreSQL 15 module on another version archives nothing,
//! and nothing else says so until the backlog alert fires hours later.
//! `agentctl wal status` shows the verdict and `agentctl doctor` fails on a
//! problem. Pure: the WAL service reads the settings (wal/src/pg.rs) and whether
//! the module is installed, and serves what [`judge`] returns in `GET /v1/wal`.

use serde::{Deserialize, Serialize};

/// Where the package installs the archive module for PostgreSQL 15, as
/// `archive_library` names it (without `.so`).
pub const MODULE_15: &str = "/usr/lib/fleet-agent/postgresql/15/fleet_archive";

/// What `setting` says of an archive_command that is not fleet-agent's.
pub const NOT_SHOWN: &str = "(another tool's command, not shown)";

/// The settings read from the cluster (`current_setting`); served only as
/// judged ([`Archiving`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSettings {
    pub server_version_num: i32,
    pub archive_mode: String,
    pub archive_command: String,
    /// Empty before PostgreSQL 15, which has no such setting.
    pub archive_library: String,
    /// As `SHOW` gives it (`0`, `1min`); `0` is off.
    pub archive_timeout: String,
}

/// What PostgreSQL archives through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    ArchiveLibrary,
    ArchiveCommand,
    Nothing,
}

/// Ordered worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// PostgreSQL archives nothing (or nothing through fleet-agent) as set.
    Problem,
    /// Archives now, but a trap: an upgrade or a reload would stop it.
    Warning,
    /// Works; a better set-up exists.
    Hint,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archiving {
    pub via: Via,
    /// The archive_library or archive_command in effect ("" for neither). An
    /// archive_command that is not fleet-agent's is not shown: another tool's
    /// may carry a credential, and `GET /v1/wal` is also on the TCP API.
    pub setting: String,
    /// PostgreSQL's major version (15 for 150020).
    pub major: i32,
    pub findings: Vec<Finding>,
}

/// `archive_library` names this package's module (by path, or by name when
/// it was copied into PostgreSQL's own library directory).
fn is_fleet_module(library: &str) -> bool {
    let file = library.rsplit('/').next().unwrap_or(library);
    file.strip_suffix(".so").unwrap_or(file) == "fleet_archive"
}

/// `archive_command` runs `agentctl ... wal push`, options allowed between.
fn calls_agentctl_push(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    let Some(at) = words
        .iter()
        .position(|w| w.rsplit('/').next() == Some("agentctl"))
    else {
        return false;
    };
    words[at + 1..].windows(2).any(|w| w == ["wal", "push"])
}

pub fn judge(settings: &ArchiveSettings, module_installed: bool) -> Archiving {
    let major = settings.server_version_num / 10000;
    let library = settings.archive_library.trim();
    let command = settings.archive_command.trim();
    let (via, setting) = if !library.is_empty() {
        (Via::ArchiveLibrary, library)
    } else if !command.is_empty() {
        (Via::ArchiveCommand, command)
    } else {
        (Via::Nothing, "")
    };
    let mut findings = Vec::new();
    let mut add = |severity: Severity, text: String| findings.push(Finding { severity, text });
    if settings.archive_mode == "off" {
        add(
            Severity::Problem,
            "archive_mode is off: PostgreSQL archives nothing; set archive_mode = on and restart \
             PostgreSQL (docs/wal.md, step 3)"
                .into(),
        );
    } else if via == Via::Nothing {
        add(
            Severity::Problem,
            "archive_mode is on but neither archive_command nor archive_library is set: WAL piles \
             up in pg_wal; set archive_command = 'agentctl wal push %p' and reload PostgreSQL \
             (docs/wal.md, step 3)"
                .into(),
        );
    }
    match via {
        Via::ArchiveLibrary => {
            if !command.is_empty() && major >= 16 {
                add(
                    Severity::Problem,
                    format!(
                        "archive_library and archive_command are both set: PostgreSQL {major} \
                         archives nothing then; remove archive_command (or archive_library) \
                         and reload PostgreSQL"
                    ),
                );
            } else if !command.is_empty() {
                add(
                    Severity::Warning,
                    "archive_command is set but ignored while archive_library is set; remove \
                     it: PostgreSQL 16 and later archive nothing with both set"
                        .into(),
                );
            }
            if is_fleet_module(library) && major != 15 {
                add(
                    Severity::Problem,
                    format!(
                        "archive_library is fleet-agent's module for PostgreSQL 15, which does \
                         not load in PostgreSQL {major}; set archive_library = '' and \
                         archive_command = 'agentctl wal push %p', then reload PostgreSQL"
                    ),
                );
            } else if !is_fleet_module(library) {
                add(
                    Severity::Warning,
                    format!(
                        "archive_library is {library}, not fleet-agent's module: PostgreSQL \
                         archives through something else"
                    ),
                );
            }
        }
        Via::ArchiveCommand if calls_agentctl_push(command) => {
            if !command.contains("%p") {
                add(
                    Severity::Problem,
                    "archive_command runs agentctl wal push without %p, so every call fails; \
                     set archive_command = 'agentctl wal push %p' and reload PostgreSQL"
                        .into(),
                );
            } else if major == 15 && module_installed {
                add(
                    Severity::Hint,
                    format!(
                        "on PostgreSQL 15, archive_library = '{MODULE_15}' archives the same way \
                         without a shell and agentctl per segment (docs/wal.md, \
                         \"archive_library instead of archive_command\")"
                    ),
                );
            }
        }
        Via::ArchiveCommand => add(
            Severity::Warning,
            "archive_command does not run agentctl wal push: PostgreSQL archives through \
             something else"
                .into(),
        ),
        Via::Nothing => {}
    }
    if settings.archive_mode != "off" && via != Via::Nothing && settings.archive_timeout == "0" {
        add(
            Severity::Hint,
            "archive_timeout is 0: a database that writes little archives a segment only once \
             a whole one is written, so its newest writes can stay outside the archive for \
             hours; set archive_timeout = 60s (docs/wal.md, Bounded RPO)"
                .into(),
        );
    }
    let setting = if via == Via::ArchiveCommand && !calls_agentctl_push(command) {
        NOT_SHOWN.to_string()
    } else {
        setting.to_string()
    };
    Archiving {
        via,
        setting,
        major,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(version: i32, mode: &str, command: &str, library: &str) -> ArchiveSettings {
        ArchiveSettings {
            server_version_num: version,
            archive_mode: mode.into(),
            archive_command: command.into(),
            archive_library: library.into(),
            archive_timeout: "1min".into(),
        }
    }

    fn severities(a: &Archiving) -> Vec<Severity> {
        a.findings.iter().map(|f| f.severity).collect()
    }

    #[test]
    fn the_documented_set_ups_pass_and_15_hears_of_the_module() {
        let command = judge(&settings(150020, "on", "agentctl wal push %p", ""), true);
        assert_eq!(command.via, Via::ArchiveCommand);
        assert_eq!(command.major, 15);
        assert_eq!(severities(&command), [Severity::Hint]);
        assert!(command.findings[0].text.contains(MODULE_15));
        // No hint where the module is not installed, nor on 16, where it does not load.
        assert!(
            judge(&settings(150020, "on", "agentctl wal push %p", ""), false)
                .findings
                .is_empty()
        );
        assert!(judge(
            &settings(
                170004,
                "always",
                "/usr/bin/agentctl --socket /run/x.sock wal push %p",
                ""
            ),
            true
        )
        .findings
        .is_empty());
        let module = judge(&settings(150020, "on", "", MODULE_15), true);
        assert_eq!(
            (module.via, module.setting.as_str()),
            (Via::ArchiveLibrary, MODULE_15)
        );
        assert!(module.findings.is_empty());
        // Copied into PostgreSQL's own directory, by name, with or without .so.
        assert!(judge(&settings(150020, "on", "", "fleet_archive.so"), true)
            .findings
            .is_empty());
    }

    #[test]
    fn what_archives_nothing_is_a_problem_that_names_the_fix() {
        let off = judge(&settings(150020, "off", "agentctl wal push %p", ""), true);
        assert_eq!(severities(&off), [Severity::Problem, Severity::Hint]);
        assert!(off.findings[0].text.contains("archive_mode = on"));
        let neither = judge(&settings(150020, "on", "", ""), true);
        assert_eq!(neither.via, Via::Nothing);
        assert_eq!(severities(&neither), [Severity::Problem]);
        assert!(neither.findings[0].text.contains("'agentctl wal push %p'"));
        let no_p = judge(&settings(150020, "on", "agentctl wal push", ""), true);
        assert_eq!(severities(&no_p), [Severity::Problem]);
        assert!(no_p.findings[0].text.contains("without %p"));
        let wrong_version = judge(&settings(160004, "on", "", MODULE_15), true);
        assert_eq!(severities(&wrong_version), [Severity::Problem]);
        assert!(wrong_version.findings[0].text.contains("PostgreSQL 16"));
    }

    #[test]
    fn both_set_is_a_trap_on_15_and_archives_nothing_from_16() {
        let on_15 = judge(
            &settings(150020, "on", "agentctl wal push %p", MODULE_15),
            true,
        );
        assert_eq!(on_15.via, Via::ArchiveLibrary);
        assert_eq!(severities(&on_15), [Severity::Warning]);
        let on_17 = judge(
            &settings(170004, "on", "cp %p /x/%f", "basic_archive"),
            true,
        );
        assert_eq!(severities(&on_17), [Severity::Problem, Severity::Warning]);
        assert!(on_17.findings[0]
            .text
            .contains("PostgreSQL 17 archives nothing"));
    }

    #[test]
    fn no_archive_timeout_is_a_hint_about_the_rpo() {
        let mut idle = settings(150020, "on", "", MODULE_15);
        idle.archive_timeout = "0".into();
        let judged = judge(&idle, true);
        assert_eq!(severities(&judged), [Severity::Hint]);
        assert!(judged.findings[0].text.contains("archive_timeout = 60s"));
        // Nothing archives anyway: the problem says so, no hint beside it.
        idle.archive_mode = "off".into();
        assert_eq!(severities(&judge(&idle, true)), [Severity::Problem]);
    }

    #[test]
    fn another_tool_is_named_not_failed() {
        let other = judge(
            &settings(150020, "on", "pgbackrest --stanza=main archive-push %p", ""),
            true,
        );
        assert_eq!(severities(&other), [Severity::Warning]);
        // Another tool's command may hold a credential: never echoed.
        let secret = judge(
            &settings(
                150020,
                "on",
                "env AWS_SECRET_ACCESS_KEY=hunter2 wal-g wal-push %p",
                "",
            ),
            true,
        );
        assert_eq!(secret.setting, NOT_SHOWN);
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!calls_agentctl_push("agentctl wal fetch %f %p"));
        assert!(!calls_agentctl_push("/usr/bin/notagentctl wal push %p"));
        assert!(calls_agentctl_push("/usr/bin/agentctl wal push %p"));
    }
}
