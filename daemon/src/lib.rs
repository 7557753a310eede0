//! fleet-agentd: keeps the department containers of this host equal to the
//! desired state. `run` wires the pieces; each module's header says what it owns.

pub mod admission;
pub mod api;
pub mod coordinator;
pub mod desired;
pub mod events;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod restart;
pub mod runtime;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod usage;

mod daemon;
pub use daemon::{check_config, run, CheckScope, RunError};
