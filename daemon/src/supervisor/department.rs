//! The owner of one department. Every trigger about it (Docker event, probe
//! result, new spec, operator command, periodic resync) arrives here as a
//! `DeptMsg` and is handled one at a time, so two actions never race on its
//! container. Docker labels say what runs; this task compares that with the
//! spec and acts.

use super::board::DeptView;
use super::probe::{self, LatencyHistogram};
use super::Shared;
use crate::restart::{Decision, FailureReason, RestartTracker};
use crate::runtime::{CreateRequest, ObservedContainer, RuntimeError};
use fleet_model::api::{DeptState, Health, ProbeRecord};
use fleet_model::{candidate_container_name, container_name, labels, DepartmentSpec};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Probe results kept for `agentctl show`.
const PROBES_KEPT: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorCommand {
    Start,
    Stop,
    Restart,
    Rollback,
}

impl OperatorCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorCommand::Start => "start",
            OperatorCommand::Stop => "stop",
            OperatorCommand::Restart => "restart",
            OperatorCommand::Rollback => "rollback",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeptError {
    #[error("department `{0}` has no previous spec to roll back to")]
    NoPrevious(String),
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

pub enum DeptMsg {
    SetSpec {
        spec: Box<DepartmentSpec>,
        host_port: u16,
    },
    Delete {
        reply: oneshot::Sender<Result<(), DeptError>>,
    },
    Command {
        command: OperatorCommand,
        reply: oneshot::Sender<Result<String, DeptError>>,
    },
    Docker {
        container_id: String,
        action: String,
        time_nano: i64,
    },
    Probe {
        generation: u64,
        record: ProbeRecord,
    },
    Resync,
}

fn wrap_probe(generation: u64, record: ProbeRecord) -> DeptMsg {
    DeptMsg::Probe { generation, record }
}

pub struct DeptActor {
    shared: Arc<Shared>,
    id: String,
    spec: DepartmentSpec,
    previous: Option<DepartmentSpec>,
    port: u16,
    desired_running: bool,
    failed_hash: Option<String>,
    state: DeptState,
    health: Health,
    reason: Option<String>,
    container: Option<ObservedContainer>,
    tracker: RestartTracker,
    restart_at: Option<Instant>,
    pending_failure: Option<FailureReason>,
    /// Wall-clock nanoseconds of our last start: Docker events older than it
    /// are about a run we already handled.
    run_started_nano: i64,
    probe_task: Option<tokio::task::JoinHandle<()>>,
    probe_generation: u64,
    probing_since: Instant,
    consecutive_failures: u32,
    probes: VecDeque<ProbeRecord>,
    restarts_by_reason: BTreeMap<String, u64>,
    probe_total: u64,
    probe_failures: u64,
    latency: LatencyHistogram,
    pull_progress: Option<String>,
    next_pull_attempt: Option<Instant>,
    /// The exited run (container id, start time) already judged, so a resync
    /// does not count the same exit twice.
    judged_run: Option<(String, Option<i64>)>,
    /// The container this task last saw running, and the engine epoch then.
    /// An exit it did not watch happen (the daemon, the host or Docker was
    /// restarting) is not judged like a crash; see `converge`.
    watched: Option<(String, u64)>,
    self_tx: mpsc::Sender<DeptMsg>,
}

pub struct DeptInit {
    pub spec: DepartmentSpec,
    pub previous: Option<DepartmentSpec>,
    pub port: u16,
    pub desired_running: bool,
    pub failed_hash: Option<String>,
    pub restarts_by_reason: BTreeMap<String, u64>,
}

impl DeptActor {
    pub fn spawn(
        shared: Arc<Shared>,
        init: DeptInit,
    ) -> (mpsc::Sender<DeptMsg>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(256);
        let actor = DeptActor {
            id: init.spec.id.clone(),
            shared,
            spec: init.spec,
            previous: init.previous,
            port: init.port,
            desired_running: init.desired_running,
            failed_hash: init.failed_hash,
            state: DeptState::Pending,
            health: Health::Unknown,
            reason: None,
            container: None,
            tracker: RestartTracker::default(),
            restart_at: None,
            pending_failure: None,
            run_started_nano: 0,
            probe_task: None,
            probe_generation: 0,
            probing_since: Instant::now(),
            consecutive_failures: 0,
            probes: VecDeque::new(),
            restarts_by_reason: init.restarts_by_reason,
            probe_total: 0,
            probe_failures: 0,
            latency: LatencyHistogram::default(),
            pull_progress: None,
            next_pull_attempt: None,
            judged_run: None,
            watched: None,
            self_tx: tx.clone(),
        };
        let handle = tokio::spawn(actor.run(rx));
        (tx, handle)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<DeptMsg>) {
        self.publish();
        // An update candidate left by a daemon that died mid-update.
        if let Ok(Some(stale)) = self
            .shared
            .runtime
            .inspect(&candidate_container_name(&self.id))
            .await
        {
            if stale.department == self.id {
                let _ = self.shared.runtime.remove(&stale.id).await;
            }
        }
        self.converge().await;
        self.publish();
        loop {
            let timer = self.restart_at;
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    if self.handle(msg).await {
                        break;
                    }
                }
                _ = sleep_until_opt(timer), if timer.is_some() => {
                    self.restart_at = None;
                    self.restart_now().await;
                }
            }
            self.publish();
        }
        self.stop_probe();
    }

    /// Returns true when the department is gone and the task should end.
    async fn handle(&mut self, msg: DeptMsg) -> bool {
        match msg {
            DeptMsg::SetSpec { spec, host_port } => {
                let changed_container = spec.container_hash(host_port) != self.hash();
                if let Some(failed) = &self.failed_hash {
                    if *failed != spec.container_hash(host_port) {
                        self.failed_hash = None;
                    }
                }
                if *spec != self.spec {
                    self.previous = Some(std::mem::replace(&mut self.spec, *spec));
                }
                self.port = host_port;
                if changed_container {
                    // A new spec is the other way out of a crash loop.
                    self.tracker.reset();
                    self.restart_at = None;
                    self.pending_failure = None;
                } else if self.probe_task.is_some() {
                    // Probe settings may have changed; restart probing with them.
                    self.start_probe();
                }
                self.converge().await;
            }
            DeptMsg::Delete { reply } => {
                let result = self.delete().await;
                let done = result.is_ok();
                let _ = reply.send(result);
                return done;
            }
            DeptMsg::Command { command, reply } => {
                let result = self.command(command).await;
                let _ = reply.send(result);
            }
            DeptMsg::Docker {
                container_id,
                action,
                time_nano,
            } => {
                self.on_docker_event(&container_id, &action, time_nano)
                    .await
            }
            DeptMsg::Probe { generation, record } => {
                if generation == self.probe_generation {
                    self.on_probe(record).await;
                }
            }
            DeptMsg::Resync => self.converge().await,
        }
        false
    }

    fn hash(&self) -> String {
        self.spec.container_hash(self.port)
    }

    fn name(&self) -> String {
        container_name(&self.id)
    }

    fn event(&self, kind: &str, reason: Option<&str>, message: &str) {
        self.shared
            .events
            .record(Some(&self.id), kind, reason, message);
    }

    fn set_state(&mut self, state: DeptState, reason: Option<String>) {
        if state != self.state {
            let reason_label = reason.as_deref().map(reason_label);
            self.event(
                &format!("state_{}", state.as_str()),
                reason_label.as_deref(),
                &format!(
                    "{} -> {}{}",
                    self.state.as_str(),
                    state.as_str(),
                    reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            );
        }
        self.state = state;
        self.reason = reason;
    }

    /// Level-triggered: look at what Docker runs and make it match the intent.
    async fn converge(&mut self) {
        if self.shared.shutting_down() {
            return;
        }
        let observed = match self.shared.runtime.inspect(&self.name()).await {
            Ok(o) => o,
            Err(e) => {
                self.reason = Some(format!("cannot inspect container: {e}"));
                return;
            }
        };
        let observed = observed.filter(|c| {
            // A same-named container of another node or not ours is not adopted.
            c.department == self.id
        });
        match observed {
            None => {
                self.container = None;
                self.stop_probe();
                if !self.desired_running {
                    self.set_state(DeptState::Stopped, Some("stopped by operator".into()));
                } else if self.tracker.parked() {
                    self.set_state(DeptState::CrashLooping, self.reason.clone());
                } else if self.restart_at.is_none()
                    && self.next_pull_attempt.is_none_or(|t| Instant::now() >= t)
                {
                    self.create_and_start(false).await;
                }
            }
            Some(c) if c.spec_hash.as_deref() != Some(self.hash().as_str()) => {
                if self.failed_hash.as_deref() == Some(self.hash().as_str()) {
                    return;
                }
                self.update(c).await;
            }
            Some(c) if c.running => {
                self.watch(&c);
                let adopted = self.container.as_ref().map(|k| k.id.as_str()) != Some(c.id.as_str());
                if adopted {
                    self.event(
                        "adopted",
                        None,
                        &format!("adopted running container {}", short(&c.id)),
                    );
                    self.container = Some(c);
                    self.start_probe();
                } else {
                    self.container = Some(c);
                    if self.probe_task.is_none() {
                        self.start_probe();
                    }
                }
                if !self.desired_running {
                    // Someone started it behind our back; the operator said stop.
                    let _ = self.stop_container().await;
                    self.set_state(DeptState::Stopped, Some("stopped by operator".into()));
                } else if matches!(
                    self.state,
                    DeptState::Pending
                        | DeptState::Starting
                        | DeptState::Stopped
                        | DeptState::Failed
                        | DeptState::Backoff
                        | DeptState::Pulling
                ) && self.restart_at.is_none()
                {
                    self.set_state(DeptState::Running, None);
                }
            }
            Some(c) => {
                self.stop_probe();
                let status = c.status.clone();
                self.container = Some(c.clone());
                if !self.desired_running {
                    self.set_state(DeptState::Stopped, Some("stopped by operator".into()));
                } else if self.tracker.parked() || self.restart_at.is_some() {
                } else if status == "created" {
                    self.start_existing().await;
                } else if self.judged_run.as_ref() == Some(&(c.id.clone(), c.started_at)) {
                    // Already judged (exit 0 under on-failure, or policy never),
                    // unless a start we meant to make never happened because
                    // Docker was unreachable.
                    if self.state == DeptState::Starting {
                        self.start_existing().await;
                    }
                } else if self.unwatched(&c) && c.exit_code == Some(0) && !c.oom_killed {
                    // It stopped while nobody watched: a host reboot or a Docker
                    // restart stops containers cleanly, and that is no reason
                    // for a department meant to run to stay down. Not a failure.
                    self.judged_run = Some((c.id.clone(), c.started_at));
                    self.event(
                        "recovering",
                        Some("engine"),
                        "container was stopped while the daemon or Docker was down; starting it again",
                    );
                    self.start_existing().await;
                } else {
                    let reason = self.exit_reason(c).await;
                    self.on_failure(reason).await;
                }
            }
        }
    }

    async fn on_docker_event(&mut self, container_id: &str, action: &str, time_nano: i64) {
        let Some(current) = &self.container else {
            if action == "destroy" || action == "die" {
                self.converge().await;
            }
            return;
        };
        if current.id != container_id {
            return;
        }
        match action {
            "die" => {
                if time_nano < self.run_started_nano {
                    return;
                }
                if !self.desired_running || self.restart_at.is_some() || self.tracker.parked() {
                    return;
                }
                let died_at = instant_of(time_nano);
                match self.shared.runtime.inspect(container_id).await {
                    Ok(Some(c)) if c.running => {}
                    Ok(Some(c)) => {
                        self.container = Some(c.clone());
                        self.stop_probe();
                        let reason = self.exit_reason(c).await;
                        self.on_failure_since(reason, died_at).await;
                    }
                    Ok(None) => self.converge().await,
                    Err(e) => self.reason = Some(format!("cannot inspect container: {e}")),
                }
            }
            "destroy" => {
                self.container = None;
                self.stop_probe();
                if self.desired_running && self.restart_at.is_none() && !self.tracker.parked() {
                    self.event(
                        "lost",
                        Some("lost"),
                        "container was removed behind the daemon's back; recreating it",
                    );
                    self.converge().await;
                }
            }
            _ => {}
        }
    }

    async fn on_failure(&mut self, reason: FailureReason) {
        self.on_failure_since(reason, Instant::now()).await
    }

    /// `failed_at`: when it failed. The backoff counts from then, not from
    /// after noticing it: Docker's `die` reaches us and the inspect answers
    /// some 100 ms after the exit, time the backoff has already waited.
    async fn on_failure_since(&mut self, reason: FailureReason, failed_at: Instant) {
        if reason != FailureReason::Unhealthy {
            self.judged_run = self
                .container
                .as_ref()
                .map(|c| (c.id.clone(), c.started_at));
        }
        self.health = if self.spec.health.enabled {
            Health::Unknown
        } else {
            Health::Disabled
        };
        let kind = match &reason {
            FailureReason::Exited { .. } => "exited",
            FailureReason::Oom => "oom",
            FailureReason::Unhealthy => "unhealthy",
            FailureReason::Lost => "lost",
        };
        self.event(kind, Some(reason.label()), &reason.describe());
        let jitter = rand::random::<f64>();
        let now = std::time::Instant::now();
        match self
            .tracker
            .on_failure(&self.spec.restart, &reason, now, jitter)
        {
            Decision::RestartAfter(delay) => {
                self.restart_at = Some(failed_at + delay);
                self.set_state(
                    DeptState::Backoff,
                    Some(format!(
                        "{}; restarting in {}",
                        reason.describe(),
                        humantime::format_duration(round_ms(delay))
                    )),
                );
                let unhealthy = reason == FailureReason::Unhealthy;
                self.pending_failure = Some(reason);
                if unhealthy {
                    // Stop it now rather than when the backoff ends: it serves
                    // nothing useful, and the stop (up to stop_timeout) then
                    // overlaps the backoff instead of adding to it. Its `die`
                    // is ours, ignored because a restart is scheduled.
                    self.stop_probe();
                    self.publish();
                    if let Some(c) = self.container.clone().filter(|c| c.running) {
                        if let Err(e) = self
                            .shared
                            .runtime
                            .stop(&c.id, self.spec.restart.stop_timeout)
                            .await
                        {
                            tracing::warn!(department = %self.id, error = %e, "Could not stop the unhealthy container.");
                        }
                        if let Ok(Some(now)) = self.shared.runtime.inspect(&c.id).await {
                            self.container = Some(now);
                        }
                    }
                }
            }
            Decision::Park => {
                self.stop_probe();
                let message = format!(
                    "crash loop: {} restarts within {} and it failed again ({}); fix the cause, then run `agentctl restart {}` or apply a new spec",
                    self.spec.restart.max_retries,
                    humantime::format_duration(self.spec.restart.window),
                    reason.describe(),
                    self.id
                );
                self.event("crash_looping", Some(reason.label()), &message);
                self.set_state(DeptState::CrashLooping, Some(message));
            }
            Decision::LeaveStopped => {
                self.stop_probe();
                let state = match reason {
                    FailureReason::Exited { code: 0 } => DeptState::Stopped,
                    FailureReason::Unhealthy => {
                        // Policy `never`: report, keep it running.
                        self.health = Health::Unhealthy;
                        self.start_probe_keep_health();
                        return;
                    }
                    _ => DeptState::Failed,
                };
                self.set_state(
                    state,
                    Some(format!(
                        "{}; restart policy {:?} does not restart it",
                        reason.describe(),
                        self.spec.restart.policy
                    )),
                );
            }
        }
    }

    fn watch(&mut self, c: &ObservedContainer) {
        let epoch = self.shared.engine_epoch.load(Ordering::Relaxed);
        self.watched = Some((c.id.clone(), epoch));
    }

    /// True when the run of `c` ended out of this task's sight: it never saw
    /// the container running, or Docker went away and came back since.
    fn unwatched(&self, c: &ObservedContainer) -> bool {
        let epoch = self.shared.engine_epoch.load(Ordering::Relaxed);
        match &self.watched {
            Some((id, seen_epoch)) => *id != c.id || *seen_epoch != epoch,
            None => true,
        }
    }

    /// Why a stopped run ended. An exit 137 without Docker's OOM flag is looked
    /// at again for a moment: Docker may set the flag, or send its `oom` event,
    /// only after reporting the exit (seen under load), and a plain SIGKILL is
    /// much rarer for a department than the kernel's OOM killer.
    async fn exit_reason(&mut self, c: ObservedContainer) -> FailureReason {
        if self.docker_reported_oom(&c) {
            return FailureReason::Oom;
        }
        if c.exit_code == Some(137) {
            let (id, started) = (c.id.clone(), c.started_at);
            let kernel_says_oom = tokio::task::spawn_blocking(move || {
                crate::host::kernel_reports_oom_kill(&id, started)
            })
            .await
            .unwrap_or(false);
            if kernel_says_oom {
                return FailureReason::Oom;
            }
            for _ in 0..OOM_RECHECKS {
                tokio::time::sleep(OOM_RECHECK_EVERY).await;
                match self.shared.runtime.inspect(&c.id).await {
                    Ok(Some(again)) if again.started_at == c.started_at => {
                        if self.docker_reported_oom(&again) {
                            self.container = Some(again);
                            return FailureReason::Oom;
                        }
                    }
                    // Started again or removed meanwhile: nothing more to learn.
                    _ => break,
                }
            }
        }
        failure_of(&c)
    }

    async fn restart_now(&mut self) {
        let reason = self.pending_failure.take().unwrap_or(FailureReason::Lost);
        if let Err(e) =
            self.shared
                .store
                .record_restart(&self.id, reason.label(), reason.exit_code())
        {
            tracing::warn!(department = %self.id, error = %e, "Could not record restart.");
        }
        *self
            .restarts_by_reason
            .entry(reason.label().to_string())
            .or_default() += 1;
        self.event(
            "restarting",
            Some(reason.label()),
            &format!("restarting after: {}", reason.describe()),
        );
        self.stop_probe();
        match self.container.clone() {
            Some(c) => {
                if c.running {
                    if let Err(e) = self
                        .shared
                        .runtime
                        .stop(&c.id, self.spec.restart.stop_timeout)
                        .await
                    {
                        tracing::warn!(department = %self.id, error = %e, "Stop before restart failed.");
                    }
                }
                self.start_existing().await;
            }
            None => self.create_and_start(false).await,
        }
    }

    /// Docker's own OOM report: the `OOMKilled` flag, or an `oom` event, which
    /// the event loop records for us even when it arrives after the `die`.
    fn docker_reported_oom(&self, c: &ObservedContainer) -> bool {
        c.oom_killed || self.shared.oom_events.seen(&c.id)
    }

    async fn start_existing(&mut self) {
        let Some(c) = self.container.clone() else {
            return Box::pin(self.create_and_start(false)).await;
        };
        self.set_state(DeptState::Starting, None);
        self.run_started_nano = now_nanos();
        // A new run of the same container: an OOM of the last one is spent.
        self.shared.oom_events.forget(&c.id);
        let permit = self.shared.start_gate.clone().acquire_owned().await.ok();
        let result = self.shared.runtime.start(&c.id).await;
        drop(permit);
        match result {
            Ok(()) => self.after_start(&c.id).await,
            Err(RuntimeError::NotFound(_)) => {
                self.container = None;
                Box::pin(self.create_and_start(false)).await;
            }
            Err(e) => self.start_failed(e).await,
        }
    }

    async fn after_start(&mut self, id: &str) {
        match self.shared.runtime.inspect(id).await {
            Ok(Some(c)) => {
                let running = c.running;
                self.container = Some(c.clone());
                if running {
                    self.watch(&c);
                    self.start_probe();
                    self.set_state(DeptState::Running, None);
                } else {
                    let reason = self.exit_reason(c).await;
                    self.on_failure(reason).await;
                }
            }
            Ok(None) => self.start_failed(RuntimeError::NotFound(id.into())).await,
            Err(e) => self.reason = Some(format!("cannot inspect container: {e}")),
        }
    }

    async fn start_failed(&mut self, error: RuntimeError) {
        if matches!(error, RuntimeError::Unavailable(_)) {
            self.reason = Some(error.to_string());
            return;
        }
        self.event(
            "start_failed",
            Some("start"),
            &format!("could not start: {error}"),
        );
        self.on_failure(FailureReason::Lost).await;
        if let Some(reason) = &mut self.reason {
            *reason = format!("could not start: {error}; {reason}");
        }
    }

    /// Makes sure the image is here; pulls it if not. False if it is not available.
    async fn ensure_image(&mut self, image: &str) -> bool {
        match self.shared.runtime.image_present(image).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => {
                self.reason = Some(format!("cannot check image: {e}"));
                return false;
            }
        }
        let before = self.state;
        self.set_state(DeptState::Pulling, Some(format!("pulling {image}")));
        self.event("pull_started", None, &format!("pulling {image}"));
        self.publish();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = self.shared.runtime.clone();
        let image_owned = image.to_string();
        let mut pull = tokio::spawn(async move { runtime.pull(&image_owned, tx).await });
        let result = loop {
            tokio::select! {
                line = rx.recv() => {
                    if let Some(line) = line {
                        self.pull_progress = Some(line);
                        self.publish();
                    }
                }
                result = &mut pull => break result,
            }
        };
        self.pull_progress = None;
        match result {
            Ok(Ok(())) => {
                self.event("pulled", None, &format!("pulled {image}"));
                self.state = before;
                true
            }
            Ok(Err(e)) => {
                self.event(
                    "pull_failed",
                    Some("pull"),
                    &format!("pull of {image} failed: {e}"),
                );
                self.reason = Some(format!("pull of {image} failed: {e}"));
                self.state = before;
                false
            }
            Err(e) => {
                self.reason = Some(format!("pull task failed: {e}"));
                self.state = before;
                false
            }
        }
    }

    fn create_request(&self, spec: &DepartmentSpec, candidate: bool) -> CreateRequest {
        let host_port = if candidate { None } else { Some(self.port) };
        let hash = spec.container_hash(self.port);
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(
            spec.secrets
                .iter()
                .map(|(k, v)| format!("{k}={}", v.expose())),
        );
        let labels = HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::DEPARTMENT.to_string(), self.id.clone()),
            (labels::SPEC_HASH.to_string(), hash),
            (labels::HOST_PORT.to_string(), self.port.to_string()),
            (labels::NODE.to_string(), self.shared.node_id.clone()),
            (
                labels::ROLE.to_string(),
                if candidate { "candidate" } else { "primary" }.to_string(),
            ),
        ]);
        CreateRequest {
            name: if candidate {
                candidate_container_name(&self.id)
            } else {
                self.name()
            },
            image: spec.image.clone(),
            env,
            labels,
            container_port: spec.container_port,
            bind: self.shared.bind,
            host_port,
            nano_cpus: spec.resources.cpus.map(|c| (c * 1e9) as i64),
            memory: spec.resources.memory.map(|m| m.bytes() as i64),
            memory_reservation: spec.resources.memory_reservation.map(|m| m.bytes() as i64),
            stop_timeout: spec.restart.stop_timeout,
        }
    }

    async fn create_and_start(&mut self, is_update: bool) {
        if !self.desired_running {
            return;
        }
        let spec = self.spec.clone();
        if !self.ensure_image(&spec.image).await {
            self.next_pull_attempt = Some(Instant::now() + Duration::from_secs(30));
            self.set_state(DeptState::Failed, self.reason.clone());
            return;
        }
        self.next_pull_attempt = None;
        self.set_state(DeptState::Starting, None);
        self.publish();
        let request = self.create_request(&spec, false);
        let created = match self.shared.runtime.create(&request).await {
            Ok(id) => id,
            Err(RuntimeError::Conflict(_)) => {
                // A container of that name appeared meanwhile: look again.
                self.reason =
                    Some("a container with this name already exists; re-examining".into());
                return;
            }
            Err(e) => return self.start_failed(e).await,
        };
        self.event(
            if is_update { "replaced" } else { "created" },
            None,
            &format!(
                "created container {} on port {} from {}",
                short(&created),
                self.port,
                spec.image
            ),
        );
        self.container = self.shared.runtime.inspect(&created).await.ok().flatten();
        self.start_existing().await;
    }

    async fn stop_container(&mut self) -> Result<(), RuntimeError> {
        self.stop_probe();
        if let Some(c) = self.container.clone() {
            self.shared
                .runtime
                .stop(&c.id, self.spec.restart.stop_timeout)
                .await?;
            if let Ok(Some(now)) = self.shared.runtime.inspect(&c.id).await {
                self.container = Some(now);
            }
        }
        Ok(())
    }

    async fn remove_container(
        &mut self,
        c: &ObservedContainer,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        if c.running {
            self.shared.runtime.stop(&c.id, timeout).await?;
        }
        self.shared.runtime.remove(&c.id).await
    }

    /// Replaces the container with one of the current spec. When the old one is
    /// serving and healthy, the new one must first prove itself healthy on a
    /// spare port; if it does not within the deadline, the department goes back
    /// to the previous spec by itself.
    async fn update(&mut self, old: ObservedContainer) {
        let old_spec = self.previous.clone();
        let gated = old.running
            && self.health == Health::Healthy
            && self.spec.health.enabled
            && old_spec.is_some()
            && self.desired_running;
        if gated {
            self.set_state(
                DeptState::Updating,
                Some(format!(
                    "proving {} healthy before the swap",
                    self.spec.image
                )),
            );
            self.publish();
            match self.try_candidate().await {
                Ok(()) => {}
                Err(why) => return self.roll_back_update(why).await,
            }
        } else {
            self.set_state(DeptState::Updating, Some("replacing container".into()));
            let spec = self.spec.clone();
            if !self.ensure_image(&spec.image).await {
                let why = self
                    .reason
                    .clone()
                    .unwrap_or_else(|| "image pull failed".into());
                if old.running && old_spec.is_some() {
                    return self.roll_back_update(why).await;
                }
                self.set_state(DeptState::Failed, Some(why));
                return;
            }
        }
        let stop_timeout = old_stop_timeout(old_spec.as_ref(), &self.spec);
        if let Err(e) = self.remove_container(&old, stop_timeout).await {
            self.reason = Some(format!("could not remove old container: {e}"));
            return;
        }
        self.stop_probe();
        self.container = None;
        self.create_and_start(true).await;
        if self.state == DeptState::Running {
            self.event("updated", None, &format!("now running {}", self.spec.image));
        }
    }

    async fn try_candidate(&mut self) -> Result<(), String> {
        let spec = self.spec.clone();
        if !self.ensure_image(&spec.image).await {
            return Err(self
                .reason
                .clone()
                .unwrap_or_else(|| "image pull failed".into()));
        }
        self.set_state(
            DeptState::Updating,
            Some(format!("proving {} healthy before the swap", spec.image)),
        );
        let name = candidate_container_name(&self.id);
        if let Ok(Some(stale)) = self.shared.runtime.inspect(&name).await {
            let _ = self.shared.runtime.remove(&stale.id).await;
        }
        let request = self.create_request(&spec, true);
        let id = self
            .shared
            .runtime
            .create(&request)
            .await
            .map_err(|e| format!("could not create the update candidate: {e}"))?;
        let outcome = self.prove_candidate(&id, &spec).await;
        if let Err(e) = self.shared.runtime.remove(&id).await {
            tracing::warn!(department = %self.id, error = %e, "Could not remove update candidate.");
        }
        outcome
    }

    async fn prove_candidate(&mut self, id: &str, spec: &DepartmentSpec) -> Result<(), String> {
        self.shared
            .runtime
            .start(id)
            .await
            .map_err(|e| format!("the new version did not start: {e}"))?;
        let deadline = Instant::now() + spec.restart.update_deadline;
        let client = self.shared.http.clone();
        let host = probe::probe_host(self.shared.bind);
        let mut last = String::from("no probe answered yet");
        while Instant::now() < deadline {
            let c = match self.shared.runtime.inspect(id).await {
                Ok(Some(c)) => c,
                Ok(None) => return Err("the new version's container disappeared".into()),
                Err(e) => return Err(format!("cannot inspect the new version: {e}")),
            };
            if !c.running {
                return Err(format!("the new version {}", failure_of(&c).describe()));
            }
            if let Some(port) = c.published_port {
                let url = probe::probe_url(host, port, &spec.health.path);
                let record = probe::probe_once(&client, &url, spec.health.timeout).await;
                if record.ok {
                    return Ok(());
                }
                last = record.error.unwrap_or_default();
            }
            tokio::time::sleep(spec.health.interval.min(Duration::from_secs(1))).await;
        }
        Err(format!(
            "the new version was not healthy within {} (last probe: {last})",
            humantime::format_duration(spec.restart.update_deadline)
        ))
    }

    async fn roll_back_update(&mut self, why: String) {
        let failed_hash = self.hash();
        let Some(previous) = self.previous.clone() else {
            self.set_state(DeptState::Failed, Some(why));
            return;
        };
        self.set_state(DeptState::RollingBack, Some(why.clone()));
        if let Err(e) = self.shared.store.roll_back(&self.id, &failed_hash) {
            tracing::error!(department = %self.id, error = %e, "Could not record rollback.");
        }
        let failed = std::mem::replace(&mut self.spec, previous);
        self.previous = Some(failed);
        self.failed_hash = Some(failed_hash);
        self.event(
            "update_failed",
            Some("update"),
            &format!("update failed and was rolled back: {why}"),
        );
        Box::pin(self.converge()).await;
        let state = self.state;
        self.set_state(
            if state == DeptState::RollingBack {
                DeptState::Running
            } else {
                state
            },
            Some(format!("last update failed and was rolled back: {why}")),
        );
    }

    async fn command(&mut self, command: OperatorCommand) -> Result<String, DeptError> {
        self.event(
            &format!("operator_{}", command.as_str()),
            Some("operator"),
            &format!("operator asked to {}", command.as_str()),
        );
        match command {
            OperatorCommand::Stop => {
                self.desired_running = false;
                self.shared.store.set_desired_running(&self.id, false)?;
                self.restart_at = None;
                self.pending_failure = None;
                self.stop_container().await?;
                self.set_state(DeptState::Stopped, Some("stopped by operator".into()));
                Ok(format!("{} stopped", self.id))
            }
            OperatorCommand::Start => {
                self.desired_running = true;
                self.shared.store.set_desired_running(&self.id, true)?;
                self.tracker.reset();
                self.restart_at = None;
                self.pending_failure = None;
                // The container the operator stopped exited on purpose: start it
                // as it is rather than let converge judge that exit as a failure
                // (under `on-failure` an exit 0 would leave it stopped).
                match self.shared.runtime.inspect(&self.name()).await? {
                    Some(c)
                        if c.department == self.id
                            && !c.running
                            && c.spec_hash.as_deref() == Some(self.hash().as_str()) =>
                    {
                        self.container = Some(c);
                        self.start_existing().await;
                    }
                    _ => self.converge().await,
                }
                Ok(format!("{} started", self.id))
            }
            OperatorCommand::Restart => {
                self.desired_running = true;
                self.shared.store.set_desired_running(&self.id, true)?;
                self.tracker.reset();
                self.restart_at = None;
                self.pending_failure = None;
                self.failed_hash = None;
                match self.container.clone() {
                    Some(c) if c.spec_hash.as_deref() == Some(self.hash().as_str()) => {
                        self.stop_container().await?;
                        self.start_existing().await;
                    }
                    _ => self.converge().await,
                }
                Ok(format!("{} restarted", self.id))
            }
            OperatorCommand::Rollback => {
                let Some(previous) = self.previous.clone() else {
                    return Err(DeptError::NoPrevious(self.id.clone()));
                };
                self.shared.store.put_spec(&previous)?;
                self.previous = Some(std::mem::replace(&mut self.spec, previous));
                self.failed_hash = None;
                self.tracker.reset();
                self.restart_at = None;
                self.converge().await;
                Ok(format!("{} rolled back to {}", self.id, self.spec.image))
            }
        }
    }

    async fn delete(&mut self) -> Result<(), DeptError> {
        self.stop_probe();
        self.restart_at = None;
        let timeout = self.spec.restart.stop_timeout;
        if let Some(candidate) = self
            .shared
            .runtime
            .inspect(&candidate_container_name(&self.id))
            .await?
        {
            self.shared.runtime.remove(&candidate.id).await?;
        }
        if let Some(c) = self.shared.runtime.inspect(&self.name()).await? {
            if c.department == self.id {
                self.remove_container(&c, timeout).await?;
            }
        }
        self.container = None;
        self.event(
            "removed",
            None,
            "department deleted; container stopped and removed",
        );
        Ok(())
    }

    async fn on_probe(&mut self, record: ProbeRecord) {
        self.probe_total += 1;
        if let Some(ms) = record.latency_ms {
            self.latency.observe(ms / 1000.0);
        }
        if !record.ok {
            self.probe_failures += 1;
        }
        let ok = record.ok;
        let detail = record.error.clone();
        self.probes.push_back(record);
        while self.probes.len() > PROBES_KEPT {
            self.probes.pop_front();
        }
        if ok {
            self.consecutive_failures = 0;
            if self.health != Health::Healthy {
                self.event("healthy", None, "health probe passed");
            }
            self.health = Health::Healthy;
            return;
        }
        let in_start_period = self.health != Health::Healthy
            && self.probing_since.elapsed() < self.spec.health.start_period;
        if in_start_period {
            return;
        }
        self.consecutive_failures += 1;
        if self.consecutive_failures >= self.spec.health.retries && self.health != Health::Unhealthy
        {
            self.health = Health::Unhealthy;
            self.event(
                "probe_failed",
                Some("unhealthy"),
                &format!(
                    "{} consecutive probe failures (last: {})",
                    self.consecutive_failures,
                    detail.unwrap_or_default()
                ),
            );
            if self.state == DeptState::Running && self.desired_running {
                self.on_failure(FailureReason::Unhealthy).await;
            }
        }
    }

    fn start_probe(&mut self) {
        self.health = if self.spec.health.enabled {
            Health::Unknown
        } else {
            Health::Disabled
        };
        self.start_probe_keep_health();
    }

    fn start_probe_keep_health(&mut self) {
        self.stop_probe();
        if !self.spec.health.enabled {
            return;
        }
        self.probe_generation += 1;
        self.consecutive_failures = 0;
        self.probing_since = Instant::now();
        let url = probe::probe_url(
            probe::probe_host(self.shared.bind),
            self.port,
            &self.spec.health.path,
        );
        self.probe_task = Some(probe::spawn(
            self.shared.http.clone(),
            url,
            self.spec.health.clone(),
            self.probe_generation,
            self.self_tx.clone(),
            wrap_probe,
        ));
    }

    fn stop_probe(&mut self) {
        if let Some(task) = self.probe_task.take() {
            task.abort();
        }
        // Results already queued from the old task are dropped by generation.
        self.probe_generation += 1;
    }

    fn publish(&self) {
        let container = self.container.as_ref();
        self.shared.board.publish(
            &self.id,
            DeptView {
                spec: self.spec.redacted(),
                previous: self.previous.as_ref().map(DepartmentSpec::redacted),
                host_port: self.port,
                state: self.state,
                health: if self.spec.health.enabled {
                    self.health
                } else {
                    Health::Disabled
                },
                reason: self.reason.clone(),
                container_id: container.map(|c| c.id.clone()),
                spec_hash: self.hash(),
                started_at: container.filter(|c| c.running).and_then(|c| c.started_at),
                desired_running: self.desired_running,
                probes: self.probes.clone(),
                restarts_by_reason: self.restarts_by_reason.clone(),
                probe_total: self.probe_total,
                probe_failures: self.probe_failures,
                probe_latency_histogram: self.latency.clone(),
                pull_progress: self.pull_progress.clone(),
                postgres_check: None,
            },
        );
    }
}

fn old_stop_timeout(old: Option<&DepartmentSpec>, new: &DepartmentSpec) -> Duration {
    old.map(|s| s.restart.stop_timeout)
        .unwrap_or(new.restart.stop_timeout)
}

fn failure_of(c: &ObservedContainer) -> FailureReason {
    if c.oom_killed {
        FailureReason::Oom
    } else {
        FailureReason::Exited {
            code: c.exit_code.unwrap_or(-1),
        }
    }
}

/// A bounded label for the `reason` field of state events.
fn reason_label(reason: &str) -> String {
    for label in [
        "oom",
        "unhealthy",
        "crash loop",
        "exited",
        "operator",
        "pull",
        "update",
        "start",
    ] {
        if reason.contains(label) {
            return label.replace(' ', "_");
        }
    }
    "other".into()
}

/// How long an exit 137 is watched for a late OOM report: 8 x 250ms.
const OOM_RECHECKS: u32 = 8;
const OOM_RECHECK_EVERY: Duration = Duration::from_millis(250);

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The monotonic instant of a Docker event's wall-clock time (the engine runs
/// on this host, on the same clock); now if the time lies ahead.
fn instant_of(unix_nanos: i64) -> Instant {
    let ago = Duration::from_nanos(now_nanos().saturating_sub(unix_nanos).max(0) as u64);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
