//! Progress of long operations the daemon reports (`Progress`): a bar per
//! operation when stderr is a terminal, plain lines on stdout otherwise (a log,
//! a pipe, Ansible), at most one a second per operation.

use fleet_model::api::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain line repeats for one operation.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

pub struct ProgressView {
    /// Set when drawing bars.
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
    printed: BTreeMap<String, Instant>,
    /// Without bars: print plain lines (not when stdout carries `--json`).
    plain: bool,
}

impl ProgressView {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        Self::with_bars(std::io::stderr().is_terminal(), true)
    }

    /// For a command whose stdout is `--json` when `json`: bars on a
    /// terminal, else nothing (a script reads the JSON).
    pub fn beside_json(json: bool) -> Self {
        Self::with_bars(std::io::stderr().is_terminal(), !json)
    }

    pub fn with_bars(bars: bool, plain: bool) -> Self {
        ProgressView {
            multi: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: BTreeMap::new(),
            printed: BTreeMap::new(),
            plain,
        }
    }

    /// A line of other output, printed above the bars.
    pub fn say(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => say!("{line}"),
        }
    }

    /// `key`'s operation moved on.
    pub fn update(&mut self, key: &str, progress: &Progress) {
        let Some(multi) = &self.multi else {
            if !self.plain {
                return;
            }
            let due = self
                .printed
                .get(key)
                .is_none_or(|at| at.elapsed() >= PLAIN_EVERY);
            if due {
                say!("{}", plain_line(key, progress));
                self.printed.insert(key.to_string(), Instant::now());
            }
            return;
        };
        let bar = self.bars.entry(key.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::no_length());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!(
                "{key}: {} {}",
                progress.operation, progress.subject
            ));
            bar
        });
        // Until every size is known the bar's end is what is known so far.
        bar.set_length(progress.total_bytes.unwrap_or(progress.done_bytes).max(1));
        bar.set_position(progress.done_bytes);
        bar.set_message(format!(
            "{}/s{}",
            crate::output::bytes(progress.bytes_per_second as u64),
            progress
                .detail
                .as_deref()
                .map(|d| format!(", {d}"))
                .unwrap_or_default()
        ));
    }

    /// `key`'s operation is over (done, failed or gone).
    pub fn done(&mut self, key: &str) {
        if let Some(bar) = self.bars.remove(key) {
            bar.finish_and_clear();
        }
        self.printed.remove(key);
    }
}

/// `hr: pull registry/app:2: 3.4MiB of 5.9MiB (58%), 875.0KiB/s, 0 of 2 layers downloaded`.
pub fn plain_line(key: &str, progress: &Progress) -> String {
    format!(
        "{key}: {} {}: {}",
        progress.operation,
        progress.subject,
        progress.line()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_has_bytes_rate_and_no_terminal_codes() {
        let p = Progress {
            operation: "pull".into(),
            subject: "reg/app:2".into(),
            done_bytes: 3 << 20,
            total_bytes: Some(6 << 20),
            bytes_per_second: 1024.0 * 1024.0,
            elapsed_seconds: 3.0,
            detail: Some("0 of 2 layers downloaded".into()),
        };
        let line = plain_line("hr", &p);
        assert_eq!(
            line,
            "hr: pull reg/app:2: 3.0MiB of 6.0MiB (50%), 1.0MiB/s, 0 of 2 layers downloaded"
        );
        assert!(!line.contains('\r') && !line.contains('\x1b'));
    }
}
