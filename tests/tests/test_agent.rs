//! The test image and the harness's Docker helpers, checked against the real
//! Docker engine without the daemon: if these fail, the supervisor tests'
//! verdicts mean nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn run(node: &str, what: &str, args: &[&str]) -> TestContainer {
    let mut all = vec!["-p", "127.0.0.1::8080"];
    all.extend_from_slice(args);
    TestContainer::run(node, &unique_name(&format!("fleet-ta-{what}")), &all)
}

fn wait_status(port: u16, path: &str, status: u16) -> HttpReply {
    wait_for(T, &format!("GET :{port}{path} to answer {status}"), || {
        http_get(port, path).ok().filter(|r| r.status == status)
    })
}

fn wait_exited(c: &TestContainer) -> fleet_tests::serde_json::Value {
    wait_for(T, &format!("{} to exit", c.name), || {
        let state = c.inspect()["State"].clone();
        (state["Running"] == false).then_some(state)
    })
}

#[test]
fn endpoints_versions_and_env_presence() {
    let node = unique_name("ta-ep");
    let v1 = run(&node, "v1", &["-e", "SECRET_X=hunter2", IMAGE_V1]);
    let v2 = run(&node, "v2", &[IMAGE_V2]);
    let bad = run(&node, "bad", &[IMAGE_BAD]);
    let p1 = v1.host_port(8080);

    assert_eq!(wait_status(p1, "/health", 200).body, "ok");
    assert_eq!(http_get(p1, "/version").unwrap().body, "1");
    let env = http_get(p1, "/env/SECRET_X").unwrap();
    assert_eq!((env.status, env.body.as_str()), (200, "set"));
    assert_eq!(http_get(p1, "/env/NOT_THERE").unwrap().status, 404);
    assert_eq!(http_get(p1, "/nope").unwrap().status, 404);

    assert_eq!(wait_status(v2.host_port(8080), "/version", 200).body, "2");
    assert_eq!(
        wait_status(bad.host_port(8080), "/health", 503).body,
        "never healthy"
    );
}

#[test]
fn health_turns_bad_redirects_and_starts_slowly_on_request() {
    let node = unique_name("ta-hl");
    let slow_started = Instant::now();
    let slow = run(&node, "slow", &["-e", "SLOW_START=3s", IMAGE_V1]);
    let port = slow.host_port(8080);
    let early = http_get(port, "/health");
    if slow_started.elapsed() < Duration::from_millis(2500) {
        assert!(early.is_err(), "SLOW_START=3s answered at once: {early:?}");
    }
    wait_status(port, "/health", 200);
    assert!(
        slow_started.elapsed() >= Duration::from_secs(3),
        "SLOW_START=3s answered early"
    );

    let started = Instant::now();
    let unhealthy = run(&node, "unh", &["-e", "UNHEALTHY_AFTER=2s", IMAGE_V1]);
    let port = unhealthy.host_port(8080);
    let early = wait_status(port, "/health", 200);
    assert_eq!(early.body, "ok");
    wait_status(port, "/health", 500);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "UNHEALTHY_AFTER=2s went bad too early"
    );

    let redirect = run(
        &node,
        "red",
        &[
            "-e",
            "REDIRECT_HEALTH_TO=http://127.0.0.1:1/elsewhere",
            IMAGE_V1,
        ],
    );
    let reply = wait_status(redirect.host_port(8080), "/health", 302);
    assert!(
        reply
            .headers
            .iter()
            .any(|(k, v)| k == "location" && v == "http://127.0.0.1:1/elsewhere"),
        "{:?}",
        reply.headers
    );
}

#[test]
fn crash_after_exits_with_the_code_asked_for() {
    let node = unique_name("ta-cr");
    let c = run(
        &node,
        "crash",
        &["-e", "CRASH_AFTER=1s", "-e", "EXIT_CODE=7", IMAGE_V1],
    );
    let state = wait_exited(&c);
    assert_eq!(state["ExitCode"], 7, "{state}");
}

#[test]
fn sigterm_stops_it_at_once_unless_it_is_told_to_ignore_it() {
    let node = unique_name("ta-st");
    let polite = run(&node, "pol", &[IMAGE_V1]);
    let stubborn = run(&node, "stub", &["-e", "IGNORE_SIGTERM=1", IMAGE_V1]);
    wait_status(polite.host_port(8080), "/health", 200);
    wait_status(stubborn.host_port(8080), "/health", 200);

    let started = Instant::now();
    docker_ok(&["stop", "-t", "20", &polite.id]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    assert_eq!(polite.inspect()["State"]["ExitCode"], 0);

    let started = Instant::now();
    docker_ok(&["stop", "-t", "2", &stubborn.id]);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "IGNORE_SIGTERM=1 stopped at once"
    );
    assert_eq!(
        stubborn.inspect()["State"]["ExitCode"],
        137,
        "it should have needed SIGKILL"
    );
}

#[test]
fn alloc_mb_above_the_memory_limit_is_oom_killed() {
    let node = unique_name("ta-oom");
    let c = run(
        &node,
        "oom",
        &[
            "-m",
            "32m",
            "--memory-swap",
            "32m",
            "-e",
            "ALLOC_MB=128",
            "-e",
            "ALLOC_AFTER=500ms",
            IMAGE_V1,
        ],
    );
    let state = wait_exited(&c);
    assert_eq!(state["ExitCode"], 137, "{state}");
    // Docker's OOMKilled flag misses kills under load (containerd loses the race
    // with the cgroup's removal); the kernel's own record is the ground truth.
    assert!(
        state["OOMKilled"] == true || kernel_logged_oom_kill(&c.id),
        "neither Docker nor the kernel log reports an OOM kill: {state}"
    );
}

#[test]
fn docker_events_sees_its_own_nodes_lifecycle_only() {
    let node = unique_name("ta-ev");
    let other = unique_name("ta-ev-other");
    let events = DockerEvents::start(&node);
    let mine = run(&node, "mine", &[IMAGE_V1]);
    let theirs = run(&other, "theirs", &[IMAGE_V1]);
    wait_status(mine.host_port(8080), "/health", 200);
    docker_ok(&["rm", "-f", &mine.id]);
    drop(theirs);

    let seen = events.finish();
    let actions: Vec<&str> = seen
        .iter()
        .filter(|e| e["Actor"]["ID"] == mine.id.as_str())
        .filter_map(|e| e["Action"].as_str())
        .collect();
    for expected in ["create", "start", "die", "destroy"] {
        assert!(
            actions.contains(&expected),
            "no {expected} event among {actions:?}"
        );
    }
    assert!(
        seen.iter()
            .all(|e| e["Actor"]["Attributes"]["fleet-agent.node"] == node.as_str()),
        "events of another node's container were recorded:\n{}",
        DockerEvents::describe(&seen)
    );
    assert!(containers_with_label(&format!("fleet-agent.node={node}")).is_empty());
}

#[test]
fn port_is_free_sees_a_published_port() {
    let node = unique_name("ta-pt");
    let c = run(&node, "port", &[IMAGE_V1]);
    let port = c.host_port(8080);
    assert!(
        !port_is_free(port),
        "Docker publishes {port} yet port_is_free says it is free"
    );
    drop(c);
    wait_until(T, "the published port to be released", || {
        port_is_free(port)
    });
    let held = hold_port(port);
    assert!(!port_is_free(port));
    drop(held);
    assert!(port_is_free(port));
}
