//! PostgreSQL WAL archiving for fleet-agent: push/fetch with a look-ahead
//! uploader and prefetch, file and S3 targets, base backups, point-in-time
//! restore, retention, status and metrics. The daemon owns the process and the
//! socket; this crate owns everything about the archive.

pub mod backup;
pub mod codec;
pub mod drill;
pub mod http;
pub mod names;
pub mod pg;
pub mod service;
pub mod target;
pub mod times;
pub mod verify;

pub use service::{EventSink, Fetched, PushOutcome, WalError, WalService};
