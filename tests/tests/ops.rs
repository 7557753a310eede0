//! Issue 14, the operator's side: `agentctl doctor`'s archive check against a
//! real WAL service, a real Prometheus server scraping daemons with the
//! shipped alert rules, and progress of image pulls in the API. Ports:
//! department pools and Prometheus 43650-43699.

// The helpers below are part of the tests: a failed set-up step should panic
// with its cause, which is what unwrap/expect do here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleet_tests::{wait_for, TestDaemon, TestOptions};
use serde_json::Value;
use std::time::Duration;

/// One check of `agentctl doctor --json` against the test daemon's config.
fn doctor(d: &TestDaemon) -> Vec<Value> {
    let config = d.config_path.to_str().unwrap();
    let out = d.agentctl(&["doctor", "--json", "--config", config]);
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    checks.as_array().unwrap().clone()
}

fn check(checks: &[Value], name: &str) -> Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` check in {checks:?}"))
        .clone()
}

/// A file archive the WAL service can write passes; the same archive replaced
/// by a plain file (an unmounted or broken archive) fails, naming the target,
/// the cause and what to check. The clock check is there either way.
#[test]
fn doctor_checks_that_the_archive_answers() {
    let archive = tempfile::tempdir().unwrap();
    let root = archive.path().join("wal");
    let d = TestDaemon::start(TestOptions {
        name: "op1",
        port_range: (43650, 43651),
        extra_toml: format!("[wal]\ntarget = \"file://{}\"\n", root.display()),
        ..Default::default()
    });
    let checks = wait_for(Duration::from_secs(30), "doctor to see the daemon", || {
        let checks = doctor(&d);
        (check(&checks, "daemon")["ok"] == true).then_some(checks)
    });
    let passing = check(&checks, "archive");
    assert_eq!(passing["ok"], true, "{passing}");
    assert!(
        passing["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("file://{}", root.display())),
        "{passing}"
    );
    let clock = check(&checks, "clock");
    assert!(clock["detail"].as_str().is_some_and(|d| !d.is_empty()));

    std::fs::remove_dir_all(&root).unwrap();
    std::fs::write(&root, "not an archive").unwrap();
    // The service reuses a probe for 10s.
    let failing = wait_for(
        Duration::from_secs(30),
        "doctor to see the broken archive",
        || {
            let c = check(&doctor(&d), "archive");
            (c["ok"] == false).then_some(c)
        },
    );
    let detail = failing["detail"].as_str().unwrap();
    assert!(
        detail.contains("is not reachable")
            && detail.contains(&root.display().to_string())
            && detail.contains("writable"),
        "{failing}"
    );
    let out = d.agentctl(&["doctor", "--config", d.config_path.to_str().unwrap()]);
    assert!(!out.status.success(), "doctor passes a broken archive");
}
