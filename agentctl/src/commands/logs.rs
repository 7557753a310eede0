//! `agentctl logs <id> [-f] [--tail N] [--since T] [--timestamps]`: the
//! container's output, streamed.

use crate::client::Client;
use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use std::io::Write;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  agentctl logs hr --tail 50
  agentctl logs hr --since 10m --timestamps
  agentctl logs hr -f --since 2026-12-03T13:00:00Z")]
pub struct Args {
    /// Department id.
    id: String,
    /// Keep following new output.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<usize>,
    /// Only output since a time (RFC 3339, UTC) or a duration ago (10m, 2h).
    #[arg(long, value_name = "TIME|DURATION")]
    since: Option<String>,
    /// Prefix each line with the time Docker received it.
    #[arg(short = 't', long)]
    timestamps: bool,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut path = format!("/v1/departments/{}/logs?follow={}", args.id, args.follow);
    if let Some(n) = args.tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(since) = &args.since {
        let ms = super::events::parse_since(since, std::time::SystemTime::now())?;
        // Docker counts whole seconds; round down so the named second is included.
        path.push_str(&format!("&since={}", ms / 1000));
    }
    if args.timestamps {
        path.push_str("&timestamps=true");
    }
    let response = client.send(Method::GET, &path, None).await?;
    if !response.status().is_success() {
        // Re-issue through `call` for the uniform error message.
        client.call(Method::GET, &path, None).await?;
        return Ok(());
    }
    let mut body = response.into_body();
    let mut stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("log stream broke")?;
        if let Some(data) = frame.data_ref() {
            if stdout.write_all(data).is_err() {
                return Ok(());
            }
            let _ = stdout.flush();
        }
    }
    Ok(())
}
