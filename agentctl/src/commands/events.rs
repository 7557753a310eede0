//! `agentctl events [-f]`: the event log; follow long-polls the cursor.

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use fleet_model::api::EventPage;

#[derive(clap::Args)]
pub struct Args {
    /// Keep following new events.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only this department's events.
    #[arg(long)]
    department: Option<String>,
    /// Start after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: i64,
    #[command(flatten)]
    json: JsonFlag,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let mut after = args.after;
    let filter = args
        .department
        .as_ref()
        .map(|d| format!("&department={d}"))
        .unwrap_or_default();
    loop {
        let wait = if args.follow { "&wait=60s" } else { "" };
        let page: EventPage = client
            .get(&format!("/v1/events?after={after}{wait}{filter}"))
            .await?;
        if args.json.json && !args.follow {
            return output::json(&page);
        }
        for e in &page.events {
            if args.json.json {
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
        }
        after = page.next;
        if !args.follow {
            return Ok(());
        }
    }
}
