//! The decisions about one department, as a pure state machine: no I/O, no
//! tokio, no clock. `Machine::handle` takes one `Input` (with the time and the
//! randomness it may need in `Ctx`) and returns the `Effect`s to carry out;
//! the department actor (`department.rs`) carries them out and feeds their
//! results back as further inputs. Anchors: ntpd-rs' `NtpSource::handle_*`
//! returning actions, Nomad's `RestartTracker` (here `restart.rs`), kubelet's
//! pod workers (one owner, level-triggered compare with what runs).
//!
//! Every change of the published state goes through `Machine::transition`,
//! whose typed `TransitionReason` names the target state and whose (from, to)
//! pair is checked against `EDGES`, the table docs/architecture.md shows.
//!
//! Long work (pull, proving an update candidate, stopping a container, the OOM
//! recheck, the delete) is one `Job` at a time, run by the actor as a
//! cancellable task. While a job runs, Docker events and resyncs are not
//! judged; the job's end is followed by a fresh look at the container.

use super::board::{DeptView, DrainView};
use super::probe::LatencyHistogram;
use crate::drain::{AgentSlots, DrainConfig, Slot};
use crate::restart::{Decision, FailureReason, RestartTracker};
use crate::runtime::{CreateRequest, ObservedContainer, RuntimeError, SecretFiles};
use fleet_model::api::{DeptState, Health, ProbeRecord};
use fleet_model::spec::SecretsMode;
use fleet_model::spec::{HashKey, HealthSpec};
use fleet_model::{candidate_container_name, container_name, labels, DepartmentSpec};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Probe results kept for `agentctl show`.
pub const PROBES_KEPT: usize = 20;
/// How long after a failed pull the next attempt is made.
pub const PULL_RETRY: Duration = Duration::from_secs(30);

pub type JobId = u64;
pub type ReplyId = u64;

/// Everything from outside the machine an input may need, as values.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Monotonic now (the actor's tokio clock, so paused-time tests work).
    pub now: Instant,
    /// Wall-clock Unix nanoseconds now, to place Docker's event times.
    pub wall_nanos: i64,
    /// In [0, 1): spreads restart delays of many departments apart.
    pub jitter: f64,
    /// How many times Docker came (back) up; see `unwatched`.
    pub engine_epoch: u64,
    pub shutting_down: bool,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timer {
    /// The backoff before the next start ended.
    Restart,
    /// Time to try a failed pull again.
    PullRetry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerAction {
    /// `exit_code` from the event's attributes, when Docker sent one.
    Die {
        exit_code: Option<i64>,
    },
    Destroy,
}

/// Why an inspect was asked for; its result comes back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    Converge,
    AfterCreate { is_update: bool },
    AfterStart,
    AfterDie { died_at: Instant },
    ForStart { reply: ReplyId },
}

/// What an image check or pull is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFor {
    Create {
        is_update: bool,
    },
    /// The gated update: a candidate must prove itself first.
    Candidate,
    /// The plain update: the old container is replaced without a proof.
    Replace,
}

/// Long work the actor runs as a cancellable task.
#[derive(Debug, Clone)]
pub enum Work {
    Pull {
        image: String,
    },
    /// Create `aio-<id>-next` from `request`, start it, probe it until healthy
    /// or `deadline`, and remove it, unless `keep` and it proved healthy (the
    /// stand-in on the standby port of a hand-over).
    Prove {
        request: Box<CreateRequest>,
        health_path: String,
        probe_timeout: Duration,
        every: Duration,
        deadline: Duration,
        keep: bool,
    },
    /// Drain first when asked (progress comes back as `DrainProgress`), then
    /// stop, then inspect again.
    Stop {
        container_id: String,
        timeout: Duration,
        drain: Option<DrainWait>,
    },
    /// Drain the stand-in on the standby port, then stop and remove it (if ours).
    Retire {
        department: String,
        wait: DrainWait,
        timeout: Duration,
    },
    /// Look again, for a moment, at an exit 137 without Docker's OOM flag.
    OomCheck {
        container_id: String,
        started_at: Option<i64>,
    },
    /// Remove the candidate and the department's container, if ours; drain
    /// the container first when asked.
    Delete {
        department: String,
        timeout: Duration,
        drain: Option<DrainWait>,
    },
}

/// Waiting for a port's in-flight connections: from `after` (HAProxy has
/// seen the `drain` answer by then) until none is left or `timeout` more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainWait {
    pub port: u16,
    pub after: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Pulled(Result<(), String>),
    Proven(Result<(), String>),
    Stopped(Result<Option<ObservedContainer>, RuntimeError>),
    Retired(Result<(), RuntimeError>),
    OomVerdict { oom: bool },
    Deleted(Result<(), RuntimeError>),
}

#[derive(Debug, Clone)]
pub enum Input {
    /// The actor started: clean up a stale candidate and look at what runs.
    Init,
    SetSpec {
        spec: Box<DepartmentSpec>,
        host_port: u16,
    },
    Command {
        command: OperatorCommand,
        reply: ReplyId,
    },
    Delete {
        reply: ReplyId,
    },
    Docker {
        container_id: String,
        action: DockerAction,
        time_nano: i64,
        /// Docker sent an `oom` event for this container.
        oom_reported: bool,
    },
    Probe {
        generation: u64,
        record: ProbeRecord,
    },
    Resync,
    TimerFired(Timer),
    Inspected {
        look: Look,
        result: Result<Option<ObservedContainer>, RuntimeError>,
        oom_reported: bool,
    },
    ImageChecked {
        image_for: ImageFor,
        result: Result<bool, RuntimeError>,
    },
    Created {
        is_update: bool,
        result: Result<String, RuntimeError>,
    },
    StartDone {
        result: Result<(), RuntimeError>,
    },
    Removed {
        result: Result<(), RuntimeError>,
    },
    PullProgress {
        job: JobId,
        line: String,
        progress: Option<fleet_model::api::Progress>,
    },
    /// A drain's count of established connections (`None`: unknown);
    /// `done`: the drain is over and the stop begins.
    DrainProgress {
        job: JobId,
        connections: Option<u32>,
        done: bool,
    },
    JobDone {
        job: JobId,
        outcome: Outcome,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("department `{0}` has no previous spec to roll back to")]
    NoPrevious(String),
    #[error("department `{0}` is being deleted")]
    Deleting(String),
    #[error("{0}")]
    Runtime(RuntimeError),
}

#[derive(Debug, Clone)]
pub enum Effect {
    // Short Docker calls: the actor awaits them and feeds the result back.
    Inspect {
        name_or_id: String,
        look: Look,
    },
    CheckImage {
        image: String,
        image_for: ImageFor,
    },
    Create {
        request: Box<CreateRequest>,
        is_update: bool,
    },
    /// `gated`: through the start gate (first starts, not restarts).
    Start {
        container_id: String,
        gated: bool,
    },
    Remove {
        container_id: String,
    },
    /// Remove `aio-<id>-next` if it is this department's.
    RemoveCandidate,
    // Long work.
    Begin {
        job: JobId,
        work: Work,
    },
    /// Cancel the job (its result, should it still come, is dropped by id).
    Abort {
        job: JobId,
    },
    /// An OOM report of this container is spent (it starts a new run).
    ForgetOom {
        container_id: String,
    },
    StartProbe {
        generation: u64,
        port: u16,
        health: HealthSpec,
    },
    StopProbe,
    ArmTimer {
        timer: Timer,
        at: Instant,
    },
    CancelTimer {
        timer: Timer,
    },
    // Intent, written in order (a failure is returned to a reply that follows).
    PersistDesiredRunning(bool),
    PersistSpec(Box<DepartmentSpec>),
    PersistRollBack {
        failed_hash: String,
    },
    // History, written after the Docker calls of the same input.
    RecordRestart {
        reason: &'static str,
        exit_code: Option<i64>,
    },
    RecordEvent {
        kind: String,
        reason: Option<&'static str>,
        message: String,
    },
    Reply {
        to: ReplyId,
        result: Result<String, CommandError>,
    },
    ReplyDeleted {
        to: ReplyId,
        result: Result<(), RuntimeError>,
    },
    /// The department is gone; the actor ends.
    Exit,
}

/// Why the state changes. Each reason names its target state, so a
/// transition to a state the reason does not lead to cannot be written.
#[derive(Debug, Clone, PartialEq)]
pub enum TransitionReason {
    ImageMissing {
        image: String,
    },
    Create,
    StartExisting,
    Started,
    Adopted,
    RolledBack {
        message: String,
    },
    Failed {
        failure: FailureReason,
        delay: Duration,
    },
    CrashLoop {
        message: String,
    },
    NewSpec {
        message: String,
    },
    UpdateFailed {
        why: String,
    },
    /// Out of HAProxy's rotation before the stop.
    Drain {
        message: String,
    },
    OperatorStop,
    /// Exit 0 under `on-failure`: done, not failed.
    ExitedCleanly {
        message: String,
    },
    /// A failure the restart policy (`never`) does not restart.
    NotRestarted {
        message: String,
    },
    PullFailed {
        message: String,
    },
    NoPrevious {
        why: String,
    },
}

impl TransitionReason {
    pub fn target(&self) -> DeptState {
        use TransitionReason as R;
        match self {
            R::ImageMissing { .. } => DeptState::Pulling,
            R::Create | R::StartExisting => DeptState::Starting,
            R::Started | R::Adopted | R::RolledBack { .. } => DeptState::Running,
            R::Failed { .. } => DeptState::Backoff,
            R::CrashLoop { .. } => DeptState::CrashLooping,
            R::NewSpec { .. } => DeptState::Updating,
            R::UpdateFailed { .. } => DeptState::RollingBack,
            R::Drain { .. } => DeptState::Draining,
            R::OperatorStop | R::ExitedCleanly { .. } => DeptState::Stopped,
            R::NotRestarted { .. } | R::PullFailed { .. } | R::NoPrevious { .. } => {
                DeptState::Failed
            }
        }
    }

    /// The bounded label of the `state_<new>` event.
    pub fn label(&self) -> &'static str {
        use TransitionReason as R;
        match self {
            R::ImageMissing { .. } | R::PullFailed { .. } => "pull",
            R::Create | R::StartExisting => "start",
            R::Started => "started",
            R::Adopted => "adopted",
            R::RolledBack { .. } | R::UpdateFailed { .. } | R::NoPrevious { .. } => "update",
            R::NewSpec { .. } => "update",
            R::Failed { failure, .. } => failure.label(),
            R::CrashLoop { .. } => "crash_loop",
            R::Drain { .. } => "drain",
            R::OperatorStop => "operator",
            R::ExitedCleanly { .. } | R::NotRestarted { .. } => "policy",
        }
    }

    /// The text shown as the department's `reason`.
    fn message(&self) -> Option<String> {
        use TransitionReason as R;
        match self {
            R::ImageMissing { image } => Some(format!("pulling {image}")),
            R::Create | R::StartExisting | R::Started | R::Adopted => None,
            R::Failed { failure, delay } => Some(format!(
                "{}; restarting in {}",
                failure.describe(),
                humantime::format_duration(round_ms(*delay))
            )),
            R::OperatorStop => Some("stopped by operator".into()),
            R::RolledBack { message }
            | R::CrashLoop { message }
            | R::NewSpec { message }
            | R::Drain { message }
            | R::ExitedCleanly { message }
            | R::NotRestarted { message }
            | R::PullFailed { message } => Some(message.clone()),
            R::UpdateFailed { why } | R::NoPrevious { why } => Some(why.clone()),
        }
    }

    /// One name per variant, for the table in docs/architecture.md.
    pub fn name(&self) -> &'static str {
        use TransitionReason as R;
        match self {
            R::ImageMissing { .. } => "image missing",
            R::Create => "create",
            R::StartExisting => "start existing container",
            R::Started => "started",
            R::Adopted => "adopted running container",
            R::RolledBack { .. } => "rolled back",
            R::Failed { .. } => "exit / oom / unhealthy / start failed",
            R::CrashLoop { .. } => "max_retries within window",
            R::NewSpec { .. } => "new container-defining spec",
            R::UpdateFailed { .. } => "candidate not healthy / pull failed",
            R::Drain { .. } => "drain before stop (restart, update swap, stop)",
            R::OperatorStop => "agentctl stop",
            R::ExitedCleanly { .. } => "exit 0 the policy does not restart",
            R::NotRestarted { .. } => "failure the policy does not restart",
            R::PullFailed { .. } => "pull failed",
            R::NoPrevious { .. } => "update failed, no previous spec",
        }
    }
}

use DeptState::{
    Backoff, CrashLooping, Draining, Failed, Pending, Pulling, RollingBack, Running, Starting,
    Stopped, Updating,
};

/// The state diagram: for each target state, the states it may be reached
/// from. `transition` refuses any other pair. `draining` (out of HAProxy's
/// rotation, finishing in-flight requests before SIGTERM) sits between the
/// states that stop a serving container and the stop itself; every such stop
/// goes through `Machine::stop_serving`.
pub const EDGES: &[(DeptState, &[DeptState])] = &[
    (Pending, &[]),
    (
        Pulling,
        &[
            Pending,
            Starting,
            Running,
            Backoff,
            Failed,
            Stopped,
            CrashLooping,
            Updating,
            RollingBack,
            Draining,
        ],
    ),
    (
        Starting,
        &[
            Pending,
            Pulling,
            Running,
            Backoff,
            Failed,
            Stopped,
            CrashLooping,
            Updating,
            RollingBack,
            Draining,
        ],
    ),
    (
        Running,
        &[
            Pending,
            Pulling,
            Starting,
            Backoff,
            Failed,
            Stopped,
            RollingBack,
            Draining,
        ],
    ),
    (
        Backoff,
        &[Pending, Starting, Running, RollingBack, Draining],
    ),
    (
        CrashLooping,
        &[Pending, Starting, Running, RollingBack, Draining],
    ),
    (
        Updating,
        &[
            Pending,
            Pulling,
            Starting,
            Running,
            Backoff,
            Failed,
            Stopped,
            CrashLooping,
            Draining,
        ],
    ),
    (RollingBack, &[Updating]),
    (
        Draining,
        &[
            Pending,
            Starting,
            Running,
            Backoff,
            CrashLooping,
            Updating,
            RollingBack,
            Failed,
        ],
    ),
    (
        Stopped,
        &[
            Pending,
            Pulling,
            Starting,
            Running,
            Backoff,
            CrashLooping,
            Updating,
            RollingBack,
            Failed,
            Draining,
        ],
    ),
    (
        Failed,
        &[
            Pending,
            Pulling,
            Starting,
            Running,
            Updating,
            RollingBack,
            Draining,
        ],
    ),
];

pub fn allowed(from: DeptState, to: DeptState) -> bool {
    EDGES
        .iter()
        .any(|(target, froms)| *target == to && froms.contains(&from))
}

/// The reasons that lead to each state, for the docs table.
pub fn reasons_into(to: DeptState) -> Vec<&'static str> {
    let f = FailureReason::Lost;
    let s = String::new;
    let all = [
        TransitionReason::ImageMissing { image: s() },
        TransitionReason::Create,
        TransitionReason::StartExisting,
        TransitionReason::Started,
        TransitionReason::Adopted,
        TransitionReason::RolledBack { message: s() },
        TransitionReason::Failed {
            failure: f,
            delay: Duration::ZERO,
        },
        TransitionReason::CrashLoop { message: s() },
        TransitionReason::NewSpec { message: s() },
        TransitionReason::UpdateFailed { why: s() },
        TransitionReason::Drain { message: s() },
        TransitionReason::OperatorStop,
        TransitionReason::ExitedCleanly { message: s() },
        TransitionReason::NotRestarted { message: s() },
        TransitionReason::PullFailed { message: s() },
        TransitionReason::NoPrevious { why: s() },
    ];
    all.iter()
        .filter(|r| r.target() == to)
        .map(TransitionReason::name)
        .collect()
}

/// The transition table as the markdown docs/architecture.md carries.
pub fn transition_table_markdown() -> String {
    let mut out = String::from("| to | from | reasons |\n|---|---|---|\n");
    for (to, froms) in EDGES {
        let froms: Vec<&str> = froms.iter().map(|s| s.as_str()).collect();
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            to.as_str(),
            if froms.is_empty() {
                "(initial state)".to_string()
            } else {
                froms.join(", ")
            },
            reasons_into(*to).join("; ")
        ));
    }
    out
}

/// What to do when a stop job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    /// Only look at it again (an unhealthy container stopped during its backoff).
    Refresh,
    /// Start it again (restart timer, `agentctl restart`).
    Start,
    /// `agentctl stop`.
    OperatorStopped,
    /// It was running although the operator said stop.
    Unwanted,
    /// Remove it and create the container of the current spec.
    Swap,
}

#[derive(Debug, Clone)]
enum JobKind {
    Pull {
        image: String,
        image_for: ImageFor,
    },
    Prove,
    /// The stand-in of a hand-over proving itself on the standby port; then
    /// the stop it was started for.
    Bridge {
        then: AfterStop,
        reply: Option<ReplyId>,
    },
    Stop {
        then: AfterStop,
        reply: Option<ReplyId>,
    },
    Retire,
    OomCheck {
        failed_at: Instant,
    },
    Delete {
        reply: ReplyId,
    },
}

#[derive(Debug, Clone)]
struct ActiveJob {
    id: JobId,
    kind: JobKind,
}

pub struct MachineInit {
    pub node_id: String,
    pub bind: IpAddr,
    pub spec: DepartmentSpec,
    pub previous: Option<DepartmentSpec>,
    pub port: u16,
    pub desired_running: bool,
    pub failed_hash: Option<String>,
    pub restarts_by_reason: BTreeMap<String, u64>,
    /// The node's `[containers]`: network, hardening and secrets defaults.
    pub containers: std::sync::Arc<fleet_model::config::ContainersConfig>,
    /// `[haproxy]` with a standby pool: stops drain, restarts hand over.
    pub drain: Option<DrainConfig>,
    /// The node's key for spec hashes.
    pub hash_key: HashKey,
    /// How long ago each restart a daemon before this one made failed
    /// (rebuilt from Docker's events): the crash-loop window and the backoff
    /// go on from there instead of from zero.
    pub restarted_ago: Vec<Duration>,
}

pub struct Machine {
    id: String,
    node_id: String,
    containers: std::sync::Arc<fleet_model::config::ContainersConfig>,
    hash_key: HashKey,
    bind: IpAddr,
    spec: DepartmentSpec,
    previous: Option<DepartmentSpec>,
    port: u16,
    desired_running: bool,
    /// An update that failed; not retried until the spec changes.
    failed_hash: Option<String>,
    state: DeptState,
    reason: Option<String>,
    container: Option<ObservedContainer>,

    tracker: RestartTracker,
    restart_at: Option<Instant>,
    pending_failure: Option<FailureReason>,
    /// The pending restart goes through the start gate: the run ended out of
    /// sight (a host reboot), when every department would start at once.
    restart_gated: bool,
    pull_retry_at: Option<Instant>,
    /// Wall-clock nanoseconds of our last start: Docker events older than it
    /// are about a run already handled.
    run_started_nano: i64,
    /// The exited run (container id, start time) already judged, so a resync
    /// does not count the same exit twice.
    judged_run: Option<(String, Option<i64>)>,
    /// The container last seen running, and the engine epoch then. An exit
    /// nobody watched (daemon, host or Docker restarting) is not a crash.
    watched: Option<(String, u64)>,
    /// The next started container is the result of an update.
    announce_update: bool,
    /// Why the last update was rolled back, shown once the old one is back.
    rollback_note: Option<String>,

    job: Option<ActiveJob>,
    next_job: JobId,
    /// Something asked for a look while a job ran.
    converge_after_job: bool,
    pull_progress: Option<String>,
    /// Bytes and rate of the pull under way.
    progress: Option<fleet_model::api::Progress>,

    health: Health,
    probing: bool,
    probe_generation: u64,
    probing_since: Instant,
    consecutive_failures: u32,
    probes: VecDeque<ProbeRecord>,
    probe_total: u64,
    probe_failures: u64,
    latency: LatencyHistogram,
    restarts_by_reason: BTreeMap<String, u64>,

    drain: Option<DrainConfig>,
    /// What HAProxy is told of the two ports.
    agent: AgentSlots,
    /// When a stand-in of the current spec came up on the standby port and is
    /// serving (`aio-<id>-next`); `None`: nothing runs there.
    bridge_since: Option<Instant>,
    drain_view: Option<DrainView>,

    out: Vec<Effect>,
}

impl Machine {
    pub fn new(init: MachineInit, now: Instant) -> Self {
        Machine {
            id: init.spec.id.clone(),
            node_id: init.node_id,
            containers: init.containers,
            hash_key: init.hash_key,
            bind: init.bind,
            spec: init.spec,
            previous: init.previous,
            port: init.port,
            desired_running: init.desired_running,
            failed_hash: init.failed_hash,
            state: Pending,
            reason: None,
            container: None,
            tracker: RestartTracker::seeded(
                init.restarted_ago
                    .iter()
                    .filter_map(|ago| now.checked_sub(*ago)),
            ),
            restart_at: None,
            pending_failure: None,
            restart_gated: false,
            pull_retry_at: None,
            run_started_nano: 0,
            judged_run: None,
            watched: None,
            announce_update: false,
            rollback_note: None,
            job: None,
            next_job: 0,
            converge_after_job: false,
            pull_progress: None,
            progress: None,
            health: Health::Unknown,
            probing: false,
            probe_generation: 0,
            probing_since: now,
            consecutive_failures: 0,
            probes: VecDeque::new(),
            probe_total: 0,
            probe_failures: 0,
            latency: LatencyHistogram::default(),
            restarts_by_reason: init.restarts_by_reason,
            // Nothing serves on the standby port until a stand-in is proven:
            // HAProxy sends it nothing even while its check still passes.
            agent: AgentSlots {
                primary_drain_from: None,
                standby_drain_from: init.drain.as_ref().map(|_| now),
            },
            drain: init.drain,
            bridge_since: None,
            drain_view: None,
            out: Vec::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn state(&self) -> DeptState {
        self.state
    }
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }
    pub fn spec(&self) -> &DepartmentSpec {
        &self.spec
    }
    pub fn health(&self) -> Health {
        self.health
    }
    pub fn container(&self) -> Option<&ObservedContainer> {
        self.container.as_ref()
    }
    pub fn probe_generation(&self) -> u64 {
        self.probe_generation
    }
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }
    pub fn hash(&self) -> String {
        self.spec.container_hash(self.port, &self.hash_key)
    }

    /// Whether a container with this `fleet-agent.spec-hash` runs the current
    /// spec: by the keyed hash, or by the unkeyed one of a container an
    /// earlier version created (adopted, not replaced, by the upgrade).
    pub fn is_current(&self, label: Option<&str>) -> bool {
        label.is_some_and(|l| self.spec.hash_matches(l, self.port, &self.hash_key))
    }

    /// Labelled with this department and this node.
    pub fn ours(&self, c: &ObservedContainer) -> bool {
        owned_by(c, &self.id, &self.node_id)
    }

    /// The one entry point: one input in, the effects to carry out out.
    pub fn handle(&mut self, ctx: Ctx, input: Input) -> Vec<Effect> {
        self.out.clear();
        if self.deleting() {
            self.while_deleting(ctx, input);
        } else {
            self.dispatch(ctx, input);
        }
        std::mem::take(&mut self.out)
    }

    fn deleting(&self) -> bool {
        matches!(
            self.job,
            Some(ActiveJob {
                kind: JobKind::Delete { .. },
                ..
            })
        )
    }

    fn dispatch(&mut self, ctx: Ctx, input: Input) {
        match input {
            Input::Init => {
                match (&self.drain, self.standby_port()) {
                    // A stand-in left by a daemon that died mid-hand-over may
                    // be serving: drain it rather than cut its requests.
                    (Some(_), Some(standby)) => self.begin_retire(ctx, standby),
                    _ => self.emit(Effect::RemoveCandidate),
                }
                self.look(ctx);
            }
            Input::SetSpec { spec, host_port } => self.set_spec(ctx, *spec, host_port),
            Input::Command { command, reply } => self.command(ctx, command, reply),
            Input::Delete { reply } => {
                self.abort_job();
                self.cancel_timers();
                self.stop_probe();
                // Behind HAProxy the container finishes its requests first;
                // new connections then go nowhere (the department is going).
                let serving = self.container.as_ref().is_some_and(|c| c.running);
                let drain = match &self.drain {
                    Some(d) if serving => {
                        self.agent.primary_drain_from = Some(ctx.now);
                        self.drain_view = Some(DrainView {
                            slot: Slot::Primary,
                            since: ctx.now,
                            connections: None,
                            took: None,
                        });
                        Some(DrainWait {
                            port: self.port,
                            after: d.noticed(),
                            timeout: self.spec.restart.drain_timeout,
                        })
                    }
                    _ => None,
                };
                self.begin(
                    JobKind::Delete { reply },
                    Work::Delete {
                        department: self.id.clone(),
                        timeout: self.spec.restart.stop_timeout,
                        drain,
                    },
                );
            }
            Input::Docker {
                container_id,
                action,
                time_nano,
                oom_reported,
            } => self.on_docker(ctx, &container_id, action, time_nano, oom_reported),
            Input::Probe { generation, record } => {
                if generation == self.probe_generation && self.probing {
                    self.on_probe(ctx, record);
                }
            }
            Input::Resync => self.look(ctx),
            Input::TimerFired(Timer::Restart) => self.restart_now(ctx),
            Input::TimerFired(Timer::PullRetry) => {
                self.pull_retry_at = None;
                self.look(ctx);
            }
            Input::Inspected {
                look,
                result,
                oom_reported,
            } => self.inspected(ctx, look, result, oom_reported),
            Input::ImageChecked { image_for, result } => self.image_checked(ctx, image_for, result),
            Input::Created { is_update, result } => self.created(ctx, is_update, result),
            Input::StartDone { result } => self.start_done(ctx, result),
            Input::Removed { result } => match result {
                Ok(()) | Err(RuntimeError::NotFound(_)) => {
                    self.stop_probe();
                    self.container = None;
                    self.create(ctx, true);
                }
                Err(e) => self.reason = Some(format!("could not remove old container: {e}")),
            },
            Input::PullProgress {
                job,
                line,
                progress,
            } => {
                if self.job.as_ref().is_some_and(|j| j.id == job) {
                    self.pull_progress = Some(line);
                    self.progress = progress;
                }
            }
            Input::DrainProgress {
                job,
                connections,
                done,
            } => self.drain_progress(ctx, job, connections, done),
            Input::JobDone { job, outcome } => {
                let Some(active) = self.job.take_if(|j| j.id == job) else {
                    return; // a job aborted meanwhile
                };
                self.job_done(ctx, active.kind, outcome);
                // The look asked for while the job ran, unless the job's end
                // goes on with Docker calls of its own: a second chain beside
                // them would create twice. After a new job it waits for that
                // one; after short calls their chain ends in a known state and
                // the next resync sees the rest.
                let continues = self.out.iter().any(|e| {
                    matches!(
                        e,
                        Effect::Inspect { .. }
                            | Effect::CheckImage { .. }
                            | Effect::Create { .. }
                            | Effect::Start { .. }
                            | Effect::Remove { .. }
                    )
                });
                if self.job.is_none() && std::mem::take(&mut self.converge_after_job) && !continues
                {
                    self.look(ctx);
                }
            }
        }
    }

    /// During a delete only its own result counts; commands are answered.
    fn while_deleting(&mut self, ctx: Ctx, input: Input) {
        match input {
            Input::JobDone { .. } | Input::DrainProgress { .. } => self.dispatch(ctx, input),
            Input::Command { reply, .. } => self.emit(Effect::Reply {
                to: reply,
                result: Err(CommandError::Deleting(self.id.clone())),
            }),
            Input::Delete { reply } => {
                // A second delete: the first one's answer is the answer.
                if let Some(ActiveJob {
                    kind: JobKind::Delete { reply: first },
                    ..
                }) = &mut self.job
                {
                    let superseded = std::mem::replace(first, reply);
                    self.emit(Effect::ReplyDeleted {
                        to: superseded,
                        result: Ok(()),
                    });
                }
            }
            _ => {}
        }
    }

    // --- effects helpers -------------------------------------------------------

    fn emit(&mut self, effect: Effect) {
        self.out.push(effect);
    }

    fn event(&mut self, kind: &str, reason: Option<&'static str>, message: String) {
        self.emit(Effect::RecordEvent {
            kind: kind.to_string(),
            reason,
            message,
        });
    }

    /// The single place the published state changes.
    fn transition(&mut self, reason: TransitionReason) {
        let from = self.state;
        let to = reason.target();
        if from != to {
            if !allowed(from, to) {
                // The diagram does not have this edge: a bug in this file.
                // Tests fail on it; a running daemon keeps its state and says so.
                if cfg!(test) {
                    panic!("transition {from:?} -> {to:?} ({reason:?}) is not in EDGES");
                }
                self.event(
                    "internal_error",
                    Some("transition"),
                    format!(
                        "refused transition {} -> {} ({})",
                        from.as_str(),
                        to.as_str(),
                        reason.name()
                    ),
                );
                return;
            }
            let message = reason.message();
            self.event(
                &format!("state_{}", to.as_str()),
                Some(reason.label()),
                format!(
                    "{} -> {}{}",
                    from.as_str(),
                    to.as_str(),
                    message
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            );
        }
        self.state = to;
        self.reason = reason.message();
    }

    fn begin(&mut self, kind: JobKind, work: Work) {
        self.abort_job();
        self.next_job += 1;
        let id = self.next_job;
        self.job = Some(ActiveJob { id, kind });
        self.emit(Effect::Begin { job: id, work });
    }

    fn abort_job(&mut self) {
        let Some(job) = self.job.take() else { return };
        self.emit(Effect::Abort { job: job.id });
        if self.agent.primary_drain_from.take().is_some() {
            // The stop it drained for is off: the container serves again.
            self.drain_view = None;
        }
        match job.kind {
            JobKind::Prove => self.emit(Effect::RemoveCandidate),
            JobKind::Bridge { reply, .. } => {
                self.emit(Effect::RemoveCandidate);
                if let Some(reply) = reply {
                    self.emit(Effect::Reply {
                        to: reply,
                        result: Ok(format!("{}: superseded by a later command", self.id)),
                    });
                }
            }
            JobKind::Pull { .. } => {
                self.pull_progress = None;
                self.progress = None;
            }
            JobKind::Stop {
                reply: Some(reply), ..
            } => self.emit(Effect::Reply {
                to: reply,
                result: Ok(format!("{}: superseded by a later command", self.id)),
            }),
            // Left running on the standby port (still drained); the next
            // hand-over, or the next start, retires it.
            _ => {}
        }
    }

    fn cancel_restart(&mut self) {
        if self.restart_at.take().is_some() {
            self.emit(Effect::CancelTimer {
                timer: Timer::Restart,
            });
        }
        self.pending_failure = None;
    }

    fn cancel_timers(&mut self) {
        self.cancel_restart();
        if self.pull_retry_at.take().is_some() {
            self.emit(Effect::CancelTimer {
                timer: Timer::PullRetry,
            });
        }
    }

    /// Level-triggered: ask what Docker runs; `converge` compares.
    fn look(&mut self, ctx: Ctx) {
        if ctx.shutting_down {
            return;
        }
        if self.job.is_some() {
            self.converge_after_job = true;
            return;
        }
        self.emit(Effect::Inspect {
            name_or_id: container_name(&self.id),
            look: Look::Converge,
        });
    }

    // --- inputs ------------------------------------------------------------------

    fn set_spec(&mut self, ctx: Ctx, spec: DepartmentSpec, host_port: u16) {
        let new_hash = spec.container_hash(host_port, &self.hash_key);
        let changed = new_hash != self.hash();
        if self.failed_hash.as_deref().is_some_and(|f| f != new_hash) {
            self.failed_hash = None;
        }
        if self.spec.differs_only_in_next_image(&spec) {
            // An announcement is no new version: the rollback stays.
            self.spec = spec;
        } else if spec != self.spec {
            self.previous = Some(std::mem::replace(&mut self.spec, spec));
        }
        self.port = host_port;
        if changed {
            // A new spec is the other way out of a crash loop, and supersedes
            // an update or pull in flight.
            self.tracker.reset();
            self.cancel_restart();
            if !matches!(
                self.job,
                Some(ActiveJob {
                    kind: JobKind::Stop { .. },
                    ..
                })
            ) {
                self.abort_job();
            }
        } else if self.probing {
            // Probe settings may have changed; probe again with them.
            self.start_probe_keep_health(ctx);
        }
        self.look(ctx);
    }

    fn command(&mut self, ctx: Ctx, command: OperatorCommand, reply: ReplyId) {
        self.event(
            &format!("operator_{}", command.as_str()),
            Some("operator"),
            format!("operator asked to {}", command.as_str()),
        );
        match command {
            OperatorCommand::Stop => {
                self.desired_running = false;
                self.emit(Effect::PersistDesiredRunning(false));
                self.cancel_restart();
                self.abort_job();
                self.stop_probe();
                match self.container.clone() {
                    Some(c) => self.stop_serving(ctx, c, AfterStop::OperatorStopped, Some(reply)),
                    None => {
                        self.transition(TransitionReason::OperatorStop);
                        self.emit(Effect::Reply {
                            to: reply,
                            result: Ok(format!("{} stopped", self.id)),
                        });
                    }
                }
            }
            OperatorCommand::Start => {
                self.desired_running = true;
                self.emit(Effect::PersistDesiredRunning(true));
                self.tracker.reset();
                self.cancel_restart();
                self.abort_job();
                self.emit(Effect::Inspect {
                    name_or_id: container_name(&self.id),
                    look: Look::ForStart { reply },
                });
            }
            OperatorCommand::Restart => {
                self.desired_running = true;
                self.emit(Effect::PersistDesiredRunning(true));
                self.tracker.reset();
                self.cancel_restart();
                self.abort_job();
                self.failed_hash = None;
                match self.container.clone() {
                    Some(c) if self.is_current(c.spec_hash.as_deref()) => {
                        self.stop_serving(ctx, c, AfterStop::Start, Some(reply));
                    }
                    _ => {
                        self.look(ctx);
                        self.emit(Effect::Reply {
                            to: reply,
                            result: Ok(format!("{} restarted", self.id)),
                        });
                    }
                }
            }
            OperatorCommand::Rollback => {
                let Some(previous) = self.previous.clone() else {
                    self.emit(Effect::Reply {
                        to: reply,
                        result: Err(CommandError::NoPrevious(self.id.clone())),
                    });
                    return;
                };
                self.emit(Effect::PersistSpec(Box::new(previous.clone())));
                self.previous = Some(std::mem::replace(&mut self.spec, previous));
                self.failed_hash = None;
                self.tracker.reset();
                self.cancel_restart();
                self.abort_job();
                self.look(ctx);
                self.emit(Effect::Reply {
                    to: reply,
                    result: Ok(format!("{} rolled back to {}", self.id, self.spec.image)),
                });
            }
        }
    }

    fn on_docker(
        &mut self,
        ctx: Ctx,
        container_id: &str,
        action: DockerAction,
        time_nano: i64,
        oom_reported: bool,
    ) {
        let Some(current) = self.container.clone() else {
            return self.look(ctx);
        };
        if current.id != container_id {
            return;
        }
        if self.job.is_some() {
            // Our own stop, or a change during an update: judged when the work ends.
            self.converge_after_job = true;
            return;
        }
        match action {
            DockerAction::Die { exit_code } => {
                if time_nano < self.run_started_nano
                    || !self.desired_running
                    || self.restart_at.is_some()
                    || self.tracker.parked()
                {
                    return;
                }
                let died_at = instant_of(ctx, time_nano);
                self.stop_probe();
                match exit_code {
                    // The event says enough: no inspect on the hot path. An
                    // exit 137 may be an OOM kill reported late, and an exit 0
                    // may be the engine stopping its containers on its way
                    // down (then the inspect fails and the look after Docker is
                    // back starts it again): both are looked at.
                    Some(code) if code != 0 && code != 137 && !oom_reported => {
                        let mut c = current;
                        c.running = false;
                        c.status = "exited".into();
                        c.exit_code = Some(code);
                        self.container = Some(c);
                        self.on_failure(ctx, FailureReason::Exited { code }, died_at);
                    }
                    _ => self.emit(Effect::Inspect {
                        name_or_id: container_id.to_string(),
                        look: Look::AfterDie { died_at },
                    }),
                }
            }
            DockerAction::Destroy => {
                self.container = None;
                self.stop_probe();
                if self.desired_running && self.restart_at.is_none() && !self.tracker.parked() {
                    self.event(
                        "lost",
                        Some("lost"),
                        "container was removed behind the daemon's back; recreating it".into(),
                    );
                    self.look(ctx);
                }
            }
        }
    }

    fn inspected(
        &mut self,
        ctx: Ctx,
        look: Look,
        result: Result<Option<ObservedContainer>, RuntimeError>,
        oom_reported: bool,
    ) {
        // A same-named container of another department or node is not ours.
        let result = result.map(|o| o.filter(|c| self.ours(c)));
        match look {
            Look::Converge => self.converge(ctx, result, oom_reported),
            Look::AfterCreate { is_update } => {
                self.container = result.ok().flatten();
                self.announce_update = is_update;
                self.start_existing(ctx, true);
            }
            Look::AfterStart => match result {
                Ok(Some(c)) if c.running => {
                    self.watch(ctx, &c);
                    self.container = Some(c);
                    self.start_probe(ctx);
                    if !self.spec.health.enabled {
                        // No probe to wait for: HAProxy's own check decides.
                        self.agent.primary_drain_from = None;
                    }
                    self.transition(TransitionReason::Started);
                    if std::mem::take(&mut self.announce_update) {
                        self.event("updated", None, format!("now running {}", self.spec.image));
                    }
                }
                Ok(Some(c)) => {
                    self.container = Some(c.clone());
                    self.judge_exit(ctx, &c, oom_reported, ctx.now);
                }
                Ok(None) => {
                    self.start_failed(ctx, RuntimeError::NotFound(container_name(&self.id)))
                }
                Err(e) => self.reason = Some(format!("cannot inspect container: {e}")),
            },
            Look::AfterDie { died_at } => match result {
                Ok(Some(c)) if c.running => self.container = Some(c),
                Ok(Some(c)) => {
                    self.container = Some(c.clone());
                    self.judge_exit(ctx, &c, oom_reported, died_at);
                }
                Ok(None) => self.look(ctx),
                Err(e) => self.reason = Some(format!("cannot inspect container: {e}")),
            },
            Look::ForStart { reply } => {
                match result {
                    Ok(Some(c)) if !c.running && self.is_current(c.spec_hash.as_deref()) => {
                        // Stopped on purpose: start it as it is rather than let
                        // converge judge that exit as a failure.
                        self.container = Some(c);
                        self.start_existing(ctx, true);
                        self.emit(Effect::Reply {
                            to: reply,
                            result: Ok(format!("{} started", self.id)),
                        });
                    }
                    Err(e) => self.emit(Effect::Reply {
                        to: reply,
                        result: Err(CommandError::Runtime(e)),
                    }),
                    other => {
                        self.converge(ctx, other, oom_reported);
                        self.emit(Effect::Reply {
                            to: reply,
                            result: Ok(format!("{} started", self.id)),
                        });
                    }
                }
            }
        }
    }

    /// Compare what runs with the intent and act.
    fn converge(
        &mut self,
        ctx: Ctx,
        result: Result<Option<ObservedContainer>, RuntimeError>,
        oom_reported: bool,
    ) {
        let observed = match result {
            Ok(o) => o,
            Err(e) => {
                self.reason = Some(format!("cannot inspect container: {e}"));
                return;
            }
        };
        let note = self.rollback_note.take();
        let hash = self.hash();
        match observed {
            None => {
                self.container = None;
                self.stop_probe();
                if !self.desired_running {
                    self.transition(TransitionReason::OperatorStop);
                } else if self.tracker.parked() {
                    let message = self.reason.clone().unwrap_or_else(|| "crash loop".into());
                    self.transition(TransitionReason::CrashLoop { message });
                } else if self.restart_at.is_none()
                    && self.pull_retry_at.is_none_or(|t| ctx.now >= t)
                {
                    self.begin_create(false);
                }
            }
            Some(c) if !self.is_current(c.spec_hash.as_deref()) => {
                if self.failed_hash.as_deref() != Some(hash.as_str()) {
                    self.begin_update(c);
                }
            }
            Some(c) if c.running => {
                self.watch(ctx, &c);
                let adopted = self.container.as_ref().map(|k| k.id.as_str()) != Some(c.id.as_str());
                let short_id = short(&c.id).to_string();
                self.container = Some(c.clone());
                if adopted {
                    self.event(
                        "adopted",
                        None,
                        format!("adopted running container {short_id}"),
                    );
                    self.start_probe(ctx);
                } else if !self.probing {
                    self.start_probe(ctx);
                }
                if !self.desired_running {
                    // Someone started it behind our back; the operator said stop.
                    self.stop_probe();
                    self.stop_serving(ctx, c, AfterStop::Unwanted, None);
                } else if matches!(
                    self.state,
                    Pending | Starting | Stopped | Failed | Backoff | Pulling | Draining
                ) && self.restart_at.is_none()
                {
                    self.transition(TransitionReason::Adopted);
                }
            }
            Some(c) => {
                self.stop_probe();
                self.container = Some(c.clone());
                let run = (c.id.clone(), c.started_at);
                if !self.desired_running {
                    self.transition(TransitionReason::OperatorStop);
                } else if self.tracker.parked() || self.restart_at.is_some() {
                } else if c.status == "created" {
                    self.start_existing(ctx, true);
                } else if self.judged_run.as_ref() == Some(&run) {
                    // Already judged, unless a start we meant to make never
                    // happened because Docker was unreachable.
                    if self.state == Starting {
                        self.start_existing(ctx, false);
                    }
                } else if self.unwatched(ctx, &c) && c.exit_code == Some(0) && !c.oom_killed {
                    // It stopped while nobody watched: a host reboot or a Docker
                    // restart stops containers cleanly, and that is no reason
                    // for a department meant to run to stay down.
                    self.judged_run = Some(run);
                    self.event(
                        "recovering",
                        Some("engine"),
                        "container was stopped while the daemon or Docker was down; starting it again".into(),
                    );
                    self.start_existing(ctx, true);
                } else {
                    self.judge_exit(ctx, &c, oom_reported, ctx.now);
                }
            }
        }
        if let Some(why) = note {
            let message = format!("last update failed and was rolled back: {why}");
            if self.state == RollingBack {
                self.transition(TransitionReason::RolledBack { message });
            } else {
                self.reason = Some(message);
            }
        }
    }

    fn image_checked(&mut self, ctx: Ctx, image_for: ImageFor, result: Result<bool, RuntimeError>) {
        let image = self.spec.image.clone();
        match result {
            Ok(true) => self.image_ready(ctx, image_for),
            Ok(false) => {
                match image_for {
                    ImageFor::Create { .. } => {
                        self.transition(TransitionReason::ImageMissing {
                            image: image.clone(),
                        });
                    }
                    // An update keeps its state while the new image comes.
                    ImageFor::Candidate | ImageFor::Replace => {
                        self.reason = Some(format!("pulling {image}"));
                    }
                }
                self.event("pull_started", None, format!("pulling {image}"));
                self.begin(
                    JobKind::Pull {
                        image: image.clone(),
                        image_for,
                    },
                    Work::Pull { image },
                );
            }
            Err(e) => {
                let why = format!("cannot check image {image}: {e}");
                match image_for {
                    ImageFor::Create { .. } => {
                        self.reason = Some(why);
                        self.arm_pull_retry(ctx);
                    }
                    ImageFor::Candidate | ImageFor::Replace => self.update_failed(ctx, why),
                }
            }
        }
    }

    fn image_ready(&mut self, ctx: Ctx, image_for: ImageFor) {
        match image_for {
            ImageFor::Create { is_update } => self.create(ctx, is_update),
            ImageFor::Candidate => self.begin_prove(),
            ImageFor::Replace => self.swap(ctx),
        }
    }

    fn arm_pull_retry(&mut self, ctx: Ctx) {
        let at = ctx.now + PULL_RETRY;
        self.pull_retry_at = Some(at);
        self.emit(Effect::ArmTimer {
            timer: Timer::PullRetry,
            at,
        });
    }

    fn created(&mut self, ctx: Ctx, is_update: bool, result: Result<String, RuntimeError>) {
        match result {
            Ok(id) => {
                self.event(
                    if is_update { "replaced" } else { "created" },
                    None,
                    format!(
                        "created container {} on port {} from {}",
                        short(&id),
                        self.port,
                        self.spec.image
                    ),
                );
                self.emit(Effect::Inspect {
                    name_or_id: id,
                    look: Look::AfterCreate { is_update },
                });
            }
            Err(RuntimeError::Conflict(_)) => {
                // A container of that name appeared meanwhile: the next look sorts it out.
                self.reason =
                    Some("a container with this name already exists; re-examining".into());
            }
            Err(e) => self.start_failed(ctx, e),
        }
    }

    fn start_done(&mut self, ctx: Ctx, result: Result<(), RuntimeError>) {
        match result {
            Ok(()) => {
                if let Some(c) = &self.container {
                    let id = c.id.clone();
                    self.emit(Effect::Inspect {
                        name_or_id: id,
                        look: Look::AfterStart,
                    });
                }
            }
            Err(RuntimeError::NotFound(_)) => {
                self.container = None;
                self.begin_create(false);
            }
            Err(e) => self.start_failed(ctx, e),
        }
    }

    fn job_done(&mut self, ctx: Ctx, kind: JobKind, outcome: Outcome) {
        match (kind, outcome) {
            (JobKind::Pull { image, image_for }, Outcome::Pulled(result)) => {
                self.pull_progress = None;
                self.progress = None;
                match result {
                    Ok(()) => {
                        self.event("pulled", None, format!("pulled {image}"));
                        if image == self.spec.image {
                            self.image_ready(ctx, image_for);
                        } else {
                            self.look(ctx);
                        }
                    }
                    Err(e) => {
                        let why = format!("pull of {image} failed: {e}");
                        self.event("pull_failed", Some("pull"), why.clone());
                        match image_for {
                            ImageFor::Create { .. } => {
                                self.arm_pull_retry(ctx);
                                self.transition(TransitionReason::PullFailed { message: why });
                            }
                            ImageFor::Candidate => self.update_failed(ctx, why),
                            ImageFor::Replace => {
                                if self.container.as_ref().is_some_and(|c| c.running)
                                    && self.previous.is_some()
                                {
                                    self.update_failed(ctx, why);
                                } else {
                                    self.arm_pull_retry(ctx);
                                    self.transition(TransitionReason::PullFailed { message: why });
                                }
                            }
                        }
                    }
                }
            }
            (JobKind::Prove, Outcome::Proven(result)) => match result {
                Ok(()) => {
                    if self.drain.is_some() && self.standby_port().is_some() {
                        // Kept running on the standby port: the hand-over's stand-in.
                        self.bridge_since = Some(ctx.now);
                        self.agent.standby_drain_from = None;
                    }
                    self.swap(ctx)
                }
                Err(why) => self.update_failed(ctx, why),
            },
            (JobKind::Bridge { then, reply }, Outcome::Proven(result)) => {
                let proven = result.is_ok();
                match result {
                    Ok(()) => {
                        self.bridge_since = Some(ctx.now);
                        self.agent.standby_drain_from = None;
                        self.event(
                            "stand_in_up",
                            Some("drain"),
                            format!(
                                "stand-in healthy on port {}; draining port {} next",
                                self.standby_port().unwrap_or_default(),
                                self.port
                            ),
                        );
                    }
                    Err(why) => self.event(
                        "stand_in_failed",
                        Some("drain"),
                        format!("no stand-in for the hand-over ({why}); stopping without one"),
                    ),
                }
                match self.container.clone() {
                    Some(c) if c.running => self.stop_serving_with(ctx, c, then, reply, proven),
                    _ => {
                        if let Some(reply) = reply {
                            self.emit(Effect::Reply {
                                to: reply,
                                result: Ok(format!("{} restarted", self.id)),
                            });
                        }
                        self.look(ctx);
                    }
                }
            }
            (JobKind::Retire, Outcome::Retired(result)) => match result {
                Ok(()) => self.bridge_since = None,
                Err(e) => self.reason = Some(format!("could not remove the stand-in: {e}")),
            },
            (JobKind::Stop { then, reply }, Outcome::Stopped(result)) => {
                // A container stopped to be started again (or replaced) stays
                // drained until it answers its probe: HAProxy's check may
                // still pass for a moment after the stop, and a connection
                // sent then would be refused and retried late.
                if matches!(then, AfterStop::Refresh | AfterStop::Unwanted) {
                    self.agent.primary_drain_from = None;
                }
                let refreshed = match result {
                    Ok(c) => c.filter(|c| self.ours(c)),
                    Err(e) => {
                        if let Some(reply) = reply {
                            self.emit(Effect::Reply {
                                to: reply,
                                result: Err(CommandError::Runtime(e)),
                            });
                        } else {
                            self.reason = Some(format!("could not stop the container: {e}"));
                        }
                        self.converge_after_job = true;
                        return;
                    }
                };
                if refreshed.is_some() {
                    self.container = refreshed;
                }
                match then {
                    AfterStop::Refresh => {}
                    AfterStop::Start => {
                        self.start_existing(ctx, false);
                        if let Some(reply) = reply {
                            self.emit(Effect::Reply {
                                to: reply,
                                result: Ok(format!("{} restarted", self.id)),
                            });
                        }
                    }
                    AfterStop::OperatorStopped | AfterStop::Unwanted => {
                        self.transition(TransitionReason::OperatorStop);
                        if let Some(reply) = reply {
                            self.emit(Effect::Reply {
                                to: reply,
                                result: Ok(format!("{} stopped", self.id)),
                            });
                        }
                    }
                    AfterStop::Swap => match &self.container {
                        Some(c) => {
                            let id = c.id.clone();
                            self.emit(Effect::Remove { container_id: id });
                        }
                        None => self.create(ctx, true),
                    },
                }
            }
            (JobKind::OomCheck { failed_at }, Outcome::OomVerdict { oom }) => {
                let failure = if oom {
                    FailureReason::Oom
                } else {
                    FailureReason::Exited { code: 137 }
                };
                self.on_failure(ctx, failure, failed_at);
            }
            (JobKind::Delete { reply }, Outcome::Deleted(result)) => match result {
                Ok(()) => {
                    self.container = None;
                    self.event(
                        "removed",
                        None,
                        "department deleted; container stopped and removed".into(),
                    );
                    self.emit(Effect::ReplyDeleted {
                        to: reply,
                        result: Ok(()),
                    });
                    self.emit(Effect::Exit);
                }
                Err(e) => {
                    self.emit(Effect::ReplyDeleted {
                        to: reply,
                        result: Err(e),
                    });
                    self.converge_after_job = true;
                }
            },
            // An outcome that does not belong to the job of that id: ignored.
            _ => {}
        }
    }

    // --- steps ---------------------------------------------------------------------

    fn begin_create(&mut self, is_update: bool) {
        if !self.desired_running {
            return;
        }
        self.emit(Effect::CheckImage {
            image: self.spec.image.clone(),
            image_for: ImageFor::Create { is_update },
        });
    }

    fn create(&mut self, _ctx: Ctx, is_update: bool) {
        if !self.desired_running {
            return;
        }
        self.pull_retry_at = None;
        self.transition(TransitionReason::Create);
        let request = self.create_request(false);
        self.emit(Effect::Create {
            request: Box::new(request),
            is_update,
        });
    }

    /// `first`: a first start (through the start gate); restarts after a
    /// failure are spread by their backoff jitter instead.
    fn start_existing(&mut self, ctx: Ctx, first: bool) {
        let Some(c) = self.container.clone() else {
            return self.begin_create(false);
        };
        self.transition(TransitionReason::StartExisting);
        self.run_started_nano = ctx.wall_nanos;
        self.emit(Effect::ForgetOom {
            container_id: c.id.clone(),
        });
        self.emit(Effect::Start {
            container_id: c.id,
            gated: first,
        });
    }

    fn start_failed(&mut self, ctx: Ctx, error: RuntimeError) {
        if matches!(error, RuntimeError::Unavailable(_)) {
            // Docker is away; the next look after it is back starts it.
            self.reason = Some(error.to_string());
            return;
        }
        self.event(
            "start_failed",
            Some("start"),
            format!("could not start: {error}"),
        );
        self.on_failure(ctx, FailureReason::Lost, ctx.now);
        if let Some(reason) = &mut self.reason {
            *reason = format!("could not start: {error}; {reason}");
        }
    }

    /// Why a stopped run ended. An exit 137 without Docker's OOM report is
    /// looked at again for a moment: Docker may set the flag, or send its
    /// `oom` event, only after reporting the exit.
    fn judge_exit(
        &mut self,
        ctx: Ctx,
        c: &ObservedContainer,
        oom_reported: bool,
        failed_at: Instant,
    ) {
        if c.oom_killed || oom_reported {
            self.on_failure(ctx, FailureReason::Oom, failed_at);
        } else if c.exit_code == Some(137) {
            self.judged_run = Some((c.id.clone(), c.started_at));
            self.begin(
                JobKind::OomCheck { failed_at },
                Work::OomCheck {
                    container_id: c.id.clone(),
                    started_at: c.started_at,
                },
            );
        } else {
            self.on_failure(ctx, failure_of(c), failed_at);
        }
    }

    /// `failed_at`: when it failed. The backoff counts from then, not from
    /// after noticing it.
    fn on_failure(&mut self, ctx: Ctx, reason: FailureReason, failed_at: Instant) {
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
        self.event(kind, Some(reason.label()), reason.describe());
        match self
            .tracker
            .on_failure(&self.spec.restart, &reason, ctx.now, ctx.jitter)
        {
            Decision::RestartAfter(delay) => {
                let at = failed_at + delay;
                self.restart_at = Some(at);
                self.emit(Effect::ArmTimer {
                    timer: Timer::Restart,
                    at,
                });
                self.transition(TransitionReason::Failed {
                    failure: reason.clone(),
                    delay,
                });
                let unhealthy = reason == FailureReason::Unhealthy;
                self.pending_failure = Some(reason);
                // A crash it watched restarts at once; spread by the jitter.
                self.restart_gated = self
                    .container
                    .as_ref()
                    .is_none_or(|c| self.unwatched(ctx, c));
                if unhealthy {
                    // Stop it now rather than when the backoff ends: it serves
                    // nothing useful, and the stop (up to stop_timeout) then
                    // overlaps the backoff instead of adding to it.
                    self.stop_probe();
                    if let Some(c) = self.container.clone().filter(|c| c.running) {
                        self.stop_serving(ctx, c, AfterStop::Refresh, None);
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
                self.event("crash_looping", Some(reason.label()), message.clone());
                self.transition(TransitionReason::CrashLoop { message });
            }
            Decision::LeaveStopped => {
                let message = format!(
                    "{}; restart policy {:?} does not restart it",
                    reason.describe(),
                    self.spec.restart.policy
                );
                match reason {
                    FailureReason::Unhealthy => {
                        // Policy `never`: report, keep it running and probed.
                        self.health = Health::Unhealthy;
                        self.start_probe_keep_health(ctx);
                    }
                    FailureReason::Exited { code: 0 } => {
                        self.stop_probe();
                        self.transition(TransitionReason::ExitedCleanly { message });
                    }
                    _ => {
                        self.stop_probe();
                        self.transition(TransitionReason::NotRestarted { message });
                    }
                }
            }
        }
    }

    fn restart_now(&mut self, ctx: Ctx) {
        if self.restart_at.take().is_none() {
            return; // cancelled meanwhile
        }
        let reason = self.pending_failure.take().unwrap_or(FailureReason::Lost);
        self.emit(Effect::RecordRestart {
            reason: reason.label(),
            exit_code: reason.exit_code(),
        });
        *self
            .restarts_by_reason
            .entry(reason.label().to_string())
            .or_default() += 1;
        self.event(
            "restarting",
            Some(reason.label()),
            format!("restarting after: {}", reason.describe()),
        );
        self.stop_probe();
        if let Some(ActiveJob {
            kind: JobKind::Stop { then, .. },
            ..
        }) = &mut self.job
        {
            // The unhealthy container is still stopping: start once it is down.
            *then = AfterStop::Start;
            return;
        }
        match self.container.clone() {
            Some(c) if c.running => self.stop_serving(ctx, c, AfterStop::Start, None),
            Some(_) => self.start_existing(ctx, self.restart_gated),
            None => self.begin_create(false),
        }
    }

    /// Every stop of a container that may be serving goes through here.
    /// Behind HAProxy (`[haproxy]`), a restart or an update swap of a healthy
    /// container first brings up a stand-in of the current spec on the
    /// standby port (unless one is up already: the proven update candidate),
    /// waits until HAProxy has seen it up, then drains the old one (`drain`
    /// for its port, in-flight requests finish up to `drain_timeout`) and only
    /// then stops it. `agentctl stop` drains too; then nothing takes new
    /// connections, as asked.
    fn stop_serving(
        &mut self,
        ctx: Ctx,
        c: ObservedContainer,
        then: AfterStop,
        reply: Option<ReplyId>,
    ) {
        self.stop_serving_with(ctx, c, then, reply, true)
    }

    /// `stand_in`: false after a stand-in failed to come up (the stop goes on
    /// without one; in-flight requests still finish).
    fn stop_serving_with(
        &mut self,
        ctx: Ctx,
        c: ObservedContainer,
        then: AfterStop,
        reply: Option<ReplyId>,
        stand_in: bool,
    ) {
        let timeout = if then == AfterStop::Swap {
            self.previous
                .as_ref()
                .map(|s| s.restart.stop_timeout)
                .unwrap_or(self.spec.restart.stop_timeout)
        } else {
            self.spec.restart.stop_timeout
        };
        let hand_over = matches!(then, AfterStop::Start | AfterStop::Swap);
        let drains = c.running && (hand_over || then == AfterStop::OperatorStopped);
        let drain = match self.drain.clone() {
            Some(d) if drains => d,
            _ => {
                self.stop_probe();
                self.begin(
                    JobKind::Stop { then, reply },
                    Work::Stop {
                        container_id: c.id,
                        timeout,
                        drain: None,
                    },
                );
                return;
            }
        };
        if hand_over
            && stand_in
            && self.bridge_since.is_none()
            && self.standby_port().is_some()
            && self.spec.health.enabled
            && self.health == Health::Healthy
        {
            return self.begin_bridge(then, reply);
        }
        self.stop_probe();
        // New connections go to the stand-in once HAProxy has had time to see
        // it up; until then the old container keeps taking them.
        let drain_from = match self.bridge_since {
            Some(up) if hand_over => (up + drain.settle).max(ctx.now),
            _ => ctx.now,
        };
        self.agent.primary_drain_from = Some(drain_from);
        self.drain_view = Some(DrainView {
            slot: Slot::Primary,
            since: drain_from,
            connections: None,
            took: None,
        });
        let wait = DrainWait {
            port: self.port,
            after: drain_from.saturating_duration_since(ctx.now) + drain.noticed(),
            timeout: self.spec.restart.drain_timeout,
        };
        let to = match (hand_over, self.standby_port()) {
            (true, Some(standby)) if self.bridge_since.is_some() => {
                format!("new connections go to port {standby}")
            }
            _ => "new connections go nowhere".to_string(),
        };
        self.transition(TransitionReason::Drain {
            message: format!(
                "draining port {} before the stop (up to {}); {to}",
                self.port,
                humantime::format_duration(self.spec.restart.drain_timeout)
            ),
        });
        self.begin(
            JobKind::Stop { then, reply },
            Work::Stop {
                container_id: c.id,
                timeout,
                drain: Some(wait),
            },
        );
    }

    /// The stand-in of a hand-over: the current spec on the standby port,
    /// proven healthy like an update candidate and kept running.
    fn begin_bridge(&mut self, then: AfterStop, reply: Option<ReplyId>) {
        let Some(standby) = self.standby_port() else {
            return;
        };
        self.reason = Some(format!(
            "starting a stand-in on port {standby} before the stop"
        ));
        let request = self.create_request_on(true, Some(standby));
        self.begin(
            JobKind::Bridge { then, reply },
            Work::Prove {
                request: Box::new(request),
                health_path: self.spec.health.path.clone(),
                probe_timeout: self.spec.health.timeout,
                every: self.spec.health.interval.min(Duration::from_secs(1)),
                deadline: self.spec.restart.update_deadline,
                keep: true,
            },
        );
    }

    /// Drain the stand-in on the standby port (the department's own port is
    /// serving again, or, at start, whatever a dead daemon left), then remove it.
    fn begin_retire(&mut self, ctx: Ctx, standby: u16) {
        let Some(drain) = self.drain.clone() else {
            return;
        };
        // After a hand-over the primary answered its probe just now: HAProxy
        // gets time to see it up before the stand-in stops taking
        // connections. A standby already drained (at start) stays drained.
        let from = match self.agent.standby_drain_from {
            Some(t) if t <= ctx.now => t,
            _ => ctx.now + drain.settle,
        };
        self.agent.standby_drain_from = Some(from);
        if self.bridge_since.is_some() {
            self.drain_view = Some(DrainView {
                slot: Slot::Standby,
                since: from,
                connections: None,
                took: None,
            });
        }
        self.begin(
            JobKind::Retire,
            Work::Retire {
                department: self.id.clone(),
                wait: DrainWait {
                    port: standby,
                    after: drain.settle + drain.noticed(),
                    timeout: self.spec.restart.drain_timeout,
                },
                timeout: self.spec.restart.stop_timeout,
            },
        );
    }

    /// After a hand-over, once the department's own container is healthy.
    fn maybe_retire(&mut self, ctx: Ctx) {
        if self.bridge_since.is_some() && self.job.is_none() && self.state == Running {
            if let Some(standby) = self.standby_port() {
                self.begin_retire(ctx, standby);
            }
        }
    }

    fn drain_progress(&mut self, ctx: Ctx, job: JobId, connections: Option<u32>, done: bool) {
        if self.job.as_ref().is_none_or(|j| j.id != job) {
            return;
        }
        let Some(view) = &mut self.drain_view else {
            return;
        };
        view.connections = connections;
        if done && view.took.is_none() {
            let took = ctx.now.saturating_duration_since(view.since);
            view.took = Some(took);
            let slot = view.slot;
            let port = match slot {
                Slot::Primary => Some(self.port),
                Slot::Standby => self.standby_port(),
            };
            let left = match connections {
                Some(0) => "no connection left".to_string(),
                Some(n) => format!("{n} connection(s) still open at drain_timeout"),
                None => "connections cannot be counted here; waited drain_timeout".to_string(),
            };
            self.event(
                "drained",
                Some("drain"),
                format!(
                    "{} port {} drained in {}: {left}",
                    slot.as_str(),
                    port.unwrap_or_default(),
                    humantime::format_duration(round_ms(took))
                ),
            );
        }
    }

    pub fn standby_port(&self) -> Option<u16> {
        self.drain.as_ref().and_then(|d| d.standby_for(self.port))
    }

    /// Replace `old` with a container of the current spec. When the old one is
    /// serving and healthy, the new one must first prove itself healthy on a
    /// spare port.
    fn begin_update(&mut self, old: ObservedContainer) {
        if !self.desired_running {
            // A stopped department keeps its old container until started.
            self.container = Some(old);
            return;
        }
        let gated = old.running
            && self.health == Health::Healthy
            && self.spec.health.enabled
            && self.previous.is_some();
        self.container = Some(old);
        let image = self.spec.image.clone();
        if gated {
            self.transition(TransitionReason::NewSpec {
                message: format!("proving {image} healthy before the swap"),
            });
        } else {
            self.transition(TransitionReason::NewSpec {
                message: "replacing container".into(),
            });
        }
        self.emit(Effect::CheckImage {
            image,
            image_for: if gated {
                ImageFor::Candidate
            } else {
                ImageFor::Replace
            },
        });
    }

    fn begin_prove(&mut self) {
        // Behind HAProxy the candidate proves itself on the standby port and
        // stays there as the stand-in of the swap.
        let standby = self.drain.as_ref().and(self.standby_port());
        let request = self.create_request_on(true, standby);
        self.reason = Some(format!(
            "proving {} healthy before the swap",
            self.spec.image
        ));
        self.begin(
            JobKind::Prove,
            Work::Prove {
                request: Box::new(request),
                health_path: self.spec.health.path.clone(),
                probe_timeout: self.spec.health.timeout,
                every: self.spec.health.interval.min(Duration::from_secs(1)),
                deadline: self.spec.restart.update_deadline,
                keep: standby.is_some(),
            },
        );
    }

    fn swap(&mut self, ctx: Ctx) {
        match self.container.clone() {
            Some(c) if c.running => self.stop_serving(ctx, c, AfterStop::Swap, None),
            Some(c) => self.emit(Effect::Remove { container_id: c.id }),
            None => self.create(ctx, true),
        }
    }

    fn update_failed(&mut self, ctx: Ctx, why: String) {
        let failed_hash = self.hash();
        let Some(previous) = self.previous.clone() else {
            self.transition(TransitionReason::NoPrevious { why });
            return;
        };
        self.transition(TransitionReason::UpdateFailed { why: why.clone() });
        self.emit(Effect::PersistRollBack {
            failed_hash: failed_hash.clone(),
        });
        let failed = std::mem::replace(&mut self.spec, previous);
        self.previous = Some(failed);
        self.failed_hash = Some(failed_hash);
        self.event(
            "update_failed",
            Some("update"),
            format!("update failed and was rolled back: {why}"),
        );
        self.rollback_note = Some(why);
        self.look(ctx);
    }

    // --- probes --------------------------------------------------------------------

    fn on_probe(&mut self, ctx: Ctx, record: ProbeRecord) {
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
                self.event("healthy", None, "health probe passed".into());
            }
            self.health = Health::Healthy;
            // Healthy again after a drained stop: new connections welcome.
            self.agent.primary_drain_from = None;
            self.maybe_retire(ctx);
            return;
        }
        let in_start_period = self.health != Health::Healthy
            && ctx.now.saturating_duration_since(self.probing_since)
                < self.spec.health.start_period;
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
                format!(
                    "{} consecutive probe failures (last: {})",
                    self.consecutive_failures,
                    detail.unwrap_or_default()
                ),
            );
            if self.state == Running && self.desired_running && self.job.is_none() {
                self.on_failure(ctx, FailureReason::Unhealthy, ctx.now);
            }
        }
    }

    fn start_probe(&mut self, ctx: Ctx) {
        self.health = if self.spec.health.enabled {
            Health::Unknown
        } else {
            Health::Disabled
        };
        self.start_probe_keep_health(ctx);
    }

    fn start_probe_keep_health(&mut self, ctx: Ctx) {
        self.stop_probe();
        if !self.spec.health.enabled {
            return;
        }
        self.probe_generation += 1;
        self.consecutive_failures = 0;
        self.probing_since = ctx.now;
        self.probing = true;
        self.emit(Effect::StartProbe {
            generation: self.probe_generation,
            port: self.port,
            health: self.spec.health.clone(),
        });
    }

    fn stop_probe(&mut self) {
        if std::mem::take(&mut self.probing) {
            self.emit(Effect::StopProbe);
        }
        // Results already queued from the old task are dropped by generation.
        self.probe_generation += 1;
    }

    // --- watching --------------------------------------------------------------------

    fn watch(&mut self, ctx: Ctx, c: &ObservedContainer) {
        self.watched = Some((c.id.clone(), ctx.engine_epoch));
    }

    /// True when the run of `c` ended out of sight: never seen running, or
    /// Docker went away and came back since.
    fn unwatched(&self, ctx: Ctx, c: &ObservedContainer) -> bool {
        match &self.watched {
            Some((id, seen_epoch)) => *id != c.id || *seen_epoch != ctx.engine_epoch,
            None => true,
        }
    }

    // --- values --------------------------------------------------------------------

    pub fn create_request(&self, candidate: bool) -> CreateRequest {
        self.create_request_on(candidate, if candidate { None } else { Some(self.port) })
    }

    /// `host_port`: `None` lets Docker choose (a candidate without a standby port).
    fn create_request_on(&self, candidate: bool, host_port: Option<u16>) -> CreateRequest {
        let spec = &self.spec;
        let hardening = crate::hardening::resolve(spec, &self.containers);
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let name = if candidate {
            candidate_container_name(&self.id)
        } else {
            container_name(&self.id)
        };
        let secret_files = match hardening.secrets_mode {
            SecretsMode::Env => {
                env.extend(
                    spec.secrets
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.expose())),
                );
                None
            }
            SecretsMode::Files => {
                env.extend(crate::hardening::file_pointers(spec));
                Some(SecretFiles {
                    key: format!("{name}.{}", self.hash()),
                    files: spec
                        .secrets
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
            }
        };
        let mut labels = HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (labels::DEPARTMENT.to_string(), self.id.clone()),
            (labels::SPEC_HASH.to_string(), self.hash()),
            (labels::HOST_PORT.to_string(), self.port.to_string()),
            (labels::NODE.to_string(), self.node_id.clone()),
            // What a node that lost its store rebuilds the department from
            // (recovery.rs); secrets masked, their values stay in the env.
            (labels::SPEC.to_string(), crate::recovery::spec_label(spec)),
            (
                labels::ROLE.to_string(),
                if candidate { "candidate" } else { "primary" }.to_string(),
            ),
        ]);
        if let Some(files) = &secret_files {
            // Where the runtime finds the files again to remove them with
            // the container, and a lost store finds the values.
            labels.insert(labels::SECRETS.to_string(), files.key.clone());
        }
        CreateRequest {
            name,
            image: spec.image.clone(),
            env,
            labels,
            container_port: spec.container_port,
            bind: self.bind,
            host_port,
            nano_cpus: spec.resources.cpus.map(|c| (c * 1e9) as i64),
            memory: spec.resources.memory.map(|m| m.bytes() as i64),
            memory_reservation: spec.resources.memory_reservation.map(|m| m.bytes() as i64),
            stop_timeout: spec.restart.stop_timeout,
            network: hardening.network,
            pids_limit: hardening.pids_limit,
            cap_add: hardening.cap_add,
            init: hardening.init,
            read_only_root: hardening.read_only_root,
            tmpfs_bytes: hardening.tmpfs_bytes,
            no_new_privileges: hardening.no_new_privileges,
            secret_files,
        }
    }

    pub fn view(&self) -> DeptView {
        let container = self.container.as_ref();
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
            progress: self.progress.clone(),
            postgres_check: None,
            standby_port: self.standby_port(),
            agent: self.agent,
            drain: self.drain_view.clone(),
        }
    }
}

/// The department and node labels are both `department`'s and `node`'s: the
/// check before anything found by name is adopted, stopped or removed.
pub fn owned_by(c: &ObservedContainer, department: &str, node: &str) -> bool {
    c.department == department && c.node.as_deref() == Some(node)
}

pub fn failure_of(c: &ObservedContainer) -> FailureReason {
    if c.oom_killed {
        FailureReason::Oom
    } else {
        FailureReason::Exited {
            code: c.exit_code.unwrap_or(-1),
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// The monotonic instant of a Docker event's wall-clock time (the engine runs
/// on this host, on the same clock); now if the time lies ahead.
fn instant_of(ctx: Ctx, unix_nanos: i64) -> Instant {
    let ago = Duration::from_nanos(ctx.wall_nanos.saturating_sub(unix_nanos).max(0) as u64);
    ctx.now.checked_sub(ago).unwrap_or(ctx.now)
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
