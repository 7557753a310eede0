//! Logging: journald (structured fields, so `journalctl -u fleet-agentd
//! DEPARTMENT=hr` works) when started by systemd, human lines or JSON on stderr
//! otherwise. Never a reason to fail to start: with `format = "journald"` (or
//! `auto` under systemd) and journald's socket absent, the daemon says so once
//! and logs to stderr. The level is `[log] level`, or `RUST_LOG` when set.
//! Secrets never reach a log line: events and messages are built from ids,
//! states and Docker's answers, never from env or secret values.

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Lets a SIGHUP change `[log] level` without a restart.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn filter_for(level: &str) -> EnvFilter {
    EnvFilter::new(format!("{level},hyper=warn,bollard=warn,reqwest=warn"))
}

/// What [`set_level`] did.
#[derive(Debug, PartialEq)]
pub enum LevelChange {
    Applied,
    /// `RUST_LOG` is set and wins over `[log] level`.
    OverriddenByRustLog,
}

/// Applies a new `[log] level` to the running daemon.
pub fn set_level(level: &str) -> Result<LevelChange, String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(LevelChange::OverriddenByRustLog);
    }
    let handle = LEVEL
        .get()
        .ok_or_else(|| "logging is not initialised".to_string())?;
    handle
        .reload(filter_for(level))
        .map(|()| LevelChange::Applied)
        .map_err(|e| e.to_string())
}

pub fn init(level: &str, format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| filter_for(level));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = LEVEL.set(handle);
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let want_journald = format == "journald" || (format == "auto" && under_systemd);
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(
                        layer
                            .with_syslog_identifier("fleet-agentd".into())
                            // Fields keep their own names, upper-cased by the
                            // layer: `department` is `DEPARTMENT`, `event` is
                            // `EVENT`, so `journalctl -u fleet-agentd DEPARTMENT=hr`
                            // works (the default prefix would make it F_DEPARTMENT).
                            .with_field_prefix(None)
                            .with_filter(filter),
                    )
                    .try_init();
                return;
            }
            Err(e) => eprintln!("fleet-agentd: journald is not reachable ({e}); logging to stderr"),
        }
    }
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = if format == "json" {
        tracing_subscriber::registry()
            .with(stderr.json().flatten_event(true).with_filter(filter))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(stderr.with_target(false).with_filter(filter))
            .try_init()
    };
}
