//! Acceptance tests of `agentctl events` and `agentctl logs` options against the
//! real daemon: `-n` shows the newest events (newest last), `--since` takes a
//! duration or a time, `--department` filters, `-f` starts at the end of the log
//! and replays nothing; `logs --since/--timestamps` reach Docker.
//!
//! Port ranges: 48200-48204 and 48205-48209.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::serde_json::Value;
use fleet_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};

const UP: Duration = Duration::from_secs(90);

fn seqs(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

fn page(d: &TestDaemon, args: &[&str]) -> Vec<Value> {
    d.agentctl_json(args)["events"].as_array().cloned().unwrap()
}

/// A spec the daemon refuses (memory admission), so each apply is one event.
fn refuse_one(d: &TestDaemon, id: &str) {
    let path = d.write_spec(
        id,
        &spec_toml(id, IMAGE_V1, "[resources]\nmemory = \"10TiB\"\n"),
    );
    let out = d.agentctl(&["apply", "-f", path.to_str().unwrap()]);
    assert!(!out.status.success(), "a 10TiB department was accepted");
}

/// `agentctl events -f <args> --json`, its stdout lines on a channel.
fn follow(d: &TestDaemon, args: &[&str]) -> (Child, mpsc::Receiver<Value>) {
    let mut child = Command::new(bin_dir().join("agentctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["events", "-f", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx
                .send(serde_json::from_str::<Value>(&line).unwrap())
                .is_err()
            {
                return;
            }
        }
    });
    (child, rx)
}

#[test]
fn events_tail_since_department_and_a_follow_that_starts_at_the_end() {
    let d = TestDaemon::start(TestOptions {
        name: "evt",
        port_range: (48200, 48204),
        ..Default::default()
    });
    let id = d.dept("a");
    d.apply(&d.write_spec(&id, &spec_toml(&id, IMAGE_V1, "")));
    d.wait_running(&id, UP);
    let big = d.dept("big");
    for _ in 0..25 {
        refuse_one(&d, &big);
    }
    let all = page(&d, &["events", "--after", "0"]);
    assert!(all.len() > 25, "{} events", all.len());
    let all_seqs = seqs(&all);
    let newest = *all_seqs.last().unwrap();

    // The default: the newest 20, newest last (like journalctl).
    let text = d.agentctl_ok(&["events"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 20, "{text}");
    assert!(
        lines[19].trim_start().starts_with(&format!("{newest} ")),
        "the last line must be the newest event {newest}: {text}"
    );
    assert_eq!(
        seqs(&page(&d, &["events"])),
        all_seqs[all_seqs.len() - 20..]
    );
    assert_eq!(
        seqs(&page(&d, &["events", "-n", "5"])),
        all_seqs[all_seqs.len() - 5..]
    );

    // --department: only that department's events.
    let own: Vec<i64> = all
        .iter()
        .filter(|e| e["department"] == id.as_str())
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert!(!own.is_empty());
    let filtered = page(&d, &["events", "--department", &id, "-n", "1000"]);
    assert_eq!(seqs(&filtered), own);

    // --since a time: exactly the events at or after it; a duration: all of them.
    let middle = all[all.len() - 10]["at_ms"].as_i64().unwrap();
    let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(middle as u64))
        .to_string();
    let want: Vec<i64> = all
        .iter()
        .filter(|e| e["at_ms"].as_i64().unwrap() >= middle)
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs(&page(&d, &["events", "--since", &at])),
        want,
        "since {at}"
    );
    assert_eq!(seqs(&page(&d, &["events", "--since", "1h"])), all_seqs);
    assert_eq!(
        seqs(&page(&d, &["events", "--since", "1h", "-n", "3"])),
        all_seqs[all_seqs.len() - 3..]
    );
    let bad = d.agentctl(&["events", "--since", "soonish"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since `soonish`"));

    // -f: the newest 2, then only what is new; nothing of the rest is replayed.
    let (mut tail_child, tail_rx) = follow(&d, &["-n", "2"]);
    let (mut new_child, new_rx) = follow(&d, &["-n", "0"]);
    let first_two: Vec<i64> = (0..2)
        .map(|_| {
            tail_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the newest 2")["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(first_two, all_seqs[all_seqs.len() - 2..]);
    // Both followers are past their first request once -n 2 has printed; give
    // the other one a moment on a busy host.
    std::thread::sleep(Duration::from_secs(2));
    refuse_one(&d, &big);
    for rx in [&tail_rx, &new_rx] {
        let e = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the new event while following");
        assert!(
            e["seq"].as_i64().unwrap() > newest,
            "replayed an old event: {e}"
        );
        assert_eq!(e["kind"], "apply_refused", "{e}");
    }
    for child in [&mut tail_child, &mut new_child] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn logs_since_and_timestamps_reach_docker() {
    let d = TestDaemon::start(TestOptions {
        name: "lgs",
        port_range: (48205, 48209),
        ..Default::default()
    });
    let id = d.dept("a");
    d.apply(&d.write_spec(&id, &spec_toml(&id, IMAGE_V1, "")));
    d.wait_running(&id, UP);
    let all = wait_for(UP, "the test agent to write a log line", || {
        let out = d.agentctl_ok(&["logs", &id]);
        (!out.trim().is_empty()).then_some(out)
    });
    let stamped = d.agentctl_ok(&["logs", &id, "--timestamps"]);
    let first = stamped.lines().next().unwrap();
    let (stamp, rest) = first.split_once(' ').unwrap();
    assert!(
        humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z')).is_ok()
            || humantime::parse_rfc3339(stamp).is_ok(),
        "no RFC 3339 timestamp in front: {first}"
    );
    assert_eq!(rest, all.lines().next().unwrap());
    assert!(!all.lines().next().unwrap().starts_with(stamp));
    // Everything so far is older than a minute from now.
    let future =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(60))
            .to_string();
    assert_eq!(d.agentctl_ok(&["logs", &id, "--since", &future]), "");
    assert_eq!(d.agentctl_ok(&["logs", &id, "--since", "1h"]), all);
}
