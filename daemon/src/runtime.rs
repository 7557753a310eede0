//! The seam between the supervisor and the container engine. `ContainerRuntime`
//! says what the supervisor needs; `BollardRuntime` does it through the Docker
//! Engine API. Docker's 404/409 and connection failures become typed errors here,
//! once, so nothing above this module sees a bollard type.

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EventMessage, HostConfig, HostConfigLogConfig,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StatsOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use fleet_model::labels;
use futures_util::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("container or image not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("Docker is unreachable: {0}")]
    Unavailable(String),
    #[error("Docker refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl RuntimeError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuntimeError::NotFound(_))
    }
}

impl From<bollard::errors::Error> for RuntimeError {
    fn from(e: bollard::errors::Error) -> Self {
        use bollard::errors::Error as B;
        match e {
            B::DockerResponseServerError {
                status_code: 404,
                message,
            } => RuntimeError::NotFound(message),
            B::DockerResponseServerError {
                status_code: 409,
                message,
            } => RuntimeError::Conflict(message),
            B::DockerResponseServerError {
                status_code,
                message,
            } => RuntimeError::Refused {
                status: status_code,
                message,
            },
            B::RequestTimeoutError => RuntimeError::Timeout(Duration::ZERO),
            other => RuntimeError::Unavailable(other.to_string()),
        }
    }
}

/// What the engine says about one managed container.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedContainer {
    pub id: String,
    pub name: String,
    pub department: String,
    /// The `fleet-agent.node` label: whose container it is.
    pub node: Option<String>,
    pub role: String,
    pub spec_hash: Option<String>,
    pub running: bool,
    /// Docker's word: created, running, exited, ...
    pub status: String,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// Unix seconds.
    pub started_at: Option<i64>,
    /// Host port actually published for the container port, if any.
    pub published_port: Option<u16>,
    pub image: Option<String>,
}

/// Everything needed to create one department container.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    pub container_port: u16,
    pub bind: IpAddr,
    /// `None` lets Docker pick an ephemeral port (update candidates).
    pub host_port: Option<u16>,
    pub nano_cpus: Option<i64>,
    pub memory: Option<i64>,
    pub memory_reservation: Option<i64>,
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeEvent {
    /// A managed container changed; `action` is Docker's (die, oom, start, destroy, ...).
    Container {
        id: String,
        department: String,
        action: String,
        exit_code: Option<i64>,
        /// Unix nanoseconds, for resuming the stream.
        time_nano: i64,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerStats {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
}

#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// Every container (any state) labelled as managed by `node`.
    async fn list(&self, node: &str) -> Result<Vec<ObservedContainer>, RuntimeError>;
    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError>;
    async fn create(&self, request: &CreateRequest) -> Result<String, RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// SIGTERM, then SIGKILL after `timeout`.
    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError>;
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError>;
    /// Pulls `image`, sending human progress lines to `progress`.
    async fn pull(
        &self,
        image: &str,
        progress: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), RuntimeError>;
    /// Container events of `node`'s managed containers from `since_nano` on.
    fn events(
        &self,
        node: &str,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent, RuntimeError>>;
    fn logs(
        &self,
        id: &str,
        query: &LogQuery,
    ) -> BoxStream<'static, Result<bytes::Bytes, RuntimeError>>;
    async fn stats(&self, id: &str) -> Result<ContainerStats, RuntimeError>;
    /// Docker's data root (`DockerRootDir`), for the disk metric.
    async fn data_root(&self) -> Result<Option<PathBuf>, RuntimeError>;
    /// The id of the image `reference` names now (`None`: not present), so a
    /// pull can be recorded as the image it produced.
    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError>;
    /// Every image the engine has (not only this node's: images carry no node).
    async fn list_images(&self) -> Result<Vec<crate::imagegc::Image>, RuntimeError>;
    /// The image ids and references of every container on the engine, any
    /// node's, running or not.
    async fn container_images(&self) -> Result<std::collections::BTreeSet<String>, RuntimeError>;
    /// Removes one image by id, never forced: an image a container uses is
    /// refused by Docker (`Conflict`).
    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError>;
    /// Labels and environment of a container, read only to rebuild a lost
    /// store (the environment holds the department's secrets). A runtime
    /// that cannot tell answers `None`, and nothing is rebuilt from it.
    async fn container_config(&self, _id: &str) -> Result<Option<ContainerConfig>, RuntimeError> {
        Ok(None)
    }
}

/// What a container was created with, as far as rebuilding needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    pub labels: HashMap<String, String>,
    /// `KEY=value` lines.
    pub env: Vec<String>,
}

/// What part of a container's output to stream, as Docker's logs API takes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogQuery {
    /// Only the last N lines.
    pub tail: Option<usize>,
    pub follow: bool,
    /// Only lines written at or after this Unix time.
    pub since_secs: Option<i64>,
    /// Prefix each line with Docker's RFC 3339 timestamp.
    pub timestamps: bool,
}

/// Docker through bollard. The client is made on first use (and again after a
/// failure), so the daemon starts even while Docker is down.
pub struct BollardRuntime {
    socket: PathBuf,
    client: Mutex<Option<Docker>>,
    registry_auth: HashMap<String, bollard::auth::DockerCredentials>,
    pull_timeout: Duration,
    /// When set, `inspect` answers only for containers labelled with this
    /// node: a same-named container of another daemon (or of nobody) is
    /// never adopted, stopped or removed by a name-based operation.
    node: Option<String>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl BollardRuntime {
    pub fn new(
        socket: PathBuf,
        registry_auth: HashMap<String, bollard::auth::DockerCredentials>,
        pull_timeout: Duration,
    ) -> Self {
        Self {
            socket,
            client: Mutex::new(None),
            registry_auth,
            pull_timeout,
            node: None,
        }
    }

    /// Limits name-based operations to containers of `node` (see `node`).
    pub fn scoped_to_node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    async fn client(&self) -> Result<Docker, RuntimeError> {
        if let Some(client) = self.cached() {
            return Ok(client);
        }
        let path = self.socket.to_string_lossy().to_string();
        let docker = Docker::connect_with_unix(
            &path,
            REQUEST_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
        // Speak the engine's own version when it is older than ours (Debian's
        // engine is API 1.41).
        let docker = docker
            .negotiate_version()
            .await
            .map_err(RuntimeError::from)?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(docker.clone());
        Ok(docker)
    }

    fn cached(&self) -> Option<Docker> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn forget_client_on(&self, error: &RuntimeError) {
        if matches!(error, RuntimeError::Unavailable(_)) {
            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, RuntimeError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: std::future::Future<Output = Result<T, bollard::errors::Error>>,
    {
        let client = self.client().await?;
        let result = f(client).await.map_err(RuntimeError::from);
        if let Err(e) = &result {
            self.forget_client_on(e);
        }
        result
    }

    fn credentials_for(&self, image: &str) -> Option<bollard::auth::DockerCredentials> {
        let registry = image
            .split('/')
            .next()
            .filter(|first| first.contains('.') || first.contains(':') || *first == "localhost")?;
        self.registry_auth.get(registry).cloned()
    }
}

fn node_filters(node: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={node}", labels::NODE),
        ],
    )])
}

fn observed_from_inspect(c: ContainerInspectResponse) -> Option<ObservedContainer> {
    let labels = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.labels.clone())
        .unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let published_port = c.network_settings.and_then(|n| n.ports).and_then(|ports| {
        ports
            .values()
            .flatten()
            .flatten()
            .find_map(|b| b.host_port.as_deref().and_then(|p| p.parse().ok()))
    });
    Some(ObservedContainer {
        id: c.id?,
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        department: labels.get(labels::DEPARTMENT).cloned().unwrap_or_default(),
        node: labels.get(labels::NODE).cloned(),
        role: labels
            .get(labels::ROLE)
            .cloned()
            .unwrap_or_else(|| "primary".into()),
        spec_hash: labels.get(labels::SPEC_HASH).cloned(),
        running: state.running.unwrap_or(false),
        status: state
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into()),
        exit_code: state.exit_code,
        oom_killed: state.oom_killed.unwrap_or(false),
        started_at: state.started_at.as_deref().and_then(parse_docker_time),
        published_port,
        image: c.config.and_then(|cfg| cfg.image),
    })
}

fn parse_docker_time(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(text.get(..19)?).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    // Docker's zero time means "never started".
    (secs > 0).then_some(secs)
}

#[async_trait]
impl ContainerRuntime for BollardRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.call(|d| async move { d.ping().await.map(|_| ()) })
            .await
    }

    async fn list(&self, node: &str) -> Result<Vec<ObservedContainer>, RuntimeError> {
        let filters = node_filters(node);
        let summaries = self
            .call(|d| async move {
                d.list_containers(Some(
                    ListContainersOptionsBuilder::default()
                        .all(true)
                        .filters(&filters)
                        .build(),
                ))
                .await
            })
            .await?;
        let mut out = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            // The summary lacks exit details; inspect gives the whole truth.
            match self.inspect(&id).await {
                Ok(Some(c)) => out.push(c),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn inspect(&self, name_or_id: &str) -> Result<Option<ObservedContainer>, RuntimeError> {
        let target = name_or_id.to_string();
        match self
            .call(|d| async move { d.inspect_container(&target, None).await })
            .await
        {
            Ok(c) => {
                if let Some(node) = &self.node {
                    let labelled = c
                        .config
                        .as_ref()
                        .and_then(|cfg| cfg.labels.as_ref())
                        .and_then(|l| l.get(labels::NODE));
                    if labelled != Some(node) {
                        return Ok(None);
                    }
                }
                Ok(observed_from_inspect(c))
            }
            Err(RuntimeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn container_config(&self, id: &str) -> Result<Option<ContainerConfig>, RuntimeError> {
        let target = id.to_string();
        match self
            .call(|d| async move { d.inspect_container(&target, None).await })
            .await
        {
            Ok(c) => {
                let config = c.config.unwrap_or_default();
                Ok(Some(ContainerConfig {
                    labels: config.labels.unwrap_or_default(),
                    env: config.env.unwrap_or_default(),
                }))
            }
            Err(RuntimeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, r: &CreateRequest) -> Result<String, RuntimeError> {
        let port_key = format!("{}/tcp", r.container_port);
        let binding = PortBinding {
            host_ip: Some(r.bind.to_string()),
            host_port: Some(r.host_port.map(|p| p.to_string()).unwrap_or_default()),
        };
        let host_config = HostConfig {
            port_bindings: Some(HashMap::from([(port_key.clone(), Some(vec![binding]))])),
            memory: r.memory,
            // No swap beyond the memory limit, so the limit means what it says.
            memory_swap: r.memory,
            memory_reservation: r.memory_reservation,
            nano_cpus: r.nano_cpus,
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".into(), "10m".into()),
                    ("max-file".into(), "3".into()),
                ])),
            }),
            // The daemon owns every restart (backoff, crash loops, unhealthy);
            // Docker restarting too would double them.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(r.image.clone()),
            env: Some(r.env.clone()),
            labels: Some(r.labels.clone()),
            exposed_ports: Some(vec![port_key]),
            stop_timeout: Some(r.stop_timeout.as_secs() as i64),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = r.name.clone();
        let created = self
            .call(|d| async move {
                d.create_container(
                    Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                    body,
                )
                .await
            })
            .await?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let id = id.to_string();
        self.call(|d| async move { d.start_container(&id, None).await })
            .await
    }

    async fn stop(&self, id: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let id = id.to_string();
        let seconds = timeout.as_secs().min(i32::MAX as u64) as i32;
        let result = self
            .call(|d| async move {
                d.with_timeout(timeout + REQUEST_TIMEOUT)
                    .stop_container(
                        &id,
                        Some(StopContainerOptionsBuilder::default().t(seconds).build()),
                    )
                    .await
            })
            .await;
        match result {
            // 304: already stopped.
            Err(RuntimeError::Refused { status: 304, .. }) => Ok(()),
            other => other,
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let id = id.to_string();
        match self
            .call(|d| async move {
                d.remove_container(
                    &id,
                    Some(
                        RemoveContainerOptionsBuilder::default()
                            .force(true)
                            .v(true)
                            .build(),
                    ),
                )
                .await
            })
            .await
        {
            Err(RuntimeError::NotFound(_)) => Ok(()),
            // "removal already in progress"
            Err(RuntimeError::Conflict(m)) if m.contains("in progress") => Ok(()),
            other => other,
        }
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        let image = image.to_string();
        match self
            .call(|d| async move { d.inspect_image(&image).await })
            .await
        {
            Ok(_) => Ok(true),
            Err(RuntimeError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn pull(
        &self,
        image: &str,
        progress: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<(), RuntimeError> {
        let client = self.client().await?;
        let credentials = self.credentials_for(image);
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let mut stream = client.create_image(Some(options), None, credentials);
        let work = async {
            while let Some(item) = stream.next().await {
                let info = item.map_err(RuntimeError::from)?;
                let mut line = String::new();
                if let Some(id) = &info.id {
                    line.push_str(id);
                    line.push_str(": ");
                }
                if let Some(status) = &info.status {
                    line.push_str(status);
                }
                if let Some(p) = &info.progress_detail {
                    if let (Some(current), Some(total)) = (p.current, p.total) {
                        line.push_str(&format!(" {current}/{total}"));
                    }
                }
                let _ = progress.send(line);
            }
            Ok::<(), RuntimeError>(())
        };
        match tokio::time::timeout(self.pull_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Timeout(self.pull_timeout)),
        }
    }

    fn events(
        &self,
        node: &str,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent, RuntimeError>> {
        let node = node.to_string();
        let client = self.cached();
        let socket = self.socket.clone();
        let stream = async_stream_events(client, socket, node, since_nano);
        Box::pin(stream)
    }

    fn logs(
        &self,
        id: &str,
        query: &LogQuery,
    ) -> BoxStream<'static, Result<bytes::Bytes, RuntimeError>> {
        let LogQuery {
            tail,
            follow,
            since_secs,
            timestamps,
        } = *query;
        let Some(client) = self.cached() else {
            return Box::pin(futures_util::stream::once(async {
                Err(RuntimeError::Unavailable("not connected yet".into()))
            }));
        };
        let tail = tail.map(|n| n.to_string()).unwrap_or_else(|| "all".into());
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .tail(&tail)
            // Docker's `since` is Unix seconds in an i32 (until 2038); 0 is "all".
            .since(since_secs.map_or(0, |s| i32::try_from(s.max(0)).unwrap_or(i32::MAX)))
            .timestamps(timestamps)
            .build();
        let client = if follow {
            client.with_timeout(Duration::from_secs(u32::MAX as u64))
        } else {
            client
        };
        Box::pin(
            client
                .logs(id, Some(options))
                .map(|item| item.map(|o| o.into_bytes()).map_err(RuntimeError::from)),
        )
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats, RuntimeError> {
        let client = self.client().await?;
        let mut stream = client.stats(
            id,
            Some(
                StatsOptionsBuilder::default()
                    .stream(false)
                    .one_shot(true)
                    .build(),
            ),
        );
        let Some(item) = stream.next().await else {
            return Err(RuntimeError::NotFound(id.to_string()));
        };
        Ok(stats_from(item.map_err(RuntimeError::from)?))
    }

    async fn data_root(&self) -> Result<Option<PathBuf>, RuntimeError> {
        let info = self.call(|d| async move { d.info().await }).await?;
        Ok(info.docker_root_dir.map(PathBuf::from))
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        let reference = reference.to_string();
        match self
            .call(|d| async move { d.inspect_image(&reference).await })
            .await
        {
            Ok(i) => Ok(i.id),
            Err(RuntimeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_images(&self) -> Result<Vec<crate::imagegc::Image>, RuntimeError> {
        let images = self
            .call(|d| async move {
                d.list_images(Some(ListImagesOptionsBuilder::default().all(false).build()))
                    .await
            })
            .await?;
        Ok(images
            .into_iter()
            .map(|i| crate::imagegc::Image {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                digests: i
                    .repo_digests
                    .into_iter()
                    .filter(|t| t != "<none>@<none>")
                    .collect(),
                size_bytes: u64::try_from(i.size).unwrap_or(0),
            })
            .collect())
    }

    async fn container_images(&self) -> Result<std::collections::BTreeSet<String>, RuntimeError> {
        let summaries = self
            .call(|d| async move {
                d.list_containers(Some(
                    ListContainersOptionsBuilder::default().all(true).build(),
                ))
                .await
            })
            .await?;
        Ok(summaries
            .into_iter()
            .flat_map(|c| [c.image_id, c.image].into_iter().flatten())
            .collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        let id = id.to_string();
        self.call(|d| async move {
            d.remove_image(
                &id,
                Some(RemoveImageOptionsBuilder::default().force(false).build()),
                None,
            )
            .await
        })
        .await
        .map(|_| ())
    }
}

/// Docker's stats body as the daemon's figures, the same on cgroup v1 and v2:
/// the engine already folds both into one shape (moby `daemon/stats_unix.go`:
/// v2's `cpu.stat` `usage_usec` becomes `total_usage` in nanoseconds, v2's
/// `memory.current`/`memory.max` become `usage`/`limit`); only the page-cache
/// key differs, v1 `total_inactive_file` (hierarchical), v2 `inactive_file`.
pub(crate) fn stats_from(s: bollard::models::ContainerStatsResponse) -> ContainerStats {
    let cpu_ns = s
        .cpu_stats
        .and_then(|c| c.cpu_usage)
        .and_then(|u| u.total_usage)
        .unwrap_or(0);
    let memory = s.memory_stats.unwrap_or_default();
    // What `docker stats` shows: usage less the page cache the kernel can
    // drop at once. v1 has `inactive_file` too, but only for the cgroup
    // itself; `total_inactive_file` covers its children, so it comes first
    // (as in the docker CLI).
    let cache = memory
        .stats
        .as_ref()
        .and_then(|m| {
            m.get("total_inactive_file")
                .or_else(|| m.get("inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    ContainerStats {
        cpu_seconds: cpu_ns as f64 / 1e9,
        memory_bytes: memory.usage.unwrap_or(0).saturating_sub(cache),
        memory_limit_bytes: memory.limit.unwrap_or(0),
    }
}

fn async_stream_events(
    client: Option<Docker>,
    socket: PathBuf,
    node: String,
    since_nano: Option<i64>,
) -> impl futures_util::Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static {
    let setup = async move {
        let client = match client {
            Some(c) => c,
            None => Docker::connect_with_unix(
                &socket.to_string_lossy(),
                REQUEST_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            )
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
            .negotiate_version()
            .await
            .map_err(RuntimeError::from)?,
        };
        // The stream is open for as long as the engine lives; no request timeout.
        let client = client.with_timeout(Duration::from_secs(u32::MAX as u64));
        let mut filters = node_filters(&node);
        filters.insert("type".into(), vec!["container".into()]);
        let since = since_nano.map(|n| format!("{}.{:09}", n / 1_000_000_000, n % 1_000_000_000));
        let mut builder = EventsOptionsBuilder::default().filters(&filters);
        if let Some(since) = &since {
            builder = builder.since(since);
        }
        Ok::<_, RuntimeError>(client.events(Some(builder.build())))
    };
    futures_util::stream::once(setup)
        .map(|result| match result {
            Ok(stream) => stream
                .map(|item| item.map_err(RuntimeError::from).map(event_from_message))
                .boxed(),
            Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
        })
        .flatten()
        .filter_map(|item| async move {
            match item {
                Ok(Some(event)) => Some(Ok(event)),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            }
        })
}

fn event_from_message(m: EventMessage) -> Option<RuntimeEvent> {
    let actor = m.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let department = attributes.get(labels::DEPARTMENT)?.clone();
    let action = m.action?;
    // "exec_start: sh -c ..." and "health_status: healthy" carry detail after a colon.
    let action = action
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    Some(RuntimeEvent::Container {
        id: actor.id?,
        department,
        exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
        action,
        time_nano: m
            .time_nano
            .unwrap_or_else(|| m.time.unwrap_or(0) * 1_000_000_000),
    })
}

/// Reads Docker's `config.json` shape (`{"auths": {"host": {"auth": base64}}}`).
pub fn load_registry_auth(
    path: &std::path::Path,
) -> Result<HashMap<String, bollard::auth::DockerCredentials>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        username: Option<String>,
        password: Option<String>,
        auth: Option<String>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: File = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(file
        .auths
        .into_iter()
        .map(|(host, entry)| {
            let creds = bollard::auth::DockerCredentials {
                username: entry.username,
                password: entry.password,
                auth: entry.auth,
                serveraddress: Some(host.clone()),
                ..Default::default()
            };
            (host, creds)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    //! Docker's stats and event bodies on cgroup v1 and v2. Recorded on this
    //! host (Debian docker.io 20.10.24, API 1.41, cgroup v1, cgroupfs driver):
    //! `*-this-host.json`. The cgroup v1 payload with figures is in the shape
    //! of the Engine API 1.41 reference (this host's engine answers stats
    //! with empty `memory_stats`, see docs/architecture.md); the v2 payloads
    //! are written from moby's source (`daemon/stats_unix.go` statsV2 keys,
    //! `daemon/monitor.go` oom/die events), not recorded on a v2 host.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn stats(json: &str) -> ContainerStats {
        stats_from(serde_json::from_str(json).expect("a Docker stats body"))
    }

    fn event(json: &str) -> RuntimeEvent {
        event_from_message(serde_json::from_str(json).expect("a Docker event")).expect("an event")
    }

    #[test]
    fn cgroup_v1_and_v2_stats_give_the_same_figures() {
        let v1 = stats(include_str!("testdata/stats-v1-documented.json"));
        let v2 = stats(include_str!("testdata/stats-v2-from-moby.json"));
        // 50 MiB used less 8 MiB of inactive page cache: v1's hierarchical
        // total_inactive_file (not the cgroup's own inactive_file), v2's
        // inactive_file.
        for s in [&v1, &v2] {
            assert_eq!(s.memory_bytes, 52_428_800 - 8_388_608);
            assert_eq!(s.memory_limit_bytes, 67_108_864);
            assert!((s.cpu_seconds - 2.5).abs() < 1e-9);
        }
    }

    #[test]
    fn an_engine_without_cgroup_figures_gives_zeros_not_garbage() {
        // What this host's engine answers for a running container.
        let s = stats(include_str!("testdata/stats-v1-this-host.json"));
        assert_eq!(s, ContainerStats::default());
    }

    #[test]
    fn die_and_oom_events_read_the_same_on_v1_and_v2() {
        let RuntimeEvent::Container {
            department,
            action,
            exit_code,
            ..
        } = event(include_str!("testdata/event-die-v1-this-host.json"));
        assert_eq!((department.as_str(), action.as_str()), ("rec", "die"));
        assert_eq!(exit_code, Some(0));
        let RuntimeEvent::Container {
            department,
            action,
            exit_code,
            time_nano,
            ..
        } = event(include_str!("testdata/event-die-v2-from-moby.json"));
        assert_eq!((department.as_str(), action.as_str()), ("hr", "die"));
        assert_eq!(exit_code, Some(137));
        assert_eq!(time_nano, 1_796_419_466_000_000_001);
        let RuntimeEvent::Container {
            action, exit_code, ..
        } = event(include_str!("testdata/event-oom-v2-from-moby.json"));
        assert_eq!((action.as_str(), exit_code), ("oom", None));
    }
}
