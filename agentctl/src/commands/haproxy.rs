//! `agentctl haproxy-config`: the HAProxy backends of this node's departments
//! (both ports, checks, agent-check), rendered by the daemon from its own
//! view; paste them into haproxy.cfg (docs/install.md shows the rest).

use crate::client::Client;
use hyper::Method;
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {}

pub async fn run(client: &Client, _args: Args) -> anyhow::Result<()> {
    let body = client.call(Method::GET, "/v1/haproxy", None).await?;
    std::io::stdout().write_all(&body)?;
    Ok(())
}
