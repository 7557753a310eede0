//! The department spec: what one department container should be, as written in
//! `departments.d/*.toml`, sent by `agentctl apply` or by the coordinator as JSON.
//! Validation collects every problem at once and names the field of each.

use crate::located::{self, at_prefix, ParseProblem};
use crate::size::ByteSize;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub const DEFAULT_CONTAINER_PORT: u16 = 8080;
/// What a secret looks like anywhere it is shown.
pub const MASK: &str = "********";

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
/// Far above any host this runs on, far below what overflows Docker's i64.
pub const MAX_MEMORY: ByteSize = ByteSize::gib(16 * 1024);
/// Entries of `[env]` and of `[secrets]`, each.
pub const MAX_ENTRIES: usize = 512;
/// One env or secret value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepartmentSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: String,
    /// The image the department's next update will use, announced ahead of
    /// it: pulled in the background and kept by image collection. Not part
    /// of the container hash, so announcing never replaces the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_image: Option<String>,
    #[serde(default = "default_container_port")]
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default)]
    pub restart: RestartSpec,
    /// Optional database reachability check reported beside the probe; it never
    /// restarts the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_check: Option<PostgresCheck>,
    /// The Docker network the container joins; default the node's
    /// `[containers] network`. Only the node's network or one of its
    /// `allowed_networks` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// How `[secrets]` reach the container; default the node's
    /// `[containers] secrets_mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_mode: Option<SecretsMode>,
    /// Container hardening; every key unset takes the node's default, and
    /// the node's `[containers]` bounds what may be asked for.
    #[serde(default, skip_serializing_if = "SecuritySpec::is_unset")]
    pub security: SecuritySpec,
}

/// Where a department's secret values are put for its container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretsMode {
    /// In the container's environment: visible in `docker inspect` and in the
    /// engine's `config.v2.json`. For images that cannot read a file.
    Env,
    /// One read-only file per secret under `/run/secrets` (a bind mount of a
    /// directory on the daemon's tmpfs), `<NAME>_FILE` in the environment
    /// pointing at it. The recommended mode.
    Files,
}

impl SecretsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretsMode::Env => "env",
            SecretsMode::Files => "files",
        }
    }
}

/// Per-department hardening; `None` is "the node's default".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySpec {
    /// Docker's PidsLimit (processes and threads of the container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<i64>,
    /// Capabilities added back after dropping all; each must be in the node's
    /// `[containers] allowed_capabilities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_add: Option<Vec<String>>,
    /// Docker's init as PID 1 (signal forwarding, zombie reaping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    /// Read-only root file system, with a tmpfs on /tmp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root: Option<bool>,
    /// Size of the /tmp tmpfs of a read-only root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_size: Option<ByteSize>,
    /// `no-new-privileges`: setuid binaries gain nothing. Turning it off
    /// needs the node's `allow_new_privileges`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_new_privileges: Option<bool>,
}

impl SecuritySpec {
    pub fn is_unset(&self) -> bool {
        *self == SecuritySpec::default()
    }
}

/// Where secret files appear inside a container in `files` mode.
pub const SECRETS_MOUNT: &str = "/run/secrets";
/// Largest PID limit a spec may name at all (the node's bound is lower).
pub const MAX_PIDS_LIMIT: i64 = 1 << 22;

fn default_container_port() -> u16 {
    DEFAULT_CONTAINER_PORT
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Docker's MemoryReservation (a soft limit): what memory admission sums
    /// against the host's budget. Defaults to `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reservation: Option<ByteSize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_start_period", with = "humantime_serde")]
    pub start_period: Duration,
    /// A probe-less department is judged only by whether its process runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retries() -> u32 {
    3
}
fn default_start_period() -> Duration {
    Duration::from_secs(60)
}
fn default_true() -> bool {
    true
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            interval: default_interval(),
            timeout: default_timeout(),
            retries: default_retries(),
            start_period: default_start_period(),
            enabled: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    #[serde(default = "default_policy")]
    pub policy: RestartPolicy,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// How long an update candidate may take to become healthy before the
    /// department rolls back to its previous spec.
    #[serde(default = "default_update_deadline", with = "humantime_serde")]
    pub update_deadline: Duration,
    /// Behind HAProxy (`[haproxy]`): how long a container taken out of
    /// rotation may finish its in-flight requests before it gets SIGTERM.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_policy() -> RestartPolicy {
    RestartPolicy::OnFailure
}
fn default_window() -> Duration {
    Duration::from_secs(600)
}
fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_update_deadline() -> Duration {
    Duration::from_secs(120)
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: default_policy(),
            max_retries: default_retries(),
            window: default_window(),
            backoff: default_backoff(),
            backoff_max: default_backoff_max(),
            stop_timeout: default_stop_timeout(),
            update_deadline: default_update_deadline(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// `SELECT 1` against the department's database, with credentials taken from the
/// department's own env and secrets by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresCheck {
    /// Name of the env or secret key holding a libpq URL or key/value string.
    pub url_from: String,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

/// A secret value: kept in the spec so the container gets it, never shown.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value: for the container's environment.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// One problem with a spec or config, named by its dotted field path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The document is not a spec: broken syntax, a wrong type, an unknown key.
    #[error("{}", .problem.in_source(.source_name))]
    Parse {
        source_name: String,
        problem: ParseProblem,
    },
    #[error("{}", join_fields(.0))]
    Invalid(Vec<FieldError>),
}

impl SpecError {
    pub fn fields(&self) -> Vec<FieldError> {
        match self {
            SpecError::Parse { problem, .. } => {
                let message = match problem.at {
                    Some(at) => format!(
                        "{} (line {}, column {})",
                        problem.message, at.line, at.column
                    ),
                    None => problem.message.clone(),
                };
                vec![FieldError::new(problem.field.clone(), message)]
            }
            SpecError::Invalid(f) => f.clone(),
        }
    }

    /// Every problem with the field prefixed by `name:line:column` of the key at
    /// fault in the TOML `text` it came from, so an operator can go straight there.
    pub fn in_file(&self, name: &str, text: &str) -> Vec<FieldError> {
        match self {
            SpecError::Parse { problem, .. } => vec![FieldError::new(
                format!("{}: {}", at_prefix(name, problem.at), problem.field),
                problem.message.clone(),
            )],
            SpecError::Invalid(fields) => fields
                .iter()
                .map(|f| {
                    let at = located::locate_toml(text, &f.field);
                    FieldError::new(
                        format!("{}: {}", at_prefix(name, at), f.field),
                        f.message.clone(),
                    )
                })
                .collect(),
        }
    }
}

pub fn join_fields(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl DepartmentSpec {
    pub fn from_toml(source_name: &str, text: &str) -> Result<Self, SpecError> {
        let spec: DepartmentSpec =
            located::from_toml(text).map_err(|problem| SpecError::Parse {
                source_name: source_name.to_string(),
                problem,
            })?;
        spec.validate().map_err(SpecError::Invalid)?;
        Ok(spec)
    }

    pub fn from_json(source_name: &str, text: &str) -> Result<Self, SpecError> {
        let spec: DepartmentSpec =
            located::from_json(text.as_bytes()).map_err(|problem| SpecError::Parse {
                source_name: source_name.to_string(),
                problem,
            })?;
        spec.validate().map_err(SpecError::Invalid)?;
        Ok(spec)
    }

    /// Every problem of this spec on its own; node-wide limits (capacity, ports in
    /// use) are checked by the daemon against the whole desired state.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if !valid_id(&self.id) {
            errors.push(FieldError::new(
                "id",
                format!(
                    "`{}` is not a valid department id; use 2-32 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'",
                    self.id.escape_debug()
                ),
            ));
        }
        if let Some(name) = &self.name {
            if name.len() > 200 || name.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    "name",
                    "must be at most 200 characters with no control characters",
                ));
            }
        }
        if let Err(message) = validate_image(&self.image) {
            errors.push(FieldError::new("image", message));
        }
        if let Some(next) = &self.next_image {
            if let Err(message) = validate_image(next) {
                errors.push(FieldError::new("next_image", message));
            }
        }
        if self.container_port == 0 {
            errors.push(FieldError::new("container_port", "must be 1-65535"));
        }
        if self.host_port == Some(0) {
            errors.push(FieldError::new(
                "host_port",
                "must be 1-65535, or left out to allocate one from the pool",
            ));
        }
        if let Some(cpus) = self.resources.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                errors.push(FieldError::new(
                    "resources.cpus",
                    "must be a positive number of CPUs such as 0.5 or 2",
                ));
            }
        }
        if let Some(memory) = self.resources.memory {
            if memory < ByteSize::mib(6) {
                errors.push(FieldError::new(
                    "resources.memory",
                    "must be at least 6MiB (Docker's minimum)",
                ));
            } else if memory > MAX_MEMORY {
                errors.push(FieldError::new(
                    "resources.memory",
                    format!("must be at most {MAX_MEMORY}"),
                ));
            }
        }
        if self.env.len() > MAX_ENTRIES {
            errors.push(FieldError::new(
                "env",
                format!("has {} entries; at most {MAX_ENTRIES}", self.env.len()),
            ));
        }
        if self.secrets.len() > MAX_ENTRIES {
            errors.push(FieldError::new(
                "secrets",
                format!("has {} entries; at most {MAX_ENTRIES}", self.secrets.len()),
            ));
        }
        for (key, value) in &self.env {
            if value.len() > MAX_VALUE_BYTES {
                errors.push(FieldError::new(
                    format!("env.{key}"),
                    format!("is {} bytes; at most {MAX_VALUE_BYTES}", value.len()),
                ));
            }
        }
        for (key, value) in &self.secrets {
            if value.expose().len() > MAX_VALUE_BYTES {
                errors.push(FieldError::new(
                    format!("secrets.{key}"),
                    format!("is longer than {MAX_VALUE_BYTES} bytes"),
                ));
            }
        }
        if let Some(reservation) = self.resources.memory_reservation {
            if reservation < ByteSize::mib(6) {
                errors.push(FieldError::new(
                    "resources.memory_reservation",
                    "must be at least 6MiB",
                ));
            }
            if self.resources.memory.is_some_and(|m| reservation > m) {
                errors.push(FieldError::new(
                    "resources.memory_reservation",
                    "must not exceed resources.memory (the hard limit)",
                ));
            }
        }
        for key in self.env.keys() {
            if !valid_env_name(key) {
                errors.push(FieldError::new(
                    format!("env.{key}"),
                    "is not a valid environment variable name (A-Z, a-z, 0-9, '_', not starting with a digit)",
                ));
            }
        }
        for (key, value) in &self.env {
            if value.contains('\0') {
                errors.push(FieldError::new(
                    format!("env.{key}"),
                    "must not contain a NUL byte",
                ));
            }
        }
        for (key, value) in &self.secrets {
            if !valid_env_name(key) {
                errors.push(FieldError::new(
                    format!("secrets.{key}"),
                    "is not a valid environment variable name (A-Z, a-z, 0-9, '_', not starting with a digit)",
                ));
            }
            if self.env.contains_key(key) {
                errors.push(FieldError::new(
                    format!("secrets.{key}"),
                    "is also set in [env]; set it in one place",
                ));
            }
            if value.expose().contains('\0') {
                errors.push(FieldError::new(
                    format!("secrets.{key}"),
                    "must not contain a NUL byte",
                ));
            }
        }
        if let Err(message) = validate_probe_path(&self.health.path) {
            errors.push(FieldError::new("health.path", message));
        }
        let h = &self.health;
        if h.interval < Duration::from_millis(100) {
            errors.push(FieldError::new("health.interval", "must be at least 100ms"));
        }
        // Upper bounds on every duration: a timer armed with an absurd one
        // overflows the clock (a panic in the department's task) or never fires.
        let bounded = [
            ("health.interval", h.interval, HOUR),
            ("health.start_period", h.start_period, HOUR),
            ("restart.window", self.restart.window, WEEK),
            ("restart.backoff", self.restart.backoff, HOUR),
            ("restart.backoff_max", self.restart.backoff_max, DAY),
            (
                "restart.update_deadline",
                self.restart.update_deadline,
                HOUR,
            ),
        ];
        for (field, value, max) in bounded {
            if value > max {
                errors.push(FieldError::new(
                    field,
                    format!("must be at most {}", humantime::format_duration(max)),
                ));
            }
        }
        if self.restart.max_retries > 1000 {
            errors.push(FieldError::new("restart.max_retries", "must be 0-1000"));
        }
        if h.timeout < Duration::from_millis(10) || h.timeout > Duration::from_secs(300) {
            errors.push(FieldError::new(
                "health.timeout",
                "must be between 10ms and 5m",
            ));
        }
        if h.retries == 0 || h.retries > 100 {
            errors.push(FieldError::new("health.retries", "must be 1-100"));
        }
        let r = &self.restart;
        if r.window.is_zero() {
            errors.push(FieldError::new("restart.window", "must be longer than 0s"));
        }
        if r.backoff.is_zero() {
            errors.push(FieldError::new("restart.backoff", "must be longer than 0s"));
        }
        if r.backoff_max < r.backoff {
            errors.push(FieldError::new(
                "restart.backoff_max",
                "must be at least restart.backoff",
            ));
        }
        if r.stop_timeout > Duration::from_secs(3600) {
            errors.push(FieldError::new(
                "restart.stop_timeout",
                "must be at most 1h",
            ));
        }
        if r.update_deadline.is_zero() {
            errors.push(FieldError::new(
                "restart.update_deadline",
                "must be longer than 0s",
            ));
        }
        if let Some(network) = &self.network {
            if let Err(message) = validate_network_name(network) {
                errors.push(FieldError::new("network", message));
            }
        }
        if self.secrets_mode == Some(SecretsMode::Files) {
            for key in self.secrets.keys() {
                let pointer = format!("{key}_FILE");
                if self.env.contains_key(&pointer) {
                    errors.push(FieldError::new(
                        format!("env.{pointer}"),
                        format!(
                            "is where secrets_mode = \"files\" points at secret {key}; rename it"
                        ),
                    ));
                }
            }
        }
        let sec = &self.security;
        if let Some(pids) = sec.pids_limit {
            if !(16..=MAX_PIDS_LIMIT).contains(&pids) {
                errors.push(FieldError::new(
                    "security.pids_limit",
                    format!("must be 16-{MAX_PIDS_LIMIT} (processes and threads)"),
                ));
            }
        }
        for (i, cap) in sec.cap_add.iter().flatten().enumerate() {
            if let Err(message) = validate_capability(cap) {
                errors.push(FieldError::new(format!("security.cap_add[{i}]"), message));
            }
        }
        if let Some(size) = sec.tmpfs_size {
            if size < ByteSize::mib(1) || size > ByteSize::gib(64) {
                errors.push(FieldError::new(
                    "security.tmpfs_size",
                    "must be between 1MiB and 64GiB",
                ));
            }
        }
        if r.drain_timeout > Duration::from_secs(3600) {
            errors.push(FieldError::new(
                "restart.drain_timeout",
                "must be at most 1h",
            ));
        }
        if let Some(check) = &self.postgres_check {
            if !self.env.contains_key(&check.url_from)
                && !self.secrets.contains_key(&check.url_from)
            {
                errors.push(FieldError::new(
                    "postgres_check.url_from",
                    format!(
                        "names `{}`, which is neither in [env] nor in [secrets]",
                        check.url_from
                    ),
                ));
            }
            if check.interval < Duration::from_secs(1) || check.interval > HOUR {
                errors.push(FieldError::new(
                    "postgres_check.interval",
                    "must be between 1s and 1h",
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Whether `other` is this spec with at most a different `next_image`:
    /// an announcement, which is no new version of the department (its
    /// previous spec, the rollback, stays what it was).
    pub fn differs_only_in_next_image(&self, other: &DepartmentSpec) -> bool {
        self.next_image != other.next_image
            && DepartmentSpec {
                next_image: other.next_image.clone(),
                ..self.clone()
            } == *other
    }

    /// The image to announce for this spec: `next_image` unless it is the
    /// current image already (then there is nothing ahead to pull).
    pub fn announced_next_image(&self) -> Option<&str> {
        self.next_image
            .as_deref()
            .filter(|next| *next != self.image)
    }

    /// A copy safe to show: every secret value replaced by the mask.
    pub fn redacted(&self) -> Self {
        let mut copy = self.clone();
        for value in copy.secrets.values_mut() {
            *value = Secret::new(MASK);
        }
        copy
    }

    /// What defines the container (not probe or restart settings, which
    /// change without a new container), with the host port actually assigned,
    /// as canonical bytes. Secrets are part of it so a rotated secret replaces
    /// the container.
    fn defining_bytes(&self, host_port: u16) -> Vec<u8> {
        #[derive(Serialize)]
        struct Defining<'a> {
            image: &'a str,
            container_port: u16,
            host_port: u16,
            cpus: Option<f64>,
            memory: Option<u64>,
            // Left out when unset, so specs without it keep their hash (and
            // their containers) across the upgrade that added it.
            #[serde(skip_serializing_if = "Option::is_none")]
            memory_reservation: Option<u64>,
            env: &'a BTreeMap<String, String>,
            secrets: BTreeMap<&'a str, &'a str>,
            // Left out when unset, like memory_reservation: specs written
            // before them keep their hash.
            #[serde(skip_serializing_if = "Option::is_none")]
            network: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            secrets_mode: Option<SecretsMode>,
            #[serde(skip_serializing_if = "SecuritySpec::is_unset")]
            security: &'a SecuritySpec,
        }
        let defining = Defining {
            image: &self.image,
            container_port: self.container_port,
            host_port,
            cpus: self.resources.cpus,
            memory: self.resources.memory.map(ByteSize::bytes),
            memory_reservation: self.resources.memory_reservation.map(ByteSize::bytes),
            env: &self.env,
            secrets: self
                .secrets
                .iter()
                .map(|(k, v)| (k.as_str(), v.expose()))
                .collect(),
            network: self.network.as_deref(),
            secrets_mode: self.secrets_mode,
            security: &self.security,
        };
        // BTreeMaps keep the serialisation canonical.
        serde_json::to_vec(&defining).unwrap_or_default()
    }

    /// The change-detection hash: HMAC-SHA256 under the node's `HashKey`, so
    /// nobody without the key can test guesses of a secret against it (every
    /// other input is shown next to it). `k1-` tells it from the unkeyed
    /// digest of earlier versions (`legacy_container_hash`).
    pub fn container_hash(&self, host_port: u16, key: &HashKey) -> String {
        use hmac::Mac;
        let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(key.bytes()) else {
            // Unreachable: HMAC takes a key of any length.
            return String::new();
        };
        mac.update(&self.defining_bytes(host_port));
        let digest = mac.finalize().into_bytes();
        format!("{KEYED_PREFIX}{}", hex::encode(&digest[..12]))
    }

    /// The unkeyed, truncated SHA-256 containers created before the keyed
    /// hash carry. Only compared with such a container's label, so an upgrade
    /// adopts it instead of replacing it; never computed for a new one.
    pub fn legacy_container_hash(&self, host_port: u16) -> String {
        let digest = Sha256::digest(self.defining_bytes(host_port));
        hex::encode(&digest[..12])
    }

    /// Whether a container labelled `label` was created from this spec on
    /// `host_port`: the keyed hash, or the unkeyed one of a container an
    /// earlier version created.
    pub fn hash_matches(&self, label: &str, host_port: u16, key: &HashKey) -> bool {
        if label.starts_with(KEYED_PREFIX) {
            label == self.container_hash(host_port, key)
        } else {
            label == self.legacy_container_hash(host_port)
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.resources.memory.map(ByteSize::bytes).unwrap_or(0)
    }
}

/// Marks a keyed spec hash (`DepartmentSpec::container_hash`).
pub const KEYED_PREFIX: &str = "k1-";

/// The node's secret key for spec hashes (`<state_dir>/spec-hash.key`). It is
/// kept apart from `state.db`, so a lost or unreadable store still finds
/// every container's hash checkable and adopts it.
#[derive(Clone)]
pub struct HashKey(std::sync::Arc<[u8; 32]>);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(std::sync::Arc::new(bytes))
    }

    /// The key in its file's form: 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
        Some(Self::from_bytes(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(*self.0)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    if bytes.len() < 2 || bytes.len() > 32 {
        return false;
    }
    let first_ok = bytes[0].is_ascii_lowercase();
    let last = bytes[bytes.len() - 1];
    let last_ok = last.is_ascii_lowercase() || last.is_ascii_digit();
    first_ok
        && last_ok
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    name.len() <= 256 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Docker's network name rule, minus the networks that would undo the
/// isolation (`host`, `none`) or the default bridge's shared segment.
pub fn validate_network_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok
        || name.len() > 64
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "`{}` is not a Docker network name (a-z, A-Z, 0-9, '_', '.', '-', starting with a letter or digit, at most 64)",
            name.escape_debug()
        ));
    }
    if matches!(name, "host" | "none" | "bridge" | "default") {
        return Err(format!(
            "`{name}` is Docker's own network, where departments are not isolated; name a bridge network such as \"aio_network\""
        ));
    }
    Ok(())
}

/// A capability as Docker names it without the `CAP_` prefix.
pub fn validate_capability(cap: &str) -> Result<(), String> {
    if cap.eq_ignore_ascii_case("ALL") {
        return Err("ALL undoes the hardening; name the capabilities needed".into());
    }
    let ok = !cap.is_empty()
        && cap.len() <= 32
        && !cap.starts_with("CAP_")
        && cap.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a capability name such as \"NET_BIND_SERVICE\" (upper case, no CAP_ prefix)",
            cap.escape_debug()
        ))
    }
}

fn validate_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("must name an image, such as \"registry.example.com/aio-agent:1.4.2\"".into());
    }
    if image.len() > 512 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{}` is not an image reference (no spaces or control characters, at most 512 characters)",
            image.escape_debug()
        ));
    }
    Ok(())
}

/// The probe always targets the department's own port on loopback, so the path
/// must be a plain absolute path: no scheme, no authority, nothing that could
/// turn it into a request to another host or smuggle a header.
pub fn validate_probe_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "`{}` must be an absolute path such as \"/health\"; the probe always targets the department's own port",
            path.escape_debug()
        ));
    }
    if path.starts_with("//") {
        return Err("must not start with \"//\" (that names another host)".into());
    }
    if path.contains("://") {
        return Err("must be a path, not a URL".into());
    }
    if path.len() > 1024 {
        return Err("must be at most 1024 characters".into());
    }
    if let Some(bad) = path
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || *c == '\\' || *c == '#')
    {
        return Err(format!(
            "contains {:?}, which a probe path may not contain",
            bad
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reservation_left_out_keeps_the_hash_of_specs_written_before_it() {
        // The digest the build before memory_reservation gave this spec: an
        // upgrade must not replace every running container.
        let spec = DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"a:1\"\n").unwrap();
        assert_eq!(spec.legacy_container_hash(8001), "b7907964540c6a372eb09f24");
        let reserved = DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"a:1\"\n[resources]\nmemory = \"64MiB\"\nmemory_reservation = \"32MiB\"\n",
        )
        .unwrap();
        assert_eq!(
            reserved.legacy_container_hash(8001),
            "4649b254a14d38afae94faf2"
        );
        let over = DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"a:1\"\n[resources]\nmemory = \"64MiB\"\nmemory_reservation = \"65MiB\"\n",
        )
        .unwrap_err();
        assert!(
            over.to_string().contains("resources.memory_reservation"),
            "{over}"
        );
    }

    fn minimal() -> DepartmentSpec {
        DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"aio:1\"\n").unwrap()
    }

    #[test]
    fn defaults_follow_the_seed() {
        let spec = minimal();
        assert_eq!(spec.container_port, 8080);
        assert_eq!(spec.health.path, "/health");
        assert_eq!(spec.health.interval, Duration::from_secs(30));
        assert_eq!(spec.health.retries, 3);
        assert_eq!(spec.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(spec.restart.backoff, Duration::from_secs(1));
    }

    #[test]
    fn bad_ids_are_refused_by_field() {
        for id in [
            "../x",
            "A",
            "x",
            "-ab",
            "ab-",
            "a_b",
            "abcdefghijabcdefghijabcdefghijabc",
        ] {
            let text = format!("id = {id:?}\nimage = \"aio:1\"\n");
            let err = DepartmentSpec::from_toml("t", &text).unwrap_err();
            assert_eq!(err.fields()[0].field, "id", "{id}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key() {
        let err =
            DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"a\"\ncolour = 1\n").unwrap_err();
        assert_eq!(err.fields()[0].field, "colour");
    }

    #[test]
    fn probe_paths_cannot_leave_the_department() {
        for bad in [
            "http://169.254.169.254/",
            "//evil/",
            "/a\r\nHost: x",
            "health",
            "/a b",
        ] {
            assert!(validate_probe_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_probe_path("/health?full=1").is_ok());
    }

    #[test]
    fn secrets_never_print_and_redact() {
        let mut spec = minimal();
        spec.secrets
            .insert("DB_PASSWORD".into(), Secret::new("canary-123"));
        assert!(!format!("{spec:?}").contains("canary-123"));
        let shown = serde_json::to_string(&spec.redacted()).unwrap();
        assert!(!shown.contains("canary-123"));
        assert!(shown.contains(MASK));
    }

    #[test]
    fn hash_ignores_probe_settings_but_not_env() {
        let key = HashKey::from_bytes([7; 32]);
        let a = minimal();
        let mut b = a.clone();
        b.health.interval = Duration::from_secs(5);
        assert_eq!(a.container_hash(8001, &key), b.container_hash(8001, &key));
        b.env.insert("X".into(), "1".into());
        assert_ne!(a.container_hash(8001, &key), b.container_hash(8001, &key));
        assert_ne!(a.container_hash(8001, &key), a.container_hash(8002, &key));
    }

    #[test]
    fn without_the_key_a_secret_guess_cannot_be_tested_against_the_hash() {
        let with_secret = |value: &str| {
            DepartmentSpec::from_toml(
                "t",
                &format!("id = \"hr\"\nimage = \"aio:1\"\n[secrets]\nDB_PASSWORD = \"{value}\"\n"),
            )
            .unwrap()
        };
        let spec = with_secret("hunter2");
        let node = HashKey::from_bytes([1; 32]);
        let shown = spec.container_hash(8001, &node);
        assert!(shown.starts_with(KEYED_PREFIX), "{shown}");
        // An outsider knows every other input (the label, the API) and guesses
        // the secret right, but has no key: the unkeyed digest or any other
        // key gives something else.
        let guess = with_secret("hunter2");
        assert_ne!(guess.legacy_container_hash(8001), shown);
        assert_ne!(
            guess.container_hash(8001, &HashKey::from_bytes([0; 32])),
            shown
        );
        assert_eq!(guess.container_hash(8001, &node), shown);
        // A rotated secret still changes it.
        assert_ne!(with_secret("hunter3").container_hash(8001, &node), shown);
    }

    #[test]
    fn a_container_of_an_earlier_version_matches_by_its_unkeyed_hash() {
        let key = HashKey::from_bytes([3; 32]);
        let spec = minimal();
        assert!(spec.hash_matches(&spec.legacy_container_hash(8001), 8001, &key));
        assert!(spec.hash_matches(&spec.container_hash(8001, &key), 8001, &key));
        assert!(!spec.hash_matches(&spec.legacy_container_hash(8002), 8001, &key));
        let other = HashKey::from_bytes([4; 32]);
        assert!(!spec.hash_matches(&spec.container_hash(8001, &other), 8001, &key));
        assert_eq!(HashKey::parse(&key.to_hex()).unwrap().bytes(), key.bytes());
        assert!(HashKey::parse("abc").is_none());
    }

    #[test]
    fn absurd_durations_and_sizes_are_refused_naming_the_field() {
        for (extra, field) in [
            (
                "[restart]\nbackoff = \"500000000000y\"\nbackoff_max = \"500000000000y\"\n",
                "restart.backoff",
            ),
            ("[restart]\nbackoff_max = \"2d\"\n", "restart.backoff_max"),
            ("[restart]\nwindow = \"8d\"\n", "restart.window"),
            (
                "[restart]\nupdate_deadline = \"2h\"\n",
                "restart.update_deadline",
            ),
            ("[restart]\nmax_retries = 100000\n", "restart.max_retries"),
            ("[health]\ninterval = \"100y\"\n", "health.interval"),
            ("[health]\nstart_period = \"2h\"\n", "health.start_period"),
            ("[resources]\nmemory = \"17TiB\"\n", "resources.memory"),
        ] {
            let text = format!("id = \"hr\"\nimage = \"aio:1\"\n{extra}");
            let err = DepartmentSpec::from_toml("t", &text).unwrap_err();
            assert!(
                err.fields().iter().any(|f| f.field == field),
                "{extra}: {err}"
            );
        }
        let mut spec = minimal();
        spec.env
            .insert("BIG".into(), "x".repeat(MAX_VALUE_BYTES + 1));
        assert_eq!(spec.validate().unwrap_err()[0].field, "env.BIG");
        // The longest allowed still fit in an Instant and in Docker's i64.
        let text = "id = \"hr\"\nimage = \"aio:1\"\n[resources]\nmemory = \"16TiB\"\n[restart]\nbackoff = \"1h\"\nbackoff_max = \"1d\"\nwindow = \"7d\"\n";
        let spec = DepartmentSpec::from_toml("t", text).unwrap();
        assert!(i64::try_from(spec.memory_bytes()).is_ok());
        assert!(std::time::Instant::now()
            .checked_add(spec.restart.window)
            .is_some());
    }

    #[test]
    fn json_round_trip_keeps_durations_readable() {
        let spec = minimal();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"30s\""));
        let back = DepartmentSpec::from_json("t", &json).unwrap();
        assert_eq!(back, spec);
    }
}
