//! `agentctl prepull <id> <image>`: announce a department's next image. The
//! daemon pulls it now, in the background, and image collection keeps it while
//! it is announced, so the update itself does not wait on the registry.

use crate::client::Client;
use hyper::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Department id.
    id: String,
    /// The image its next spec will name (registry/name:tag).
    image: String,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let answer: serde_json::Value = client
        .post(
            Method::POST,
            &format!("/v1/departments/{}/prepull", args.id),
            &serde_json::json!({ "image": args.image }),
        )
        .await?;
    match answer.get("message").and_then(|m| m.as_str()) {
        Some(message) => say!("{message}"),
        None => say!("{}: {} announced", args.id, args.image),
    }
    Ok(())
}
