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

/// The exit status of a bad configuration or command line (sysexits'
/// EX_USAGE), the same for every fleet-agent program.
pub const EXIT_CONFIG: u8 = 64;

/// Runs a service to its end on the runtime both programs use (fleet-agentd
/// `run` and `wal-serve`, fleet-agent-wal): two workers, as the host's budget
/// for the agent is small and the blocking pool takes the CPU-bound encodes.
/// A failure is logged and printed under `program`'s name, and a problem the
/// operator fixes in a file (config, token, TLS) exits with [`EXIT_CONFIG`].
pub fn run_to_exit(
    program: &str,
    work: impl std::future::Future<Output = Result<(), RunError>>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{program}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{program} stopped.");
            eprintln!("{program}: {e}");
            match e {
                RunError::Config(_) | RunError::Token(_) | RunError::Tls(_) => {
                    ExitCode::from(EXIT_CONFIG)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
