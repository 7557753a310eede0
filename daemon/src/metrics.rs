//! `/metrics` in Prometheus text format, rendered from the status board and the
//! counters: nothing here waits on Docker. The seed's alert rules need
//! `agent_health_checks_total` and `agent_health_check_failures_total`; every
//! other name is under `fleet_agent_`. Labels come from bounded sets (department
//! ids, states, reasons), never from env or secret values.

use crate::snapshot::NodeSnapshot;
use crate::supervisor::board::DeptView;
use crate::usage::UsageCache;
use fleet_model::api::DeptState;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// A subsystem's contribution to `/metrics` (WAL, coordinator): appends whole
/// families (`# HELP`, `# TYPE`, samples) under `fleet_agent_<subsystem>_`.
/// Push one onto `ApiState::extra_metrics` at start-up; `/metrics` calls each
/// after the daemon's own families, so it must be cheap and never wait.
pub type MetricsSource = std::sync::Arc<dyn Fn(&mut String) + Send + Sync>;

pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family of one unlabelled sample: its header and its value.
pub(crate) fn single(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// Renders the daemon's own families from one snapshot and the stats cache.
pub fn render(snap: &NodeSnapshot, usage: &UsageCache) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let board = &snap.departments;

    header(
        &mut out,
        "agent_health_checks_total",
        "counter",
        "Health probes run per department.",
    );
    for (id, v) in board {
        let _ = writeln!(
            out,
            "agent_health_checks_total{{department=\"{id}\"}} {}",
            v.probe_total
        );
    }
    header(
        &mut out,
        "agent_health_check_failures_total",
        "counter",
        "Health probes that failed per department.",
    );
    for (id, v) in board {
        let _ = writeln!(
            out,
            "agent_health_check_failures_total{{department=\"{id}\"}} {}",
            v.probe_failures
        );
    }
    header(
        &mut out,
        "fleet_agent_department_up",
        "gauge",
        "1 when the department's container is running.",
    );
    for (id, v) in board {
        let up = u8::from(crate::usage::running(v));
        let _ = writeln!(out, "fleet_agent_department_up{{department=\"{id}\"}} {up}");
    }
    header(
        &mut out,
        "fleet_agent_department_healthy",
        "gauge",
        "1 healthy, 0 unhealthy, -1 unknown or disabled.",
    );
    for (id, v) in board {
        let value = match v.health {
            fleet_model::api::Health::Healthy => 1,
            fleet_model::api::Health::Unhealthy => 0,
            _ => -1,
        };
        let _ = writeln!(
            out,
            "fleet_agent_department_healthy{{department=\"{id}\"}} {value}"
        );
    }
    header(
        &mut out,
        "fleet_agent_department_state",
        "gauge",
        "1 for the department's current state.",
    );
    for (id, v) in board {
        for s in DeptState::ALL {
            let _ = writeln!(
                out,
                "fleet_agent_department_state{{department=\"{id}\",state=\"{}\"}} {}",
                s.as_str(),
                u8::from(v.state == s)
            );
        }
    }
    header(
        &mut out,
        "fleet_agent_department_drain_connections",
        "gauge",
        "Established connections of the port draining now, where they can be counted.",
    );
    for (id, v) in board {
        if let Some(d) = v.drain.as_ref().filter(|d| d.took.is_none()) {
            if let Some(n) = d.connections {
                let _ = writeln!(
                    out,
                    "fleet_agent_department_drain_connections{{department=\"{id}\",slot=\"{}\"}} {n}",
                    d.slot.as_str()
                );
            }
        }
    }
    header(
        &mut out,
        "fleet_agent_department_drain_seconds",
        "gauge",
        "How long the drain in progress has taken, or the last one took.",
    );
    let now = std::time::Instant::now();
    for (id, v) in board {
        if let Some(d) = &v.drain {
            let _ = writeln!(
                out,
                "fleet_agent_department_drain_seconds{{department=\"{id}\",slot=\"{}\",active=\"{}\"}} {:.3}",
                d.slot.as_str(),
                d.took.is_none(),
                d.seconds(now)
            );
        }
    }
    header(
        &mut out,
        "fleet_agent_department_restarts_total",
        "counter",
        "Restarts by the daemon, by reason.",
    );
    for (id, v) in board {
        for reason in ["exit", "oom", "unhealthy", "lost"] {
            let n = v.restarts_by_reason.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "fleet_agent_department_restarts_total{{department=\"{id}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    header(
        &mut out,
        "fleet_agent_probe_duration_seconds",
        "histogram",
        "Health probe latency.",
    );
    for (id, v) in board {
        let h = &v.probe_latency_histogram;
        for (bound, count) in crate::supervisor::probe::LATENCY_BUCKETS
            .iter()
            .zip(h.buckets.iter())
        {
            let _ = writeln!(
                out,
                "fleet_agent_probe_duration_seconds_bucket{{department=\"{id}\",le=\"{bound}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "fleet_agent_probe_duration_seconds_bucket{{department=\"{id}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "fleet_agent_probe_duration_seconds_sum{{department=\"{id}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "fleet_agent_probe_duration_seconds_count{{department=\"{id}\"}} {}",
            h.count
        );
    }

    let c = &snap.counts;
    header(
        &mut out,
        "fleet_agent_reconcile_runs_total",
        "counter",
        "Full resyncs against Docker.",
    );
    let _ = writeln!(out, "fleet_agent_reconcile_runs_total {}", c.reconcile_runs);
    single(
        &mut out,
        "fleet_agent_reconcile_duration_seconds_total",
        "counter",
        "Time spent in full resyncs.",
        c.reconcile_seconds,
    );
    single(
        &mut out,
        "fleet_agent_docker_event_stream_reconnects_total",
        "counter",
        "Reconnects of the Docker event stream.",
        c.event_stream_reconnects,
    );
    single(
        &mut out,
        "fleet_agent_docker_events_dropped_total",
        "counter",
        "Docker events not handed to a department whose mailbox was full (the next resync covers them).",
        c.events_dropped,
    );
    let ages = snap.heartbeat;
    header(
        &mut out,
        "fleet_agent_loop_heartbeat_age_seconds",
        "gauge",
        "Time since the Docker event loop and the resync loop last proved they run; the systemd watchdog is fed only while both are fresh.",
    );
    let _ = writeln!(
        out,
        "fleet_agent_loop_heartbeat_age_seconds{{loop=\"event\"}} {}",
        ages.event_loop.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "fleet_agent_loop_heartbeat_age_seconds{{loop=\"resync\"}} {}",
        ages.resync.as_secs_f64()
    );
    header(
        &mut out,
        "fleet_agent_state_rebuilt",
        "gauge",
        "1 when this run found state.db missing or unreadable and rebuilt the node from Docker's labels (reason: missing, corrupt).",
    );
    match &snap.state_rebuilt {
        Some(rebuilt) => {
            let _ = writeln!(
                out,
                "fleet_agent_state_rebuilt{{reason=\"{}\"}} 1",
                rebuilt.reason
            );
        }
        None => {
            let _ = writeln!(out, "fleet_agent_state_rebuilt{{reason=\"none\"}} 0");
        }
    }
    header(
        &mut out,
        "fleet_agent_docker_up",
        "gauge",
        "1 when the Docker engine answers.",
    );
    let _ = writeln!(out, "fleet_agent_docker_up {}", u8::from(snap.docker_up));

    let sample = &snap.host;
    single(
        &mut out,
        "fleet_agent_host_memory_total_bytes",
        "gauge",
        "Host memory.",
        sample.resources.memory_total_bytes,
    );
    single(
        &mut out,
        "fleet_agent_host_memory_available_bytes",
        "gauge",
        "Host memory available.",
        sample.resources.memory_available_bytes,
    );
    header(
        &mut out,
        "fleet_agent_host_load1",
        "gauge",
        "Host load average over 1 minute.",
    );
    let _ = writeln!(
        out,
        "fleet_agent_host_load1 {}",
        sample.resources.load_average_1m
    );
    single(
        &mut out,
        "fleet_agent_host_cpu_usage_ratio",
        "gauge",
        "Host CPU busy share, 0-1.",
        sample.cpu_usage_percent as f64 / 100.0,
    );

    header(
        &mut out,
        "fleet_agent_departments",
        "gauge",
        "Departments on this node.",
    );
    let _ = writeln!(out, "fleet_agent_departments {}", board.len());
    header(
        &mut out,
        "fleet_agent_departments_max",
        "gauge",
        "max_departments of this node.",
    );
    let _ = writeln!(out, "fleet_agent_departments_max {}", snap.max_departments);
    if let Some((low, high)) = snap.port_range {
        let leased = board
            .values()
            .filter(|v| v.host_port >= low && v.host_port <= high)
            .count();
        let size = usize::from(high - low) + 1;
        single(
            &mut out,
            "fleet_agent_port_pool_free",
            "gauge",
            "Pool ports not leased to a department.",
            size.saturating_sub(leased),
        );
        header(
            &mut out,
            "fleet_agent_port_pool_size",
            "gauge",
            "Ports in the pool.",
        );
        let _ = writeln!(out, "fleet_agent_port_pool_size {size}");
    }
    render_usage(&mut out, usage, board);
    render_daemon(&mut out, snap, sample);
    out
}

/// Container CPU and memory from the stats cache (`usage.rs`), disks, and the
/// collector's own figures. A department without a sample yet (just started,
/// or not running) has no series here rather than a made-up zero.
fn render_usage(out: &mut String, usage: &UsageCache, board: &BTreeMap<String, DeptView>) {
    let samples = usage.current(board);
    header(
        out,
        "fleet_agent_department_cpu_seconds_total",
        "counter",
        "CPU time of the department's current container (resets when it is replaced).",
    );
    for (id, s) in &samples {
        let _ = writeln!(
            out,
            "fleet_agent_department_cpu_seconds_total{{department=\"{id}\"}} {}",
            s.stats.cpu_seconds
        );
    }
    header(
        out,
        "fleet_agent_department_memory_bytes",
        "gauge",
        "Memory of the department's container, page cache excluded (as docker stats shows it).",
    );
    for (id, s) in &samples {
        let _ = writeln!(
            out,
            "fleet_agent_department_memory_bytes{{department=\"{id}\"}} {}",
            s.stats.memory_bytes
        );
    }
    header(
        out,
        "fleet_agent_department_memory_limit_bytes",
        "gauge",
        "Memory limit of the department's container (the host's memory when it has none).",
    );
    for (id, s) in &samples {
        let _ = writeln!(
            out,
            "fleet_agent_department_memory_limit_bytes{{department=\"{id}\"}} {}",
            s.stats.memory_limit_bytes
        );
    }

    let disks = usage.disks();
    header(
        out,
        "fleet_agent_host_disk_total_bytes",
        "gauge",
        "Size of the filesystem holding the state directory (volume=state) or Docker's data root (volume=docker).",
    );
    for d in &disks {
        let _ = writeln!(
            out,
            "fleet_agent_host_disk_total_bytes{{volume=\"{}\"}} {}",
            d.volume, d.total_bytes
        );
    }
    header(
        out,
        "fleet_agent_host_disk_available_bytes",
        "gauge",
        "Space available to unprivileged users on that filesystem.",
    );
    for d in &disks {
        let _ = writeln!(
            out,
            "fleet_agent_host_disk_available_bytes{{volume=\"{}\"}} {}",
            d.volume, d.available_bytes
        );
    }

    let c = &usage.counters;
    single(
        out,
        "fleet_agent_stats_collections_total",
        "counter",
        "Runs of the container stats collector (every stats_interval).",
        c.runs.load(Ordering::Relaxed),
    );
    single(
        out,
        "fleet_agent_stats_collection_errors_total",
        "counter",
        "Container stats calls that failed or timed out.",
        c.errors.load(Ordering::Relaxed),
    );
    single(
        out,
        "fleet_agent_stats_collection_duration_seconds",
        "gauge",
        "Duration of the last stats collection run.",
        c.last_duration_micros.load(Ordering::Relaxed) as f64 / 1e6,
    );
}

fn render_daemon(out: &mut String, snap: &NodeSnapshot, sample: &crate::host::HostSample) {
    if let Some(process) = crate::process::sample() {
        crate::process::render(out, &process);
    }
    header(
        out,
        "fleet_agent_host_load5",
        "gauge",
        "Host load average over 5 minutes.",
    );
    let _ = writeln!(out, "fleet_agent_host_load5 {}", sample.load_average_5m);
    header(
        out,
        "fleet_agent_host_load15",
        "gauge",
        "Host load average over 15 minutes.",
    );
    let _ = writeln!(out, "fleet_agent_host_load15 {}", sample.load_average_15m);
    header(
        out,
        "fleet_agent_host_cpus",
        "gauge",
        "CPUs available to the daemon.",
    );
    let _ = writeln!(out, "fleet_agent_host_cpus {}", sample.resources.cpus);
    header(
        out,
        "fleet_agent_build_info",
        "gauge",
        "Always 1; the daemon's version and mode as labels.",
    );
    let mode = snap.mode.as_str();
    let _ = writeln!(
        out,
        "fleet_agent_build_info{{version=\"{}\",mode=\"{mode}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    single(
        out,
        "fleet_agent_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        snap.uptime.as_secs_f64(),
    );
}
