//! A scriptable in-memory `ContainerRuntime` for tests of the supervisor on
//! paused tokio time: containers live in a map, every call is logged, and a
//! test scripts failures (a pull that fails or hangs, a start that fails, a
//! container that exits with a code some time after it starts, an inspect
//! error) and drives the event stream (or loses events on purpose).
//! Compiled for the crate's own tests and behind the `fake-runtime` feature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::runtime::{
    ContainerConfig, ContainerRuntime, ContainerStats, CreateRequest, LogQuery, ObservedContainer,
    RuntimeError, RuntimeEvent,
};
use async_trait::async_trait;
use fleet_model::labels;
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// One call the runtime received, with its main argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Ping,
    List,
    Inspect(String),
    Create(String),
    Start(String),
    Stop(String),
    Remove(String),
    ImagePresent(String),
    Pull(String),
}

#[derive(Debug, Clone, Default)]
pub enum PullScript {
    /// The image is there afterwards.
    #[default]
    Succeed,
    Fail(String),
    /// Never answers (until the caller gives up or is aborted).
    Hang,
}

#[derive(Debug, Clone)]
pub struct FakeContainer {
    pub observed: ObservedContainer,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    pub host_port: Option<u16>,
}

#[derive(Default)]
struct State {
    containers: BTreeMap<String, FakeContainer>,
    images: BTreeSet<String>,
    next_id: u64,
    calls: Vec<Call>,
    pull: PullScript,
    /// Starts left that fail with this error.
    start_failures: Vec<RuntimeError>,
    /// Every started container exits with this code after this long.
    exit_after_start: Option<(i64, Duration)>,
    inspect_error: Option<RuntimeError>,
    /// Events are not delivered (the stream stays silent).
    lose_events: bool,
    subscribers: Vec<mpsc::UnboundedSender<Result<RuntimeEvent, RuntimeError>>>,
    /// Bumped on every start, so a scripted exit of an older run does nothing.
    runs: HashMap<String, u64>,
    /// The engine's own record of every event (lost ones included), with the
    /// container's node and role labels, for `past_events`.
    history: Vec<(Option<String>, String, RuntimeEvent)>,
    /// Node and role label of every container ever created.
    meta: HashMap<String, (Option<String>, String)>,
    /// Where a container created without a host port (an update candidate,
    /// which Docker gives an ephemeral port) is published: a test's own
    /// listener, so the candidate's proof probes something real.
    ephemeral_port: Option<u16>,
    /// Name and requested host port of every create.
    created: Vec<(String, Option<u16>)>,
}

#[derive(Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_image(&self, image: &str) {
        self.lock().images.insert(image.to_string());
    }

    pub fn script_pull(&self, script: PullScript) {
        self.lock().pull = script;
    }

    pub fn fail_next_start(&self, error: RuntimeError) {
        self.lock().start_failures.push(error);
    }

    pub fn exit_after_start(&self, script: Option<(i64, Duration)>) {
        self.lock().exit_after_start = script;
    }

    pub fn fail_inspect(&self, error: Option<RuntimeError>) {
        self.lock().inspect_error = error;
    }

    /// Containers created without a host port are published on `port`.
    pub fn publish_ephemeral_on(&self, port: Option<u16>) {
        self.lock().ephemeral_port = port;
    }

    /// Name and requested host port of every container created through `create`.
    pub fn created(&self) -> Vec<(String, Option<u16>)> {
        self.lock().created.clone()
    }

    pub fn lose_events(&self, lose: bool) {
        self.lock().lose_events = lose;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn count(&self, pred: impl Fn(&Call) -> bool) -> usize {
        self.lock().calls.iter().filter(|c| pred(c)).count()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    pub fn by_name(&self, name: &str) -> Option<FakeContainer> {
        self.lock()
            .containers
            .values()
            .find(|c| c.observed.name == name)
            .cloned()
    }

    pub fn containers(&self) -> Vec<FakeContainer> {
        self.lock().containers.values().cloned().collect()
    }

    /// A container that already exists, as a daemon before us left it.
    pub fn insert(&self, request: &CreateRequest, running: bool) -> String {
        let mut state = self.lock();
        let id = Self::create_locked(&mut state, request);
        if running {
            let c = state.containers.get_mut(&id).unwrap();
            c.observed.running = true;
            c.observed.status = "running".into();
            c.observed.started_at = Some(now_nanos() / 1_000_000_000);
        }
        id
    }

    /// The container's process exits now with `code` (a crash).
    pub fn exit(&self, id: &str, code: i64) {
        let mut state = self.lock();
        Self::exit_locked(&mut state, id, code, false);
    }

    /// The kernel's OOM killer ends it: Docker's `oom`, then `die` with 137.
    pub fn oom_kill(&self, id: &str) {
        let mut state = self.lock();
        Self::exit_locked(&mut state, id, 137, true);
    }

    fn exit_locked(state: &mut State, id: &str, code: i64, oom: bool) {
        let Some(c) = state.containers.get_mut(id) else {
            return;
        };
        if !c.observed.running {
            return;
        }
        c.observed.running = false;
        c.observed.status = "exited".into();
        c.observed.exit_code = Some(code);
        c.observed.oom_killed = oom;
        let department = c.observed.department.clone();
        if oom {
            Self::emit(state, id, &department, "oom", None);
        }
        Self::emit(state, id, &department, "die", Some(code));
    }

    fn emit(state: &mut State, id: &str, department: &str, action: &str, exit_code: Option<i64>) {
        let event = RuntimeEvent::Container {
            id: id.to_string(),
            department: department.to_string(),
            action: action.to_string(),
            exit_code,
            time_nano: now_nanos(),
        };
        let (node, role) = state.meta.get(id).cloned().unwrap_or_default();
        state.history.push((node, role, event.clone()));
        if state.lose_events {
            return;
        }
        state
            .subscribers
            .retain(|tx| tx.send(Ok(event.clone())).is_ok());
    }

    fn create_locked(state: &mut State, r: &CreateRequest) -> String {
        state.next_id += 1;
        let id = format!("{:012x}{:052x}", state.next_id, state.next_id);
        let department = r
            .labels
            .get(labels::DEPARTMENT)
            .cloned()
            .unwrap_or_default();
        let observed = ObservedContainer {
            id: id.clone(),
            name: r.name.clone(),
            department,
            node: r.labels.get(labels::NODE).cloned(),
            role: r.labels.get(labels::ROLE).cloned().unwrap_or_default(),
            spec_hash: r.labels.get(labels::SPEC_HASH).cloned(),
            running: false,
            status: "created".into(),
            exit_code: None,
            oom_killed: false,
            started_at: None,
            published_port: r.host_port.or(state.ephemeral_port),
            image: Some(r.image.clone()),
        };
        state
            .meta
            .insert(id.clone(), (observed.node.clone(), observed.role.clone()));
        state.containers.insert(
            id.clone(),
            FakeContainer {
                observed,
                labels: r.labels.clone(),
                env: r.env.clone(),
                host_port: r.host_port,
            },
        );
        id
    }

    fn find<'a>(state: &'a State, name_or_id: &str) -> Option<&'a FakeContainer> {
        state.containers.get(name_or_id).or_else(|| {
            state
                .containers
                .values()
                .find(|c| c.observed.name == name_or_id)
        })
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.lock().calls.push(Call::Ping);
        Ok(())
    }

    async fn list(&self, node: &str) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::List);
        Ok(state
            .containers
            .values()
            .filter(|c| c.labels.get(labels::NODE).map(String::as_str) == Some(node))
            .map(|c| c.observed.clone())
            .collect())
    }

    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Inspect(name_or_id.to_string()));
        if let Some(e) = &state.inspect_error {
            return Err(e.clone());
        }
        Ok(Self::find(&state, name_or_id).map(|c| c.observed.clone()))
    }

    async fn create(&self, request: &CreateRequest) -> Result<String, RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Create(request.name.clone()));
        if Self::find(&state, &request.name).is_some() {
            return Err(RuntimeError::Conflict(format!(
                "the name {} is in use",
                request.name
            )));
        }
        if !state.images.contains(&request.image) {
            return Err(RuntimeError::NotFound(format!(
                "no such image: {}",
                request.image
            )));
        }
        let id = Self::create_locked(&mut state, request);
        state
            .created
            .push((request.name.clone(), request.host_port));
        let department = request
            .labels
            .get(labels::DEPARTMENT)
            .cloned()
            .unwrap_or_default();
        Self::emit(&mut state, &id, &department, "create", None);
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let exit = {
            let mut state = self.lock();
            state.calls.push(Call::Start(id.to_string()));
            if !state.start_failures.is_empty() {
                return Err(state.start_failures.remove(0));
            }
            let Some(c) = state.containers.get_mut(id) else {
                return Err(RuntimeError::NotFound(id.to_string()));
            };
            if c.observed.running {
                return Ok(());
            }
            c.observed.running = true;
            c.observed.status = "running".into();
            c.observed.exit_code = None;
            c.observed.oom_killed = false;
            c.observed.started_at = Some(now_nanos() / 1_000_000_000);
            let department = c.observed.department.clone();
            let run = {
                let r = state.runs.entry(id.to_string()).or_default();
                *r += 1;
                *r
            };
            Self::emit(&mut state, id, &department, "start", None);
            state.exit_after_start.map(|script| (script, run))
        };
        if let Some(((code, after), run)) = exit {
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut state = me.lock();
                if state.runs.get(&id) == Some(&run) {
                    Self::exit_locked(&mut state, &id, code, false);
                }
            });
        }
        Ok(())
    }

    async fn stop(&self, id: &str, _timeout: Duration) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Stop(id.to_string()));
        let Some(c) = state.containers.get(id) else {
            return Err(RuntimeError::NotFound(id.to_string()));
        };
        if c.observed.running {
            // Docker's order for a requested stop: kill (SIGTERM), then die.
            let department = c.observed.department.clone();
            Self::emit(&mut state, id, &department, "kill", None);
        }
        Self::exit_locked(&mut state, id, 143, false);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Remove(id.to_string()));
        if let Some(c) = state.containers.remove(id) {
            let department = c.observed.department.clone();
            if c.observed.running {
                Self::emit(&mut state, id, &department, "kill", None);
                Self::emit(&mut state, id, &department, "die", Some(137));
            }
            Self::emit(&mut state, id, &department, "destroy", None);
        }
        Ok(())
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::ImagePresent(image.to_string()));
        Ok(state.images.contains(image))
    }

    async fn pull(
        &self,
        image: &str,
        progress: mpsc::UnboundedSender<crate::pull_progress::PullEvent>,
    ) -> Result<(), RuntimeError> {
        let script = {
            let mut state = self.lock();
            state.calls.push(Call::Pull(image.to_string()));
            state.pull.clone()
        };
        let _ = progress.send(crate::pull_progress::PullEvent {
            layer: Some("layer".into()),
            status: "Downloading".into(),
            current: Some(512),
            total: Some(1024),
        });
        match script {
            PullScript::Succeed => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.lock().images.insert(image.to_string());
                Ok(())
            }
            PullScript::Fail(message) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Err(RuntimeError::NotFound(message))
            }
            PullScript::Hang => {
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    }

    fn events(
        &self,
        _node: &str,
        _since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent, RuntimeError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().subscribers.push(tx);
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()
    }

    async fn past_events(
        &self,
        node: &str,
        since_nano: i64,
        until_nano: i64,
    ) -> Result<Vec<RuntimeEvent>, RuntimeError> {
        Ok(self
            .lock()
            .history
            .iter()
            .filter(|(n, role, RuntimeEvent::Container { time_nano, .. })| {
                n.as_deref() == Some(node)
                    && role == "primary"
                    && (since_nano..=until_nano).contains(time_nano)
            })
            .map(|(_, _, e)| e.clone())
            .collect())
    }

    fn logs(
        &self,
        _id: &str,
        _query: &LogQuery,
    ) -> BoxStream<'static, Result<bytes::Bytes, RuntimeError>> {
        futures_util::stream::empty().boxed()
    }

    async fn stats(&self, _id: &str) -> Result<ContainerStats, RuntimeError> {
        Ok(ContainerStats::default())
    }

    async fn data_root(&self) -> Result<Option<PathBuf>, RuntimeError> {
        Ok(None)
    }

    async fn container_config(&self, id: &str) -> Result<Option<ContainerConfig>, RuntimeError> {
        let state = self.lock();
        Ok(Self::find(&state, id).map(|c| ContainerConfig {
            labels: c.labels.clone(),
            env: c.env.clone(),
            // The fake writes no secret files: files-mode recovery is the
            // real runtime's (recovery.rs tests the decision).
            secret_files: Default::default(),
        }))
    }
    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        Ok(self
            .lock()
            .images
            .contains(reference)
            .then(|| fake_image_id(reference)))
    }

    async fn list_images(&self) -> Result<Vec<crate::imagegc::Image>, RuntimeError> {
        Ok(self
            .lock()
            .images
            .iter()
            .map(|r| crate::imagegc::Image {
                id: fake_image_id(r),
                tags: vec![crate::imagegc::normalize(r)],
                digests: vec![],
                size_bytes: 1,
            })
            .collect())
    }

    async fn container_images(&self) -> Result<BTreeSet<String>, RuntimeError> {
        Ok(self
            .lock()
            .containers
            .values()
            .filter_map(|c| c.observed.image.clone())
            .collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        let Some(reference) = state
            .images
            .iter()
            .find(|r| fake_image_id(r) == id)
            .cloned()
        else {
            return Err(RuntimeError::NotFound(id.to_string()));
        };
        if state
            .containers
            .values()
            .any(|c| c.observed.image.as_deref() == Some(reference.as_str()))
        {
            return Err(RuntimeError::Conflict(format!("image {id} is in use")));
        }
        state.images.remove(&reference);
        Ok(())
    }
}

/// A stable stand-in for an image id, derived from the reference.
fn fake_image_id(reference: &str) -> String {
    format!(
        "sha256:{}",
        crate::imagegc::normalize(reference).replace([':', '/'], "-")
    )
}
