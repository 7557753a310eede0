//! Host resources, sampled in the background (sysinfo) so that readers of
//! `/v1/node` and `/metrics` never wait on a refresh.

use fleet_model::api::HostResources;
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct HostSampler {
    latest: Arc<RwLock<HostSample>>,
}

#[derive(Debug, Clone, Default)]
pub struct HostSample {
    pub resources: HostResources,
    pub cpu_usage_percent: f32,
    pub load_average_5m: f64,
    pub load_average_15m: f64,
}

impl HostSampler {
    pub fn start(interval: Duration) -> Self {
        let sampler = Self::default();
        let latest = sampler.latest.clone();
        let mut system = sysinfo::System::new();
        refresh(&mut system, &latest);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                refresh(&mut system, &latest);
            }
        });
        sampler
    }

    pub fn snapshot(&self) -> HostResources {
        self.sample().resources
    }

    pub fn sample(&self) -> HostSample {
        self.latest.read().map(|s| s.clone()).unwrap_or_default()
    }
}

fn refresh(system: &mut sysinfo::System, latest: &RwLock<HostSample>) {
    system.refresh_memory();
    system.refresh_cpu_usage();
    let load = sysinfo::System::load_average();
    let sample = HostSample {
        resources: HostResources {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_total_bytes: system.total_memory(),
            memory_available_bytes: system.available_memory(),
            load_average_1m: load.one,
        },
        cpu_usage_percent: system.global_cpu_usage(),
        load_average_5m: load.five,
        load_average_15m: load.fifteen,
    };
    if let Ok(mut guard) = latest.write() {
        *guard = sample;
    }
}

/// Total memory, read once at start for the capacity check.
pub fn total_memory_bytes() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.total_memory()
}

/// True when the kernel's log holds an OOM kill inside the memory cgroup of
/// `container_id` (its `oom-kill:` line names the cgroup, which carries the full
/// container id under both the cgroupfs and the systemd driver) since the run
/// that began at `run_started_unix` (a restarted container keeps its id, so an
/// older run's OOM must not count; unknown start: the last 30 seconds).
///
/// Docker's own OOM report (the `OOMKilled` flag and `oom` event) depends on
/// containerd noticing the cgroup's OOM before the cgroup is gone, and under
/// load it misses it: the container then looks like a plain `SIGKILL` (137).
/// The kernel's record does not race. Reading `/dev/kmsg` needs root or
/// CAP_SYSLOG when `kernel.dmesg_restrict` is set; without it this says false
/// and the exit is reported as an exit, as before.
pub fn kernel_reports_oom_kill(container_id: &str, run_started_unix: Option<i64>) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    if container_id.len() < 12 || !container_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    // Record timestamps are microseconds of the monotonic clock; place the run's
    // start on that clock, two seconds early for the whole-second start time.
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let age_seconds = run_started_unix.map_or(30, |started| (now_unix - started).max(0) + 2);
    let Ok(monotonic) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) else {
        return false;
    };
    let now_us = monotonic.tv_sec() * 1_000_000 + monotonic.tv_nsec() / 1_000;
    let since_us = now_us - age_seconds * 1_000_000;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    // Each read returns one record (at most 8 KiB with its continuation lines).
    let mut record = vec![0u8; 16 * 1024];
    let mut found = false;
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&record[..n]);
                if let Some((header, message)) = text.split_once(';') {
                    let at_us = header
                        .split(',')
                        .nth(2)
                        .and_then(|ts| ts.parse::<i64>().ok())
                        .unwrap_or(0);
                    if at_us >= since_us
                        && message.starts_with("oom-kill:")
                        && oom_record_names(message, container_id)
                    {
                        found = true;
                    }
                }
            }
            // Records overwritten while we read: go on with the next one.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            // EAGAIN: the end of the buffer; anything else: nothing more to learn.
            Err(_) => break,
        }
    }
    found
}

/// Whether an `oom-kill:` record's `oom_memcg=` names the container's cgroup.
fn oom_record_names(message: &str, container_id: &str) -> bool {
    message
        .split(',')
        .filter_map(|field| field.strip_prefix("oom_memcg="))
        .any(|memcg| memcg.contains(container_id))
}

#[cfg(test)]
mod oom_tests {
    use super::oom_record_names;

    const ID: &str = "56c80135220bee6015d90240a0ab3ef0e5c54622b4ed52afb254623117c981b8";

    #[test]
    fn oom_records_are_matched_by_the_memcg_under_both_cgroup_drivers() {
        let cgroupfs = format!("oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={ID},mems_allowed=0,oom_memcg=/docker/{ID},task_memcg=/docker/{ID},task=test-agent,pid=9788,uid=0");
        let systemd = format!("oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/system.slice/docker-{ID}.scope,task_memcg=/system.slice/docker-{ID}.scope,task=x,pid=1,uid=0");
        assert!(oom_record_names(&cgroupfs, ID));
        assert!(oom_record_names(&systemd, ID));
        // Another container's kill, even when this one's id is elsewhere in the line.
        let other = cgroupfs.replace(
            &format!("oom_memcg=/docker/{ID}"),
            "oom_memcg=/docker/0123abcd",
        );
        assert!(!oom_record_names(&other, ID));
    }
}
