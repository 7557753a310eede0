//! Acceptance tests of local metrics, alert rules, the dashboard and logging
//! (issue 5, tests 1-5), against a real daemon, a real Docker engine, the test
//! image and Prometheus' own `promtool` (scripts/test.sh `service_promtool`).
//!
//! Port ranges: 44000-44099, ten per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::coordinator::StubCoordinator;
use fleet_tests::serde_json::{json, Value};
use fleet_tests::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Time for departments to be created, started, probed and sampled on a busy host.
const UP: Duration = Duration::from_secs(120);

/// Every daemon here samples container stats every second, so a test does not
/// wait the default 10s for the first sample.
const FAST_STATS: &str = "stats_interval = \"1s\"";

/// GET over the daemon's unix socket (HTTP/1.0: the server closes when done).
fn socket_get(d: &TestDaemon, path: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(&d.socket).expect("connect to the control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

fn metrics(d: &TestDaemon) -> String {
    let (status, body) = socket_get(d, "/metrics");
    assert_eq!(status, 200, "GET /metrics on the socket: {body}");
    body
}

/// The value of the sample written exactly `series` (`name{labels}`), if any.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("/metrics has no sample {series}:\n{text}"))
}

/// Names of every sample in a `/metrics` text.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// Runs `promtool <args>` (with `stdin` piped in when given) and asserts it
/// succeeded with nothing to complain about.
fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> String {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (scripts/test.sh installs it: service_promtool)");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

fn packaging() -> std::path::PathBuf {
    workspace_root().join("packaging")
}

/// A spec probing every second; `restart` holds `[restart]` keys.
fn spec(
    id: &str,
    image: &str,
    env: &[(&str, &str)],
    secrets: &[(&str, &str)],
    restart: &str,
) -> String {
    let env: String = env.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
    let secrets: String = secrets
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}\n"))
        .collect();
    spec_toml_with_restart(
        id,
        image,
        &format!("[env]\n{env}[secrets]\n{secrets}"),
        &format!("stop_timeout = \"2s\"\n{restart}\n"),
    )
}

/// Test 1: one healthy, one crash-looping and one unhealthy department; the
/// text passes `promtool check metrics` and each shows its own values, on the
/// socket and on the TCP API alike.
#[test]
fn metrics_show_a_healthy_a_crash_looping_and_an_unhealthy_department() {
    let d = TestDaemon::start(TestOptions {
        name: "mt1",
        port_range: (44000, 44009),
        extra_toml: FAST_STATS.into(),
        ..Default::default()
    });
    let ok = d.dept("ok");
    let crash = d.dept("crash");
    let sick = d.dept("sick");
    let dir = d.specs_dir();
    d.write_spec(&ok, &spec(&ok, IMAGE_V1, &[], &[], ""));
    d.write_spec(
        &crash,
        &spec(
            &crash,
            IMAGE_V1,
            &[("CRASH_AFTER", "1s"), ("EXIT_CODE", "3")],
            &[],
            "max_retries = 2\nbackoff = \"1s\"\nwindow = \"10m\"",
        ),
    );
    // Policy `never` keeps an unhealthy container running and reported as such
    // (the default would restart it, and it would crash-loop too).
    d.write_spec(
        &sick,
        &spec(&sick, IMAGE_BAD, &[], &[], "policy = \"never\""),
    );
    d.apply(&dir);

    d.wait_running(&ok, UP);
    wait_until(UP, &format!("{crash} to be crash_looping"), || {
        d.summary(&crash)
            .is_some_and(|s| s["state"] == "crash_looping")
    });
    wait_until(UP, &format!("{sick} to be unhealthy"), || {
        d.summary(&sick).is_some_and(|s| s["health"] == "unhealthy")
    });
    let text = wait_for(UP, "container stats of the running departments", || {
        let text = metrics(&d);
        let sampled = |id: &str| {
            value(
                &text,
                &format!("fleet_agent_department_memory_bytes{{department=\"{id}\"}}"),
            )
            .is_some_and(|m| m > 0.0)
        };
        (sampled(&ok) && sampled(&sick)).then_some(text)
    });

    promtool(&["check", "metrics"], &packaging(), Some(&text));
    // The daemon's own process figures, under Prometheus' standard names.
    assert!(must(&text, "process_resident_memory_bytes") > 1e6);
    assert!(must(&text, "process_cpu_seconds_total") > 0.0);
    assert!(must(&text, "process_open_fds") >= 3.0);
    assert!(must(&text, "process_max_fds") >= must(&text, "process_open_fds"));

    let series =
        |name: &str, id: &str, extra: &str| format!("{name}{{department=\"{id}\"{extra}}}");
    // The healthy one.
    assert_eq!(
        must(&text, &series("fleet_agent_department_up", &ok, "")),
        1.0
    );
    assert_eq!(
        must(&text, &series("fleet_agent_department_healthy", &ok, "")),
        1.0
    );
    assert_eq!(
        must(
            &text,
            &series("fleet_agent_department_state", &ok, ",state=\"running\"")
        ),
        1.0
    );
    assert_eq!(
        must(
            &text,
            &series(
                "fleet_agent_department_state",
                &ok,
                ",state=\"crash_looping\""
            )
        ),
        0.0
    );
    let checks = must(&text, &series("agent_health_checks_total", &ok, ""));
    let failures = must(&text, &series("agent_health_check_failures_total", &ok, ""));
    assert!(
        checks >= 1.0,
        "{ok} was probed healthy, yet checks = {checks}"
    );
    assert!(
        failures < checks,
        "{ok}: {failures} failures of {checks} checks"
    );
    assert!(
        must(
            &text,
            &series("fleet_agent_probe_duration_seconds_count", &ok, "")
        ) >= 1.0
    );
    for reason in ["exit", "oom", "unhealthy", "lost"] {
        assert_eq!(
            must(
                &text,
                &series(
                    "fleet_agent_department_restarts_total",
                    &ok,
                    &format!(",reason=\"{reason}\"")
                )
            ),
            0.0,
            "{ok} never restarted"
        );
    }
    assert!(
        must(
            &text,
            &series("fleet_agent_department_cpu_seconds_total", &ok, "")
        ) > 0.0
    );
    assert!(
        must(
            &text,
            &series("fleet_agent_department_memory_limit_bytes", &ok, "")
        ) > 0.0
    );

    // The crash-looping one: started once, restarted max_retries = 2 times for
    // its exits, then parked; nothing runs, so it has no container figures.
    assert_eq!(
        must(
            &text,
            &series(
                "fleet_agent_department_state",
                &crash,
                ",state=\"crash_looping\""
            )
        ),
        1.0
    );
    assert_eq!(
        must(
            &text,
            &series("fleet_agent_department_state", &crash, ",state=\"running\"")
        ),
        0.0
    );
    assert_eq!(
        must(&text, &series("fleet_agent_department_up", &crash, "")),
        0.0
    );
    assert_eq!(
        must(
            &text,
            &series(
                "fleet_agent_department_restarts_total",
                &crash,
                ",reason=\"exit\""
            )
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            &series("fleet_agent_department_memory_bytes", &crash, "")
        ),
        None,
        "a parked department has no container to measure"
    );

    // The unhealthy one: running, every probe failed, reported unhealthy.
    assert_eq!(
        must(&text, &series("fleet_agent_department_up", &sick, "")),
        1.0
    );
    assert_eq!(
        must(&text, &series("fleet_agent_department_healthy", &sick, "")),
        0.0
    );
    assert_eq!(
        must(
            &text,
            &series("fleet_agent_department_state", &sick, ",state=\"running\"")
        ),
        1.0
    );
    let sick_checks = must(&text, &series("agent_health_checks_total", &sick, ""));
    let sick_failures = must(
        &text,
        &series("agent_health_check_failures_total", &sick, ""),
    );
    assert!(sick_failures >= 3.0, "{sick}: {sick_failures} failures");
    assert_eq!(sick_failures, sick_checks, "every probe of {sick} fails");

    // The node.
    assert_eq!(must(&text, "fleet_agent_departments"), 3.0);
    assert_eq!(must(&text, "fleet_agent_docker_up"), 1.0);
    assert_eq!(must(&text, "fleet_agent_port_pool_size"), 10.0);
    assert_eq!(must(&text, "fleet_agent_port_pool_free"), 7.0);
    assert!(must(&text, "fleet_agent_host_memory_total_bytes") > 0.0);
    assert!(must(&text, "fleet_agent_host_disk_total_bytes{volume=\"state\"}") > 0.0);
    assert!(
        must(
            &text,
            "fleet_agent_host_disk_total_bytes{volume=\"docker\"}"
        ) > 0.0
    );
    assert!(must(&text, "fleet_agent_reconcile_runs_total") >= 1.0);
    assert!(must(&text, "fleet_agent_stats_collections_total") >= 1.0);

    // The TCP API serves the same families (no token configured: loopback).
    let tcp = d.api_get("/metrics").expect("GET /metrics over TCP");
    assert_eq!(tcp.status, 200, "{}", tcp.body);
    assert_eq!(sample_names(&tcp.body), sample_names(&text));
    promtool(&["check", "metrics"], &packaging(), Some(&tcp.body));

    // `agentctl top` reads the same cache.
    let usage = d.agentctl_json(&["top"]);
    let row = |id: &str| {
        usage
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("top --json has no {id}: {usage}"))
    };
    assert!(row(&ok)["memory_bytes"].as_u64().unwrap_or(0) > 0);
    assert_eq!(row(&crash)["state"], "crash_looping");
    assert_eq!(row(&crash)["memory_bytes"], Value::Null);
    assert_eq!(row(&sick)["health"], "unhealthy");
    let table = d.agentctl_ok(&["top", "--once"]);
    assert!(
        table.starts_with("ID") && table.contains(&ok) && table.contains("CPU %"),
        "agentctl top --once:\n{table}"
    );
}

/// Test 2: the shipped alert rules are valid and their unit tests pass.
#[test]
fn alert_rules_pass_promtool_check_and_test() {
    let dir = packaging().join("prometheus");
    let checked = promtool(&["check", "rules", "fleet-agent-rules.yml"], &dir, None);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "fleet-agent-rules.test.yml"], &dir, None);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The seed's rule is there, on the seed's metric names.
    let rules = std::fs::read_to_string(dir.join("fleet-agent-rules.yml")).unwrap();
    assert!(rules.contains("alert: HighAgentFailureRate"));
    assert!(rules.contains(
        "(rate(agent_health_check_failures_total[5m]) / rate(agent_health_checks_total[5m])) > 0.05"
    ));
}

/// Every alert rule links its own section of docs/runbook.md, and the promtool
/// unit tests see every alert both firing and staying quiet.
#[test]
fn every_alert_has_a_runbook_section_and_tests_that_fire_and_stay_quiet() {
    let dir = packaging().join("prometheus");
    let rules = std::fs::read_to_string(dir.join("fleet-agent-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("fleet-agent-rules.test.yml")).unwrap();
    let runbook = std::fs::read_to_string(workspace_root().join("docs/runbook.md")).unwrap();
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    // (alert, runbook_url) in file order.
    let mut alerts: Vec<(String, Option<String>)> = Vec::new();
    for line in rules.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            alerts.push((name.trim().to_string(), None));
        } else if let Some(url) = line.strip_prefix("runbook_url: ") {
            alerts.last_mut().expect("runbook_url inside a rule").1 =
                Some(url.trim_matches('"').to_string());
        }
    }
    assert!(alerts.len() >= 20, "{alerts:?}");
    // (alert, fires) of every alert_rule_test entry.
    let mut cases: BTreeSet<(String, bool)> = BTreeSet::new();
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname: ") {
            let next = lines[i + 1..].iter().find(|l| !l.is_empty()).unwrap();
            cases.insert((name.to_string(), *next != "exp_alerts: []"));
        }
    }
    for (name, url) in &alerts {
        let url = url
            .as_deref()
            .unwrap_or_else(|| panic!("{name} has no runbook_url"));
        let anchor = url.rsplit_once("docs/runbook.md#").map(|(_, a)| a);
        assert_eq!(anchor, Some(name.to_lowercase().as_str()), "{name}: {url}");
        assert!(
            headings.contains(&name.to_lowercase()),
            "docs/runbook.md has no section `## {name}`"
        );
        assert!(
            cases.contains(&(name.clone(), true)),
            "no test sees {name} fire"
        );
        assert!(
            cases.contains(&(name.clone(), false)),
            "no test sees {name} stay quiet"
        );
    }
    for heading in &headings {
        assert!(
            alerts.iter().any(|(n, _)| n.to_lowercase() == *heading),
            "docs/runbook.md section `{heading}` has no alert"
        );
    }
}

/// Metric names (ours: `fleet_agent_*`, `agent_health_*`) in a PromQL text.
fn names_in_query(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in query.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("fleet_agent_") || word.starts_with("agent_health_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

/// Every string under an `expr`, `query` or `definition` key of a JSON value.
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queries(i, out)),
        _ => {}
    }
}

/// Names that are missing from a live `/metrics` for a good reason: each
/// exists only once what it measures has happened, which this test does not
/// do (a zero would be a false reading): the newest base backup's age after
/// the first base backup, the newest archived segment's age after the first
/// push, the verify and drill results after a verify and a drill
/// (tests/tests/wal.rs sees each appear). Every other name (the other WAL
/// figures included: the daemon below has `[wal]` configured) must be there.
const NOT_YET: &[&str] = &[
    "fleet_agent_wal_last_base_backup_age_seconds",
    "fleet_agent_wal_newest_archived_age_seconds",
    "fleet_agent_wal_verify_ok",
    // Only once a verify ran / with wal.verify_interval set (FleetWalVerifyOverdue).
    "fleet_agent_wal_verify_timestamp_seconds",
    "fleet_agent_wal_verify_interval_seconds",
    "fleet_agent_wal_drill_ok",
    // Once the schedule (every 10 s) or a status read PostgreSQL's settings.
    "fleet_agent_wal_archiving_problems",
];

/// Test 3: every metric the dashboard (and the alert rules) query is in the
/// live output of a coordinated daemon with WAL archiving, running a department.
#[test]
fn every_metric_the_dashboard_queries_is_in_the_live_output() {
    let stub = StubCoordinator::start();
    let archive = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(TestOptions {
        name: "mt3",
        port_range: (44010, 44019),
        extra_toml: format!(
            "{FAST_STATS}\n[coordinator]\nurl = \"{}\"\npoll_interval = \"1s\"\n\n[wal]\ntarget = \"file://{}\"\n",
            stub.url(),
            archive.path().display()
        ),
        ..Default::default()
    });
    let id = d.dept("web");
    stub.set_document(
        &d.node_id,
        1,
        json!([{
            "id": id,
            "image": IMAGE_V1,
            "health": {"path": "/health", "interval": "1s", "timeout": "500ms", "retries": 3, "start_period": "0s"},
            "restart": {"stop_timeout": "2s"},
        }]),
    );
    d.wait_running(&id, UP);
    let text = wait_for(
        UP,
        "a stats sample and a completed coordinator sync",
        || {
            let text = metrics(&d);
            (value(
                &text,
                &format!("fleet_agent_department_memory_bytes{{department=\"{id}\"}}"),
            )
            .is_some()
                && value(
                    &text,
                    "fleet_agent_coordinator_last_success_timestamp_seconds",
                )
                .is_some()
                && value(&text, "fleet_agent_applied_revision") == Some(1.0))
            .then_some(text)
        },
    );
    let live = sample_names(&text);
    // With the coordinator's and the WAL service's families in, too.
    promtool(&["check", "metrics"], &packaging(), Some(&text));

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging().join("grafana/fleet-agent.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut texts = Vec::new();
    queries(&dashboard, &mut texts);
    assert!(
        texts.len() > 20,
        "the dashboard has only {} queries",
        texts.len()
    );
    let rules =
        std::fs::read_to_string(packaging().join("prometheus/fleet-agent-rules.yml")).unwrap();
    texts.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:").map(str::to_string)),
    );
    let wanted: BTreeSet<String> = texts.iter().flat_map(|q| names_in_query(q)).collect();
    assert!(wanted.contains("agent_health_checks_total"));
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|n| !live.contains(*n) && !NOT_YET.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard or the rules but not in /metrics: {missing:?}\nlive names: {live:?}"
    );
    assert!(
        wanted.iter().any(|n| n.starts_with("fleet_agent_wal_")),
        "the dashboard shows no WAL figure"
    );
}

/// Test 4: a canary secret never appears in `/metrics`, the API or the logs.
#[test]
fn a_canary_secret_never_appears_in_metrics_or_logs() {
    let d = TestDaemon::start(TestOptions {
        name: "mt4",
        port_range: (44020, 44029),
        extra_toml: FAST_STATS.into(),
        log_level: "debug",
        ..Default::default()
    });
    let canary = format!("canary-{}", unique_name("s3cr3t"));
    let id = d.dept("sec");
    let path = d.write_spec(
        &id,
        &spec(
            &id,
            IMAGE_V1,
            &[("PLAIN", "visible")],
            &[("CANARY_TOKEN", &canary)],
            "",
        ),
    );
    d.apply(&path);
    let row = d.wait_running(&id, UP);
    // The container does get it.
    let port = row["host_port"].as_u64().unwrap() as u16;
    assert_eq!(http_get(port, "/env/CANARY_TOKEN").unwrap().body, "set");

    // A restart puts more of the department through the log.
    d.agentctl_ok(&["restart", &id]);
    d.wait_running(&id, UP);
    let text = wait_for(UP, "a stats sample", || {
        let text = metrics(&d);
        value(
            &text,
            &format!("fleet_agent_department_memory_bytes{{department=\"{id}\"}}"),
        )
        .is_some()
        .then_some(text)
    });
    let mut seen = vec![
        ("/metrics (socket)", text),
        ("/metrics (TCP)", d.api_get("/metrics").unwrap().body),
        ("/v1/usage", socket_get(&d, "/v1/usage").1),
        (
            "/v1/departments",
            socket_get(&d, &format!("/v1/departments/{id}")).1,
        ),
        ("/v1/events", socket_get(&d, "/v1/events").1),
        ("agentctl top", d.agentctl_ok(&["top", "--once"])),
        ("agentctl show", d.agentctl_ok(&["show", &id, "--json"])),
    ];
    let log = d.log_text();
    assert!(
        log.contains(&format!("\"department\":\"{id}\"")),
        "the daemon logged nothing about {id}:\n{log}"
    );
    seen.push(("the daemon log", log));
    for (what, text) in &seen {
        assert!(!text.is_empty(), "{what} is empty");
        assert!(
            !text.contains(&canary),
            "{what} contains the canary secret:\n{text}"
        );
    }
}

/// Test 5: with journald's socket absent, `--log-format journald` and `auto`
/// under systemd (JOURNAL_STREAM set) fall back to stderr and the daemon runs.
#[test]
fn without_journald_the_daemon_logs_to_stderr_and_runs() {
    const JOURNAL: &str = "/run/systemd/journal/socket";
    for format in ["journald", "auto"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let socket = root.join("agentctl.sock");
        std::fs::create_dir_all(root.join("departments.d")).unwrap();
        let config = root.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "node_id = \"{node}\"\nstate_dir = \"{state}\"\nsocket = \"{socket}\"\ndepartments_dir = \"{deps}\"\n\
                 [ports]\nrange = \"44030-44039\"\nbind = \"127.0.0.1\"\n[api]\nlisten = \"\"\n[log]\nformat = \"{format}\"\nlevel = \"info\"\n",
                node = unique_name("test-mt5"),
                state = root.join("state").display(),
                socket = socket.display(),
                deps = root.join("departments.d").display(),
            ),
        )
        .unwrap();
        let stderr_path = root.join("stderr.log");
        let daemon = bin_dir().join("fleet-agentd");
        // On a host with journald, hide its socket from this daemon alone: a
        // private mount namespace with an empty tmpfs over the journal's directory.
        let mut cmd = if Path::new(JOURNAL).exists() {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg("mount -t tmpfs tmpfs /run/systemd/journal && exec \"$0\" \"$@\"")
                .arg(&daemon);
            c
        } else {
            Command::new(&daemon)
        };
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .env("JOURNAL_STREAM", "8:12345")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn fleet-agentd");
        let agentctl = |args: &[&str]| {
            Command::new(bin_dir().join("agentctl"))
                .arg("--socket")
                .arg(&socket)
                .args(args)
                .output()
                .unwrap()
        };
        let answered = (0..600).any(|_| {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if socket.exists() && agentctl(&["status"]).status.success() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
            false
        });
        let running = child.try_wait().unwrap().is_none();
        sigterm(child.id());
        let status = child.wait().unwrap();
        let stderr = std::fs::read_to_string(&stderr_path).unwrap();
        assert!(
            answered && running,
            "--log-format {format}: the daemon did not run without journald:\n{stderr}"
        );
        assert!(
            status.success(),
            "--log-format {format}: exit {status}:\n{stderr}"
        );
        assert!(
            stderr.contains("journald is not reachable")
                && stderr.contains("Starting fleet-agentd"),
            "--log-format {format}: no fallback notice and log lines on stderr:\n{stderr}"
        );
    }
}
