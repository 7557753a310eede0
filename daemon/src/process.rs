//! The daemon's own figures under Prometheus' standard `process_*` names (RSS,
//! CPU, open fds), read from `/proc/self` at scrape time: a few small reads, no
//! Docker, so a scrape still never waits.

use std::fmt::Write;

/// What `/proc/self` says about this process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Parses `/proc/self/stat`: fields after the command name (which may hold
/// spaces and parentheses, so split after its last `)`), with clock ticks per
/// second, the page size and the boot time (Unix seconds, `btime` of `/proc/stat`).
pub fn parse_stat(stat: &str, ticks: f64, page_size: u64, boot_time: u64) -> Option<ProcessSample> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state) of proc(5).
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let utime = field(14)?;
    let stime = field(15)?;
    Some(ProcessSample {
        cpu_seconds: (utime + stime) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
        open_fds: None,
        max_fds: None,
    })
}

/// `btime` of `/proc/stat`.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// This process now; `None` off Linux or when `/proc` cannot be read.
pub fn sample() -> Option<ProcessSample> {
    use nix::unistd::{sysconf, SysconfVar};
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let mut s = parse_stat(
        &std::fs::read_to_string("/proc/self/stat").ok()?,
        ticks,
        page,
        boot,
    )?;
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    s.max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    Some(s)
}

/// The `process_*` families of `s`.
pub fn render(out: &mut String, s: &ProcessSample) {
    let mut family = |name: &str, kind: &str, help: &str, value: String| {
        crate::metrics::header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time of fleet-agentd in seconds.",
        s.cpu_seconds.to_string(),
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of fleet-agentd in bytes.",
        s.resident_bytes.to_string(),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory of fleet-agentd in bytes.",
        s.virtual_bytes.to_string(),
    );
    family(
        "process_threads",
        "gauge",
        "Threads of fleet-agentd.",
        s.threads.to_string(),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of fleet-agentd since the Unix epoch in seconds.",
        s.start_time_seconds.to_string(),
    );
    if let Some(fds) = s.open_fds {
        family(
            "process_open_fds",
            "gauge",
            "Open file descriptors of fleet-agentd.",
            fds.to_string(),
        );
    }
    if let Some(max) = s.max_fds {
        family(
            "process_max_fds",
            "gauge",
            "The file descriptor limit (soft) of fleet-agentd.",
            max.to_string(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis must not shift fields.
        let stat = "4242 (fleet (agent) d) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert!(parse_stat("garbage", 100.0, 4096, 0).is_none());
    }

    #[test]
    fn this_process_is_sampled_and_rendered() {
        let s = sample().expect("/proc/self is readable on Linux");
        assert!(s.resident_bytes > 0 && s.threads >= 1, "{s:?}");
        assert!(s.open_fds.is_some_and(|n| n >= 3), "{s:?}");
        let mut out = String::new();
        render(&mut out, &s);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name}: {out}");
        }
    }
}
