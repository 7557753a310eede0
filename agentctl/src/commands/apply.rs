//! `agentctl apply -f <file|dir> [--wait]`: read TOML specs, validate them here
//! (so a bad file is named before anything is sent), and apply them as one set;
//! with `--wait`, follow each department (pull progress, state, reason) until it
//! runs the applied spec healthy, or fails, or rolls back. In standalone mode the
//! daemon keeps what it accepted in `<state_dir>/applied.d/<id>.toml`; an id a
//! hand-written `departments.d` file defines is refused (the daemon names it).

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use anyhow::{bail, Context};
use fleet_model::api::{ApplyReport, ApplyRequest, DepartmentDetail, DeptState, EventPage, Health};
use fleet_model::DepartmentSpec;
use hyper::Method;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// A spec file, or a directory of *.toml specs.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Delete the applied departments that are not in the given specs
    /// (departments of hand-written departments.d files stay).
    #[arg(long)]
    prune: bool,
    /// Follow the applied departments (pull progress, state, reason) until each
    /// runs its new spec healthy; fail if one fails or rolls back.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    #[command(flatten)]
    json: JsonFlag,
}

pub fn read_specs(paths: &[PathBuf]) -> anyhow::Result<Vec<DepartmentSpec>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {}", path.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        bail!("no *.toml spec found in {}", show_paths(paths));
    }
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let name = file.display().to_string();
        match DepartmentSpec::from_toml(&name, &text) {
            Ok(spec) => specs.push(spec),
            Err(e) => {
                // Each field is `file:line:column: field`, as the daemon reports it.
                for f in e.in_file(&name, &text) {
                    problems.push(format!("  {}: {}", f.field, f.message));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("specs refused, nothing applied:\n{}", problems.join("\n"));
    }
    Ok(specs)
}

fn show_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p: &PathBuf| Path::display(p).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let specs = read_specs(&args.files)?;
    // Events already logged are not this apply's; remember where each ends.
    let mut cursors = BTreeMap::new();
    if args.wait {
        for spec in &specs {
            cursors.insert(spec.id.clone(), last_event(client, &spec.id).await?);
        }
    }
    let request = ApplyRequest {
        departments: specs.clone(),
        prune: args.prune,
    };
    let report: ApplyReport = client.post(Method::POST, "/v1/apply", &request).await?;
    if args.json.json && !args.wait {
        return output::json(&report);
    }
    for (verb, ids) in [
        ("created", &report.created),
        ("updated", &report.updated),
        ("unchanged", &report.unchanged),
        ("deleted", &report.deleted),
    ] {
        for id in ids {
            say!("{id} {verb}");
        }
    }
    if args.wait {
        wait(
            client,
            &specs,
            &report.spec_hashes,
            cursors,
            args.wait_timeout,
        )
        .await?;
    }
    if args.json.json {
        return output::json(&report);
    }
    Ok(())
}

/// Where one department stands against the spec just applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Waiting,
    Done,
    Failed,
}

/// Judges a department against the spec just applied. `saw_new` remembers
/// whether it ever took the new spec: if it did and then went back, the update
/// was rolled back. A rollback finished before the first look shows as the
/// applied spec sitting in `previous_spec` with a "rolled back" reason.
/// `expected_hash` is the daemon's hash of the applied spec (`ApplyReport::
/// spec_hashes`; the hash is keyed, so agentctl cannot compute it itself).
fn judge(
    detail: &DepartmentDetail,
    applied: &DepartmentSpec,
    expected_hash: Option<&str>,
    saw_new: &mut bool,
) -> Outcome {
    let row = &detail.summary;
    let on_new = match expected_hash {
        Some(hash) => row.spec_hash.as_deref() == Some(hash),
        // A daemon from before the keyed hash does not say; its hash is the
        // unkeyed one.
        None => {
            row.spec_hash.as_deref()
                == Some(
                    applied
                        .legacy_container_hash(row.host_port.unwrap_or_default())
                        .as_str(),
                )
        }
    };
    if on_new {
        *saw_new = true;
        let healthy = matches!(row.health, Health::Healthy | Health::Disabled);
        return match row.state {
            DeptState::Running if healthy => Outcome::Done,
            DeptState::Failed | DeptState::CrashLooping | DeptState::Stopped => Outcome::Failed,
            _ => Outcome::Waiting,
        };
    }
    let rolled_back = row
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("rolled back"));
    let applied_is_previous = detail.previous_spec.as_ref() == Some(&applied.redacted());
    if *saw_new || rolled_back && applied_is_previous {
        Outcome::Failed
    } else {
        Outcome::Waiting
    }
}

/// The sequence number of the department's latest event (0 if none).
async fn last_event(client: &Client, id: &str) -> anyhow::Result<i64> {
    let mut after = 0;
    loop {
        let page: EventPage = client
            .get(&format!(
                "/v1/events?after={after}&department={id}&limit=5000"
            ))
            .await?;
        if page.events.is_empty() {
            return Ok(after);
        }
        after = page.next;
    }
}

/// Prints the department's events logged since `cursor` (pull started, pulled,
/// update failed, ...): steps too quick for the status poll are not missed.
async fn print_new_events(
    client: &Client,
    id: &str,
    cursor: &mut i64,
    out: &crate::progress::ProgressView,
) -> anyhow::Result<()> {
    let page: EventPage = client
        .get(&format!("/v1/events?after={cursor}&department={id}"))
        .await?;
    for e in &page.events {
        out.say(&format!("{id}: event {}: {}", e.kind, e.message));
    }
    *cursor = page.next.max(*cursor);
    Ok(())
}

async fn wait(
    client: &Client,
    specs: &[DepartmentSpec],
    hashes: &BTreeMap<String, String>,
    mut cursors: BTreeMap<String, i64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: BTreeMap<String, (&DepartmentSpec, bool)> =
        specs.iter().map(|s| (s.id.clone(), (s, false))).collect();
    let mut last_line: BTreeMap<String, String> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut bars = crate::progress::ProgressView::new();
    // The first look may still show the old spec: the department task takes
    // the new one a moment after the apply returns, so a rollback is only
    // believed once the new hash has been seen or the reason says so.
    while !pending.is_empty() {
        let mut finished = Vec::new();
        for (id, (spec, saw_new)) in pending.iter_mut() {
            let cursor = cursors.entry(id.clone()).or_default();
            print_new_events(client, id, cursor, &bars).await?;
            let detail: DepartmentDetail = client.get(&format!("/v1/departments/{id}")).await?;
            let row = &detail.summary;
            // While a pull reports its bytes, the engine's own line (the
            // reason) changes with every message: the bar or the progress
            // lines say it instead.
            let reason = match &row.progress {
                Some(_) => None,
                None => row.reason.as_deref(),
            };
            let line = format!(
                "{id}: {} ({}){}",
                row.state.as_str(),
                row.health.as_str(),
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            );
            if last_line.get(id) != Some(&line) {
                bars.say(&line);
                last_line.insert(id.clone(), line.clone());
            }
            match &row.progress {
                Some(progress) => bars.update(id, progress),
                None => bars.done(id),
            }
            let expected = hashes.get(id).map(String::as_str);
            match judge(&detail, spec, expected, saw_new) {
                Outcome::Waiting => {}
                Outcome::Done => finished.push(id.clone()),
                Outcome::Failed => {
                    bars.done(id);
                    finished.push(id.clone());
                    failed.push(line);
                }
            }
        }
        for id in finished {
            pending.remove(&id);
        }
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "gave up waiting after {} for {}; follow it with `agentctl status` or `agentctl show <id>`",
                humantime::format_duration(timeout),
                pending.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !failed.is_empty() {
        bail!(
            "not every department runs its new spec: {}; see `agentctl show <id>`",
            failed.join("; ")
        );
    }
    Ok(())
}
