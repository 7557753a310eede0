//! `agentctl start|stop|restart|rollback <id>`: operator commands, handled by the
//! department's own task in turn with everything else that happens to it.

use crate::client::Client;
use hyper::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Department id.
    id: String,
}

pub async fn run(client: &Client, action: &str, args: Args) -> anyhow::Result<()> {
    let answer: serde_json::Value = client
        .post(
            Method::POST,
            &format!("/v1/departments/{}/{action}", args.id),
            &serde_json::json!({}),
        )
        .await?;
    match answer.get("message").and_then(|m| m.as_str()) {
        Some(message) => say!("{message}"),
        None => say!("{} {action}: done", args.id),
    }
    Ok(())
}
