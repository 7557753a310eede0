//! Rebuilding the node from Docker's labels when `state.db` is lost or
//! unreadable. Every department container carries, besides its department,
//! node, host port and spec hash, the whole spec with secret values masked
//! (`fleet-agent.spec`). The secret values themselves live where the container
//! needs them anyway, in its environment (Docker keeps that in the container's
//! config under its data root, readable by root only); they are never in a
//! label.
//!
//! `SpecLabels` puts that label on every container the department tasks create
//! (it wraps the runtime, so the tasks need not know), from a catalog of the
//! specs the supervisor handed out, found by the container's spec hash.
//! `recover_spec` is the way back: label + environment -> the spec, accepted
//! only when it hashes to the container's own spec hash, so a rebuilt
//! department adopts its container untouched instead of replacing it.

use crate::runtime::{
    ContainerConfig, ContainerRuntime, ContainerStats, CreateRequest, LogQuery, ObservedContainer,
    RuntimeError, RuntimeEvent,
};
use async_trait::async_trait;
use fleet_model::spec::Secret;
use fleet_model::{labels, DepartmentSpec};
use futures_util::stream::BoxStream;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The label value: the spec with its secrets masked.
pub fn spec_label(spec: &DepartmentSpec) -> String {
    serde_json::to_string(&spec.redacted()).unwrap_or_default()
}

/// The spec a container was created from, rebuilt from its labels and
/// environment. Refused (with why) unless it hashes to `labels`' spec hash
/// with `labels`' host port.
pub fn recover_spec(config: &ContainerConfig) -> Result<(DepartmentSpec, u16), String> {
    let label = config
        .labels
        .get(labels::SPEC)
        .ok_or("the container has no fleet-agent.spec label (created by an older fleet-agentd)")?;
    let port: u16 = config
        .labels
        .get(labels::HOST_PORT)
        .and_then(|p| p.parse().ok())
        .ok_or("the container has no usable fleet-agent.host-port label")?;
    let expected = config
        .labels
        .get(labels::SPEC_HASH)
        .ok_or("the container has no fleet-agent.spec-hash label")?;
    let mut spec: DepartmentSpec = serde_json::from_str(label)
        .map_err(|e| format!("its fleet-agent.spec label does not parse: {e}"))?;
    let env: BTreeMap<&str, &str> = config
        .env
        .iter()
        .filter_map(|line| line.split_once('='))
        .collect();
    for (key, value) in spec.secrets.iter_mut() {
        let found = env
            .get(key.as_str())
            .ok_or_else(|| format!("secret {key} is not in the container's environment"))?;
        *value = Secret::new(*found);
    }
    spec.validate().map_err(|errors| {
        format!(
            "its spec is not valid here: {}",
            fleet_model::spec::join_fields(&errors)
        )
    })?;
    if spec.container_hash(port) != *expected {
        return Err("the spec rebuilt from its labels does not hash to its spec-hash label".into());
    }
    Ok((spec, port))
}

/// Specs the supervisor handed to department tasks, by container hash; a few
/// per department (current, previous, the one before), so a rollback's
/// container is labelled too.
#[derive(Default)]
pub struct SpecCatalog {
    by_department: Mutex<BTreeMap<String, VecDeque<(String, String)>>>,
}

impl SpecCatalog {
    const KEEP: usize = 4;

    pub fn register(&self, spec: &DepartmentSpec, host_port: u16) {
        let hash = spec.container_hash(host_port);
        let mut all = self.by_department.lock().unwrap_or_else(|p| p.into_inner());
        let entries = all.entry(spec.id.clone()).or_default();
        entries.retain(|(h, _)| *h != hash);
        entries.push_back((hash, spec_label(spec)));
        while entries.len() > Self::KEEP {
            entries.pop_front();
        }
    }

    pub fn forget(&self, department: &str) {
        self.by_department
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(department);
    }

    fn label_for(&self, department: &str, hash: &str) -> Option<String> {
        self.by_department
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(department)?
            .iter()
            .find(|(h, _)| h == hash)
            .map(|(_, label)| label.clone())
    }
}

/// The runtime the department tasks use: the real one, plus the spec label on
/// every container created.
pub struct SpecLabels {
    inner: Arc<dyn ContainerRuntime>,
    catalog: Arc<SpecCatalog>,
}

impl SpecLabels {
    pub fn new(inner: Arc<dyn ContainerRuntime>, catalog: Arc<SpecCatalog>) -> Self {
        Self { inner, catalog }
    }
}

#[async_trait]
impl ContainerRuntime for SpecLabels {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.inner.ping().await
    }
    async fn list(&self, node: &str) -> Result<Vec<ObservedContainer>, RuntimeError> {
        self.inner.list(node).await
    }
    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        self.inner.inspect(name_or_id).await
    }
    async fn create(&self, request: &CreateRequest) -> Result<String, RuntimeError> {
        let label = match (
            request.labels.get(labels::DEPARTMENT),
            request.labels.get(labels::SPEC_HASH),
        ) {
            (Some(department), Some(hash)) => self.catalog.label_for(department, hash),
            _ => None,
        };
        match label {
            Some(label) => {
                let mut labelled = request.clone();
                labelled.labels.insert(labels::SPEC.to_string(), label);
                self.inner.create(&labelled).await
            }
            None => {
                tracing::warn!(container = %request.name, "No spec known for this container's hash; it is created without the fleet-agent.spec label and cannot be rebuilt from labels alone.");
                self.inner.create(request).await
            }
        }
    }
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.start(id).await
    }
    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        self.inner.stop(id, timeout).await
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.remove(id).await
    }
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.inner.image_present(image).await
    }
    async fn pull(
        &self,
        image: &str,
        progress: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), RuntimeError> {
        self.inner.pull(image, progress).await
    }
    fn events(
        &self,
        node: &str,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent, RuntimeError>> {
        self.inner.events(node, since_nano)
    }
    fn logs(
        &self,
        id: &str,
        query: &LogQuery,
    ) -> BoxStream<'static, Result<bytes::Bytes, RuntimeError>> {
        self.inner.logs(id, query)
    }
    async fn stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        self.inner.stats(id).await
    }
    async fn data_root(&self) -> Result<Option<PathBuf>, RuntimeError> {
        self.inner.data_root().await
    }
    async fn container_config(&self, id: &str) -> Result<Option<ContainerConfig>, RuntimeError> {
        self.inner.container_config(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec() -> DepartmentSpec {
        DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"aio:1\"\n[env]\nMODE = \"x\"\n[secrets]\nDB_PASSWORD = \"canary-42\"\n",
        )
        .unwrap()
    }

    fn config_of(spec: &DepartmentSpec, port: u16, env: &[&str]) -> ContainerConfig {
        ContainerConfig {
            labels: HashMap::from([
                (labels::SPEC.to_string(), spec_label(spec)),
                (labels::HOST_PORT.to_string(), port.to_string()),
                (labels::SPEC_HASH.to_string(), spec.container_hash(port)),
            ]),
            env: env.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_label_never_holds_a_secret_and_the_env_gives_it_back() {
        let spec = spec();
        assert!(!spec_label(&spec).contains("canary-42"));
        let config = config_of(
            &spec,
            8003,
            &["PATH=/bin", "MODE=x", "DB_PASSWORD=canary-42"],
        );
        let (back, port) = recover_spec(&config).unwrap();
        assert_eq!(port, 8003);
        assert_eq!(back, spec);
    }

    #[test]
    fn a_rebuilt_spec_must_hash_like_the_container() {
        let spec = spec();
        let wrong_secret = config_of(&spec, 8003, &["MODE=x", "DB_PASSWORD=other"]);
        assert!(recover_spec(&wrong_secret)
            .unwrap_err()
            .contains("does not hash"));
        let missing = config_of(&spec, 8003, &["MODE=x"]);
        assert!(recover_spec(&missing).unwrap_err().contains("DB_PASSWORD"));
        let mut old = config_of(&spec, 8003, &[]);
        old.labels.remove(labels::SPEC);
        assert!(recover_spec(&old).unwrap_err().contains("older"));
    }

    #[test]
    fn the_catalog_finds_a_spec_by_hash_and_keeps_a_few() {
        let catalog = SpecCatalog::default();
        let mut spec = spec();
        let first = spec.container_hash(8001);
        catalog.register(&spec, 8001);
        for i in 0..SpecCatalog::KEEP {
            spec.image = format!("aio:{}", i + 2);
            catalog.register(&spec, 8001);
        }
        assert!(
            catalog.label_for("hr", &first).is_none(),
            "the oldest is dropped"
        );
        let newest = catalog.label_for("hr", &spec.container_hash(8001)).unwrap();
        assert!(newest.contains(&spec.image));
        catalog.forget("hr");
        assert!(catalog
            .label_for("hr", &spec.container_hash(8001))
            .is_none());
    }
}
