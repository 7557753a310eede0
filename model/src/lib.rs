//! Types shared by `fleet-agentd`, `agentctl` and the tests, so the daemon and its
//! CLI can never drift apart. Pure data and validation: no I/O beyond reading a file
//! the caller names, no async, no Docker.

pub mod api;
pub mod archiving;
pub mod config;
pub mod located;
pub mod manpage;
pub mod reference;
pub mod size;
pub mod spec;

pub use config::{Config, ConfigError};
pub use spec::{DepartmentSpec, FieldError, SpecError};

/// Label keys that make Docker the source of truth about what runs.
pub mod labels {
    pub const MANAGED: &str = "fleet-agent.managed";
    pub const DEPARTMENT: &str = "fleet-agent.department";
    pub const SPEC_HASH: &str = "fleet-agent.spec-hash";
    pub const HOST_PORT: &str = "fleet-agent.host-port";
    /// `primary` for the serving container, `candidate` for an update under trial.
    pub const ROLE: &str = "fleet-agent.role";
    pub const NODE: &str = "fleet-agent.node";
    /// The department spec as JSON with every secret value masked, so a node
    /// that lost its store can rebuild the department from what runs (the
    /// secret values are taken back from the container's own environment).
    pub const SPEC: &str = "fleet-agent.spec";
    /// In `secrets_mode = "files"`: the directory (under the node's
    /// `[containers] secrets_dir`) holding this container's secret files.
    pub const SECRETS: &str = "fleet-agent.secrets";
}

/// The container name the seed's playbook used, kept so hosts migrate with no rename.
pub fn container_name(department_id: &str) -> String {
    format!("aio-{department_id}")
}

/// Name of the short-lived container that proves an update healthy before the swap.
pub fn candidate_container_name(department_id: &str) -> String {
    format!("aio-{department_id}-next")
}
