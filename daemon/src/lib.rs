//! fleet-agentd: keeps the department containers of this host equal to the
//! desired state. `run` wires the pieces; each module's header says what it owns.

pub mod admission;
pub mod api;
pub mod coordinator;
pub mod desired;
pub mod drain;
pub mod events;
/// In-memory engine for tests (also for `tests/` with the `fake-runtime` feature).
#[cfg(any(test, feature = "fake-runtime"))]
pub mod fake_runtime;
pub mod hardening;
pub mod host;
pub mod imagegc;
pub mod logging;
pub mod metrics;
pub mod ports;
pub mod process;
pub mod pull_progress;
pub mod recovery;
pub mod restart;
pub mod runtime;
pub mod snapshot;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod usage;
pub mod walfiles;
pub mod walserve;

mod daemon;
pub use daemon::{check_config, run, CheckScope, RunError};
pub use walserve::serve as wal_serve;

/// The runtime both binaries run their service on (fleet-agentd `run` and
/// `wal-serve`, fleet-agent-wal): two workers, as the host's budget for the
/// agent is small and the blocking pool takes the CPU-bound encodes.
pub fn service_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
