//! The seam between the supervisor and the container engine. `ContainerRuntime`
//! says what the supervisor needs; `BollardRuntime` does it through the Docker
//! Engine API. Docker's 404/409 and connection failures become typed errors here,
//! once, so nothing above this module sees a bollard type.

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EventMessage, HostConfig, HostConfigLogConfig,
    Mount, MountType, NetworkCreateRequest, PortBinding, RestartPolicy, RestartPolicyNameEnum,
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
use std::collections::{BTreeMap, HashMap};
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
    /// The network joined; created (inter-container communication off) when missing.
    pub network: String,
    pub pids_limit: i64,
    /// Added back after dropping every capability.
    pub cap_add: Vec<String>,
    pub init: bool,
    pub read_only_root: bool,
    /// Size of the /tmp tmpfs (read-only roots only).
    pub tmpfs_bytes: Option<u64>,
    pub no_new_privileges: bool,
    /// Files mode: written under the secrets directory and bind-mounted
    /// read-only on `/run/secrets`; `None` in env mode.
    pub secret_files: Option<SecretFiles>,
}

/// The secret files of one container, in files mode. `key` names its
/// directory under the node's secrets directory (container name and spec
/// hash, so an update's new container never rewrites the files of the one
/// still serving).
#[derive(Clone, PartialEq)]
pub struct SecretFiles {
    pub key: String,
    pub files: Vec<(String, fleet_model::spec::Secret)>,
}

impl std::fmt::Debug for SecretFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The values are Secret (masked); say which files, not what is in them.
        f.debug_struct("SecretFiles")
            .field("key", &self.key)
            .field(
                "files",
                &self.files.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
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
    /// Pulls `image`, sending each message of the engine's stream to `progress`.
    async fn pull(
        &self,
        image: &str,
        progress: tokio::sync::mpsc::UnboundedSender<crate::pull_progress::PullEvent>,
    ) -> Result<(), RuntimeError>;
    /// Container events of `node`'s managed containers from `since_nano` on.
    fn events(
        &self,
        node: &str,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent, RuntimeError>>;
    /// What the engine still remembers of `node`'s primary containers between
    /// two instants (Unix nanoseconds): a finite replay of its event buffer,
    /// read once at start to rebuild restart history (`recovery`).
    async fn past_events(
        &self,
        node: &str,
        since_nano: i64,
        until_nano: i64,
    ) -> Result<Vec<RuntimeEvent>, RuntimeError>;
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
    /// (Re)writes a container's secret files before it starts: the
    /// directory is on a tmpfs, gone after a reboot while the container
    /// stays. A runtime without a file system of its own does nothing.
    async fn put_secrets(&self, _files: &SecretFiles) -> Result<(), RuntimeError> {
        Ok(())
    }
}

/// What a container was created with, as far as rebuilding needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerConfig {
    pub labels: HashMap<String, String>,
    /// `KEY=value` lines.
    pub env: Vec<String>,
    /// Files mode: the secret files' contents by name, read back from the
    /// secrets directory the `fleet-agent.secrets` label names.
    pub secret_files: HashMap<String, String>,
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
    /// Files-mode secrets are written under here.
    secrets_dir: PathBuf,
    /// The node's own network: the one a created network gets the bridge
    /// name for.
    node_network: String,
    bridge_name: String,
    /// Networks known to exist, so a create costs no extra call.
    networks: Mutex<std::collections::HashSet<String>>,
    /// One inspect-then-create at a time: an engine on API 1.41 (Debian's
    /// docker.io 20.10) does not refuse a second network of the same name
    /// unless asked (`CheckDuplicate`, which bollard's request type lacks), so
    /// two departments starting at once would each make one.
    network_gate: tokio::sync::Mutex<()>,
    /// `[docker] log_driver` (None: the engine's default) and `log_options`.
    log_driver: Option<String>,
    log_options: BTreeMap<String, String>,
}

/// Drivers whose files grow on the host's disk until a `max-size` stops them.
const FILE_LOG_DRIVERS: &[&str] = &["json-file", "local"];

/// The `LogConfig` of a department container: the configured driver (or, as
/// `None`, the engine's default `engine_driver`) with the configured options,
/// plus a size cap where the driver writes files and no cap is configured.
pub fn container_log_config(
    driver: Option<&str>,
    options: &BTreeMap<String, String>,
    engine_driver: &str,
) -> HostConfigLogConfig {
    let mut config: HashMap<String, String> = options
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if FILE_LOG_DRIVERS.contains(&driver.unwrap_or(engine_driver)) {
        config
            .entry("max-size".into())
            .or_insert_with(|| "10m".into());
        config
            .entry("max-file".into())
            .or_insert_with(|| "3".into());
    }
    HostConfigLogConfig {
        typ: driver.map(str::to_string),
        config: (!config.is_empty()).then_some(config),
    }
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
            secrets_dir: fleet_model::config::ContainersConfig::default().secrets_dir,
            node_network: String::new(),
            bridge_name: String::new(),
            networks: Mutex::new(Default::default()),
            network_gate: tokio::sync::Mutex::new(()),
            log_driver: None,
            log_options: BTreeMap::new(),
        }
    }

    /// Where secret files go, and which network gets the bridge name.
    pub fn with_containers(mut self, c: &fleet_model::config::ContainersConfig) -> Self {
        self.secrets_dir = c.secrets_dir.clone();
        self.node_network = c.network.clone();
        self.bridge_name = c.bridge_name.clone();
        self
    }

    /// Makes sure `name` exists: adopted as it is when present (an
    /// operator's own network keeps its settings), else created as a bridge
    /// with inter-container communication off, so departments on it reach
    /// the host and the outside but not each other.
    async fn ensure_network(&self, name: &str) -> Result<(), RuntimeError> {
        if self
            .networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return Ok(());
        }
        let _gate = self.network_gate.lock().await;
        if self
            .networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return Ok(());
        }
        let target = name.to_string();
        match self
            .call(|d| async move { d.inspect_network(&target, None).await })
            .await
        {
            Ok(n) => {
                let icc = n
                    .options
                    .as_ref()
                    .and_then(|o| o.get("com.docker.network.bridge.enable_icc"))
                    .map(String::as_str);
                if icc != Some("false") {
                    tracing::warn!(
                        network = name,
                        "Departments join network {name}, which allows inter-container communication: they can reach each other's containers (recreate it, or let the agent create it)."
                    );
                }
            }
            Err(RuntimeError::NotFound(_)) => {
                let mut options = HashMap::from([(
                    "com.docker.network.bridge.enable_icc".to_string(),
                    "false".to_string(),
                )]);
                if name == self.node_network && !self.bridge_name.is_empty() {
                    options.insert(
                        "com.docker.network.bridge.name".into(),
                        self.bridge_name.clone(),
                    );
                }
                let request = NetworkCreateRequest {
                    name: name.to_string(),
                    driver: Some("bridge".into()),
                    options: Some(options),
                    labels: Some(HashMap::from([(
                        labels::MANAGED.to_string(),
                        "true".to_string(),
                    )])),
                    ..Default::default()
                };
                match self
                    .call(|d| async move { d.create_network(request).await })
                    .await
                {
                    Ok(_) => tracing::info!(
                        network = name,
                        "Created network {name} (inter-container communication off)."
                    ),
                    // Another daemon on this engine made it meanwhile.
                    Err(RuntimeError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        self.networks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
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

    /// The `fleet-agent.secrets` label of a container about to be removed
    /// (`None` in env mode, or when it is already gone).
    async fn secrets_key_of(&self, id: &str) -> Option<String> {
        let target = id.to_string();
        let c = self
            .call(|d| async move { d.inspect_container(&target, None).await })
            .await
            .ok()?;
        c.config?.labels?.get(labels::SECRETS).cloned()
    }

    fn secrets_path(&self, key: &str) -> Option<PathBuf> {
        // The key is built by the core from a container name and a hex
        // hash; anything else (a hand-made label) is never a path here.
        let ok = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
            && !key.starts_with('.');
        ok.then(|| self.secrets_dir.join(key))
    }

    /// How department containers log (`[docker] log_driver`, `log_options`).
    pub fn with_logging(
        mut self,
        driver: Option<String>,
        options: BTreeMap<String, String>,
    ) -> Self {
        self.log_driver = driver;
        self.log_options = options;
        self
    }

    /// The engine's default logging driver, asked only when none is configured.
    async fn log_config(&self) -> Result<HostConfigLogConfig, RuntimeError> {
        let engine_driver = match &self.log_driver {
            Some(_) => String::new(),
            None => self
                .call(|d| async move { d.info().await })
                .await?
                .logging_driver
                .unwrap_or_default(),
        };
        Ok(container_log_config(
            self.log_driver.as_deref(),
            &self.log_options,
            &engine_driver,
        ))
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
                let labels = config.labels.unwrap_or_default();
                let secret_files = match labels
                    .get(labels::SECRETS)
                    .and_then(|k| self.secrets_path(k))
                {
                    Some(dir) => tokio::task::spawn_blocking(move || read_secret_files(&dir))
                        .await
                        .unwrap_or_default(),
                    None => HashMap::new(),
                };
                Ok(Some(ContainerConfig {
                    labels,
                    env: config.env.unwrap_or_default(),
                    secret_files,
                }))
            }
            Err(RuntimeError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_secrets(&self, files: &SecretFiles) -> Result<(), RuntimeError> {
        let dir = self
            .secrets_path(&files.key)
            .ok_or_else(|| RuntimeError::Refused {
                status: 400,
                message: format!("`{}` is not a secrets directory name", files.key),
            })?;
        let root = self.secrets_dir.clone();
        let files = files.files.clone();
        tokio::task::spawn_blocking(move || write_secret_files(&root, &dir, &files))
            .await
            .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
            .map_err(|e| RuntimeError::Refused {
                status: 500,
                message: format!("cannot write the secret files: {e}"),
            })
    }

    async fn create(&self, r: &CreateRequest) -> Result<String, RuntimeError> {
        self.ensure_network(&r.network).await?;
        let mut mounts = Vec::new();
        if let Some(files) = &r.secret_files {
            self.put_secrets(files).await?;
            let source = self.secrets_path(&files.key).unwrap_or_default();
            mounts.push(Mount {
                target: Some(fleet_model::spec::SECRETS_MOUNT.into()),
                source: Some(source.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let mut security_opt = Vec::new();
        if r.no_new_privileges {
            security_opt.push("no-new-privileges:true".to_string());
        }
        let tmpfs = r.tmpfs_bytes.filter(|_| r.read_only_root).map(|bytes| {
            HashMap::from([("/tmp".to_string(), format!("rw,nosuid,nodev,size={bytes}"))])
        });
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
            security_opt: Some(security_opt),
            network_mode: Some(r.network.clone()),
            pids_limit: Some(r.pids_limit),
            // Nothing by default; a spec adds back what its image needs,
            // within the node's allowlist (hardening.rs).
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: (!r.cap_add.is_empty()).then(|| r.cap_add.clone()),
            init: Some(r.init),
            readonly_rootfs: Some(r.read_only_root),
            tmpfs,
            mounts: (!mounts.is_empty()).then_some(mounts),
            log_config: Some(self.log_config().await?),
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
        let attempt = |body: ContainerCreateBody| {
            let name = name.clone();
            self.call(|d| async move {
                d.create_container(
                    Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                    body,
                )
                .await
            })
        };
        let created = match attempt(body.clone()).await {
            // Removed behind our back since we last saw it: make it again.
            Err(RuntimeError::NotFound(m)) if m.contains("network") => {
                self.networks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&r.network);
                self.ensure_network(&r.network).await?;
                attempt(body).await?
            }
            other => other?,
        };
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
        let secrets = self.secrets_key_of(id).await;
        self.remove_container(id).await?;
        if let Some(dir) = secrets.as_deref().and_then(|k| self.secrets_path(k)) {
            let _ = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), error = %e, "Could not remove a removed container's secret files.");
                }
                _ => {}
            })
            .await;
        }
        Ok(())
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
        progress: tokio::sync::mpsc::UnboundedSender<crate::pull_progress::PullEvent>,
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
                let detail = info.progress_detail.as_ref();
                let _ = progress.send(crate::pull_progress::PullEvent {
                    layer: info.id.clone(),
                    status: info.status.clone().unwrap_or_default(),
                    current: detail
                        .and_then(|p| p.current)
                        .and_then(|v| u64::try_from(v).ok()),
                    total: detail
                        .and_then(|p| p.total)
                        .and_then(|v| u64::try_from(v).ok()),
                });
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

    async fn past_events(
        &self,
        node: &str,
        since_nano: i64,
        until_nano: i64,
    ) -> Result<Vec<RuntimeEvent>, RuntimeError> {
        let client = self.client().await?;
        let mut filters = node_filters(node);
        filters.insert("type".into(), vec!["container".into()]);
        if let Some(label) = filters.get_mut("label") {
            label.push(format!("{}=primary", labels::ROLE));
        }
        let at = |n: i64| format!("{}.{:09}", n / 1_000_000_000, n % 1_000_000_000);
        let options = EventsOptionsBuilder::default()
            .filters(&filters)
            .since(&at(since_nano))
            .until(&at(until_nano))
            .build();
        // With `until` in the past the engine sends its buffered events and
        // closes the stream; the bound is for an engine that does not.
        let collect = client
            .events(Some(options))
            .map(|item| item.map_err(RuntimeError::from))
            .collect::<Vec<_>>();
        let items = tokio::time::timeout(Duration::from_secs(10), collect)
            .await
            .map_err(|_| RuntimeError::Timeout(Duration::from_secs(10)))?;
        let mut out = Vec::new();
        for item in items {
            if let Some(event) = event_from_message(item?) {
                out.push(event);
            }
        }
        Ok(out)
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

/// Writes one container's secret files: `root` 0700 (only the daemon's user
/// and root get past it on the host), the container's directory 0755 and
/// each file 0444, so whatever user the image runs as reads them inside the
/// container, where the directory is the only way to them. Modes are set
/// explicitly: the unit's UMask would take the bits the container needs.
/// Each file is replaced by a rename, never seen half-written.
fn write_secret_files(
    root: &std::path::Path,
    dir: &std::path::Path,
    files: &[(String, fleet_model::spec::Secret)],
) -> std::io::Result<()> {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    match fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for (name, value) in files {
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(value.expose().as_bytes())?;
        drop(f);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
        fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

/// The files of a secrets directory by name; unreadable ones are left out
/// (the rebuild then says which secret it lacks).
fn read_secret_files(dir: &std::path::Path) -> HashMap<String, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') {
                return None;
            }
            Some((name, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect()
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
mod log_config_tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config_of(c: &HostConfigLogConfig) -> BTreeMap<String, String> {
        c.config.clone().unwrap_or_default().into_iter().collect()
    }

    #[test]
    fn the_engines_file_driver_gets_a_cap_and_keeps_its_type() {
        let c = container_log_config(None, &BTreeMap::new(), "json-file");
        assert_eq!(
            c.typ, None,
            "the engine's own driver, not a copy of its name"
        );
        assert_eq!(
            config_of(&c),
            opts(&[("max-file", "3"), ("max-size", "10m")])
        );
        let c = container_log_config(None, &BTreeMap::new(), "local");
        assert_eq!(config_of(&c).len(), 2);
    }

    #[test]
    fn a_driver_without_files_gets_only_what_is_configured() {
        let c = container_log_config(None, &BTreeMap::new(), "journald");
        assert_eq!((c.typ, c.config), (None, None));
        let c = container_log_config(
            Some("journald"),
            &opts(&[("tag", "{{.Name}}")]),
            "json-file",
        );
        assert_eq!(c.typ.as_deref(), Some("journald"));
        assert_eq!(config_of(&c), opts(&[("tag", "{{.Name}}")]));
    }

    #[test]
    fn configured_caps_win_and_a_missing_one_is_filled() {
        let c = container_log_config(Some("local"), &opts(&[("max-size", "50m")]), "journald");
        assert_eq!(c.typ.as_deref(), Some("local"));
        assert_eq!(
            config_of(&c),
            opts(&[("max-file", "3"), ("max-size", "50m")])
        );
    }
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
