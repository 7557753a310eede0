//! `agentctl status`: the node and a row per department.

use super::JsonFlag;
use crate::client::Client;
use crate::output::{self, or_dash};
use fleet_model::api::{DepartmentSummary, NodeStatus};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    json: JsonFlag,
}

#[derive(Serialize)]
struct Status {
    node: NodeStatus,
    departments: Vec<DepartmentSummary>,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let node: NodeStatus = client.get("/v1/node").await?;
    let mut departments: Vec<DepartmentSummary> = client.get("/v1/departments").await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for d in &mut departments {
        d.uptime_seconds = d.started_at.map(|s| (now - s).max(0) as u64);
    }
    if args.json.json {
        return output::json(&Status { node, departments });
    }
    say!(
        "node {}  fleet-agentd {}  {} mode  docker {}  departments {}/{}  memory {}/{}{}",
        node.node_id,
        node.version,
        node.mode,
        if node.docker_reachable { "up" } else { "DOWN" },
        node.departments,
        node.max_departments,
        output::bytes(node.memory_committed_bytes),
        output::bytes(node.memory_limit_bytes),
        node.applied_revision
            .map(|r| format!("  revision {r}"))
            .unwrap_or_default(),
    );
    if !node.docker_reachable {
        say!("Docker is unreachable: the departments below show their last known state.");
    }
    if let Some(c) = &node.coordinator {
        say!(
            "coordinator {}  {}{}",
            c.url,
            if c.stale { "STALE" } else { "ok" },
            c.last_error
                .as_ref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default()
        );
        if let Some(r) = &c.last_refusal {
            say!(
                "last refused document: {}at {}: {}",
                r.revision
                    .map(|v| format!("revision {v} "))
                    .unwrap_or_default(),
                output::time_ms(r.at.saturating_mul(1000)),
                r.reason
            );
        }
    }
    say!();
    let rows: Vec<Vec<String>> = departments
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.state.as_str().to_string(),
                d.health.as_str().to_string(),
                or_dash(d.host_port),
                d.image.clone(),
                d.restarts.to_string(),
                d.uptime_seconds
                    .map(output::duration)
                    .unwrap_or_else(|| "-".into()),
                d.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if rows.is_empty() {
        say!("no departments; add one with `agentctl apply -f <spec.toml>`");
    } else {
        output::table(
            &[
                "ID", "STATE", "HEALTH", "PORT", "IMAGE", "RESTARTS", "UPTIME", "REASON",
            ],
            &rows,
        );
    }
    Ok(())
}
