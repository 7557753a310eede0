//! `agentctl top`: the departments' CPU, memory, health and restarts, refreshed
//! in place like `docker stats`. Figures come from the daemon's stats cache
//! (`GET /v1/usage`), refreshed every `stats_interval`, so a frame never waits
//! on Docker. `--once` prints one table, `--json` one JSON array, for scripts.

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use fleet_model::api::DepartmentUsage;
use std::io::{IsTerminal, Write};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Print one table and exit (implied by --json).
    #[arg(long)]
    once: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    #[command(flatten)]
    json: JsonFlag,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    if args.json.json {
        let usage: Vec<DepartmentUsage> = client.get("/v1/usage").await?;
        return output::json(&usage);
    }
    if args.once {
        let usage: Vec<DepartmentUsage> = client.get("/v1/usage").await?;
        for line in frame(&usage) {
            say!("{line}");
        }
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let interval = args.interval.max(Duration::from_millis(200));
    let mut stdout = std::io::stdout();
    if tty {
        // Clear once, then hide the cursor while frames are redrawn under it.
        let _ = write!(stdout, "\x1b[2J\x1b[?25l");
    }
    // SIGTERM as well as Ctrl-C, so the cursor comes back either way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = async {
        loop {
            let usage: Vec<DepartmentUsage> = client.get("/v1/usage").await?;
            let lines = frame(&usage);
            let mut text = String::new();
            if tty {
                // Home, then each line clears its own tail and the rest of the
                // screen is cleared last: redrawn in place, without flicker.
                text.push_str("\x1b[H");
                for line in &lines {
                    text.push_str(line);
                    text.push_str("\x1b[K\n");
                }
                text.push_str("\x1b[J");
            } else {
                for line in &lines {
                    text.push_str(line);
                    text.push('\n');
                }
                text.push('\n');
            }
            if stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // A closed pipe (`agentctl top | head`) ends it quietly.
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
            }
        }
    }
    .await;
    if tty {
        let _ = write!(stdout, "\x1b[?25h");
        let _ = stdout.flush();
    }
    result
}

/// One screen: a header and a row per department.
fn frame(usage: &[DepartmentUsage]) -> Vec<String> {
    let headers = [
        "ID",
        "STATE",
        "HEALTH",
        "CPU %",
        "MEM USAGE / LIMIT",
        "MEM %",
        "RESTARTS",
    ];
    let rows: Vec<Vec<String>> = usage
        .iter()
        .map(|u| {
            let memory = match (u.memory_bytes, u.memory_limit_bytes) {
                (Some(m), Some(l)) => format!("{} / {}", output::bytes(m), output::bytes(l)),
                (Some(m), None) => output::bytes(m),
                _ => "-".into(),
            };
            let memory_pct = match (u.memory_bytes, u.memory_limit_bytes) {
                (Some(m), Some(l)) if l > 0 => format!("{:.1}%", m as f64 * 100.0 / l as f64),
                _ => "-".into(),
            };
            vec![
                u.id.clone(),
                u.state.as_str().to_string(),
                u.health.as_str().to_string(),
                u.cpu_ratio
                    .map(|r| format!("{:.1}%", r * 100.0))
                    .unwrap_or_else(|| "-".into()),
                memory,
                memory_pct,
                u.restarts.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return vec!["no departments".into()];
    }
    output::table_lines(&headers, &rows)
}
