//! The owner of one department: a thin actor around `machine.rs`. Every
//! trigger about the department (Docker event, probe result, new spec,
//! operator command, resync) arrives as a `DeptMsg`, becomes an `Input` of the
//! machine, and the actor carries out the `Effect`s it returns. Short Docker
//! calls are awaited here and their results fed back at once; long work
//! (pull, candidate proof, stop, OOM recheck, delete) runs as a spawned task
//! the machine can abort, so the mailbox is served while it runs.

use super::board::DeptView;
pub use super::machine::OperatorCommand;
use super::machine::{
    owned_by, CommandError, Ctx, DockerAction, DrainWait, Effect, Input, JobId, Machine,
    MachineInit, Outcome, ReplyId, Timer, Work,
};
use super::probe;
use super::Shared;
use crate::runtime::{ContainerRuntime, CreateRequest, RuntimeError};
use fleet_model::api::ProbeRecord;
use fleet_model::{candidate_container_name, container_name, DepartmentSpec};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum DeptError {
    #[error("department `{0}` has no previous spec to roll back to")]
    NoPrevious(String),
    #[error("department `{0}` is being deleted")]
    Deleting(String),
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

impl From<CommandError> for DeptError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::NoPrevious(id) => DeptError::NoPrevious(id),
            CommandError::Deleting(id) => DeptError::Deleting(id),
            CommandError::Runtime(e) => DeptError::Runtime(e),
        }
    }
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
        /// From the event's `exitCode` attribute (`die` events carry it).
        exit_code: Option<i64>,
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

pub struct DeptInit {
    pub spec: DepartmentSpec,
    pub previous: Option<DepartmentSpec>,
    pub port: u16,
    pub desired_running: bool,
    pub failed_hash: Option<String>,
    pub restarts_by_reason: BTreeMap<String, u64>,
    /// See `MachineInit::restarted_ago`.
    pub restarted_ago: Vec<std::time::Duration>,
}

enum Reply {
    Command(oneshot::Sender<Result<String, DeptError>>),
    Delete(oneshot::Sender<Result<(), DeptError>>),
}

pub struct DeptActor {
    shared: Arc<Shared>,
    machine: Machine,
    replies: HashMap<ReplyId, Reply>,
    next_reply: ReplyId,
    timers: BTreeMap<Timer, Instant>,
    job: Option<(JobId, JoinHandle<()>)>,
    probe_task: Option<JoinHandle<()>>,
    self_tx: mpsc::Sender<DeptMsg>,
    /// Results of long work come back here, beside the mailbox.
    work_tx: mpsc::UnboundedSender<Input>,
    done: bool,
}

impl DeptActor {
    pub fn spawn(shared: Arc<Shared>, init: DeptInit) -> (mpsc::Sender<DeptMsg>, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(256);
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let machine = Machine::new(
            MachineInit {
                node_id: shared.node_id.clone(),
                bind: shared.bind,
                spec: init.spec,
                previous: init.previous,
                port: init.port,
                desired_running: init.desired_running,
                failed_hash: init.failed_hash,
                restarts_by_reason: init.restarts_by_reason,
                containers: std::sync::Arc::new(shared.config.containers.clone()),
                drain: crate::drain::DrainConfig::from_config(&shared.config),
                hash_key: shared.store.hash_key().clone(),
                restarted_ago: init.restarted_ago,
            },
            Instant::now().into_std(),
        );
        let actor = DeptActor {
            shared,
            machine,
            replies: HashMap::new(),
            next_reply: 0,
            timers: BTreeMap::new(),
            job: None,
            probe_task: None,
            self_tx: tx.clone(),
            work_tx,
            done: false,
        };
        // On the board before spawn returns: an `apply` that answered
        // "created" is then followed by a readable department, never a 404.
        actor.publish();
        let handle = tokio::spawn(actor.run(rx, work_rx));
        (tx, handle)
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<DeptMsg>,
        mut work_rx: mpsc::UnboundedReceiver<Input>,
    ) {
        self.feed(Input::Init).await;
        self.publish();
        while !self.done {
            let next_timer = self
                .timers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, at)| (t.clone(), *at));
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    if let Some(input) = self.input_of(msg) {
                        self.feed(input).await;
                    }
                }
                Some(input) = work_rx.recv() => self.feed(input).await,
                _ = sleep_until_opt(next_timer.as_ref().map(|t| t.1)), if next_timer.is_some() => {
                    if let Some((timer, _)) = next_timer {
                        self.timers.remove(&timer);
                        self.feed(Input::TimerFired(timer)).await;
                    }
                }
            }
            if !self.done {
                self.publish();
            }
        }
        self.stop_probe();
        if let Some((_, task)) = self.job.take() {
            task.abort();
        }
    }

    fn input_of(&mut self, msg: DeptMsg) -> Option<Input> {
        Some(match msg {
            DeptMsg::SetSpec { spec, host_port } => Input::SetSpec { spec, host_port },
            DeptMsg::Delete { reply } => Input::Delete {
                reply: self.register(Reply::Delete(reply)),
            },
            DeptMsg::Command { command, reply } => Input::Command {
                command,
                reply: self.register(Reply::Command(reply)),
            },
            DeptMsg::Docker {
                container_id,
                action,
                exit_code,
                time_nano,
            } => {
                let action = match action.as_str() {
                    "die" => {
                        // For bench/restart.sh's breakdown of a restart.
                        tracing::debug!(
                            department = %self.machine.id(),
                            exit_code,
                            lag_ms = (now_nanos() - time_nano) as f64 / 1e6,
                            "Docker die event received."
                        );
                        DockerAction::Die { exit_code }
                    }
                    "destroy" => DockerAction::Destroy,
                    _ => return None,
                };
                let oom_reported = self.shared.oom_events.seen(&container_id);
                Input::Docker {
                    container_id,
                    action,
                    time_nano,
                    oom_reported,
                }
            }
            DeptMsg::Probe { generation, record } => Input::Probe { generation, record },
            DeptMsg::Resync => Input::Resync,
        })
    }

    fn register(&mut self, reply: Reply) -> ReplyId {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, reply);
        self.next_reply
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            now: Instant::now().into_std(),
            wall_nanos: now_nanos(),
            jitter: rand::random::<f64>(),
            engine_epoch: self.shared.engine_epoch.load(Ordering::Relaxed),
            shutting_down: self.shared.shutting_down(),
        }
    }

    /// One input and everything it leads to through short calls. History is
    /// written once the Docker calls of this input are made.
    async fn feed(&mut self, input: Input) {
        let mut queue: VecDeque<Effect> = self.machine.handle(self.ctx(), input).into();
        let mut history = Vec::new();
        let mut persist_error = None;
        while let Some(effect) = queue.pop_front() {
            if let Some(result) = self
                .carry_out(effect, &mut history, &mut persist_error)
                .await
            {
                let ctx = self.ctx();
                queue.extend(self.machine.handle(ctx, result));
            }
        }
        for effect in history {
            self.write_history(effect);
        }
    }

    async fn carry_out(
        &mut self,
        effect: Effect,
        history: &mut Vec<Effect>,
        persist_error: &mut Option<crate::store::StoreError>,
    ) -> Option<Input> {
        let runtime = self.shared.runtime.clone();
        let id = self.machine.id().to_string();
        match effect {
            Effect::Inspect { name_or_id, look } => {
                let result = runtime.inspect(&name_or_id).await;
                let oom_reported =
                    matches!(&result, Ok(Some(c)) if self.shared.oom_events.seen(&c.id));
                return Some(Input::Inspected {
                    look,
                    result,
                    oom_reported,
                });
            }
            Effect::CheckImage { image, image_for } => {
                let result = runtime.image_present(&image).await;
                return Some(Input::ImageChecked { image_for, result });
            }
            Effect::Create { request, is_update } => {
                let result = runtime.create(&request).await;
                return Some(Input::Created { is_update, result });
            }
            Effect::Start {
                container_id,
                gated,
            } => {
                let permit = if gated {
                    self.shared.start_gate.clone().acquire_owned().await.ok()
                } else {
                    None
                };
                tracing::debug!(department = %id, gated, "Starting container.");
                let called = Instant::now();
                // Files mode: the secrets live on a tmpfs and are gone after a
                // reboot, while the stopped container is not; write them again.
                let put = match self.machine.create_request(false).secret_files {
                    Some(files) => runtime.put_secrets(&files).await,
                    None => Ok(()),
                };
                let result = match put {
                    Ok(()) => runtime.start(&container_id).await,
                    Err(e) => Err(e),
                };
                drop(permit);
                tracing::debug!(
                    department = %id,
                    call_ms = called.elapsed().as_secs_f64() * 1000.0,
                    "Container start call returned."
                );
                return Some(Input::StartDone { result });
            }
            Effect::Remove { container_id } => {
                let result = runtime.remove(&container_id).await;
                return Some(Input::Removed { result });
            }
            Effect::RemoveCandidate => {
                if let Ok(Some(stale)) = runtime.inspect(&candidate_container_name(&id)).await {
                    if owned_by(&stale, &id, &self.shared.node_id) {
                        if let Err(e) = runtime.remove(&stale.id).await {
                            tracing::warn!(department = %id, error = %e, "Could not remove update candidate.");
                        }
                    }
                }
            }
            Effect::Begin { job, work } => self.begin(job, work),
            Effect::Abort { job } => {
                if let Some((_, task)) = self.job.take_if(|(j, _)| *j == job) {
                    task.abort();
                }
            }
            Effect::ForgetOom { container_id } => self.shared.oom_events.forget(&container_id),
            Effect::StartProbe {
                generation,
                port,
                health,
            } => {
                self.stop_probe();
                let url = probe::probe_url(probe::probe_host(self.shared.bind), port, &health.path);
                self.probe_task = Some(probe::spawn(
                    self.shared.http.clone(),
                    url,
                    health,
                    generation,
                    self.self_tx.clone(),
                    wrap_probe,
                ));
            }
            Effect::StopProbe => self.stop_probe(),
            Effect::ArmTimer { timer, at } => {
                self.timers.insert(timer, Instant::from_std(at));
            }
            Effect::CancelTimer { timer } => {
                self.timers.remove(&timer);
            }
            Effect::PersistDesiredRunning(running) => {
                if let Err(e) = self.shared.store.set_desired_running(&id, running) {
                    tracing::error!(department = %id, error = %e, "Could not record desired state.");
                    *persist_error = Some(e);
                }
            }
            Effect::PersistSpec(spec) => {
                if let Err(e) = self.shared.store.put_spec(&spec) {
                    tracing::error!(department = %id, error = %e, "Could not record the spec.");
                    *persist_error = Some(e);
                }
            }
            Effect::PersistRollBack { failed_hash } => {
                if let Err(e) = self.shared.store.roll_back(&id, &failed_hash) {
                    tracing::error!(department = %id, error = %e, "Could not record rollback.");
                }
            }
            e @ (Effect::RecordRestart { .. } | Effect::RecordEvent { .. }) => history.push(e),
            Effect::Reply { to, result } => {
                if let Some(Reply::Command(tx)) = self.replies.remove(&to) {
                    let result = match persist_error.take() {
                        Some(e) => Err(DeptError::Store(e)),
                        None => result.map_err(DeptError::from),
                    };
                    let _ = tx.send(result);
                }
            }
            Effect::ReplyDeleted { to, result } => {
                if let Some(Reply::Delete(tx)) = self.replies.remove(&to) {
                    let _ = tx.send(result.map_err(DeptError::from));
                }
            }
            Effect::Exit => self.done = true,
        }
        None
    }

    fn write_history(&self, effect: Effect) {
        let id = self.machine.id();
        match effect {
            Effect::RecordRestart { reason, exit_code } => {
                if let Err(e) = self.shared.store.record_restart(id, reason, exit_code) {
                    tracing::warn!(department = %id, error = %e, "Could not record restart.");
                }
            }
            Effect::RecordEvent {
                kind,
                reason,
                message,
            } => self.shared.events.record(Some(id), &kind, reason, &message),
            _ => {}
        }
    }

    fn begin(&mut self, job: JobId, work: Work) {
        if let Some((_, old)) = self.job.take() {
            old.abort();
        }
        let shared = self.shared.clone();
        let id = self.machine.id().to_string();
        let tx = self.work_tx.clone();
        let task = tokio::spawn(async move {
            let outcome = match work {
                Work::Pull { image } => {
                    let result = pull(&*shared.runtime, &image, job, &tx).await;
                    if result.is_ok() {
                        record_pull(&shared, &id, &image).await;
                    }
                    Outcome::Pulled(result)
                }
                Work::Prove {
                    request,
                    health_path,
                    probe_timeout,
                    every,
                    deadline,
                    keep,
                } => Outcome::Proven(
                    prove(
                        &shared,
                        &id,
                        &request,
                        &health_path,
                        probe_timeout,
                        every,
                        deadline,
                        keep,
                    )
                    .await,
                ),
                Work::Stop {
                    container_id,
                    timeout,
                    drain,
                } => {
                    if let Some(wait) = drain {
                        drain_port(wait, job, &tx).await;
                    }
                    Outcome::Stopped(stop(&*shared.runtime, &container_id, timeout).await)
                }
                Work::Retire {
                    department,
                    wait,
                    timeout,
                } => Outcome::Retired(retire(&shared, &department, wait, timeout, job, &tx).await),
                Work::OomCheck {
                    container_id,
                    started_at,
                } => Outcome::OomVerdict {
                    oom: oom_check(&shared, &container_id, started_at).await,
                },
                Work::Delete {
                    department,
                    timeout,
                    drain,
                } => {
                    if let Some(wait) = drain {
                        drain_port(wait, job, &tx).await;
                    }
                    Outcome::Deleted(
                        delete(&*shared.runtime, &department, &shared.node_id, timeout).await,
                    )
                }
            };
            let _ = tx.send(Input::JobDone { job, outcome });
        });
        self.job = Some((job, task));
    }

    fn stop_probe(&mut self) {
        if let Some(task) = self.probe_task.take() {
            task.abort();
        }
    }

    fn publish(&self) {
        let view: DeptView = self.machine.view();
        self.shared.board.publish(self.machine.id(), view);
    }
}

// --- long work, each a task of its own -------------------------------------------

/// How often a pull's progress reaches the board.
const PULL_PROGRESS_EVERY: Duration = Duration::from_millis(250);

async fn pull(
    runtime: &dyn ContainerRuntime,
    image: &str,
    job: JobId,
    tx: &mpsc::UnboundedSender<Input>,
) -> Result<(), String> {
    let (progress_tx, mut progress) = mpsc::unbounded_channel();
    let pulling = runtime.pull(image, progress_tx);
    tokio::pin!(pulling);
    let started = tokio::time::Instant::now();
    let mut tracker = crate::pull_progress::PullTracker::default();
    // Docker streams a message every few kilobytes per layer; the department
    // task (and the board) hear about it at most this often.
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            Some(event) = progress.recv() => {
                tracker.observe(&event);
                let now = tokio::time::Instant::now();
                if last_sent.is_some_and(|at| now - at < PULL_PROGRESS_EVERY) {
                    continue;
                }
                last_sent = Some(now);
                let _ = tx.send(Input::PullProgress {
                    job,
                    line: event.line(),
                    progress: tracker.progress(image, (now - started).as_secs_f64()),
                });
            }
            result = &mut pulling => return result.map_err(|e| e.to_string()),
        }
    }
}

/// Remembers the image the pull produced, so image collection may remove it
/// once no department uses it (and only then: an image it cannot find here was
/// not pulled by the agent). A failure to record only keeps the image forever.
pub(crate) async fn record_pull(shared: &Shared, department: &str, image: &str) {
    match shared.runtime.image_id(image).await {
        Ok(Some(image_id)) => {
            if let Err(e) = shared.store.record_pulled(image, &image_id, department) {
                tracing::warn!(department, image, error = %e, "Could not record the pull; the image will not be collected.");
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(department, image, error = %e, "Could not read the pulled image's id; it will not be collected.")
        }
    }
}

async fn stop(
    runtime: &dyn ContainerRuntime,
    container_id: &str,
    timeout: Duration,
) -> Result<Option<crate::runtime::ObservedContainer>, RuntimeError> {
    match runtime.stop(container_id, timeout).await {
        Ok(()) => runtime.inspect(container_id).await,
        Err(RuntimeError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How often a draining port's connections are counted.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// Waits `after` (HAProxy has the `drain` answer by then), then until the
/// port has no established connection or `timeout` passed; where the count
/// cannot be known, the whole `timeout`. Reports each count, then the end.
async fn drain_port(wait: DrainWait, job: JobId, tx: &mpsc::UnboundedSender<Input>) {
    tokio::time::sleep(wait.after).await;
    let until = Instant::now() + wait.timeout;
    let mut last = None;
    loop {
        let count = tokio::task::spawn_blocking(move || crate::drain::connections_to(wait.port))
            .await
            .unwrap_or(None);
        if count != last {
            let _ = tx.send(Input::DrainProgress {
                job,
                connections: count,
                done: false,
            });
            last = count;
        }
        if count == Some(0) || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(DRAIN_POLL.min(until.saturating_duration_since(Instant::now()))).await;
    }
    let _ = tx.send(Input::DrainProgress {
        job,
        connections: last,
        done: true,
    });
}

/// Drains the stand-in (`aio-<id>-next`) if one of this department runs,
/// then stops and removes it.
async fn retire(
    shared: &Shared,
    department: &str,
    wait: DrainWait,
    timeout: Duration,
    job: JobId,
    tx: &mpsc::UnboundedSender<Input>,
) -> Result<(), RuntimeError> {
    let runtime = &*shared.runtime;
    let Some(c) = runtime
        .inspect(&candidate_container_name(department))
        .await?
    else {
        return Ok(());
    };
    if !owned_by(&c, department, &shared.node_id) {
        return Ok(());
    }
    if c.running {
        drain_port(wait, job, tx).await;
        match runtime.stop(&c.id, timeout).await {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    match runtime.remove(&c.id).await {
        Ok(()) | Err(RuntimeError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the candidate and the department's container, each only when its
/// department and node labels are this department's and this node's.
async fn delete(
    runtime: &dyn ContainerRuntime,
    department: &str,
    node: &str,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    if let Some(c) = runtime
        .inspect(&candidate_container_name(department))
        .await?
    {
        if owned_by(&c, department, node) {
            runtime.remove(&c.id).await?;
        }
    }
    if let Some(c) = runtime.inspect(&container_name(department)).await? {
        if owned_by(&c, department, node) {
            if c.running {
                match runtime.stop(&c.id, timeout).await {
                    Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            runtime.remove(&c.id).await?;
        }
    }
    Ok(())
}

/// Runs the update candidate and probes it until healthy or `deadline`; the
/// candidate is removed either way (and by the actor when this is aborted),
/// except when `keep` and healthy: the stand-in of a hand-over.
#[allow(clippy::too_many_arguments)]
async fn prove(
    shared: &Shared,
    department: &str,
    request: &CreateRequest,
    health_path: &str,
    probe_timeout: Duration,
    every: Duration,
    deadline: Duration,
    keep: bool,
) -> Result<(), String> {
    let runtime = &*shared.runtime;
    if let Ok(Some(stale)) = runtime.inspect(&request.name).await {
        if owned_by(&stale, department, &shared.node_id) {
            let _ = runtime.remove(&stale.id).await;
        }
    }
    let id = runtime
        .create(request)
        .await
        .map_err(|e| format!("could not create the update candidate: {e}"))?;
    let outcome = prove_running(
        runtime,
        &shared.http,
        shared.bind,
        &id,
        health_path,
        probe_timeout,
        every,
        deadline,
    )
    .await;
    if keep && outcome.is_ok() {
        return outcome;
    }
    if let Err(e) = runtime.remove(&id).await {
        tracing::warn!(department = %department, error = %e, "Could not remove update candidate.");
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn prove_running(
    runtime: &dyn ContainerRuntime,
    http: &reqwest::Client,
    bind: IpAddr,
    id: &str,
    health_path: &str,
    probe_timeout: Duration,
    every: Duration,
    deadline: Duration,
) -> Result<(), String> {
    runtime
        .start(id)
        .await
        .map_err(|e| format!("the new version did not start: {e}"))?;
    let until = Instant::now() + deadline;
    let host = probe::probe_host(bind);
    let mut last = String::from("no probe answered yet");
    while Instant::now() < until {
        let c = match runtime.inspect(id).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err("the new version's container disappeared".into()),
            Err(e) => return Err(format!("cannot inspect the new version: {e}")),
        };
        if !c.running {
            return Err(format!(
                "the new version {}",
                super::machine::failure_of(&c).describe()
            ));
        }
        if let Some(port) = c.published_port {
            let url = probe::probe_url(host, port, health_path);
            let record = probe::probe_once(http, &url, probe_timeout).await;
            if record.ok {
                return Ok(());
            }
            last = record.error.unwrap_or_default();
        }
        tokio::time::sleep(every).await;
    }
    Err(format!(
        "the new version was not healthy within {} (last probe: {last})",
        humantime::format_duration(deadline)
    ))
}

/// How long an exit 137 is watched for a late OOM report: 8 x 250ms.
const OOM_RECHECKS: u32 = 8;
const OOM_RECHECK_EVERY: Duration = Duration::from_millis(250);

/// An exit 137 without Docker's OOM flag: the kernel's log, then Docker's
/// flag or `oom` event for a moment (seen arriving after the exit under load);
/// a plain SIGKILL is much rarer for a department than the OOM killer.
async fn oom_check(shared: &Shared, container_id: &str, started_at: Option<i64>) -> bool {
    let id = container_id.to_string();
    let kernel_says_oom =
        tokio::task::spawn_blocking(move || crate::host::kernel_reports_oom_kill(&id, started_at))
            .await
            .unwrap_or(false);
    if kernel_says_oom {
        return true;
    }
    for _ in 0..OOM_RECHECKS {
        tokio::time::sleep(OOM_RECHECK_EVERY).await;
        match shared.runtime.inspect(container_id).await {
            Ok(Some(again)) if again.started_at == started_at => {
                if again.oom_killed || shared.oom_events.seen(container_id) {
                    return true;
                }
            }
            // Started again or removed meanwhile: nothing more to learn.
            _ => break,
        }
    }
    false
}

pub(crate) fn now_nanos() -> i64 {
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

#[cfg(test)]
#[path = "actor_tests.rs"]
mod tests;
