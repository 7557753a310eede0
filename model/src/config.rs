//! `agent.toml`: parsed strictly (unknown keys are errors), then validated into a
//! `Config` with every problem reported at once. With no file at all the daemon
//! runs on `Config::embedded_default()`.

use crate::located::{self, at_prefix, ParseProblem, Position};
use crate::size::ByteSize;
use crate::spec::FieldError;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SYSTEM_CONFIG_PATH: &str = "/etc/fleet-agent/agent.toml";
pub const SYSTEM_SOCKET_PATH: &str = "/run/fleet-agent/agentctl.sock";
pub const CONFIG_ENV: &str = "FLEET_AGENT_CONFIG";
pub const SOCKET_ENV: &str = "FLEET_AGENT_SOCKET";
/// Where `fleet-agentd wal-serve` listens in the packaged unit, and where
/// agentctl's WAL commands look first.
pub const SYSTEM_WAL_SOCKET_PATH: &str = "/run/fleet-agent-wal/wal.sock";
/// Overrides the WAL socket agentctl's wal/backup/restore commands use.
pub const WAL_SOCKET_ENV: &str = "FLEET_AGENT_WAL_SOCKET";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Defaults to the hostname.
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_departments_dir")]
    pub departments_dir: PathBuf,
    #[serde(default = "default_max_departments")]
    pub max_departments: usize,
    #[serde(default = "default_reserved_memory")]
    pub reserved_memory: ByteSize,
    /// How far the departments' hard memory limits (`resources.memory`) may
    /// add up beyond the budget (host memory minus `reserved_memory`), which
    /// their reservations must fit: 1.25 lets limits reach 125% of it.
    #[serde(default = "default_memory_oversubscription")]
    pub memory_oversubscription: f64,
    /// What a department without `resources.memory` counts as in memory
    /// admission (Docker gives its container no limit).
    #[serde(default = "default_department_memory")]
    pub department_memory_default: ByteSize,
    /// Full list-and-compare against Docker, beside the event stream.
    #[serde(default = "default_resync_interval", with = "humantime_serde")]
    pub resync_interval: Duration,
    /// How often the daemon reads each department container's CPU and memory
    /// from Docker into the cache `/metrics`, `/v1/usage` and `agentctl top` read.
    #[serde(default = "default_stats_interval", with = "humantime_serde")]
    pub stats_interval: Duration,
    /// How many departments start at once after a boot.
    #[serde(default = "default_start_concurrency")]
    pub start_concurrency: usize,
    /// Unix group (besides root) allowed full use of the local socket.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub ports: PortsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    /// What every department container is created with, and the bounds a
    /// spec's `network`, `secrets_mode` and `[security]` must stay in.
    #[serde(default)]
    pub containers: ContainersConfig,
    #[serde(default)]
    pub images: ImagesConfig,
    #[serde(default)]
    pub coordinator: Option<CoordinatorConfig>,
    #[serde(default)]
    pub wal: Option<WalConfig>,
    #[serde(default)]
    pub haproxy: Option<HaproxyConfig>,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/fleet-agent".into()
}
fn default_socket() -> PathBuf {
    SYSTEM_SOCKET_PATH.into()
}
fn default_departments_dir() -> PathBuf {
    "/etc/fleet-agent/departments.d".into()
}
fn default_max_departments() -> usize {
    10
}
fn default_reserved_memory() -> ByteSize {
    ByteSize::gib(2)
}
fn default_memory_oversubscription() -> f64 {
    1.0
}
fn default_department_memory() -> ByteSize {
    ByteSize::mib(512)
}
fn default_resync_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_start_concurrency() -> usize {
    2
}
fn default_admin_group() -> String {
    "fleet-agent".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `auto` (journald when present, else text on stderr), `text`, `json`, `journald`.
    #[serde(default = "default_log_format")]
    pub format: String,
}

fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "auto".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_log_level(),
            format: default_log_format(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsConfig {
    #[serde(default = "default_port_range")]
    pub range: String,
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// The standby (hand-over) ports, one per port of `range`, same length.
    #[serde(default)]
    pub standby_range: Option<String>,
}

fn default_port_range() -> String {
    "8001-8010".into()
}
fn default_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

impl Default for PortsConfig {
    fn default() -> Self {
        Self {
            range: default_port_range(),
            bind: default_bind(),
            standby_range: None,
        }
    }
}

impl PortsConfig {
    /// The pool as an inclusive range; `validate` has already checked it parses.
    pub fn parsed_range(&self) -> Result<(u16, u16), String> {
        parse_port_range(&self.range)
    }

    /// The standby pool, if configured: `Ok(None)` when absent.
    pub fn parsed_standby_range(&self) -> Result<Option<(u16, u16)>, String> {
        self.standby_range
            .as_deref()
            .map(parse_port_range)
            .transpose()
    }
}

/// `low-high`, inclusive.
fn parse_port_range(range: &str) -> Result<(u16, u16), String> {
    {
        let (low, high) = range
            .split_once('-')
            .ok_or_else(|| format!("`{range}` is not a range; write it like \"8001-8010\""))?;
        let low: u16 = low
            .trim()
            .parse()
            .map_err(|_| format!("`{low}` is not a port number"))?;
        let high: u16 = high
            .trim()
            .parse()
            .map_err(|_| format!("`{high}` is not a port number"))?;
        if low == 0 || high < low {
            return Err(format!(
                "`{}` must go from a low port to a higher one, such as \"8001-8010\"",
                range
            ));
        }
        Ok((low, high))
    }
}

/// `[haproxy]`: the node tells the HAProxy tier which of a department's two
/// ports takes new connections (HAProxy's agent-check), so restarts and
/// updates hand over without refusing a connection (docs/architecture.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyConfig {
    /// host:port of the agent-check listener.
    pub agent_listen: String,
    #[serde(default = "default_check_inter", with = "humantime_serde")]
    pub check_inter: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_rise")]
    pub fall: u32,
    #[serde(default = "default_check_inter", with = "humantime_serde")]
    pub agent_inter: Duration,
}

fn default_check_inter() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}

impl HaproxyConfig {
    pub fn agent_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.agent_listen.parse().map_err(|_| {
            format!(
                "`{}` is not host:port, such as \"127.0.0.1:8099\"",
                self.agent_listen
            )
        })
    }

    /// How long after a replacement answers its health probe HAProxy has
    /// surely seen it up (rise checks), and a new agent answer besides.
    pub fn settle(&self) -> Duration {
        self.check_inter * (self.rise + 1) + self.agent_inter
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Read-only API and `/metrics`; empty string turns the TCP listener off.
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of CAs whose client certificates are required.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Per client address; `0` turns the limit off (benchmarks only).
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// A client must send a whole request head within this; it is also how long
    /// an idle keep-alive connection may stay open.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A handler must answer within this (long-polls get their `wait` on top).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest `/v1/events` long-poll; a longer `wait` is shortened to it.
    #[serde(default = "default_max_event_wait", with = "humantime_serde")]
    pub max_event_wait: Duration,
}

fn default_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_max_connections() -> usize {
    1024
}
fn default_requests_per_second() -> u32 {
    200
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_event_wait() -> Duration {
    Duration::from_secs(120)
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_connections: default_max_connections(),
            requests_per_second: default_requests_per_second(),
            header_timeout: default_header_timeout(),
            request_timeout: default_request_timeout(),
            max_event_wait: default_max_event_wait(),
        }
    }
}

impl ApiConfig {
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.listen.trim().is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            format!(
                "`{}` is not an address; write it like \"127.0.0.1:7070\"",
                self.listen
            )
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersConfig {
    /// The Docker network department containers join (the seed's playbook
    /// used `aio_network`). Created when missing, with inter-container
    /// communication off; adopted as it is when present.
    #[serde(default = "default_network")]
    pub network: String,
    /// Other networks a spec's `network` may name.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// Linux name of the bridge of a network the agent creates (at most 15
    /// characters), so a host firewall rule can name it; empty lets Docker
    /// pick `br-<id>`.
    #[serde(default = "default_bridge_name")]
    pub bridge_name: String,
    /// PID limit of a department that does not set `security.pids_limit`.
    #[serde(default = "default_pids_limit")]
    pub pids_limit: i64,
    /// The largest `security.pids_limit` a spec may ask for.
    #[serde(default = "default_max_pids_limit")]
    pub max_pids_limit: i64,
    /// Capabilities a spec may add back with `security.cap_add`; every other
    /// capability is dropped.
    #[serde(default = "default_allowed_capabilities")]
    pub allowed_capabilities: Vec<String>,
    /// Whether a department without `security.read_only_root` gets a
    /// read-only root file system.
    #[serde(default)]
    pub read_only_root: bool,
    /// Whether a spec may set `security.read_only_root = false`.
    #[serde(default = "default_true")]
    pub allow_writable_root: bool,
    /// Size of the /tmp tmpfs of a read-only root, unless the spec says.
    #[serde(default = "default_tmpfs_size")]
    pub tmpfs_size: ByteSize,
    /// Whether a spec may set `security.no_new_privileges = false`.
    #[serde(default)]
    pub allow_new_privileges: bool,
    /// `secrets_mode` of a spec that does not set it: "env" or "files"
    /// ("files" is recommended; "env" stays for images that cannot read one).
    #[serde(default = "default_secrets_mode")]
    pub secrets_mode: crate::spec::SecretsMode,
    /// Where the daemon writes secret files for `files` mode: a tmpfs the
    /// engine can read (bind-mounted read-only into the container). Under
    /// the shipped unit only /run/fleet-agent is writable to the daemon.
    #[serde(default = "default_secrets_dir")]
    pub secrets_dir: PathBuf,
}

fn default_network() -> String {
    "aio_network".into()
}
fn default_bridge_name() -> String {
    "aio0".into()
}
fn default_pids_limit() -> i64 {
    512
}
fn default_max_pids_limit() -> i64 {
    4096
}
fn default_allowed_capabilities() -> Vec<String> {
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "SETGID",
        "SETUID",
        "NET_BIND_SERVICE",
    ]
    .map(String::from)
    .to_vec()
}
fn default_tmpfs_size() -> ByteSize {
    ByteSize::mib(64)
}
fn default_secrets_mode() -> crate::spec::SecretsMode {
    crate::spec::SecretsMode::Env
}
fn default_secrets_dir() -> PathBuf {
    "/run/fleet-agent/secrets".into()
}

impl Default for ContainersConfig {
    fn default() -> Self {
        Self {
            network: default_network(),
            allowed_networks: Vec::new(),
            bridge_name: default_bridge_name(),
            pids_limit: default_pids_limit(),
            max_pids_limit: default_max_pids_limit(),
            allowed_capabilities: default_allowed_capabilities(),
            read_only_root: false,
            allow_writable_root: true,
            tmpfs_size: default_tmpfs_size(),
            allow_new_privileges: false,
            secrets_mode: default_secrets_mode(),
            secrets_dir: default_secrets_dir(),
        }
    }
}

impl ContainersConfig {
    fn validate(&self, problems: &mut Vec<FieldError>) {
        for (field, name) in std::iter::once(("containers.network".to_string(), &self.network))
            .chain(
                self.allowed_networks
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("containers.allowed_networks[{i}]"), n)),
            )
        {
            if let Err(m) = crate::spec::validate_network_name(name) {
                problems.push(FieldError::new(field, m));
            }
        }
        let bridge_ok = self.bridge_name.len() <= 15
            && self
                .bridge_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !bridge_ok {
            problems.push(FieldError::new(
                "containers.bridge_name",
                "must be an interface name of at most 15 characters (letters, digits, '_', '-', '.'), or empty",
            ));
        }
        let max = crate::spec::MAX_PIDS_LIMIT;
        if !(16..=max).contains(&self.max_pids_limit) {
            problems.push(FieldError::new(
                "containers.max_pids_limit",
                format!("must be 16-{max}"),
            ));
        }
        if !(16..=self.max_pids_limit.max(16)).contains(&self.pids_limit) {
            problems.push(FieldError::new(
                "containers.pids_limit",
                "must be at least 16 and at most containers.max_pids_limit",
            ));
        }
        for (i, cap) in self.allowed_capabilities.iter().enumerate() {
            if let Err(m) = crate::spec::validate_capability(cap) {
                problems.push(FieldError::new(
                    format!("containers.allowed_capabilities[{i}]"),
                    m,
                ));
            }
        }
        if self.tmpfs_size < ByteSize::mib(1) || self.tmpfs_size > ByteSize::gib(64) {
            problems.push(FieldError::new(
                "containers.tmpfs_size",
                "must be between 1MiB and 64GiB",
            ));
        }
        if !self.secrets_dir.is_absolute() {
            problems.push(FieldError::new(
                "containers.secrets_dir",
                "must be an absolute path (the engine bind-mounts from it)",
            ));
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    #[serde(default = "default_docker_socket")]
    pub socket: PathBuf,
    /// JSON file in Docker's `config.json` shape (`{"auths": {...}}`) for pulls.
    #[serde(default)]
    pub registry_auth_file: Option<PathBuf>,
    #[serde(default = "default_pull_timeout", with = "humantime_serde")]
    pub pull_timeout: Duration,
    /// Logging driver of the department containers (`json-file`, `local`,
    /// `journald`, ...); absent: the engine's own default.
    #[serde(default)]
    pub log_driver: Option<String>,
    /// The driver's `--log-opt`s. With `json-file` or `local` (chosen here or
    /// the engine's default) a missing `max-size` / `max-file` becomes 10m / 3,
    /// so a chatty department cannot fill the disk.
    #[serde(default)]
    pub log_options: std::collections::BTreeMap<String, String>,
}

fn default_docker_socket() -> PathBuf {
    "/var/run/docker.sock".into()
}
fn default_pull_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: default_docker_socket(),
            registry_auth_file: None,
            pull_timeout: default_pull_timeout(),
            log_driver: None,
            log_options: Default::default(),
        }
    }
}

/// Image garbage collection and the disk-pressure guard (`daemon/src/imagegc.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// Remove images the agent pulled for a department once no department
    /// uses them (never the current or previous spec image, never one it did
    /// not pull). `false`: the disk is still watched, nothing is removed.
    #[serde(default = "default_true")]
    pub gc: bool,
    #[serde(default = "default_gc_interval", with = "humantime_serde")]
    pub gc_interval: Duration,
    /// How often the disk is looked at.
    #[serde(default = "default_disk_check_interval", with = "humantime_serde")]
    pub disk_check_interval: Duration,
    /// Percent used at which disk pressure starts (collection at once).
    #[serde(default = "default_high_watermark")]
    pub disk_high_watermark: u8,
    /// Percent used at or below which disk pressure ends.
    #[serde(default = "default_low_watermark")]
    pub disk_low_watermark: u8,
    /// The filesystem to watch; absent: Docker's data root (`DockerRootDir`).
    #[serde(default)]
    pub disk_path: Option<PathBuf>,
}

fn default_gc_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_disk_check_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_high_watermark() -> u8 {
    90
}
fn default_low_watermark() -> u8 {
    80
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            gc: default_true(),
            gc_interval: default_gc_interval(),
            disk_check_interval: default_disk_check_interval(),
            disk_high_watermark: default_high_watermark(),
            disk_low_watermark: default_low_watermark(),
            disk_path: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Base URL; the daemon calls `POST {url}/v1/nodes/{node_id}/sync`.
    pub url: String,
    /// The name the coordinator knows this node by; defaults to the top-level `node_id`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Bearer token the daemon presents to the coordinator (file, mode 0600).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Cap of the backoff while the coordinator is unreachable. Defaults to
    /// `poll_interval`, so a returning coordinator is reached within one poll
    /// interval; raise it to spare a struggling coordinator at that cost.
    #[serde(default, with = "humantime_serde::option")]
    pub backoff_max: Option<Duration>,
    /// Extra CA bundle (PEM) to trust for the coordinator's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(15)
}

impl CoordinatorConfig {
    pub fn backoff_max(&self) -> Duration {
        self.backoff_max.unwrap_or(self.poll_interval)
    }
}

/// `[wal]`: where this host's PostgreSQL WAL goes. Owned by the `fleet-wal` crate's
/// feature set; kept here so the whole config parses in one place.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    /// `file:///path` or `s3://bucket/prefix`.
    pub target: String,
    /// libpq key/value string used for base backups and monitoring.
    #[serde(default)]
    pub postgres: Option<String>,
    /// Unix user of the PostgreSQL server, allowed WAL push/fetch on the socket.
    #[serde(default = "default_postgres_user")]
    pub postgres_user: String,
    #[serde(default)]
    pub s3: Option<S3Config>,
    #[serde(default = "default_recovery_window", with = "humantime_serde")]
    pub recovery_window: Duration,
    #[serde(default = "default_parallel")]
    pub parallel_uploads: usize,
    /// `pg_wal` directory whose `archive_status/*.ready` the daemon pushes ahead.
    #[serde(default)]
    pub pg_wal_dir: Option<PathBuf>,
    /// Base backup schedule: a period such as "24h"; absent means by hand only.
    #[serde(default, with = "humantime_serde::option")]
    pub backup_interval: Option<Duration>,
    /// The protective valve: acknowledge segments unarchived past this backlog.
    #[serde(default)]
    pub valve_backlog: Option<ByteSize>,
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// A base backup still running after this is killed and fails (an event).
    #[serde(default = "default_backup_timeout", with = "humantime_serde")]
    pub backup_timeout: Duration,
    /// Bandwidth cap of a base backup per second, passed to pg_basebackup's
    /// `--max-rate` so a backup does not starve the cluster's own disk reads
    /// (absent: no cap).
    #[serde(default)]
    pub backup_max_rate: Option<ByteSize>,
    /// The socket of the WAL service when it runs on its own as the PostgreSQL
    /// user (`fleet-agentd wal-serve`, fleet-agent-wal.service). Set: fleet-agentd
    /// does not run the WAL service itself and shows its status and metrics from
    /// there. Absent: fleet-agentd runs it (the daemon must then have
    /// PostgreSQL's rights, i.e. run as root).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// PostgreSQL's programs for the restore drill (absent: Debian's
    /// `/usr/lib/postgresql/<PG_VERSION of the backup>/bin`).
    #[serde(default)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Where restore drills make their scratch data directory (absent:
    /// `<state_dir>/wal-drill`); the PostgreSQL user must be able to reach it.
    #[serde(default)]
    pub drill_dir: Option<PathBuf>,
    /// Restore drill schedule ("7d"); absent: by hand only (`agentctl wal drill`).
    #[serde(default, with = "humantime_serde::option")]
    pub drill_interval: Option<Duration>,
    /// `agentctl wal verify` schedule ("24h"); absent: by hand only. Off by
    /// default: each run reads every object from the oldest kept base backup
    /// on back from the target, a cost that grows with the archive and lands
    /// on the operator's storage bill (docs/wal.md, "Verifying the archive").
    #[serde(default, with = "humantime_serde::option")]
    pub verify_interval: Option<Duration>,
    /// The checksum new archive objects record: "xxh3" (FWAL3), "blake3"
    /// (FWAL2) or "sha256" (FWAL1, readable by every version); absent:
    /// [`DEFAULT_OBJECT_CHECKSUM`]. All three are always read. The older
    /// formats stay for an archive that older agents must still read
    /// (docs/wal.md, "Upgrading to 0.2.0" and "Upgrading to 0.3.0").
    #[serde(default)]
    pub object_checksum: ObjectChecksum,
}

/// What `wal.object_checksum` is when absent. The one place to change the
/// default: the docs generated from the reference and the tests follow it.
pub const DEFAULT_OBJECT_CHECKSUM: ObjectChecksum = ObjectChecksum::Xxh3;

/// `wal.object_checksum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectChecksum {
    /// FWAL1: SHA-256.
    Sha256,
    /// FWAL2: BLAKE3-256.
    Blake3,
    /// FWAL3: XXH3-128, not cryptographic (docs/wal.md, "Why this checksum").
    Xxh3,
}

impl Default for ObjectChecksum {
    fn default() -> Self {
        DEFAULT_OBJECT_CHECKSUM
    }
}

fn default_postgres_user() -> String {
    "postgres".into()
}
fn default_backup_timeout() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_recovery_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_parallel() -> usize {
    4
}
/// zstd level 1: on WAL it compresses 1.3-1.8x faster than level 3 for 0-10%
/// more bytes (docs/wal.md), and CPU is what a VPS shares with its departments.
fn default_compression_level() -> i32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// File with `access_key_id` and `secret_access_key` lines (`key = value`).
    pub credentials_file: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Extra CA bundle (PEM) trusted for the endpoint's certificate, for a
    /// store behind a private CA (MinIO, Ceph RGW on a LAN).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .problem.in_source(&.path.display().to_string()))]
    Parse {
        path: PathBuf,
        problem: ParseProblem,
    },
    /// Each problem's position is where its key is written (`None`: not written,
    /// e.g. a default that a set key contradicts).
    #[error("{}", show_invalid(.path, .problems, .positions))]
    Invalid {
        path: PathBuf,
        problems: Vec<FieldError>,
        positions: Vec<Option<Position>>,
    },
}

/// One line per problem, `path:line:column: field: message`, when there are
/// several; one line otherwise.
fn show_invalid(path: &Path, problems: &[FieldError], positions: &[Option<Position>]) -> String {
    let name = path.display().to_string();
    problems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = positions.get(i).copied().flatten();
            format!("{}: {}: {}", at_prefix(&name, at), p.field, p.message)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `password=...` of a libpq string and `user:password@` of a URL, masked.
fn mask_password(text: &str) -> String {
    let mask = crate::spec::MASK;
    if let Some((scheme, rest)) = text.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:{mask}@{host}");
            }
        }
    }
    text.split(' ')
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.trim().eq_ignore_ascii_case("password") => {
                format!("{key}={mask}")
            }
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the config came from, for messages and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefault,
}

impl Config {
    /// The config a new user gets with no file: everything under one local
    /// directory, standalone mode, API on loopback.
    pub fn embedded_default() -> Self {
        let state_dir = embedded_state_dir();
        let mut config: Config = match toml::from_str("") {
            Ok(c) => c,
            Err(_) => unreachable_default(),
        };
        config.socket = state_dir.join("agentctl.sock");
        config.departments_dir = state_dir.join("departments.d");
        config.state_dir = state_dir;
        config
    }

    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = located::from_toml(text).map_err(|problem| ConfigError::Parse {
            path: path.to_path_buf(),
            problem,
        })?;
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            positions: problems
                .iter()
                .map(|p| located::locate_toml(text, &p.field))
                .collect(),
            problems,
        })?;
        Ok(config)
    }

    /// The config as it may be shown: a password in `wal.postgres` or in the
    /// coordinator's URL is replaced by the mask.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        if let Some(wal) = &mut c.wal {
            if let Some(pg) = &mut wal.postgres {
                *pg = mask_password(pg);
            }
        }
        if let Some(coordinator) = &mut c.coordinator {
            coordinator.url = mask_password(&coordinator.url);
        }
        c
    }

    /// TOML of every key, defaults filled in (`fleet-agentd config show`).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    pub fn load_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(path, &text)
    }

    /// `--config`, then `FLEET_AGENT_CONFIG`, then the system path if it exists,
    /// then the embedded default.
    pub fn locate(explicit: Option<&Path>) -> Result<(Self, ConfigSource), ConfigError> {
        if let Some(path) = explicit {
            return Ok((Self::load_file(path)?, ConfigSource::File(path.into())));
        }
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(path);
            return Ok((Self::load_file(&path)?, ConfigSource::File(path)));
        }
        let system = Path::new(SYSTEM_CONFIG_PATH);
        if system.exists() {
            return Ok((Self::load_file(system)?, ConfigSource::File(system.into())));
        }
        Ok((Self::embedded_default(), ConfigSource::EmbeddedDefault))
    }

    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut problems = Vec::new();
        self.containers.validate(&mut problems);
        if let Some(node_id) = &self.node_id {
            if !valid_node_id(node_id) {
                problems.push(FieldError::new(
                    "node_id",
                    "must be 1-64 characters of letters, digits, '-', '_' and '.'",
                ));
            }
        }
        if self.max_departments == 0 || self.max_departments > 1000 {
            problems.push(FieldError::new("max_departments", "must be 1-1000"));
        }
        if !(self.memory_oversubscription.is_finite()
            && (1.0..=4.0).contains(&self.memory_oversubscription))
        {
            problems.push(FieldError::new(
                "memory_oversubscription",
                "must be between 1.0 (hard limits fit the budget) and 4.0, such as 1.25",
            ));
        }
        if self.department_memory_default < ByteSize::mib(6) {
            problems.push(FieldError::new(
                "department_memory_default",
                "must be at least 6MiB (Docker's minimum)",
            ));
        }
        if self.resync_interval < Duration::from_millis(500) {
            problems.push(FieldError::new("resync_interval", "must be at least 500ms"));
        }
        if self.stats_interval < Duration::from_secs(1) {
            problems.push(FieldError::new("stats_interval", "must be at least 1s"));
        }
        if self.start_concurrency == 0 {
            problems.push(FieldError::new("start_concurrency", "must be at least 1"));
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&self.log.level.as_str()) {
            problems.push(FieldError::new(
                "log.level",
                "must be one of trace, debug, info, warn, error",
            ));
        }
        if !["auto", "text", "json", "journald"].contains(&self.log.format.as_str()) {
            problems.push(FieldError::new(
                "log.format",
                "must be one of auto, text, json, journald",
            ));
        }
        let range = self.ports.parsed_range();
        if let Err(message) = &range {
            problems.push(FieldError::new("ports.range", message.clone()));
        }
        match (self.ports.parsed_standby_range(), range) {
            (Err(message), _) => problems.push(FieldError::new("ports.standby_range", message)),
            (Ok(Some((slow, shigh))), Ok((low, high))) => {
                if shigh - slow != high - low {
                    problems.push(FieldError::new(
                        "ports.standby_range",
                        format!(
                            "must hold as many ports as ports.range ({}), one standby port per department port",
                            high - low + 1
                        ),
                    ));
                } else if slow <= high && low <= shigh {
                    problems.push(FieldError::new(
                        "ports.standby_range",
                        "must not overlap ports.range",
                    ));
                }
            }
            _ => {}
        }
        if let Some(h) = &self.haproxy {
            if self.ports.standby_range.is_none() {
                problems.push(FieldError::new(
                    "haproxy",
                    "needs ports.standby_range: a hand-over needs a second port per department",
                ));
            }
            if let Err(message) = h.agent_addr() {
                problems.push(FieldError::new("haproxy.agent_listen", message));
            }
            if h.rise == 0 || h.rise > 100 || h.fall == 0 || h.fall > 100 {
                problems.push(FieldError::new(
                    "haproxy.rise",
                    "rise and fall must be 1-100",
                ));
            }
            if h.check_inter < Duration::from_millis(100)
                || h.agent_inter < Duration::from_millis(100)
            {
                problems.push(FieldError::new(
                    "haproxy.check_inter",
                    "check_inter and agent_inter must be at least 100ms",
                ));
            }
        }
        match self.api.listen_addr() {
            Err(message) => problems.push(FieldError::new("api.listen", message)),
            Ok(Some(addr)) if !addr.ip().is_loopback() && self.api.token_file.is_none() => {
                problems.push(FieldError::new(
                    "api.token_file",
                    format!(
                        "is required because api.listen ({addr}) is not a loopback address; create a token file (mode 0600) and name it here"
                    ),
                ));
            }
            Ok(_) => {}
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            problems.push(FieldError::new(
                "api.tls_key",
                "api.tls_cert and api.tls_key must be set together",
            ));
        }
        if self.api.tls_client_ca.is_some() && self.api.tls_cert.is_none() {
            problems.push(FieldError::new(
                "api.tls_client_ca",
                "needs api.tls_cert and api.tls_key",
            ));
        }
        if let Some(driver) = &self.docker.log_driver {
            if driver.is_empty()
                || !driver
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
            {
                problems.push(FieldError::new(
                    "docker.log_driver",
                    "must be a Docker logging driver name such as json-file, local or journald (leave it out for the engine's default)",
                ));
            }
        }
        if self.docker.log_options.keys().any(|k| k.trim().is_empty()) {
            problems.push(FieldError::new(
                "docker.log_options",
                "option names must not be empty",
            ));
        }
        if self.api.max_connections == 0 || self.api.max_connections > 100_000 {
            problems.push(FieldError::new("api.max_connections", "must be 1-100000"));
        }
        if self.api.header_timeout < Duration::from_millis(100) {
            problems.push(FieldError::new(
                "api.header_timeout",
                "must be at least 100ms",
            ));
        }
        if self.api.request_timeout < Duration::from_millis(100) {
            problems.push(FieldError::new(
                "api.request_timeout",
                "must be at least 100ms",
            ));
        }
        let images = &self.images;
        if images.gc_interval < Duration::from_secs(1) {
            problems.push(FieldError::new("images.gc_interval", "must be at least 1s"));
        }
        if images.disk_check_interval < Duration::from_millis(100) {
            problems.push(FieldError::new(
                "images.disk_check_interval",
                "must be at least 100ms",
            ));
        }
        if !(1..=99).contains(&images.disk_high_watermark) {
            problems.push(FieldError::new(
                "images.disk_high_watermark",
                "must be 1-99 (percent used)",
            ));
        }
        if images.disk_low_watermark >= images.disk_high_watermark {
            problems.push(FieldError::new(
                "images.disk_low_watermark",
                format!(
                    "must be below images.disk_high_watermark ({})",
                    images.disk_high_watermark
                ),
            ));
        }
        if images.disk_path.as_ref().is_some_and(|p| !p.is_absolute()) {
            problems.push(FieldError::new(
                "images.disk_path",
                "must be an absolute path",
            ));
        }
        if let Some(coordinator) = &self.coordinator {
            if !(coordinator.url.starts_with("http://") || coordinator.url.starts_with("https://"))
            {
                problems.push(FieldError::new(
                    "coordinator.url",
                    "must start with https:// (or http:// on a trusted network)",
                ));
            }
            if coordinator.poll_interval < Duration::from_millis(100) {
                problems.push(FieldError::new(
                    "coordinator.poll_interval",
                    "must be at least 100ms",
                ));
            }
            if coordinator.backoff_max() < coordinator.poll_interval.min(Duration::from_secs(1)) {
                problems.push(FieldError::new(
                    "coordinator.backoff_max",
                    "must be at least poll_interval or 1s, whichever is smaller",
                ));
            }
            if let Some(id) = &coordinator.node_id {
                if !valid_node_id(id) {
                    problems.push(FieldError::new(
                        "coordinator.node_id",
                        "must be 1-64 characters of letters, digits, '-', '_' and '.'",
                    ));
                }
            }
        }
        if let Some(wal) = &self.wal {
            if !(wal.target.starts_with("file:///") || wal.target.starts_with("s3://")) {
                problems.push(FieldError::new(
                    "wal.target",
                    "must be file:///absolute/path or s3://bucket/prefix",
                ));
            }
            if wal.target.starts_with("s3://") && wal.s3.is_none() {
                problems.push(FieldError::new(
                    "wal.s3",
                    "is required for an s3:// target (endpoint, region, credentials_file)",
                ));
            }
            if wal.parallel_uploads == 0 || wal.parallel_uploads > 64 {
                problems.push(FieldError::new("wal.parallel_uploads", "must be 1-64"));
            }
            if !(1..=22).contains(&wal.compression_level) {
                problems.push(FieldError::new("wal.compression_level", "must be 1-22"));
            }
            // Short intervals are allowed (tests and labs use seconds); zero
            // would mean one base backup after another, never a schedule.
            if wal
                .backup_interval
                .is_some_and(|i| i < Duration::from_secs(1))
            {
                problems.push(FieldError::new(
                    "wal.backup_interval",
                    "must be at least 1s (absent: backups by hand only)",
                ));
            }
            if wal
                .drill_interval
                .is_some_and(|i| i < Duration::from_secs(60))
            {
                problems.push(FieldError::new(
                    "wal.drill_interval",
                    "must be at least 1m: each drill restores a whole cluster (absent: drills by hand only)",
                ));
            }
            if wal.verify_interval.is_some_and(|i| {
                !(Duration::from_secs(60)..=Duration::from_secs(365 * 86400)).contains(&i)
            }) {
                problems.push(FieldError::new(
                    "wal.verify_interval",
                    "must be from 1m to 365d: each verify reads the whole archive back (absent: verify by hand only)",
                ));
            }
            if wal.backup_timeout < Duration::from_secs(1) {
                problems.push(FieldError::new(
                    "wal.backup_timeout",
                    "must be at least 1s (default 6h)",
                ));
            }
            // pg_basebackup's own bounds for --max-rate (32 kB/s to 1024 MB/s).
            if let Some(rate) = wal.backup_max_rate {
                if !(32 * 1024..=1024 * 1024 * 1024).contains(&rate.bytes()) {
                    problems.push(FieldError::new(
                        "wal.backup_max_rate",
                        "must be from 32KiB to 1GiB (per second; pg_basebackup --max-rate)",
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(hostname)
    }

    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// Where the daemon keeps the specs `agentctl apply` sent (standalone mode),
    /// beside `departments_dir`'s hand-written ones: under the state directory,
    /// the one place the unit lets it write.
    pub fn applied_dir(&self) -> PathBuf {
        self.state_dir.join("applied.d")
    }
}

/// Node ids go into URL paths and labels: keep them to URL-safe characters.
fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn unreachable_default() -> Config {
    // Every field has a serde default, so parsing "" cannot fail; this keeps
    // that promise without a panic path.
    Config {
        node_id: None,
        state_dir: default_state_dir(),
        socket: default_socket(),
        departments_dir: default_departments_dir(),
        max_departments: default_max_departments(),
        reserved_memory: default_reserved_memory(),
        memory_oversubscription: default_memory_oversubscription(),
        department_memory_default: default_department_memory(),
        resync_interval: default_resync_interval(),
        stats_interval: default_stats_interval(),
        start_concurrency: default_start_concurrency(),
        admin_group: default_admin_group(),
        log: LogConfig::default(),
        ports: PortsConfig::default(),
        api: ApiConfig::default(),
        docker: DockerConfig::default(),
        containers: ContainersConfig::default(),
        images: ImagesConfig::default(),
        coordinator: None,
        wal: None,
        haproxy: None,
    }
}

/// `$XDG_STATE_HOME/fleet-agent`, else `~/.local/state/fleet-agent`, else
/// `./.fleet-agent`: a place any user can write without setup.
pub fn embedded_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("fleet-agent");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/state/fleet-agent");
    }
    PathBuf::from(".fleet-agent")
}

/// The socket `agentctl` talks to when not told: the system one if a daemon made
/// it, else the embedded default's.
pub fn default_client_socket() -> PathBuf {
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    let system = Path::new(SYSTEM_SOCKET_PATH);
    if system.exists() {
        return system.into();
    }
    embedded_state_dir().join("agentctl.sock")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_documented_default() {
        let c = Config::from_toml_str(Path::new("t"), "").unwrap();
        assert_eq!(c.max_departments, 10);
        assert_eq!(c.ports.parsed_range().unwrap(), (8001, 8010));
        assert_eq!(c.reserved_memory, ByteSize::gib(2));
        assert!(c.coordinator.is_none());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text =
            "max_departments = 0\n[ports]\nrange = \"9-1\"\n[api]\nlisten = \"0.0.0.0:7070\"\n";
        let err = Config::from_toml_str(Path::new("t"), text).unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["max_departments", "ports.range", "api.token_file"]);
    }

    #[test]
    fn the_hand_over_needs_a_standby_pool_as_long_as_the_range_and_apart_from_it() {
        let fields = |text: &str| -> Vec<String> {
            match Config::from_toml_str(Path::new("t"), text) {
                Ok(_) => vec![],
                Err(ConfigError::Invalid { problems, .. }) => {
                    problems.into_iter().map(|p| p.field).collect()
                }
                Err(e) => panic!("{e}"),
            }
        };
        let haproxy = "[haproxy]\nagent_listen = \"127.0.0.1:8099\"\n";
        let good =
            format!("[ports]\nrange = \"8001-8010\"\nstandby_range = \"8101-8110\"\n{haproxy}");
        assert_eq!(fields(&good), Vec::<String>::new());
        let c = Config::from_toml_str(Path::new("t"), &good).unwrap();
        let h = c.haproxy.unwrap();
        // (rise + 1) * check_inter + agent_inter, with the defaults 2, 1s, 1s.
        assert_eq!(h.settle(), Duration::from_secs(4));
        assert_eq!(fields(haproxy), ["haproxy"]);
        assert_eq!(
            fields("[ports]\nrange = \"8001-8010\"\nstandby_range = \"8101-8105\"\n"),
            ["ports.standby_range"]
        );
        assert_eq!(
            fields("[ports]\nrange = \"8001-8010\"\nstandby_range = \"8005-8014\"\n"),
            ["ports.standby_range"]
        );
        let bad_agent =
            "[ports]\nstandby_range = \"8101-8110\"\n[haproxy]\nagent_listen = \"here\"\n";
        assert_eq!(fields(bad_agent), ["haproxy.agent_listen"]);
    }

    #[test]
    fn wal_verify_interval_is_off_by_default_and_from_a_minute_to_a_year() {
        let wal = |extra: &str| format!("[wal]\ntarget = \"file:///tmp/a\"\n{extra}");
        let c = Config::from_toml_str(Path::new("t"), &wal("")).unwrap();
        assert_eq!(c.wal.and_then(|w| w.verify_interval), None);
        let c = Config::from_toml_str(Path::new("t"), &wal("verify_interval = \"24h\"\n")).unwrap();
        assert_eq!(
            c.wal.and_then(|w| w.verify_interval),
            Some(Duration::from_secs(86400))
        );
        for bad in ["30s", "0s", "400d"] {
            let err = Config::from_toml_str(
                Path::new("t"),
                &wal(&format!("verify_interval = \"{bad}\"\n")),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("wal.verify_interval"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn wal_drill_interval_is_off_by_default_and_at_least_a_minute() {
        let wal = |extra: &str| format!("[wal]\ntarget = \"file:///tmp/a\"\n{extra}");
        let c = Config::from_toml_str(Path::new("t"), &wal("")).unwrap();
        assert_eq!(c.wal.and_then(|w| w.drill_interval), None);
        let c = Config::from_toml_str(Path::new("t"), &wal("drill_interval = \"7d\"\n")).unwrap();
        assert_eq!(
            c.wal.and_then(|w| w.drill_interval),
            Some(Duration::from_secs(7 * 86400))
        );
        let err =
            Config::from_toml_str(Path::new("t"), &wal("drill_interval = \"10s\"\n")).unwrap_err();
        assert!(err.to_string().contains("wal.drill_interval"), "{err}");
    }

    #[test]
    fn wal_backup_interval_may_be_short_but_not_zero() {
        let wal = |interval: &str| {
            format!("[wal]\ntarget = \"file:///tmp/a\"\nbackup_interval = \"{interval}\"\n")
        };
        let c = Config::from_toml_str(Path::new("t"), &wal("3s")).unwrap();
        let interval = c.wal.and_then(|w| w.backup_interval);
        assert_eq!(interval, Some(Duration::from_secs(3)));
        let err = Config::from_toml_str(Path::new("t"), &wal("0s")).unwrap_err();
        assert!(err.to_string().contains("wal.backup_interval"), "{err}");
    }

    #[test]
    fn show_masks_passwords_and_lists_every_key() {
        let text = "[wal]\ntarget = \"file:///w\"\npostgres = \"host=/run dbname=x password=s3cret user=a\"\n[coordinator]\nurl = \"https://n:t0ken@c.example\"\n";
        let config = Config::from_toml_str(Path::new("a.toml"), text).unwrap();
        let shown = config.redacted().to_toml().unwrap();
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
        assert!(shown.contains("password=********"), "{shown}");
        assert!(shown.contains("https://n:********@c.example"), "{shown}");
        assert!(shown.contains("pull_timeout = \"10m\""), "{shown}");
        // What is shown reads back as the same config.
        Config::from_toml_str(Path::new("shown.toml"), &shown).unwrap();
    }

    #[test]
    fn docker_log_driver_and_options_are_read_and_a_bad_driver_is_named() {
        let c = Config::from_toml_str(
            Path::new("t"),
            "[docker]\nlog_driver = \"local\"\nlog_options = { max-size = \"50m\" }\n",
        )
        .unwrap();
        assert_eq!(c.docker.log_driver.as_deref(), Some("local"));
        assert_eq!(c.docker.log_options["max-size"], "50m");
        assert!(DockerConfig::default().log_driver.is_none());
        let err = Config::from_toml_str(Path::new("t"), "[docker]\nlog_driver = \"json file\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("docker.log_driver"), "{err}");
        let err =
            Config::from_toml_str(Path::new("t"), "[docker]\nlog_options = { \"\" = \"x\" }\n")
                .unwrap_err();
        assert!(err.to_string().contains("docker.log_options"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml_str(Path::new("t"), "max_deparments = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_deparments"), "{err}");
    }

    #[test]
    fn coordinator_section_defaults_and_checks() {
        let c = Config::from_toml_str(
            Path::new("t"),
            "[coordinator]\nurl = \"https://c.example\"\npoll_interval = \"20s\"\n",
        )
        .unwrap();
        let coordinator = c.coordinator.unwrap();
        assert_eq!(coordinator.backoff_max(), Duration::from_secs(20));
        let err = Config::from_toml_str(
            Path::new("t"),
            "[coordinator]\nurl = \"ftp://c\"\nnode_id = \"a/b\"\nbackoff_max = \"10ms\"\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "coordinator.url",
                "coordinator.backoff_max",
                "coordinator.node_id"
            ]
        );
    }

    #[test]
    fn api_limits_are_checked() {
        let err = Config::from_toml_str(
            Path::new("t"),
            "[api]\nmax_connections = 0\nheader_timeout = \"1ms\"\ntls_client_ca = \"/ca.pem\"\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "api.tls_client_ca",
                "api.max_connections",
                "api.header_timeout"
            ]
        );
    }

    #[test]
    fn embedded_default_is_valid() {
        Config::embedded_default().validate().unwrap();
    }
}
