//! Acceptance tests of standalone mode's two desired-state sources, with the
//! daemon as root from target/debug (the fast loop; the same scenario as
//! installed is packaging/tests/installed-desired.sh): hand-written
//! `departments.d` beside `<state_dir>/applied.d`, the refusals between them,
//! and a refused load that keeps supervising and says so everywhere.
//!
//! Ports: 48100-48109 and 48110-48119.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::serde_json::Value;
use fleet_tests::*;
use std::fs;
use std::time::Duration;

const UP: Duration = Duration::from_secs(90);
const SOON: Duration = Duration::from_secs(20);

fn node(d: &TestDaemon) -> Value {
    let reply = d.api_get("/v1/node").expect("GET /v1/node");
    serde_json::from_str(&reply.body).expect("/v1/node is JSON")
}

fn desired_valid_metric(d: &TestDaemon) -> Option<String> {
    let reply = d.api_get("/metrics").ok()?;
    reply
        .body
        .lines()
        .find_map(|l| l.strip_prefix("fleet_agent_desired_state_valid "))
        .map(str::to_string)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn hand_written_and_applied_specs_live_apart_and_a_bad_load_keeps_supervising() {
    let mut d = TestDaemon::start(TestOptions {
        name: "des",
        port_range: (48100, 48109),
        ..Default::default()
    });
    let applied = d.dept("a");
    let hand = d.dept("h");
    let spec = |id: &str| spec_toml(id, IMAGE_V1, "");

    // agentctl apply keeps its spec under the state directory, not in departments.d.
    d.apply(&d.write_spec(&applied, &spec(&applied)));
    d.wait_running(&applied, UP);
    assert!(d.applied_dir().join(format!("{applied}.toml")).exists());
    assert_eq!(fs::read_dir(d.departments_dir()).unwrap().count(), 0);

    // A hand-written file and SIGHUP; its id is then not agentctl's.
    let hand_file = d.departments_dir().join("mine.toml");
    fs::write(&hand_file, spec(&hand)).unwrap();
    sighup(d.pid().unwrap());
    d.wait_running(&hand, UP);
    let out = d.agentctl(&[
        "apply",
        "-f",
        d.write_spec(&hand, &spec(&hand)).to_str().unwrap(),
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("mine.toml"),
        "apply of a hand-written id must be refused naming its file: {}",
        stderr(&out)
    );
    let out = d.agentctl(&["delete", &hand]);
    assert!(
        !out.status.success() && stderr(&out).contains("mine.toml"),
        "delete of a hand-written id must be refused naming its file: {}",
        stderr(&out)
    );
    assert!(!d.applied_dir().join(format!("{hand}.toml")).exists());
    assert_eq!(node(&d)["desired_state"]["valid"], true);
    assert_eq!(desired_valid_metric(&d).as_deref(), Some("1"));

    // The applied id written by hand too: the whole load is refused naming both files.
    let dup = d.departments_dir().join("dup.toml");
    fs::write(&dup, spec(&applied)).unwrap();
    sighup(d.pid().unwrap());
    let problem = wait_for(SOON, "the duplicate id to be refused", || {
        let n = node(&d);
        (n["desired_state"]["valid"] == false).then(|| n["desired_state"]["problem"].to_string())
    });
    assert!(
        problem.contains("dup.toml") && problem.contains(&format!("applied.d/{applied}.toml")),
        "{problem}"
    );
    fs::remove_file(&dup).unwrap();

    // A bad file, then a daemon restart: it starts, adopts, supervises, and says why.
    let before = container_id(&format!("aio-{hand}")).unwrap();
    fs::write(
        d.departments_dir().join("typo.toml"),
        format!("id = \"{hand}-2\"\nimage = \"{IMAGE_V1}\"\n[health]\nintervall = \"1s\"\n"),
    )
    .unwrap();
    d.restart();
    let n = wait_for(SOON, "/v1/node after the restart", || {
        d.api_get("/v1/node").ok().map(|r| r.body)
    });
    let n: Value = serde_json::from_str(&n).unwrap();
    assert_eq!(n["desired_state"]["valid"], false, "{n}");
    let problem = n["desired_state"]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("typo.toml:4:1: health.intervall: unknown field"),
        "{problem}"
    );
    assert_eq!(desired_valid_metric(&d).as_deref(), Some("0"));
    let events = d.agentctl_ok(&["events", "--after", "0"]);
    assert!(events.contains("desired_state_refused"), "{events}");
    assert_eq!(
        container_id(&format!("aio-{hand}")).as_deref(),
        Some(before.as_str()),
        "the running department must be adopted, not replaced"
    );
    d.wait_running(&applied, UP);
    docker_ok(&["kill", &format!("aio-{hand}")]);
    wait_until(SOON, "the killed department to be restarted", || {
        container_running(&format!("aio-{hand}"))
    });

    // Fixed, reloaded: accepted again.
    fs::remove_file(d.departments_dir().join("typo.toml")).unwrap();
    sighup(d.pid().unwrap());
    wait_until(SOON, "the fixed load to be accepted", || {
        desired_valid_metric(&d).as_deref() == Some("1")
    });
    // agentctl delete removes the applied spec, and a reload keeps it gone.
    d.agentctl_ok(&["delete", &applied]);
    assert!(!d.applied_dir().join(format!("{applied}.toml")).exists());
    sighup(d.pid().unwrap());
    std::thread::sleep(Duration::from_secs(3));
    assert!(!container_exists(&format!("aio-{applied}")));
    assert!(container_running(&format!("aio-{hand}")));
}

#[test]
fn memory_reservation_reaches_docker_beside_the_hard_limit() {
    let d = TestDaemon::start(TestOptions {
        name: "desmem",
        port_range: (48110, 48119),
        ..Default::default()
    });
    let id = d.dept("m");
    let toml = spec_toml(
        &id,
        IMAGE_V1,
        "[resources]\nmemory = \"64MiB\"\nmemory_reservation = \"32MiB\"\n",
    );
    d.apply(&d.write_spec(&id, &toml));
    d.wait_running(&id, UP);
    let c = inspect(&format!("aio-{id}")).expect("the container exists");
    assert_eq!(
        c["HostConfig"]["Memory"],
        64 * 1024 * 1024,
        "{}",
        c["HostConfig"]
    );
    assert_eq!(
        c["HostConfig"]["MemoryReservation"],
        32 * 1024 * 1024,
        "{}",
        c["HostConfig"]
    );
    // What /v1/node counts against the budget is the reservation.
    assert_eq!(node(&d)["memory_committed_bytes"], 32 * 1024 * 1024);
}
