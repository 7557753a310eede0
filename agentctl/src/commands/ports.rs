//! `agentctl ports`: the pool, and who holds each port.

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use fleet_model::api::PortLease;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    json: JsonFlag,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let leases: Vec<PortLease> = client.get("/v1/ports").await?;
    if args.json.json {
        return output::json(&leases);
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            vec![
                l.port.to_string(),
                l.status.clone(),
                output::or_dash(l.department.as_deref()),
            ]
        })
        .collect();
    output::table(&["PORT", "STATUS", "DEPARTMENT"], &rows);
    Ok(())
}
