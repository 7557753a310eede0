//! `agentctl apply -f <file|dir>`: read TOML specs, validate them here (so a bad
//! file is named before anything is sent), and apply them as one set.

use super::JsonFlag;
use crate::client::Client;
use crate::output;
use anyhow::{bail, Context};
use fleet_model::api::{ApplyReport, ApplyRequest};
use fleet_model::DepartmentSpec;
use hyper::Method;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A spec file, or a directory of *.toml specs.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Delete departments that are not in the given specs.
    #[arg(long)]
    prune: bool,
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
        match DepartmentSpec::from_toml(&file.display().to_string(), &text) {
            Ok(spec) => specs.push(spec),
            Err(e) => {
                for f in e.fields() {
                    problems.push(format!("  {}: {}: {}", file.display(), f.field, f.message));
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
    let request = ApplyRequest {
        departments: specs,
        prune: args.prune,
    };
    let report: ApplyReport = client.post(Method::POST, "/v1/apply", &request).await?;
    if args.json.json {
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
    Ok(())
}
