//! `agentctl delete <id>`: stop gracefully, remove the container, free the port
//! and (standalone) remove the spec `agentctl apply` kept. A department of a
//! hand-written `departments.d` file is refused: the daemon names the file.

use crate::client::Client;
use hyper::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Department id.
    id: String,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    client
        .call(
            Method::DELETE,
            &format!("/v1/departments/{}", args.id),
            None,
        )
        .await?;
    say!("{} deleted", args.id);
    Ok(())
}
