//! `agentctl show <id>`: one department in depth. Secrets arrive masked.

use super::JsonFlag;
use crate::client::Client;
use crate::output::{self, or_dash};
use fleet_model::api::DepartmentDetail;

#[derive(clap::Args)]
pub struct Args {
    /// Department id.
    id: String,
    #[command(flatten)]
    json: JsonFlag,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let d: DepartmentDetail = client.get(&format!("/v1/departments/{}", args.id)).await?;
    if args.json.json {
        return output::json(&d);
    }
    let s = &d.summary;
    say!(
        "department  {}{}",
        s.id,
        s.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    say!(
        "state       {}{}",
        s.state.as_str(),
        s.reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    if let Some(p) = &s.progress {
        say!("progress    {} {}: {}", p.operation, p.subject, p.line());
    }
    say!("health      {}", s.health.as_str());
    say!(
        "port        {} -> {}",
        or_dash(s.host_port),
        d.spec.container_port
    );
    if let Some(standby) = s.standby_port {
        say!("standby     {standby} (hand-over port behind HAProxy)");
    }
    if let Some(d) = &s.drain {
        let left = match d.connections {
            Some(n) => format!("{n} connection(s)"),
            None => "connections unknown".to_string(),
        };
        say!(
            "drain       {} {} {:.1}s, {left}",
            d.slot,
            if d.active {
                "draining for"
            } else {
                "last drained in"
            },
            d.seconds
        );
    }
    say!("image       {}", s.image);
    say!(
        "container   {}",
        or_dash(s.container_id.as_deref().map(|c| c.get(..12).unwrap_or(c)))
    );
    say!("restarts    {}", s.restarts);
    say!("spec hash   {}", or_dash(s.spec_hash.as_deref()));
    if let Some(p) = &d.previous_spec {
        say!("previous    {} (agentctl rollback {})", p.image, s.id);
    }
    say!("\nspec (secrets masked):");
    let spec = toml::to_string(&d.spec).unwrap_or_default();
    for line in spec.lines() {
        say!("  {line}");
    }
    if !d.probes.is_empty() {
        say!("\nrecent probes:");
        let rows: Vec<Vec<String>> = d
            .probes
            .iter()
            .rev()
            .map(|p| {
                vec![
                    output::time_ms(p.at_ms),
                    if p.ok { "ok".into() } else { "FAIL".into() },
                    or_dash(p.status),
                    p.latency_ms
                        .map(|l| format!("{l:.1}ms"))
                        .unwrap_or_else(|| "-".into()),
                    p.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::table(&["TIME", "RESULT", "STATUS", "LATENCY", "ERROR"], &rows);
    }
    if !d.restart_history.is_empty() {
        say!("\nrestart history:");
        let rows: Vec<Vec<String>> = d
            .restart_history
            .iter()
            .map(|r| {
                vec![
                    output::time_ms(r.at * 1000),
                    r.reason.clone(),
                    or_dash(r.exit_code),
                ]
            })
            .collect();
        output::table(&["TIME", "REASON", "EXIT"], &rows);
    }
    if !d.events.is_empty() {
        say!("\nrecent events:");
        let rows: Vec<Vec<String>> = d
            .events
            .iter()
            .map(|e| vec![output::time_ms(e.at_ms), e.kind.clone(), e.message.clone()])
            .collect();
        output::table(&["TIME", "EVENT", "MESSAGE"], &rows);
    }
    Ok(())
}
