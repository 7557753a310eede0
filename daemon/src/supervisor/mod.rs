//! The supervisor: owns the set of departments on this node. Node-wide decisions
//! (validation of a whole desired state, capacity, port leases) happen here under
//! one lock; everything about one department is a message to its own task
//! (`department.rs`). Two background loops feed those tasks: the Docker event
//! stream (react at once) and the periodic resync (catch what events missed).

pub mod board;
pub mod department;
pub mod probe;

use crate::events::EventLog;
use crate::ports::{port_busy, PortPool};
use crate::runtime::{ContainerRuntime, RuntimeEvent};
use crate::store::Store;
use board::Board;
use department::{DeptActor, DeptError, DeptInit, DeptMsg, OperatorCommand};
use fleet_model::api::ApplyReport;
use fleet_model::spec::FieldError;
use fleet_model::{Config, DepartmentSpec};
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Mutex, Semaphore};

/// What every department task shares: read-mostly handles, no department state.
pub struct Shared {
    pub node_id: String,
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub events: EventLog,
    pub board: Board,
    pub bind: IpAddr,
    pub http: reqwest::Client,
    /// Limits how many departments start at once (after a reboot, all would).
    pub start_gate: Arc<Semaphore>,
    pub docker_up: AtomicBool,
    /// Counts the times Docker came (back) up: a container last seen running
    /// in an older epoch may have been stopped by the engine, not by itself.
    pub engine_epoch: AtomicU64,
    pub shutdown: AtomicBool,
    pub counters: Counters,
    pub host_memory_bytes: u64,
    /// Containers Docker reported an `oom` event for, newest last. Written by the
    /// event loop itself, so a department task busy deciding why its container
    /// died still sees an `oom` event that arrived after the `die`.
    pub oom_events: OomEvents,
}

impl Shared {
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

/// The last few container ids Docker reported out of memory.
#[derive(Default)]
pub struct OomEvents(std::sync::Mutex<std::collections::VecDeque<String>>);

impl OomEvents {
    const KEEP: usize = 64;

    pub fn record(&self, container_id: &str) {
        let mut ids = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if ids.len() >= Self::KEEP {
            ids.pop_front();
        }
        ids.push_back(container_id.to_string());
    }

    pub fn seen(&self, container_id: &str) -> bool {
        let ids = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.iter().any(|id| id == container_id)
    }

    /// Forgets `container_id`, whose OOM has been accounted for: the same
    /// container started again may later exit for another reason.
    pub fn forget(&self, container_id: &str) {
        let mut ids = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ids.retain(|id| id != container_id);
    }
}

/// Figures for `/metrics` that do not belong to a department.
#[derive(Default)]
pub struct Counters {
    pub reconcile_runs: AtomicU64,
    pub reconcile_seconds_micros: AtomicU64,
    pub event_stream_reconnects: AtomicU64,
    pub docker_events: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("the desired state was refused: {}", fleet_model::spec::join_fields(.0))]
    Invalid(Vec<FieldError>),
    #[error("no department `{0}` on this node")]
    UnknownDepartment(String),
    #[error("{0}")]
    Department(#[from] DeptError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the department task of `{0}` is gone; the daemon is shutting down")]
    Gone(String),
}

struct Handle {
    tx: tokio::sync::mpsc::Sender<DeptMsg>,
    spec: DepartmentSpec,
    task: tokio::task::JoinHandle<()>,
}

struct Registry {
    pool: PortPool,
    departments: BTreeMap<String, Handle>,
}

/// Department id -> its task's mailbox, for the event loop and the resync, which
/// must not wait behind a long apply holding the registry lock.
type Routes = Arc<std::sync::RwLock<BTreeMap<String, tokio::sync::mpsc::Sender<DeptMsg>>>>;

#[derive(Clone)]
pub struct Supervisor {
    pub shared: Arc<Shared>,
    registry: Arc<Mutex<Registry>>,
    routes: Routes,
}

impl Supervisor {
    /// Loads the intent from the store and spawns one task per department; each
    /// adopts what Docker already runs for it.
    pub async fn start(
        config: Arc<Config>,
        store: Arc<Store>,
        runtime: Arc<dyn ContainerRuntime>,
        events: EventLog,
        host_memory_bytes: u64,
    ) -> Result<Self, SupervisorError> {
        let (low, high) = config
            .ports
            .parsed_range()
            .map_err(|m| SupervisorError::Invalid(vec![FieldError::new("ports.range", m)]))?;
        let leases = store.leases()?;
        let shared = Arc::new(Shared {
            node_id: config.node_id(),
            bind: config.ports.bind,
            store: store.clone(),
            runtime,
            events,
            board: Board::default(),
            http: probe::client(),
            start_gate: Arc::new(Semaphore::new(config.start_concurrency)),
            docker_up: AtomicBool::new(false),
            engine_epoch: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
            host_memory_bytes,
            oom_events: OomEvents::default(),
            config,
        });
        let mut registry = Registry {
            pool: PortPool::new(low, high, leases),
            departments: BTreeMap::new(),
        };
        // Departments that already hold a lease keep it; of the others, those
        // naming an explicit host_port are placed before those taking a pool
        // port, so a pool department never takes a port another spec names.
        let mut stored_departments = store.departments()?;
        stored_departments.sort_by_key(|s| {
            (
                registry.pool.lease_of(&s.spec.id).is_none(),
                s.spec.host_port.is_none(),
            )
        });
        for stored in stored_departments {
            let id = stored.spec.id.clone();
            let bind = shared.bind;
            let port = match registry.pool.lease_of(&id) {
                Some(p) => p,
                None => match registry
                    .pool
                    .assign(&id, stored.spec.host_port, |p| port_busy(bind, p))
                {
                    Ok(p) => {
                        store.set_lease(&id, p)?;
                        p
                    }
                    Err(e) => {
                        shared.events.record(
                            Some(&id),
                            "port_unavailable",
                            Some("port"),
                            &e.to_string(),
                        );
                        continue;
                    }
                },
            };
            let restarts = restarts_by_reason(&store, &id);
            let (tx, task) = DeptActor::spawn(
                shared.clone(),
                DeptInit {
                    spec: stored.spec.clone(),
                    previous: stored.previous,
                    port,
                    desired_running: stored.desired_running,
                    failed_hash: stored.failed_hash,
                    restarts_by_reason: restarts,
                },
            );
            registry.departments.insert(
                id,
                Handle {
                    tx,
                    spec: stored.spec,
                    task,
                },
            );
        }
        let routes: Routes = Arc::new(std::sync::RwLock::new(
            registry
                .departments
                .iter()
                .map(|(id, h)| (id.clone(), h.tx.clone()))
                .collect(),
        ));
        Ok(Self {
            shared,
            registry: Arc::new(Mutex::new(registry)),
            routes,
        })
    }

    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().event_loop()),
            tokio::spawn(self.clone().resync_loop()),
        ]
    }

    /// Applies a set of specs as one: validated whole (ids, capacity, ports)
    /// before anything changes. With `prune`, departments not in the set go.
    pub async fn apply(
        &self,
        specs: Vec<DepartmentSpec>,
        prune: bool,
    ) -> Result<ApplyReport, SupervisorError> {
        let mut registry = self.registry.lock().await;
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, spec) in specs.iter().enumerate() {
            if let Err(errors) = spec.validate() {
                problems.extend(
                    errors
                        .into_iter()
                        .map(|e| FieldError::new(prefixed(&spec.id, i, &e.field), e.message)),
                );
            }
            if !seen.insert(spec.id.clone()) {
                problems.push(FieldError::new(
                    prefixed(&spec.id, i, "id"),
                    format!("`{}` appears twice in this desired state", spec.id),
                ));
            }
        }
        // The node after this apply.
        let mut next: BTreeMap<String, DepartmentSpec> = if prune {
            BTreeMap::new()
        } else {
            registry
                .departments
                .iter()
                .map(|(id, h)| (id.clone(), h.spec.clone()))
                .collect()
        };
        for spec in &specs {
            next.insert(spec.id.clone(), spec.clone());
        }
        let max = self.shared.config.max_departments;
        if next.len() > max {
            problems.push(FieldError::new(
                "departments",
                format!(
                    "this would run {} departments but max_departments is {max}; remove one first or raise max_departments",
                    next.len()
                ),
            ));
        }
        let node = crate::admission::Node::of(&self.shared.config, self.shared.host_memory_bytes);
        let changing = |id: &str| specs.iter().any(|s| s.id == id);
        if let Err(mut memory) = crate::admission::admit(next.values(), changing, &node) {
            problems.append(&mut memory);
        }
        // Ports, decided on a copy so a refusal changes nothing.
        let mut pool = registry.pool.clone();
        for id in registry.departments.keys() {
            if !next.contains_key(id) {
                pool.release(id);
            }
        }
        let bind = self.shared.bind;
        let mut ports = BTreeMap::new();
        let mut clean: Vec<&DepartmentSpec> = specs
            .iter()
            .filter(|s| problems_free(&problems, &s.id))
            .collect();
        // Explicit host_ports first: otherwise a pool department earlier in
        // the list could take the lowest free port that a later spec names,
        // and that spec would be refused for a port nobody asked for.
        clean.sort_by_key(|s| s.host_port.is_none());
        for spec in clean {
            match (pool.admit_explicit(spec.host_port))
                .and_then(|()| pool.assign(&spec.id, spec.host_port, |p| port_busy(bind, p)))
            {
                Ok(port) => {
                    ports.insert(spec.id.clone(), port);
                }
                Err(e) => problems.push(FieldError::new(
                    if spec.host_port.is_some() {
                        format!("{}.host_port", spec.id)
                    } else {
                        "ports.range".to_string()
                    },
                    e.to_string(),
                )),
            }
        }
        if !problems.is_empty() {
            self.shared.events.record(
                None,
                "apply_refused",
                Some("invalid"),
                &format!(
                    "desired state refused, nothing changed: {}",
                    fleet_model::spec::join_fields(&problems)
                ),
            );
            return Err(SupervisorError::Invalid(problems));
        }

        let mut report = ApplyReport {
            created: vec![],
            updated: vec![],
            unchanged: vec![],
            deleted: vec![],
        };
        let removed: Vec<String> = registry
            .departments
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            self.delete_locked(&mut registry, &id).await?;
            report.deleted.push(id);
        }
        registry.pool = pool;
        for spec in specs {
            let id = spec.id.clone();
            let port = ports.get(&id).copied().unwrap_or_default();
            self.shared.store.put_spec(&spec)?;
            self.shared.store.set_lease(&id, port)?;
            match registry.departments.get_mut(&id) {
                Some(handle) if handle.spec == spec => report.unchanged.push(id),
                Some(handle) => {
                    handle.spec = spec.clone();
                    self.shared
                        .events
                        .record(Some(&id), "spec_applied", None, "new spec applied");
                    let _ = handle
                        .tx
                        .send(DeptMsg::SetSpec {
                            spec: Box::new(spec),
                            host_port: port,
                        })
                        .await;
                    report.updated.push(id);
                }
                None => {
                    self.shared.events.record(
                        Some(&id),
                        "spec_applied",
                        None,
                        &format!("new department on port {port}"),
                    );
                    let (tx, task) = DeptActor::spawn(
                        self.shared.clone(),
                        DeptInit {
                            spec: spec.clone(),
                            previous: None,
                            port,
                            desired_running: true,
                            failed_hash: None,
                            restarts_by_reason: BTreeMap::new(),
                        },
                    );
                    registry
                        .departments
                        .insert(id.clone(), Handle { tx, spec, task });
                    report.created.push(id);
                }
            }
        }
        Ok(report)
    }

    pub async fn delete(&self, id: &str) -> Result<(), SupervisorError> {
        let mut registry = self.registry.lock().await;
        if !registry.departments.contains_key(id) {
            return Err(SupervisorError::UnknownDepartment(id.to_string()));
        }
        self.delete_locked(&mut registry, id).await
    }

    async fn delete_locked(
        &self,
        registry: &mut Registry,
        id: &str,
    ) -> Result<(), SupervisorError> {
        let Some(handle) = registry.departments.get(id) else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        handle
            .tx
            .send(DeptMsg::Delete { reply })
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))?;
        answer
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))??;
        if let Some(handle) = registry.departments.remove(id) {
            handle.task.abort();
        }
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        registry.pool.release(id);
        self.shared.store.delete_department(id)?;
        self.shared.board.remove(id);
        Ok(())
    }

    pub async fn command(
        &self,
        id: &str,
        command: OperatorCommand,
    ) -> Result<String, SupervisorError> {
        let tx = {
            let registry = self.registry.lock().await;
            registry
                .departments
                .get(id)
                .map(|h| h.tx.clone())
                .ok_or_else(|| SupervisorError::UnknownDepartment(id.to_string()))?
        };
        let (reply, answer) = oneshot::channel();
        tx.send(DeptMsg::Command { command, reply })
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))?;
        Ok(answer
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))??)
    }

    pub async fn specs(&self) -> Vec<DepartmentSpec> {
        self.registry
            .lock()
            .await
            .departments
            .values()
            .map(|h| h.spec.clone())
            .collect()
    }

    /// Port pool for `agentctl ports`: (port, department) for every pool port.
    pub async fn port_table(&self) -> (PortPool, IpAddr) {
        (self.registry.lock().await.pool.clone(), self.shared.bind)
    }

    pub async fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
    }

    fn senders(&self) -> BTreeMap<String, tokio::sync::mpsc::Sender<DeptMsg>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// React to Docker events at once; reconnect with backoff when the engine
    /// goes away, resuming from the last event seen, then resync everything.
    async fn event_loop(self) {
        let mut since: Option<i64> = None;
        let mut delay = Duration::from_millis(250);
        loop {
            if self.shared.shutting_down() {
                return;
            }
            if self.shared.runtime.ping().await.is_err() {
                self.set_docker_up(false);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
            let was_down = !self.shared.docker_up.load(Ordering::Relaxed);
            self.set_docker_up(true);
            delay = Duration::from_millis(250);
            let mut stream = self.shared.runtime.events(&self.shared.node_id, since);
            if was_down {
                // Whatever happened while we were not listening: look at everything.
                self.resync_once().await;
            }
            while let Some(item) = stream.next().await {
                match item {
                    Ok(RuntimeEvent::Container {
                        id,
                        department,
                        action,
                        time_nano,
                        ..
                    }) => {
                        since = Some(time_nano + 1);
                        if action == "oom" {
                            self.shared.oom_events.record(&id);
                        }
                        self.shared
                            .counters
                            .docker_events
                            .fetch_add(1, Ordering::Relaxed);
                        let target = self
                            .registry
                            .lock()
                            .await
                            .departments
                            .get(&department)
                            .map(|h| h.tx.clone());
                        if let Some(tx) = target {
                            let _ = tx
                                .send(DeptMsg::Docker {
                                    container_id: id,
                                    action,
                                    time_nano,
                                })
                                .await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Docker event stream failed; reconnecting.");
                        break;
                    }
                }
            }
            self.shared
                .counters
                .event_stream_reconnects
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn set_docker_up(&self, up: bool) {
        let was = self.shared.docker_up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                self.shared.engine_epoch.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .events
                    .record(None, "docker_up", None, "Docker engine reachable");
            } else {
                self.shared.events.record(
                    None,
                    "docker_down",
                    Some("docker"),
                    "Docker engine unreachable; containers keep running, retrying",
                );
            }
        }
    }

    async fn resync_loop(self) {
        let mut ticker = tokio::time::interval(self.shared.config.resync_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if self.shared.shutting_down() {
                return;
            }
            self.resync_once().await;
            crate::systemd::watchdog();
        }
    }

    /// Lists this node's managed containers, removes the ones no department owns,
    /// and asks every department to compare itself with Docker.
    pub async fn resync_once(&self) {
        let started = std::time::Instant::now();
        match self.shared.runtime.list(&self.shared.node_id).await {
            Ok(containers) => {
                self.set_docker_up(true);
                let known: BTreeSet<String> = self
                    .registry
                    .lock()
                    .await
                    .departments
                    .keys()
                    .cloned()
                    .collect();
                for c in containers {
                    if !known.contains(&c.department) {
                        self.shared.events.record(
                            Some(&c.department),
                            "orphan_removed",
                            Some("orphan"),
                            &format!(
                                "removing managed container {} of unknown department",
                                c.name
                            ),
                        );
                        if c.running {
                            let _ = self
                                .shared
                                .runtime
                                .stop(&c.id, Duration::from_secs(30))
                                .await;
                        }
                        if let Err(e) = self.shared.runtime.remove(&c.id).await {
                            tracing::warn!(container = %c.name, error = %e, "Could not remove orphan.");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "Resync could not list containers.");
                self.set_docker_up(false);
                return;
            }
        }
        for tx in self.senders().into_values() {
            // A busy department (mid-update) skips this round rather than block the loop.
            let _ = tx.try_send(DeptMsg::Resync);
        }
        self.shared
            .counters
            .reconcile_runs
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .counters
            .reconcile_seconds_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

fn prefixed(id: &str, index: usize, field: &str) -> String {
    if id.is_empty() || !fleet_model::spec::valid_id(id) {
        format!("departments[{index}].{field}")
    } else {
        format!("{id}.{field}")
    }
}

fn problems_free(problems: &[FieldError], id: &str) -> bool {
    let prefix = format!("{id}.");
    !problems.iter().any(|p| p.field.starts_with(&prefix))
}

fn restarts_by_reason(store: &Store, id: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for record in store.restart_history(id, 10_000).unwrap_or_default() {
        *out.entry(record.reason).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::OomEvents;

    #[test]
    fn oom_events_remember_the_newest_and_forget_on_request() {
        let oom = OomEvents::default();
        for i in 0..(OomEvents::KEEP + 5) {
            oom.record(&format!("c{i}"));
        }
        assert!(!oom.seen("c0"), "the oldest ids are dropped");
        assert!(oom.seen(&format!("c{}", OomEvents::KEEP + 4)));
        oom.forget(&format!("c{}", OomEvents::KEEP + 4));
        assert!(!oom.seen(&format!("c{}", OomEvents::KEEP + 4)));
    }
}
