//! `agentctl logs <id> [-f] [--tail N]`: the container's output, streamed.

use crate::client::Client;
use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    /// Department id.
    id: String,
    /// Keep following new output.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<usize>,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut path = format!("/v1/departments/{}/logs?follow={}", args.id, args.follow);
    if let Some(n) = args.tail {
        path.push_str(&format!("&tail={n}"));
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
