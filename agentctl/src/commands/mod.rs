//! One file per verb.

pub mod apply;
pub mod control;
pub mod delete;
pub mod doctor;
pub mod events;
pub mod generate;
pub mod haproxy;
pub mod logs;
pub mod ports;
pub mod prepull;
pub mod show;
pub mod status;
pub mod top;
pub mod wal;

/// `--json` on every read command.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct JsonFlag {
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}
