//! Acceptance tests of the coordinator pull protocol and the node API's
//! security (issue 4, tests 1-6), against the stand-in coordinator of
//! `fleet_tests::coordinator`, a real Docker engine and the test image.
//!
//! Port ranges: 43000-43099, ten per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::coordinator::{RecordedSync, Reply, StubCoordinator};
use fleet_tests::serde_json::{json, Value};
use fleet_tests::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Time for departments to be created, started and probed healthy on a busy host.
const UP: Duration = Duration::from_secs(120);
/// `poll_interval` of every coordinated test daemon.
const POLL: Duration = Duration::from_secs(1);
/// Generous bound for "within a few polls" on a loaded 2-core machine.
const SYNC: Duration = Duration::from_secs(30);

fn coordinated(name: &'static str, port_range: (u16, u16), stub: &StubCoordinator) -> TestDaemon {
    TestDaemon::start(TestOptions {
        name,
        port_range,
        extra_toml: format!(
            "[coordinator]\nurl = \"{}\"\npoll_interval = \"{}ms\"\n",
            stub.url(),
            POLL.as_millis()
        ),
        ..Default::default()
    })
}

/// A department as the coordinator sends it: fast probes, quick stop.
fn dept(id: &str, image: &str, env: &[(&str, &str)]) -> Value {
    let env: BTreeMap<&str, &str> = env.iter().copied().collect();
    json!({
        "id": id,
        "image": image,
        "env": env,
        "health": {"path": "/health", "interval": "1s", "timeout": "500ms", "retries": 3, "start_period": "0s"},
        "restart": {"stop_timeout": "5s"},
    })
}

fn node(d: &TestDaemon) -> Value {
    let reply = d.api_get("/v1/node").expect("GET /v1/node");
    assert_eq!(reply.status, 200, "GET /v1/node: {}", reply.body);
    serde_json::from_str(&reply.body).unwrap()
}

fn wait_applied(d: &TestDaemon, revision: i64) {
    wait_until(
        SYNC,
        &format!("/v1/node to show applied_revision {revision}"),
        || node(d)["applied_revision"] == revision,
    );
}

fn container_of(d: &TestDaemon, id: &str) -> String {
    d.summary(id).expect("department listed")["container_id"]
        .as_str()
        .expect("a running department has a container")
        .to_string()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Every department of a sync body is running and healthy.
fn all_running(sync: &RecordedSync, count: usize) -> bool {
    sync.body["departments"].as_array().is_some_and(|ds| {
        ds.len() == count
            && ds
                .iter()
                .all(|d| d["state"] == "running" && d["health"] == "healthy")
    })
}

// 1. Revision 1 with 3 departments converges and is reported; revision 2 changes
//    one department and only that one is touched.
#[test]
fn coordinator_revision_converges_and_only_changed_department_is_touched() {
    let stub = StubCoordinator::start();
    let d = coordinated("co1", (43000, 43009), &stub);
    let ids = [d.dept("a"), d.dept("b"), d.dept("c")];
    let v1: Vec<Value> = ids
        .iter()
        .map(|id| dept(id, IMAGE_V1, &[("FOO", "1")]))
        .collect();
    stub.set_document(&d.node_id, 1, json!(v1));
    for id in &ids {
        d.wait_running(id, UP);
    }
    wait_applied(&d, 1);
    let reported = stub.wait_sync(
        &d.node_id,
        Instant::now(),
        SYNC,
        "a sync reporting revision 1 and three running departments",
        |s| s.body["applied_revision"] == 1 && all_running(s, 3),
    );
    assert!(
        reported.body["applied_etag"].is_string(),
        "{}",
        reported.body
    );
    assert!(reported.body["last_refusal"].is_null(), "{}", reported.body);
    assert_eq!(
        reported.if_none_match,
        reported.body["applied_etag"].as_str().map(str::to_string),
        "the node sends the ETag of the document it applied"
    );

    // In coordinator mode the local desired-state commands are refused, with the reason.
    let spec = d.write_spec(&ids[0], &spec_toml(&ids[0], IMAGE_V2, ""));
    let out = d.agentctl(&["apply", "-f", spec.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("coordinator"),
        "apply: {stderr}"
    );
    let out = d.agentctl(&["delete", &ids[0]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("coordinator"),
        "delete: {stderr}"
    );
    // Operator commands still work and are reported as events.
    d.agentctl_ok(&["restart", &ids[2]]);
    d.wait_running(&ids[2], UP);

    let before: Vec<String> = ids.iter().map(|id| container_of(&d, id)).collect();
    let events = d.docker_events();
    let mut v2 = v1.clone();
    v2[1] = dept(&ids[1], IMAGE_V1, &[("FOO", "2")]);
    stub.set_document(&d.node_id, 2, json!(v2));
    wait_applied(&d, 2);
    wait_until(UP, "department b to run a new container", || {
        d.summary(&ids[1]).is_some_and(|s| {
            s["state"] == "running"
                && s["health"] == "healthy"
                && s["container_id"] != before[1].as_str()
        })
    });
    stub.wait_sync(
        &d.node_id,
        Instant::now(),
        SYNC,
        "a sync reporting revision 2 with all three running",
        |s| s.body["applied_revision"] == 2 && all_running(s, 3),
    );
    let seen = events.finish();
    let lifecycle = |id: &str| {
        seen.iter()
            .filter(|e| {
                e["Type"] == "container"
                    && LIFECYCLE_ACTIONS.iter().any(|a| e["Action"] == *a)
                    && e["Actor"]["Attributes"]["fleet-agent.department"] == id
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    for i in [0, 2] {
        let touched = lifecycle(&ids[i]);
        assert!(
            touched.is_empty(),
            "{} did not change but was touched:\n{}",
            ids[i],
            DockerEvents::describe(&touched)
        );
        assert_eq!(
            container_of(&d, &ids[i]),
            before[i],
            "{} got a new container",
            ids[i]
        );
    }
    assert!(
        !lifecycle(&ids[1]).is_empty(),
        "the changed department was not recreated"
    );
    let c = inspect(&format!("aio-{}", ids[1])).unwrap();
    assert!(container_env(&c).contains(&"FOO=2".to_string()));
    let log = d.agentctl_ok(&["events", "--after", "0", "--json"]);
    assert!(
        log.contains("desired_state_applied"),
        "no desired_state_applied event: {log}"
    );
}

// 2. The coordinator goes away for several poll intervals (and the daemon is
//    even restarted meanwhile): nothing restarts or stops, /v1/node shows it stale
//    with the last success time, and when it returns the node catches up within
//    one poll interval.
#[test]
fn coordinator_gone_nothing_stops_and_node_catches_up_when_it_returns() {
    let mut stub = StubCoordinator::start_on(48302);
    let mut d = coordinated("co2", (43010, 43019), &stub);
    let ids = [d.dept("a"), d.dept("b")];
    let v1: Vec<Value> = ids.iter().map(|id| dept(id, IMAGE_V1, &[])).collect();
    stub.set_document(&d.node_id, 1, json!(v1));
    for id in &ids {
        d.wait_running(id, UP);
    }
    wait_applied(&d, 1);
    let before: Vec<String> = ids.iter().map(|id| container_of(&d, id)).collect();
    let restarts: Vec<Value> = ids
        .iter()
        .map(|id| d.summary(id).unwrap()["restarts"].clone())
        .collect();
    let events = d.docker_events();

    let gone_at = unix_now();
    stub.go_away();
    // Stale after three poll intervals without a completed sync.
    wait_until(SYNC, "/v1/node to show the coordinator stale", || {
        node(&d)["coordinator"]["stale"] == true
    });
    std::thread::sleep(POLL * 3);
    let n = node(&d);
    let c = &n["coordinator"];
    let last_success = c["last_success_at"].as_i64().expect("a last success time");
    assert!(
        last_success <= gone_at + 1,
        "last success {last_success} after going away at {gone_at}: {n}"
    );
    assert!(c["consecutive_failures"].as_u64().unwrap() >= 3, "{n}");
    assert!(
        c["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{n}"
    );
    assert_eq!(n["applied_revision"], 1);
    let metrics = d.api_get("/metrics").unwrap().body;
    assert!(
        metrics.contains(&format!(
            "fleet_agent_coordinator_last_success_timestamp_seconds {last_success}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_agent_coordinator_stale 1\n"),
        "{metrics}"
    );
    // `agentctl doctor` says so, with the age of the last success.
    let check = doctor_check(&d, "coordinator");
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("not reached for"),
        "{check}"
    );

    // A daemon crash and restart while the coordinator is away: the last
    // applied state is still enforced from the store.
    d.kill9();
    d.restart();
    std::thread::sleep(POLL * 3);
    for (i, id) in ids.iter().enumerate() {
        let row = d.wait_running(id, UP);
        assert_eq!(
            row["container_id"],
            before[i].as_str(),
            "{id} got a new container"
        );
        assert_eq!(row["restarts"], restarts[i], "{id} restarted");
    }
    assert_eq!(node(&d)["applied_revision"], 1);

    // Back, with a new revision that adds a department.
    let added = d.dept("c");
    let mut v2 = v1.clone();
    v2.push(dept(&added, IMAGE_V1, &[]));
    stub.set_document(&d.node_id, 2, json!(v2));
    // Let the restarted daemon's backoff reach its cap before the return.
    std::thread::sleep(POLL * 3);
    let back = Instant::now();
    stub.come_back();
    let first = stub.wait_sync(
        &d.node_id,
        back,
        SYNC,
        "the first sync after the return",
        |_| true,
    );
    let waited = first.at.duration_since(back);
    // One poll interval, plus scheduling slack on a busy machine.
    assert!(
        waited <= POLL + Duration::from_millis(700),
        "the node came back after {waited:?}; the poll interval is {POLL:?}"
    );
    wait_applied(&d, 2);
    d.wait_running(&added, UP);
    wait_until(SYNC, "the coordinator not stale any more", || {
        node(&d)["coordinator"]["stale"] == false
    });
    let check = doctor_check(&d, "coordinator");
    assert_eq!(check["ok"], true, "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains("last sync"),
        "{check}"
    );
    let seen = events.finish();
    let touched: Vec<Value> = seen
        .iter()
        .filter(|e| {
            e["Type"] == "container"
                && LIFECYCLE_ACTIONS.iter().any(|a| e["Action"] == *a)
                && ids
                    .iter()
                    .any(|id| e["Actor"]["Attributes"]["fleet-agent.department"] == id.as_str())
        })
        .cloned()
        .collect();
    assert!(
        touched.is_empty(),
        "running departments were touched while the coordinator was away:\n{}",
        DockerEvents::describe(&touched)
    );
}

// 3. Malformed JSON, an unknown field, 11 departments, `id = "../x"`, a 5 MiB
//    body, a lower revision: each refused with its reason reported to the
//    coordinator; the applied revision stays.
#[test]
fn bad_documents_are_refused_whole_and_reported_back() {
    let mut stub = StubCoordinator::start_on(48303);
    let mut d = coordinated("co3", (43020, 43029), &stub);
    let keep = d.dept("keep");
    stub.set_document(&d.node_id, 5, json!([dept(&keep, IMAGE_V1, &[])]));
    d.wait_running(&keep, UP);
    wait_applied(&d, 5);
    let container = container_of(&d, &keep);
    let events = d.docker_events();

    let mut unknown = dept(&keep, IMAGE_V1, &[]);
    unknown["colour"] = json!("red");
    let eleven: Vec<Value> = (0..11)
        .map(|i| dept(&d.dept(&format!("x{i}")), IMAGE_V1, &[]))
        .collect();
    let mut huge = br#"{"revision": 6, "departments": [], "padding": ""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    huge.extend(br#""}"#);
    let doc = |revision: i64, departments: Value| {
        serde_json::to_vec(&json!({"revision": revision, "departments": departments})).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "malformed JSON",
            br#"{"revision": 6, "departments": [{"id": "#.to_vec(),
            true,
            "not a valid desired state",
        ),
        (
            "an unknown field",
            doc(6, json!([unknown])),
            true,
            "unknown field `colour`",
        ),
        (
            "11 departments",
            doc(6, json!(eleven)),
            true,
            "max_departments is 10",
        ),
        (
            "id \"../x\"",
            doc(6, json!([dept("../x", IMAGE_V1, &[])])),
            true,
            ".id",
        ),
        (
            "a 5 MiB body",
            huge,
            false,
            "larger than the 1024 KiB limit",
        ),
        (
            "a lower revision",
            doc(4, json!([dept(&keep, IMAGE_V1, &[])])),
            true,
            "lower than the applied revision 5",
        ),
    ];
    let mut last_etag = String::new();
    for (what, body, content_length, reason) in cases {
        let etag = stub.fresh_etag(6);
        last_etag = etag.clone();
        stub.set_reply(
            &d.node_id,
            Reply::Raw {
                body,
                etag: etag.clone(),
                content_length,
            },
        );
        let sync = stub.wait_sync(
            &d.node_id,
            Instant::now(),
            SYNC,
            &format!("the refusal of {what} reported to the coordinator"),
            |s| s.body["last_refusal"]["etag"] == etag.as_str(),
        );
        let refusal = &sync.body["last_refusal"];
        let text = format!("{} {}", refusal["reason"], refusal["fields"]);
        assert!(
            text.contains(reason),
            "refusal of {what} should mention `{reason}`: {refusal}"
        );
        assert_eq!(sync.body["applied_revision"], 5, "{what}: {}", sync.body);
        assert_eq!(node(&d)["applied_revision"], 5, "{what}");
        assert_eq!(
            d.status()["departments"].as_array().unwrap().len(),
            1,
            "{what}"
        );
    }
    // Nothing running was touched by any of it.
    assert_eq!(container_of(&d, &keep), container);
    let seen = events.finish();
    let touched: Vec<Value> = seen
        .iter()
        .filter(|e| e["Type"] == "container" && LIFECYCLE_ACTIONS.iter().any(|a| e["Action"] == *a))
        .cloned()
        .collect();
    assert!(
        touched.is_empty(),
        "refused documents touched containers:\n{}",
        DockerEvents::describe(&touched)
    );
    let metrics = d.api_get("/metrics").unwrap().body;
    assert!(
        metrics.contains("fleet_agent_applied_revision 5\n"),
        "{metrics}"
    );

    // The last refusal survives a daemon restart while the coordinator is
    // away: /v1/node, `agentctl status` and `agentctl doctor` still show it.
    stub.go_away();
    d.restart();
    let n = node(&d);
    let refusal = &n["coordinator"]["last_refusal"];
    assert_eq!(refusal["etag"], last_etag.as_str(), "{n}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("lower than the applied revision 5"),
        "{n}"
    );
    let status = d.agentctl_ok(&["status"]);
    assert!(
        status.contains("last refused document: revision 4"),
        "{status}"
    );
    let check = doctor_check(&d, "desired state");
    assert_eq!(check["ok"], false, "{check}");
    stub.come_back();
    // And it is reported on the first sync after the restart.
    let back = Instant::now();
    let sync = stub.wait_sync(&d.node_id, back, SYNC, "a sync after the restart", |_| true);
    assert_eq!(sync.body["last_refusal"]["etag"], last_etag.as_str());

    // A good document afterwards is applied and the refusal is cleared.
    stub.set_document(&d.node_id, 6, json!([dept(&keep, IMAGE_V1, &[])]));
    stub.wait_sync(
        &d.node_id,
        Instant::now(),
        SYNC,
        "revision 6 applied, refusal cleared",
        |s| s.body["applied_revision"] == 6 && s.body["last_refusal"].is_null(),
    );
    assert_eq!(container_of(&d, &keep), container);
    assert!(node(&d)["coordinator"]["last_refusal"].is_null());
}

/// One check of `agentctl doctor --json` against the test daemon's config.
fn doctor_check(d: &TestDaemon, name: &str) -> Value {
    let config = d.config_path.to_str().unwrap();
    let out = d.agentctl(&["doctor", "--json", "--config", config]);
    let checks: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` check in {checks}"))
        .clone()
}

fn write_token_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("api-token");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// GET `/v1/node` with an optional Authorization header: (status, body).
fn get_with(addr: std::net::SocketAddr, auth: Option<&str>) -> (u16, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let mut request = client.get(format!("http://{addr}/v1/node"));
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let response = request.send().unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

// 4. No token, a wrong token, a token differing in its last byte: 401; the unix
//    socket from a uid outside root and the fleet-agent group: refused.
#[test]
fn tokens_are_checked_and_the_socket_refuses_strangers() {
    let secrets = tempfile::tempdir().unwrap();
    let token = "alpha-0123456789abcdef";
    let next = "beta-fedcba9876543210";
    let file = write_token_file(secrets.path(), &format!("{token}\n{next}\n"));
    let d = TestDaemon::start(TestOptions {
        name: "co4",
        port_range: (43030, 43039),
        api_toml: format!("token_file = \"{}\"\n", file.display()),
        ..Default::default()
    });
    let mut last_byte = token.to_string();
    last_byte.pop();
    last_byte.push('g');
    for (what, auth) in [
        ("no token", None),
        ("a wrong token", Some("Bearer not-the-token".to_string())),
        (
            "a token differing in its last byte",
            Some(format!("Bearer {last_byte}")),
        ),
        (
            "a prefix of the token",
            Some(format!("Bearer {}", &token[..token.len() - 1])),
        ),
        (
            "the token in another scheme",
            Some(format!("Basic {token}")),
        ),
    ] {
        let (status, body) = get_with(d.api_addr, auth.as_deref());
        assert_eq!(status, 401, "{what}: {body}");
        assert!(
            body.is_empty(),
            "{what}: a 401 says nothing more, got {body}"
        );
    }
    for path in ["/metrics", "/v1/departments", "/v1/events", "/healthz"] {
        let reply = d.api_get(path).unwrap();
        assert_eq!(reply.status, 401, "{path} without a token");
    }
    // Both tokens of a rotation are accepted.
    assert_eq!(
        get_with(d.api_addr, Some(&format!("Bearer {token}"))).0,
        200
    );
    assert_eq!(get_with(d.api_addr, Some(&format!("Bearer {next}"))).0, 200);

    // The unix socket: let `nobody` reach the socket file so that the daemon's
    // peer-credential check, not the file system, is what refuses it.
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let agentctl = d.dir().join("agentctl-copy");
    std::fs::copy(bin_dir().join("agentctl"), &agentctl).unwrap();
    std::fs::set_permissions(&agentctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&agentctl)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .expect("run setpriv")
    };
    for args in [&["status"][..], &["events"][..], &["delete", "nothing"][..]] {
        let out = run_as_nobody(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "agentctl {args:?} as nobody succeeded: {stderr}"
        );
        assert!(
            stderr.contains("permission denied"),
            "agentctl {args:?} as nobody must be refused by the daemon, got: {stderr}"
        );
    }
    // The same binary as root works, so the refusal above is about the caller.
    let out = Command::new(&agentctl)
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// The operations tagged `unix-socket` in docs/openapi.yaml are not served on
// TCP (schemathesis runs on the `read` ones only): with a valid token each
// answers `403` with an ErrorBody, an unknown path `404`, and nothing changes.
#[test]
fn unix_socket_paths_are_not_served_on_tcp() {
    let secrets = tempfile::tempdir().unwrap();
    let token = "socket-only-0123456789";
    let file = write_token_file(secrets.path(), &format!("{token}\n"));
    let d = TestDaemon::start(TestOptions {
        name: "co7",
        port_range: (43060, 43069),
        api_toml: format!("token_file = \"{}\"\n", file.display()),
        ..Default::default()
    });
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let url = |path: &str| format!("http://{}{path}", d.api_addr);
    let spec = json!({"id": "nope", "image": IMAGE_V1});
    let attempts = [
        (
            "POST /v1/apply",
            client
                .post(url("/v1/apply"))
                .json(&json!({"departments": [spec]})),
            403,
        ),
        (
            "POST .../restart",
            client.post(url("/v1/departments/nope/restart")),
            403,
        ),
        (
            "GET .../logs",
            client.get(url("/v1/departments/nope/logs")),
            403,
        ),
        (
            "PUT /v1/departments/{id}",
            client.put(url("/v1/departments/nope")).json(&spec),
            403,
        ),
        (
            "DELETE /v1/departments/{id}",
            client.delete(url("/v1/departments/nope")),
            403,
        ),
        ("GET /v1/nothing", client.get(url("/v1/nothing")), 404),
        ("POST /v1/node", client.post(url("/v1/node")), 405),
    ];
    for (what, request, expected) in attempts {
        let response = request.bearer_auth(token).send().unwrap();
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .unwrap_or_else(|e| panic!("{what}: the body is not JSON: {e}"));
        assert_eq!(status, expected, "{what}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
    }
    // Without the token the same requests learn nothing.
    let response = client.post(url("/v1/apply")).send().unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert!(
        d.containers().is_empty(),
        "a TCP request created a container"
    );
}

// Status reads carry an ETag and answer `304` to If-None-Match, so a poller
// pays for a body only when something changed. `/v1/node`'s tag is weak and
// ignores the uptime, which changes every second.
#[test]
fn status_reads_answer_304_until_something_changes() {
    let secrets = tempfile::tempdir().unwrap();
    let token = "etag-token-0123456789";
    let file = write_token_file(secrets.path(), &format!("{token}\n"));
    let d = TestDaemon::start(TestOptions {
        name: "co8",
        port_range: (43070, 43079),
        api_toml: format!("token_file = \"{}\"\n", file.display()),
        ..Default::default()
    });
    let id = d.dept("e");
    d.apply(&d.write_spec(&id, &spec_toml(&id, IMAGE_V1, "")));
    d.wait_running(&id, UP);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap();
    let get = |path: &str, etag: Option<&str>| {
        let mut request = client
            .get(format!("http://{}{path}", d.api_addr))
            .bearer_auth(token);
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let tag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        (status, tag, response.text().unwrap())
    };
    // Let the department settle (healthy, probes recorded) so nothing but
    // time moves during the checks below.
    wait_until(UP, "the department healthy", || {
        d.summary(&id).is_some_and(|s| s["health"] == "healthy")
    });
    for path in ["/v1/node".to_string(), "/v1/departments".to_string()] {
        let (status, etag, body) = get(&path, None);
        assert_eq!(status, 200, "{path}: {body}");
        let etag = etag.unwrap_or_else(|| panic!("{path}: no ETag"));
        // Past a second boundary: the node's uptime has changed by then.
        std::thread::sleep(Duration::from_millis(1100));
        let (status, again, body) = get(&path, Some(&etag));
        assert_eq!(status, 304, "{path} with its own ETag {etag}: {body}");
        assert!(body.is_empty(), "{path}: a 304 has no body");
        assert_eq!(
            again.as_deref(),
            Some(etag.as_str()),
            "{path}: the 304 carries the ETag"
        );
        let (status, _, _) = get(&path, Some("\"something-else\""));
        assert_eq!(status, 200, "{path} with another ETag");
    }
    let (_, node_etag, _) = get("/v1/node", None);
    let node_etag = node_etag.unwrap();
    assert!(
        node_etag.starts_with("W/\""),
        "/v1/node has a weak ETag: {node_etag}"
    );
    // A change the coordinator acts on (one more department) changes the tag.
    let other = d.dept("f");
    d.apply(&d.write_spec(&other, &spec_toml(&other, IMAGE_V1, "")));
    let (status, changed, body) = get("/v1/node", Some(&node_etag));
    assert_eq!(status, 200, "{body}");
    assert_ne!(changed.as_deref(), Some(node_etag.as_str()));
    let node: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(node["departments"], 2, "{node}");
}

// 5. schemathesis against docs/openapi.yaml on the running daemon finds no
//    failure: no 5xx, responses match the schema, unauthenticated calls refused.
#[test]
fn schemathesis_finds_no_failure_against_the_openapi_document() {
    let schemathesis = which("schemathesis").unwrap_or_else(|| {
        panic!("schemathesis is not installed; `bash scripts/test.sh` installs it (pip install schemathesis)")
    });
    let secrets = tempfile::tempdir().unwrap();
    let token = "schema-token-0123456789";
    let file = write_token_file(secrets.path(), &format!("{token}\n"));
    let d = TestDaemon::start(TestOptions {
        name: "co5",
        port_range: (43040, 43049),
        // A short long-poll cap: the fuzzer picks `wait` values up to the
        // pattern's 999999999s and `after` past the last event, and each such
        // request is held for the whole cap.
        api_toml: format!(
            "token_file = \"{}\"\nrequests_per_second = 0\nmax_event_wait = \"2s\"\n",
            file.display()
        ),
        ..Default::default()
    });
    let id = d.dept("s");
    d.apply(&d.write_spec(&id, &spec_toml(&id, IMAGE_V1, "")));
    d.wait_running(&id, UP);
    let spec = workspace_root().join("docs/openapi.yaml");
    let report = d.dir().join("schemathesis");
    let out = Command::new(schemathesis)
        .arg("run")
        .arg(&spec)
        .args(["--url", &format!("http://{}", d.api_addr)])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        // What the TCP listener serves. The `unix-socket` operations (they
        // change departments) are served on the control socket only, and the
        // `coordinator` one by the coordinator; the TCP answer to the former is
        // covered by `unix_socket_paths_are_not_served_on_tcp`.
        .args(["--include-tag", "read"])
        .args(["--checks", "all"])
        .args(["--max-examples", "30"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "20"])
        .arg("--no-color")
        .env("SCHEMATHESIS_HOOKS", "")
        .env("HOME", d.dir())
        .current_dir(d.dir())
        .env("SCHEMATHESIS_REPORT_DIR", &report)
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}"
    );
    // It must actually have exercised the API, not skipped everything.
    assert!(!stdout.contains("No operations"), "{stdout}");
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

// 6. 500 idle connections and a slow-header client do not stop the coordinator
//    from being served.
#[test]
fn idle_connections_and_slow_headers_do_not_starve_the_coordinator() {
    let header_timeout = Duration::from_secs(3);
    let d = TestDaemon::start(TestOptions {
        name: "co6",
        port_range: (43050, 43059),
        api_toml: format!("header_timeout = \"{}s\"\n", header_timeout.as_secs()),
        ..Default::default()
    });
    let mut idle: Vec<TcpStream> = (0..500)
        .map(|i| {
            TcpStream::connect(d.api_addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    // The slow client sends a request head one byte at a time, never finishing it.
    let addr = d.api_addr;
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        let head = b"GET /v1/node HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head.iter().cycle() {
            if s.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
            if started.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        started.elapsed()
    });
    // The coordinator polls meanwhile and is served promptly every time.
    let deadline = Instant::now() + header_timeout + Duration::from_secs(2);
    let mut polls = 0;
    while Instant::now() < deadline {
        let started = Instant::now();
        let reply = d
            .api_get("/v1/node")
            .expect("GET /v1/node beside 500 idle connections");
        assert_eq!(reply.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "GET /v1/node took {:?} beside 500 idle connections",
            started.elapsed()
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(polls >= 10);
    // The slow client was cut off at the head deadline, not allowed to linger.
    let lasted = slow.join().unwrap();
    assert!(
        lasted < header_timeout + Duration::from_secs(5),
        "the slow-header client kept its connection for {lasted:?}"
    );
    // So were the idle connections: each slot came back.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "an idle connection got data instead of being closed");
    }
    assert_eq!(d.api_get("/v1/node").unwrap().status, 200);
}
