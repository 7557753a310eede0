//! The supervisor: owns the set of departments on this node. Node-wide decisions
//! (validation of a whole desired state, capacity, port leases) are made whole
//! before anything changes; everything about one department is a message to its
//! own task (`department.rs`). Two background loops feed those tasks: the Docker
//! event stream (react at once) and the periodic resync (catch what events
//! missed).
//!
//! Locking: one registry (department id -> mailbox, applied spec; the port
//! pool) behind a std `Mutex` that is only ever held for map operations, never
//! across an await. Desired-state changes are decided under `changes`, an
//! async gate that the event loop, the resync loop, operator commands, readers
//! and the watchdog never take. An operator's delete marks its department
//! under the gate and waits for the task without it; only the deletions of an
//! `apply(prune)` are awaited under the gate (a department renamed onto its
//! own port must not start before the old container is gone).

pub mod board;
pub mod department;
pub mod machine;
pub mod probe;

use crate::events::EventLog;
use crate::ports::{port_busy, PortPool};
use crate::runtime::{ContainerRuntime, RuntimeEvent};
use crate::store::{Origin, Store, StoredDepartment};
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
use tokio::sync::{oneshot, Notify, Semaphore};

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
    /// Docker events not handed to a department because its mailbox was full.
    pub events_dropped: AtomicU64,
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
    #[error("department `{0}` is being deleted; try again once that delete has finished")]
    Deleting(String),
}

struct Handle {
    tx: tokio::sync::mpsc::Sender<DeptMsg>,
    spec: DepartmentSpec,
    task: tokio::task::JoinHandle<()>,
    /// An operator's delete is under way (see `Supervisor::delete`): the
    /// department keeps its lease and counts until its container is gone.
    deleting: bool,
}

/// The one registry: what runs here and on which port. Held only for map
/// operations (never across an await), so the event loop and the resync see a
/// department applied at run time at once.
struct Registry {
    pool: PortPool,
    departments: BTreeMap<String, Handle>,
}

#[derive(Clone)]
pub struct Supervisor {
    pub shared: Arc<Shared>,
    registry: Arc<std::sync::Mutex<Registry>>,
    /// Serializes desired-state changes (apply, delete); see the module header.
    changes: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the resync loop for a pass now (Docker came back).
    resync_now: Arc<Notify>,
    pub heartbeat: Arc<crate::systemd::Heartbeat>,
    /// Set once a desired state has been applied since start (standalone: the
    /// departments directory; coordinator mode: a document or a `304`). Until
    /// then the resync removes no container as an orphan: after a lost store
    /// the department set is not known yet.
    desired_applied: Arc<AtomicBool>,
    /// What this run rebuilt from Docker's labels, when the store was lost.
    pub state_rebuilt: Option<fleet_model::api::StateRebuilt>,
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
        let mut stored_departments = store.departments()?;
        let state_rebuilt =
            rebuild_from_labels(&shared, &mut registry.pool, &mut stored_departments).await?;
        let (mut past, running_now) = past_restarts(&shared, &stored_departments).await;
        if let Some(rebuilt) = &state_rebuilt {
            // The store's restart rows went with it: the engine's record of
            // them is all that is left, so it becomes the history again.
            for id in &rebuilt.recovered {
                for r in past.get(id).into_iter().flatten() {
                    store.record_restart_at(
                        id,
                        r.failed_at_nano / 1_000_000_000,
                        r.reason.label(),
                        r.reason.exit_code(),
                    )?;
                }
            }
        }
        // Departments that already hold a lease keep it; of the others, those
        // naming an explicit host_port are placed before those taking a pool
        // port, so a pool department never takes a port another spec names.
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
            let now_nano = crate::supervisor::department::now_nanos();
            // Only the restarts of the container it runs now: a new spec (a
            // new container) starts the crash-loop count afresh, as it does
            // in a running daemon.
            let current = running_now.get(&id);
            let restarted_ago = past
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| current == Some(&r.container_id))
                .map(|r| r.failed_at_nano)
                .filter(|at| {
                    now_nano.saturating_sub(*at) <= stored.spec.restart.window.as_nanos() as i64
                })
                .map(|at| Duration::from_nanos(now_nano.saturating_sub(at).max(0) as u64))
                .collect();
            let (tx, task) = DeptActor::spawn(
                shared.clone(),
                DeptInit {
                    spec: stored.spec.clone(),
                    previous: stored.previous,
                    port,
                    desired_running: stored.desired_running,
                    failed_hash: stored.failed_hash,
                    restarts_by_reason: restarts,
                    restarted_ago,
                },
            );
            registry.departments.insert(
                id,
                Handle {
                    tx,
                    spec: stored.spec,
                    task,
                    deleting: false,
                },
            );
        }
        Ok(Self {
            shared,
            registry: Arc::new(std::sync::Mutex::new(registry)),
            changes: Arc::new(tokio::sync::Mutex::new(())),
            resync_now: Arc::new(Notify::new()),
            heartbeat: Arc::new(crate::systemd::Heartbeat::default()),
            desired_applied: Arc::new(AtomicBool::new(false)),
            state_rebuilt,
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Every change to the registry is a plain map operation that cannot
        // leave it half-done, so a poisoned lock is still consistent.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn spawn_background(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.clone().event_loop()),
            tokio::spawn(self.clone().resync_loop()),
        ];
        if let Some(interval) = crate::systemd::watchdog_interval() {
            tasks.push(tokio::spawn(crate::systemd::feed_watchdog(
                self.heartbeat.clone(),
                interval,
                self.shared.config.resync_interval,
            )));
        }
        tasks
    }

    /// Applies a set of specs as one: validated whole (ids, capacity, ports)
    /// before anything changes. With `prune`, departments not in the set go.
    pub async fn apply(
        &self,
        specs: Vec<DepartmentSpec>,
        prune: bool,
    ) -> Result<ApplyReport, SupervisorError> {
        let _gate = self.changes.lock().await;
        let (current, current_pool, deleting) = {
            let registry = self.registry();
            let current: BTreeMap<String, DepartmentSpec> = registry
                .departments
                .iter()
                .map(|(id, h)| (id.clone(), h.spec.clone()))
                .collect();
            let deleting: BTreeSet<String> = registry
                .departments
                .iter()
                .filter(|(_, h)| h.deleting)
                .map(|(id, _)| id.clone())
                .collect();
            (current, registry.pool.clone(), deleting)
        };
        // Not a fault in the document but work in progress: 409, and the
        // same apply succeeds once the delete has finished.
        if let Some(busy) = specs.iter().find(|s| deleting.contains(&s.id)) {
            self.shared.events.record(
                Some(&busy.id),
                "apply_refused",
                Some("deleting"),
                &format!(
                    "desired state refused, nothing changed: {}",
                    SupervisorError::Deleting(busy.id.clone())
                ),
            );
            return Err(SupervisorError::Deleting(busy.id.clone()));
        }
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
        // The node after this apply. A department an operator is deleting
        // still runs (and counts) until its container is gone.
        let mut next: BTreeMap<String, DepartmentSpec> = if prune {
            current
                .iter()
                .filter(|(id, _)| deleting.contains(*id))
                .map(|(id, spec)| (id.clone(), spec.clone()))
                .collect()
        } else {
            current.clone()
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
        let removed: Vec<String> = current
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        // An explicit port outside the pool is refused: HAProxy and the
        // firewall only know the pool.
        let outside: Vec<FieldError> = specs
            .iter()
            .filter_map(|s| {
                current_pool
                    .admit_explicit(s.host_port)
                    .err()
                    .map(|e| FieldError::new(format!("{}.host_port", s.id), e.to_string()))
            })
            .collect();
        problems.extend(outside);
        // Network, hardening and secrets mode within the node's bounds.
        for spec in &specs {
            for f in crate::hardening::check(spec, &self.shared.config.containers) {
                problems.push(FieldError::new(
                    format!("{}.{}", spec.id, f.field),
                    f.message,
                ));
            }
        }
        // Ports, decided on a copy so a refusal changes nothing (ports.rs).
        let wanted: Vec<(String, Option<u16>)> = specs
            .iter()
            .filter(|s| problems_free(&problems, &s.id))
            .map(|s| (s.id.clone(), s.host_port))
            .collect();
        let bind = self.shared.bind;
        let (mut pool, ports, refused) = crate::ports::plan(
            &current_pool,
            &wanted,
            |d| next.contains_key(d),
            &removed,
            |p| port_busy(bind, p),
        );
        for (id, explicit, e) in refused {
            problems.push(FieldError::new(
                if explicit {
                    format!("{id}.host_port")
                } else {
                    "ports.range".to_string()
                },
                e.to_string(),
            ));
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
            spec_hashes: BTreeMap::new(),
        };
        for id in removed {
            self.delete_department(&id).await?;
            report.deleted.push(id);
        }
        {
            // Leases of departments whose delete finished meanwhile go too.
            let mut registry = self.registry();
            let departments = &registry.departments;
            pool.retain_departments(|d| ports.contains_key(d) || departments.contains_key(d));
            registry.pool = pool;
        }
        for spec in specs {
            let id = spec.id.clone();
            let port = ports.get(&id).copied().unwrap_or_default();
            report.spec_hashes.insert(
                id.clone(),
                spec.container_hash(port, self.shared.store.hash_key()),
            );
            self.shared.store.put_spec(&spec)?;
            self.shared.store.set_lease(&id, port)?;
            self.announce(current.get(&id), &spec)?;
            // Decided under the lock, carried out after it: a full mailbox
            // (a wedged department) must not hold the registry.
            let send = {
                let mut registry = self.registry();
                let result = match registry.departments.get_mut(&id) {
                    Some(handle) if handle.spec == spec => {
                        report.unchanged.push(id.clone());
                        None
                    }
                    Some(handle) => {
                        handle.spec = spec.clone();
                        report.updated.push(id.clone());
                        Some((handle.tx.clone(), spec))
                    }
                    None => {
                        let (tx, task) = DeptActor::spawn(
                            self.shared.clone(),
                            DeptInit {
                                spec: spec.clone(),
                                previous: None,
                                port,
                                desired_running: true,
                                failed_hash: None,
                                restarts_by_reason: BTreeMap::new(),
                                restarted_ago: Vec::new(),
                            },
                        );
                        registry.departments.insert(
                            id.clone(),
                            Handle {
                                tx,
                                spec,
                                task,
                                deleting: false,
                            },
                        );
                        report.created.push(id.clone());
                        None
                    }
                };
                result
            };
            match send {
                Some((tx, spec)) => {
                    self.shared
                        .events
                        .record(Some(&id), "spec_applied", None, "new spec applied");
                    // Under the gate only (applies stay in order); it waits only
                    // when the department's mailbox (256) is full.
                    let _ = tx
                        .send(DeptMsg::SetSpec {
                            spec: Box::new(spec),
                            host_port: port,
                        })
                        .await;
                }
                None if report.created.last() == Some(&id) => self.shared.events.record(
                    Some(&id),
                    "spec_applied",
                    None,
                    &format!("new department on port {port}"),
                ),
                None => {}
            }
        }
        self.desired_applied.store(true, Ordering::Relaxed);
        Ok(report)
    }

    /// The coordinator's (or an applied file's) `next_image`: a new one is
    /// announced and pulled in the background as `agentctl prepull` does;
    /// one cleared withdraws the announcement it made (not one an operator
    /// made since). Only a change acts, so a coordinator re-sending the same
    /// document pulls nothing again.
    fn announce(
        &self,
        before: Option<&DepartmentSpec>,
        spec: &DepartmentSpec,
    ) -> Result<(), SupervisorError> {
        let was = before.and_then(DepartmentSpec::announced_next_image);
        let now = spec.announced_next_image();
        if was == now {
            return Ok(());
        }
        match now {
            Some(image) => {
                crate::imagegc::prepull(self.shared.clone(), &spec.id, image)?;
            }
            None => {
                let ours = self
                    .shared
                    .store
                    .announced_images()?
                    .into_iter()
                    .any(|(d, i)| d == spec.id && Some(i.as_str()) == was);
                if ours {
                    self.shared.store.clear_announcement(&spec.id)?;
                    self.shared.events.record(
                        Some(&spec.id),
                        "prepull_withdrawn",
                        None,
                        &format!("next_image {} no longer announced", was.unwrap_or_default()),
                    );
                }
            }
        }
        Ok(())
    }

    /// An operator's delete. Marked under the gate, then carried out without
    /// it: the department's task may take up to its stop timeout (or, busy in
    /// a pull, longer), and applies of other departments must not wait for
    /// that. Until it is done the department keeps its lease and its place in
    /// the count, and an apply naming it is refused.
    pub async fn delete(&self, id: &str) -> Result<(), SupervisorError> {
        {
            let _gate = self.changes.lock().await;
            let mut registry = self.registry();
            match registry.departments.get_mut(id) {
                None => return Err(SupervisorError::UnknownDepartment(id.to_string())),
                Some(h) if h.deleting => return Err(SupervisorError::Deleting(id.to_string())),
                Some(h) => h.deleting = true,
            }
        }
        let result = self.delete_department(id).await;
        if result.is_err() {
            if let Some(h) = self.registry().departments.get_mut(id) {
                h.deleting = false;
            }
        }
        result
    }

    /// Asks the department's task to remove its container and waits for the
    /// answer with no registry lock held; then forgets the department.
    async fn delete_department(&self, id: &str) -> Result<(), SupervisorError> {
        let Some(tx) = self.registry().departments.get(id).map(|h| h.tx.clone()) else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        tx.send(DeptMsg::Delete { reply })
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))?;
        answer
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))??;
        {
            let mut registry = self.registry();
            if let Some(handle) = registry.departments.remove(id) {
                handle.task.abort();
            }
            registry.pool.release(id);
        }
        self.shared.store.delete_department(id)?;
        self.shared.board.remove(id);
        Ok(())
    }

    pub async fn command(
        &self,
        id: &str,
        command: OperatorCommand,
    ) -> Result<String, SupervisorError> {
        let tx = self
            .registry()
            .departments
            .get(id)
            .map(|h| h.tx.clone())
            .ok_or_else(|| SupervisorError::UnknownDepartment(id.to_string()))?;
        let (reply, answer) = oneshot::channel();
        tx.send(DeptMsg::Command { command, reply })
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))?;
        Ok(answer
            .await
            .map_err(|_| SupervisorError::Gone(id.to_string()))??)
    }

    pub fn specs(&self) -> Vec<DepartmentSpec> {
        self.registry()
            .departments
            .values()
            .map(|h| h.spec.clone())
            .collect()
    }

    /// Port pool for `agentctl ports`: (port, department) for every pool port.
    pub fn port_table(&self) -> (PortPool, IpAddr) {
        (self.registry().pool.clone(), self.shared.bind)
    }

    /// The desired state in force was confirmed (coordinator: a `304`), so
    /// what no department owns may go.
    pub fn desired_state_confirmed(&self) {
        self.desired_applied.store(true, Ordering::Relaxed);
    }

    pub async fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
    }

    fn sender(&self, department: &str) -> Option<tokio::sync::mpsc::Sender<DeptMsg>> {
        self.registry()
            .departments
            .get(department)
            .map(|h| h.tx.clone())
    }

    fn senders(&self) -> Vec<tokio::sync::mpsc::Sender<DeptMsg>> {
        self.registry()
            .departments
            .values()
            .map(|h| h.tx.clone())
            .collect()
    }

    fn known_departments(&self) -> BTreeSet<String> {
        self.registry().departments.keys().cloned().collect()
    }

    /// React to Docker events at once; reconnect with backoff when the engine
    /// goes away, resuming from the last event seen, then resync everything.
    /// It stamps the heartbeat every second while it waits and never awaits a
    /// department task (events are handed over with `try_send`).
    async fn event_loop(self) {
        let mut since: Option<i64> = None;
        let mut delay = Duration::from_millis(250);
        let mut beat = tokio::time::interval(crate::systemd::EVENT_LOOP_BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.event_loop_alive();
            if self.shared.shutting_down() {
                return;
            }
            let ping = tokio::time::timeout(Duration::from_secs(5), self.shared.runtime.ping());
            if !matches!(ping.await, Ok(Ok(()))) {
                self.set_docker_up(false);
                self.heartbeat.event_loop_alive();
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
                self.resync_now.notify_one();
            }
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = beat.tick() => {
                        self.heartbeat.event_loop_alive();
                        continue;
                    }
                };
                match item {
                    Some(Ok(RuntimeEvent::Container {
                        id,
                        department,
                        action,
                        exit_code,
                        time_nano,
                        ..
                    })) => {
                        since = Some(time_nano + 1);
                        if action == "oom" {
                            self.shared.oom_events.record(&id);
                        }
                        self.shared
                            .counters
                            .docker_events
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(tx) = self.sender(&department) {
                            let message = DeptMsg::Docker {
                                container_id: id,
                                action,
                                exit_code,
                                time_nano,
                            };
                            if tx.try_send(message).is_err() {
                                // A mailbox of 256 full: the department is wedged
                                // or gone; the next resync looks at it anyway.
                                self.shared
                                    .counters
                                    .events_dropped
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Docker event stream failed; reconnecting.");
                        break;
                    }
                    None => break,
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

    /// One pass every `resync_interval` (or at once when the event loop saw
    /// Docker come back), each bounded by the pass limit so a hung Docker call
    /// cannot stop the loop; every finished or abandoned pass stamps the
    /// heartbeat.
    async fn resync_loop(self) {
        let interval = self.shared.config.resync_interval;
        let limit = crate::systemd::resync_pass_limit(interval);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.resync_alive();
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.resync_now.notified() => {}
            }
            if self.shared.shutting_down() {
                return;
            }
            if tokio::time::timeout(limit, self.resync_once())
                .await
                .is_err()
            {
                tracing::warn!(
                    limit = %humantime::format_duration(limit),
                    "A resync pass took longer than its limit (Docker slow?); abandoned, retrying at the next tick."
                );
            }
        }
    }

    /// Lists this node's managed containers, removes the ones no department
    /// owns (only once a desired state has been applied since start: before
    /// that, "unknown" may just mean "not loaded yet"), and asks every
    /// department to compare itself with Docker.
    pub async fn resync_once(&self) {
        let started = std::time::Instant::now();
        let containers = match self.shared.runtime.list(&self.shared.node_id).await {
            Ok(containers) => containers,
            Err(e) => {
                tracing::debug!(error = %e, "Resync could not list containers.");
                self.set_docker_up(false);
                return;
            }
        };
        self.set_docker_up(true);
        // The departments first: removing an orphan may take a stop timeout,
        // and a pass cut short at its limit must not have skipped them.
        for tx in self.senders() {
            // A busy department (mid-update) skips this round rather than block the loop.
            let _ = tx.try_send(DeptMsg::Resync);
        }
        if self.desired_applied.load(Ordering::Relaxed) {
            let known = self.known_departments();
            for c in containers.iter().filter(|c| !known.contains(&c.department)) {
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

/// After a lost or unreadable store, Docker's labels say what this node ran.
/// Every primary container of this node whose department the store does not
/// know gives back its port lease (`fleet-agent.host-port`) and, when its
/// `fleet-agent.spec` label and environment rebuild a spec with its own spec
/// hash, the department itself (persisted again, so the next start needs no
/// labels). Anything else is left running as it is: no container is removed
/// before a desired state has been applied (see `desired_applied`). Docker
/// unreachable at start: nothing is rebuilt now (the departments the store
/// knows still start), and the loss is still reported.
async fn rebuild_from_labels(
    shared: &Shared,
    pool: &mut PortPool,
    stored: &mut Vec<StoredDepartment>,
) -> Result<Option<fleet_model::api::StateRebuilt>, SupervisorError> {
    let store_origin = shared.store.origin().clone();
    let listed = tokio::time::timeout(
        Duration::from_secs(10),
        shared.runtime.list(&shared.node_id),
    )
    .await;
    let containers = match listed {
        Ok(Ok(containers)) => containers,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Docker unreachable at start: nothing rebuilt from labels now.");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("Docker did not list containers within 10s at start: nothing rebuilt from labels now.");
            Vec::new()
        }
    };
    let known: BTreeSet<String> = stored.iter().map(|d| d.spec.id.clone()).collect();
    let mut recovered = Vec::new();
    let mut not_recovered = Vec::new();
    let mut unknown = 0usize;
    for c in containers
        .iter()
        .filter(|c| c.role == "primary" && !c.department.is_empty())
    {
        if known.contains(&c.department) {
            continue;
        }
        unknown += 1;
        let config = match shared.runtime.container_config(&c.id).await {
            Ok(Some(config)) => config,
            Ok(None) => continue,
            Err(e) => {
                not_recovered.push(format!("{}: cannot inspect it: {e}", c.name));
                continue;
            }
        };
        let labelled_port = config
            .labels
            .get(fleet_model::labels::HOST_PORT)
            .and_then(|p| p.parse::<u16>().ok())
            .or(c.published_port);
        if let Some(port) = labelled_port {
            match pool.holder(port) {
                Some(holder) if holder != c.department => {
                    not_recovered.push(format!(
                        "{}: its port {port} is leased to `{holder}`",
                        c.name
                    ));
                    continue;
                }
                _ => {
                    pool.release(&c.department);
                    pool.insert_lease(port, &c.department);
                    shared.store.set_lease(&c.department, port)?;
                }
            }
        }
        match crate::recovery::recover_spec(&config, shared.store.hash_key()) {
            Ok((spec, _port)) => {
                shared.store.put_spec(&spec)?;
                shared.events.record(
                    Some(&spec.id),
                    "recovered",
                    Some("state_lost"),
                    &format!(
                        "department rebuilt from the labels of container {} (store lost)",
                        c.name
                    ),
                );
                recovered.push(spec.id.clone());
                stored.push(StoredDepartment {
                    spec,
                    previous: None,
                    desired_running: true,
                    failed_hash: None,
                });
            }
            Err(why) => {
                shared.events.record(
                    Some(&c.department),
                    "not_recovered",
                    Some("state_lost"),
                    &format!(
                        "container {} left as it is until a desired state names its department: {why}",
                        c.name
                    ),
                );
                not_recovered.push(format!("{}: {why}", c.name));
            }
        }
    }
    let (reason, moved_to) = match &store_origin {
        Origin::MovedAside { moved_to, .. } => ("corrupt", Some(moved_to.display().to_string())),
        Origin::Created if unknown > 0 => ("missing", None),
        _ => return Ok(None),
    };
    let message = format!(
        "state.db was {}{}; rebuilt from Docker's labels: {} department(s) recovered{}",
        if reason == "corrupt" {
            "unreadable"
        } else {
            "missing"
        },
        moved_to
            .as_deref()
            .map(|p| format!(" (kept as {p})"))
            .unwrap_or_default(),
        recovered.len(),
        if not_recovered.is_empty() {
            String::new()
        } else {
            format!(", {} container(s) left as they are", not_recovered.len())
        }
    );
    tracing::error!(reason, "{message}");
    shared
        .events
        .record(None, "state_rebuilt", Some(reason), &message);
    Ok(Some(fleet_model::api::StateRebuilt {
        reason: reason.to_string(),
        moved_to,
        at: crate::store::now_secs(),
        recovered,
        not_recovered,
    }))
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

/// The restarts Docker still remembers for `departments`, over the longest
/// crash-loop window among them (see `recovery::restarts_from_events`). An
/// engine that cannot answer leaves the history empty, as before.
/// Also each department's primary container now, by department.
async fn past_restarts(
    shared: &Shared,
    departments: &[StoredDepartment],
) -> (
    BTreeMap<String, Vec<crate::recovery::PastRestart>>,
    BTreeMap<String, String>,
) {
    let Some(window) = departments.iter().map(|d| d.spec.restart.window).max() else {
        return Default::default();
    };
    let until = crate::supervisor::department::now_nanos();
    let since = until.saturating_sub(window.as_nanos().min(i64::MAX as u128) as i64);
    let runtime = &shared.runtime;
    let node = &shared.node_id;
    let read = async {
        let events = runtime.past_events(node, since, until).await?;
        let containers = runtime.list(node).await?;
        Ok::<_, crate::runtime::RuntimeError>((events, containers))
    };
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok((events, containers))) => (
            crate::recovery::restarts_from_events(&events),
            containers
                .into_iter()
                .filter(|c| c.role == "primary")
                .map(|c| (c.department, c.id))
                .collect(),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Docker's past events are unreadable: restart history starts empty.");
            Default::default()
        }
        Err(_) => {
            tracing::warn!(
                "Docker did not replay its past events within 10s: restart history starts empty."
            );
            Default::default()
        }
    }
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
