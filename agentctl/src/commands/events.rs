//! `agentctl events [-n N] [--since T] [--department ID] [-f]`: the newest
//! events of the log (like `journalctl -n`); follow continues from the end of the
//! log with long-polls, replaying nothing.

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use anyhow::{bail, Context};
use fleet_model::api::{Event, EventPage};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Events shown when neither `-n`, `--since` nor `--after` is given.
const DEFAULT_TAIL: u32 = 20;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agentctl events                    the newest 20 events
  agentctl events -n 100 --department hr
  agentctl events --since 10m        everything of the last ten minutes
  agentctl events --since 2026-12-03T13:00:00Z
  agentctl events -f                 the newest 20, then new ones as they come
  agentctl events -f -n 0            only new ones")]
pub struct Args {
    /// Keep following new events (after the newest `-n`).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Show the newest N events (default 20; with --since, all since then).
    #[arg(short = 'n', long = "tail", value_name = "N")]
    tail: Option<u32>,
    /// Only events since a time (RFC 3339, UTC: 2026-12-03T13:00:00Z) or a
    /// duration ago (10m, 2h, 1d).
    #[arg(long, value_name = "TIME|DURATION")]
    since: Option<String>,
    /// Only this department's events.
    #[arg(long)]
    department: Option<String>,
    /// Every event after this sequence number, oldest first (a cursor from `next`).
    #[arg(long, conflicts_with = "tail")]
    after: Option<i64>,
    #[command(flatten)]
    json: JsonFlag,
}

/// What `--since` means, in Unix milliseconds.
pub fn parse_since(text: &str, now: SystemTime) -> anyhow::Result<i64> {
    let text = text.trim();
    let at = if let Ok(ago) = humantime::parse_duration(text) {
        now.checked_sub(ago).unwrap_or(UNIX_EPOCH)
    } else if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        t
    } else {
        bail!(
            "--since `{text}` is neither a duration (10m, 2h) nor a UTC time (2026-12-03T13:00:00Z or \"2026-12-03 13:00:00\")"
        );
    };
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let since_ms = args
        .since
        .as_deref()
        .map(|s| parse_since(s, SystemTime::now()))
        .transpose()?;
    let mut filter = String::new();
    if let Some(d) = &args.department {
        filter.push_str(&format!("&department={d}"));
    }
    if let Some(ms) = since_ms {
        filter.push_str(&format!("&since_ms={ms}"));
    }
    // With --after, or --since without -n, every matching event is paged
    // through oldest first; otherwise only the newest N.
    let tail = match (args.after, args.tail, since_ms) {
        (Some(_), _, _) => None,
        (None, Some(n), _) => Some(n),
        (None, None, Some(_)) => None,
        (None, None, None) => Some(DEFAULT_TAIL),
    };
    let mut after = args.after.unwrap_or(0);
    let mut all = Vec::new();
    if let Some(n) = tail {
        let page: EventPage = client
            .get(&format!("/v1/events?after={after}&tail={n}{filter}"))
            .await?;
        after = page.next;
        all.extend(page.events);
    } else {
        loop {
            let page: EventPage = client
                .get(&format!("/v1/events?after={after}&limit=5000{filter}"))
                .await?;
            let done = page.events.is_empty();
            after = page.next;
            all.extend(page.events);
            if done {
                break;
            }
        }
    }
    if args.json.json && !args.follow {
        return output::json(&EventPage {
            events: all,
            next: after,
        });
    }
    for e in &all {
        show(e, args.json.json)?;
    }
    if !args.follow {
        return Ok(());
    }
    // New events only from here: since no longer filters anything.
    let filter = args
        .department
        .as_ref()
        .map(|d| format!("&department={d}"))
        .unwrap_or_default();
    loop {
        let page: EventPage = client
            .get(&format!("/v1/events?after={after}&wait=60s{filter}"))
            .await
            .context("following the event log")?;
        for e in &page.events {
            show(e, args.json.json)?;
        }
        after = page.next;
    }
}

fn show(e: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        say!("{}", serde_json::to_string(e)?);
    } else {
        say!(
            "{:>6}  {}  {:<12}  {:<18}  {}",
            e.seq,
            output::time_ms(e.at_ms),
            e.department.as_deref().unwrap_or("-"),
            e.kind,
            e.message
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_ago_or_a_utc_time() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_since("10m", now).unwrap(), (1_000_000 - 600) * 1000);
        assert_eq!(
            parse_since("1970-01-02T00:00:00Z", now).unwrap(),
            86_400_000
        );
        assert_eq!(parse_since("1970-01-02 00:00:00", now).unwrap(), 86_400_000);
        let err = parse_since("yesterday-ish", now).unwrap_err().to_string();
        assert!(err.contains("--since `yesterday-ish`"), "{err}");
    }
}
