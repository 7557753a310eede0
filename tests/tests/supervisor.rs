//! Acceptance tests of the core supervisor: departments applied, adopted across a
//! daemon crash, updated, deleted, repaired, refused, and secrets kept secret —
//! against a real Docker engine and the `fleet-test-agent` image.
//!
//! Port ranges: `ten_departments...` alone uses 8001-8010 (the issue demands it);
//! the others take ten ports each from 42000-42069, and
//! `explicit_host_ports_...` takes 47500-47502. The registry, locking and
//! state-loss tests at the end take ten each from 42100-42199;
//! `container_logging_...` takes 43600-43619, the restart history one
//! 43700-43709 and the `deleting` one 43710-43719.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::serde_json::Value;
use fleet_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

/// Time for a department to be created, started and probed healthy on a busy host.
const UP: Duration = Duration::from_secs(90);
/// "A few resync intervals" (`resync_interval = "1s"`), generously.
const RESYNC: Duration = Duration::from_secs(30);
/// How long to watch for something that must not happen (three resyncs and more).
const QUIET: Duration = Duration::from_secs(4);

fn daemon(name: &'static str, port_range: (u16, u16)) -> TestDaemon {
    TestDaemon::start(TestOptions {
        name,
        port_range,
        ..Default::default()
    })
}

fn container(id: &str) -> String {
    format!("aio-{id}")
}

fn host_port(row: &Value) -> u16 {
    row["host_port"]
        .as_u64()
        .expect("a running department has a host port") as u16
}

/// Waits for `/health` on the published port to answer 200 "ok".
fn wait_health_ok(port: u16) {
    wait_until(
        UP,
        &format!("GET 127.0.0.1:{port}/health to answer 200 ok"),
        || http_get(port, "/health").is_ok_and(|r| r.status == 200 && r.body == "ok"),
    );
}

/// Asserts the container behind a running department is what the contract says:
/// name, labels, port published on 127.0.0.1, and the id status reports.
/// Returns the Docker container id.
fn assert_container_matches(d: &TestDaemon, id: &str, row: &Value) -> String {
    let c = inspect(&container(id))
        .unwrap_or_else(|| panic!("container {} does not exist", container(id)));
    assert_eq!(
        c["State"]["Running"],
        true,
        "{} is not running",
        container(id)
    );
    let labels = container_labels(&c);
    assert_eq!(
        labels["fleet-agent.managed"],
        "true",
        "labels of {}: {labels}",
        container(id)
    );
    assert_eq!(
        labels["fleet-agent.department"],
        id,
        "labels of {}: {labels}",
        container(id)
    );
    assert_eq!(
        labels["fleet-agent.node"],
        d.node_id.as_str(),
        "labels of {}: {labels}",
        container(id)
    );
    let hash = labels["fleet-agent.spec-hash"].as_str().unwrap_or("");
    assert!(
        !hash.is_empty(),
        "{} has no fleet-agent.spec-hash label: {labels}",
        container(id)
    );
    if let Some(reported) = row["spec_hash"].as_str() {
        assert_eq!(
            reported, hash,
            "status and the container disagree on the spec hash of {id}"
        );
    }
    let port = host_port(row);
    assert_eq!(
        published(&c, 8080),
        vec![("127.0.0.1".to_string(), port)],
        "{} must publish 8080/tcp on 127.0.0.1:{port} exactly",
        container(id)
    );
    let docker_id = c["Id"].as_str().unwrap().to_string();
    if let Some(reported) = row["container_id"].as_str() {
        assert!(
            !reported.is_empty() && docker_id.starts_with(reported),
            "status says {id} runs container {reported}, Docker says {docker_id}"
        );
    }
    docker_id
}

fn assert_no_lifecycle(events: &[Value], what: &str) {
    let lifecycle: Vec<Value> = events
        .iter()
        .filter(|e| e["Type"] == "container" && LIFECYCLE_ACTIONS.iter().any(|a| e["Action"] == *a))
        .cloned()
        .collect();
    assert!(
        lifecycle.is_empty(),
        "{what}, yet Docker saw:\n{}",
        DockerEvents::describe(&lifecycle)
    );
}

fn of_department(events: &[Value], id: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["Actor"]["Attributes"]["fleet-agent.department"] == id)
        .cloned()
        .collect()
}

fn department_ids(d: &TestDaemon) -> BTreeSet<String> {
    d.status()["departments"]
        .as_array()
        .expect("status --json lists departments")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// `field: message` as the contract prints each problem, the field not being the
/// tail of a longer name.
fn names_field(stderr: &str, field: &str) -> bool {
    let needle = format!("{field}:");
    stderr.match_indices(&needle).any(|(at, _)| {
        stderr[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

/// Applies the specs and waits until every one runs healthy; returns the rows.
fn apply_and_wait(
    d: &TestDaemon,
    ids: &[String],
    spec: impl Fn(&str) -> String,
) -> BTreeMap<String, Value> {
    for id in ids {
        d.write_spec(id, &spec(id));
    }
    d.apply(&d.specs_dir());
    ids.iter()
        .map(|id| (id.clone(), d.wait_running(id, UP)))
        .collect()
}

#[test]
fn ten_departments_fill_the_pool_and_an_eleventh_is_refused() {
    let d = daemon("ten", (8001, 8010));
    let ids: Vec<String> = (1..=10).map(|i| d.dept(&format!("d{i}"))).collect();
    let rows = apply_and_wait(&d, &ids, |id| spec_toml(id, IMAGE_V1, ""));

    let mut ports = BTreeSet::new();
    let mut docker_ids = BTreeMap::new();
    for id in &ids {
        let row = &rows[id];
        let port = host_port(row);
        assert!(
            (8001..=8010).contains(&port),
            "{id} got port {port}, outside 8001-8010"
        );
        ports.insert(port);
        docker_ids.insert(id.clone(), assert_container_matches(&d, id, row));
        wait_health_ok(port);
    }
    assert_eq!(
        ports.len(),
        10,
        "ten departments must have ten distinct ports: {ports:?}"
    );
    assert_eq!(
        d.containers().len(),
        10,
        "exactly ten containers: {:?}",
        d.containers()
    );

    let events = d.docker_events();
    let eleventh = d.dept("d11");
    let path = d.dir().join("eleventh.toml");
    fs::write(&path, spec_toml(&eleventh, IMAGE_V1, "")).unwrap();
    let out = d.agentctl(&["apply", "-f", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an 11th department was accepted; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lower = stderr.to_lowercase();
    assert!(
        [
            "max_departments",
            "limit",
            "at most 10",
            "10 departments",
            "maximum"
        ]
        .iter()
        .any(|w| lower.contains(w)),
        "the refusal must mention the limit of 10 departments; stderr: {stderr}"
    );

    // Standalone mode writes spec files before the apply takes effect; a
    // refused apply must put the directory back as it was.
    let spec_file = d.applied_dir().join(format!("{eleventh}.toml"));
    assert!(
        !spec_file.exists(),
        "the refused department's spec file was left in applied.d"
    );
    assert_eq!(
        fs::read_dir(d.applied_dir()).unwrap().count(),
        10,
        "applied.d must hold the 10 applied specs and nothing else"
    );

    std::thread::sleep(QUIET);
    assert!(
        !container_exists(&container(&eleventh)),
        "a container was made for the refused department"
    );
    assert!(
        !department_ids(&d).contains(&eleventh),
        "the refused department is listed in status"
    );
    for id in &ids {
        let row = d
            .summary(id)
            .unwrap_or_else(|| panic!("{id} vanished from status"));
        assert_eq!(row["state"], "running", "{id} after the refusal: {row}");
        assert_eq!(
            container_id(&container(id)).as_deref(),
            Some(docker_ids[id].as_str()),
            "{id} was replaced"
        );
    }
    assert_no_lifecycle(
        &events.finish(),
        "the 11th department was refused and nothing may be touched",
    );
}

#[test]
fn kill9_of_the_daemon_adopts_every_container_untouched() {
    let mut d = daemon("adopt", (42000, 42009));
    let ids: Vec<String> = (1..=4).map(|i| d.dept(&format!("d{i}"))).collect();
    let rows = apply_and_wait(&d, &ids, |id| spec_toml(id, IMAGE_V1, ""));
    let before: BTreeMap<String, (String, u16, String, Value)> = ids
        .iter()
        .map(|id| {
            let docker_id = assert_container_matches(&d, id, &rows[id]);
            let started = inspect(&container(id)).unwrap()["State"]["StartedAt"].clone();
            (
                id.clone(),
                (
                    docker_id,
                    host_port(&rows[id]),
                    started.to_string(),
                    rows[id]["restarts"].clone(),
                ),
            )
        })
        .collect();

    let events = d.docker_events();
    for round in 1..=3 {
        d.kill9();
        for id in &ids {
            assert!(
                container_running(&container(id)),
                "round {round}: {id} died with the daemon"
            );
        }
        d.restart();
        for id in &ids {
            let row = d.wait_running(id, UP);
            let (docker_id, port, _, _) = &before[id];
            assert_eq!(host_port(&row), *port, "round {round}: {id} changed port");
            assert_eq!(
                &assert_container_matches(&d, id, &row),
                docker_id,
                "round {round}: {id} was replaced"
            );
        }
    }
    std::thread::sleep(QUIET);

    for id in &ids {
        let row = d.summary(id).unwrap();
        let (docker_id, port, started, restarts) = &before[id];
        assert_eq!(
            &assert_container_matches(&d, id, &row),
            docker_id,
            "{id} was replaced after adoption"
        );
        assert_eq!(host_port(&row), *port);
        let now_started = inspect(&container(id)).unwrap()["State"]["StartedAt"].to_string();
        assert_eq!(&now_started, started, "{id}'s container was restarted");
        assert_eq!(
            &row["restarts"], restarts,
            "{id}'s restart count changed across daemon restarts"
        );
        wait_health_ok(*port);
    }
    let leases = d.ports();
    for id in &ids {
        let port = before[id].1;
        assert!(
            leases.iter().any(|l| l["port"] == port
                && l["department"] == id.as_str()
                && l["status"] == "leased"),
            "ports --json must show {port} leased to {id}: {leases:?}"
        );
    }
    assert_eq!(
        d.containers().len(),
        4,
        "exactly four containers: {:?}",
        d.containers()
    );
    assert_no_lifecycle(
        &events.finish(),
        "three kill -9 and restarts of the daemon must adopt, not recreate",
    );
}

#[test]
fn changed_spec_replaces_only_that_container_and_reapply_touches_nothing() {
    let d = daemon("upd", (42010, 42019));
    let ids: Vec<String> = (1..=3).map(|i| d.dept(&format!("d{i}"))).collect();
    let with_color = |image: &str, color: &str| {
        let color = color.to_string();
        let image = image.to_string();
        move |id: &str| spec_toml(id, &image, &format!("[env]\nCOLOR = \"{color}\"\n"))
    };
    let rows = apply_and_wait(&d, &ids, with_color(IMAGE_V1, "blue"));
    let docker_ids: BTreeMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), assert_container_matches(&d, id, &rows[id])))
        .collect();
    let ports: BTreeMap<String, u16> = ids
        .iter()
        .map(|id| (id.clone(), host_port(&rows[id])))
        .collect();
    let (d1, d2, d3) = (&ids[0], &ids[1], &ids[2]);
    for port in ports.values() {
        wait_health_ok(*port);
    }

    // Image :1 -> :2 on d2.
    let events = d.docker_events();
    let path = d.write_spec(d2, &with_color(IMAGE_V2, "blue")(d2));
    let report = d.agentctl_json(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        report["updated"],
        serde_json_array(&[d2]),
        "apply report: {report}"
    );
    assert_eq!(
        report["created"],
        serde_json_array(&[]),
        "apply report: {report}"
    );
    assert_eq!(
        report["deleted"],
        serde_json_array(&[]),
        "apply report: {report}"
    );
    let row = wait_for(
        UP,
        "d2 to run image :2, healthy, in a new container",
        || {
            d.summary(d2).filter(|r| {
                r["image"] == IMAGE_V2
                    && r["state"] == "running"
                    && r["health"] == "healthy"
                    && inspect(&container(d2)).is_some_and(|c| {
                        c["Id"] != docker_ids[d2].as_str() && c["Config"]["Image"] == IMAGE_V2
                    })
            })
        },
    );
    assert_eq!(
        host_port(&row),
        ports[d2],
        "the updated department must keep its port"
    );
    let new_d2 = assert_container_matches(&d, d2, &row);
    assert_ne!(new_d2, docker_ids[d2], "d2's container was not replaced");
    assert_eq!(
        inspect(&container(d2)).unwrap()["Config"]["Image"],
        IMAGE_V2
    );
    wait_until(UP, "/version on d2's port to answer 2", || {
        http_get(ports[d2], "/version").is_ok_and(|r| r.status == 200 && r.body == "2")
    });
    wait_until(
        RESYNC,
        "only three containers on the node (no leftover update candidate)",
        || d.containers().len() == 3,
    );

    // An env var changed on d3.
    let path = d.write_spec(d3, &with_color(IMAGE_V1, "green")(d3));
    let report = d.agentctl_json(&["apply", "-f", path.to_str().unwrap()]);
    assert_eq!(
        report["updated"],
        serde_json_array(&[d3]),
        "apply report: {report}"
    );
    let row = wait_for(UP, "d3 to run with COLOR=green, healthy", || {
        d.summary(d3).filter(|r| {
            r["state"] == "running"
                && r["health"] == "healthy"
                && inspect(&container(d3))
                    .is_some_and(|c| container_env(&c).contains(&"COLOR=green".to_string()))
        })
    });
    assert_eq!(
        host_port(&row),
        ports[d3],
        "the updated department must keep its port"
    );
    assert_ne!(
        assert_container_matches(&d, d3, &row),
        docker_ids[d3],
        "d3's container was not replaced"
    );
    wait_health_ok(ports[d3]);
    wait_until(RESYNC, "only three containers on the node", || {
        d.containers().len() == 3
    });

    let seen = events.finish();
    assert_no_lifecycle(&of_department(&seen, d1), "d1's spec did not change");
    assert!(
        of_department(&seen, d2)
            .iter()
            .any(|e| e["Action"] == "create"),
        "no container was created for d2's update:\n{}",
        DockerEvents::describe(&seen)
    );
    assert_eq!(
        container_id(&container(d1)).as_deref(),
        Some(docker_ids[d1].as_str()),
        "d1 was replaced"
    );
    let after: BTreeMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), container_id(&container(id)).unwrap()))
        .collect();

    // The same specs again: nothing to do.
    let events = d.docker_events();
    let report = d.agentctl_json(&["apply", "-f", d.specs_dir().to_str().unwrap()]);
    let mut unchanged: Vec<String> = report["unchanged"]
        .as_array()
        .unwrap_or_else(|| panic!("apply report without `unchanged`: {report}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    unchanged.sort();
    assert_eq!(unchanged, ids, "re-applying the same specs: {report}");
    for key in ["created", "updated", "deleted"] {
        assert_eq!(
            report[key],
            serde_json_array(&[]),
            "re-applying the same specs: {report}"
        );
    }
    std::thread::sleep(QUIET);
    assert_no_lifecycle(&events.finish(), "the same specs were applied again");
    for id in &ids {
        assert_eq!(
            container_id(&container(id)).as_ref(),
            Some(&after[id]),
            "{id} was replaced by a no-op apply"
        );
        assert_eq!(host_port(&d.summary(id).unwrap()), ports[id]);
    }
}

fn serde_json_array(items: &[&String]) -> Value {
    Value::Array(items.iter().map(|s| Value::String((*s).clone())).collect())
}

#[test]
fn delete_stops_and_removes_the_container_and_frees_its_port() {
    let d = daemon("del", (42020, 42029));
    let ids: Vec<String> = (1..=2).map(|i| d.dept(&format!("d{i}"))).collect();
    let rows = apply_and_wait(&d, &ids, |id| spec_toml(id, IMAGE_V1, ""));
    let (d1, d2) = (&ids[0], &ids[1]);
    let p1 = host_port(&rows[d1]);
    let keep = assert_container_matches(&d, d2, &rows[d2]);
    assert_container_matches(&d, d1, &rows[d1]);

    let events = d.docker_events();
    d.agentctl_ok(&["delete", d1]);
    wait_until(UP, "aio-d1 to be removed", || {
        !container_exists(&container(d1))
    });
    wait_until(RESYNC, "d1 to leave status", || {
        !department_ids(&d).contains(d1)
    });
    wait_until(RESYNC, "port of d1 to be free in `agentctl ports`", || {
        let leases = d.ports();
        !leases.iter().any(|l| l["department"] == d1.as_str())
            && leases
                .iter()
                .filter(|l| l["port"] == p1)
                .all(|l| l["status"] == "free")
    });
    wait_until(RESYNC, "the host port of d1 to be released", || {
        port_is_free(p1)
    });
    let leases = d.ports();
    assert!(
        leases
            .iter()
            .any(|l| l["department"] == d2.as_str() && l["status"] == "leased"),
        "d2 must still hold its lease: {leases:?}"
    );

    let seen = events.finish();
    let mine = of_department(&seen, d1);
    assert!(
        mine.iter().any(|e| e["Action"] == "destroy"),
        "no destroy event for d1:\n{}",
        DockerEvents::describe(&seen)
    );
    let dies: Vec<&Value> = mine.iter().filter(|e| e["Action"] == "die").collect();
    assert!(
        !dies.is_empty(),
        "d1's container never stopped:\n{}",
        DockerEvents::describe(&seen)
    );
    assert!(
        dies.iter()
            .all(|e| e["Actor"]["Attributes"]["exitCode"] == "0"),
        "d1 must be stopped with SIGTERM (the test agent then exits 0), not killed:\n{}",
        DockerEvents::describe(&mine)
    );
    assert_no_lifecycle(&of_department(&seen, d2), "d2 was not deleted");
    assert_eq!(container_id(&container(d2)), Some(keep));
}

#[test]
fn container_removed_behind_the_daemons_back_comes_back_on_its_port() {
    let d = daemon("heal", (42030, 42039));
    let ids: Vec<String> = (1..=2).map(|i| d.dept(&format!("d{i}"))).collect();
    let rows = apply_and_wait(&d, &ids, |id| spec_toml(id, IMAGE_V1, ""));
    let (d1, d2) = (&ids[0], &ids[1]);
    let p1 = host_port(&rows[d1]);
    let old = assert_container_matches(&d, d1, &rows[d1]);
    let keep = assert_container_matches(&d, d2, &rows[d2]);

    docker_ok(&["rm", "-f", &container(d1)]);
    let new = wait_for(RESYNC, "aio-d1 to be recreated and running", || {
        inspect(&container(d1))
            .filter(|c| c["State"]["Running"] == true && c["Id"] != old.as_str())
            .map(|c| c["Id"].as_str().unwrap().to_string())
    });
    let row = d.wait_running(d1, UP);
    assert_eq!(
        host_port(&row),
        p1,
        "the recreated department must keep its port"
    );
    assert_eq!(assert_container_matches(&d, d1, &row), new);
    wait_health_ok(p1);
    assert_eq!(container_id(&container(d2)), Some(keep), "d2 was touched");
}

#[test]
fn a_port_held_by_another_process_is_skipped() {
    let _held = hold_port(42040);
    let d = daemon("busy", (42040, 42042));
    let ids: Vec<String> = (1..=2).map(|i| d.dept(&format!("d{i}"))).collect();
    let rows = apply_and_wait(&d, &ids, |id| spec_toml(id, IMAGE_V1, ""));
    let ports: BTreeSet<u16> = ids.iter().map(|id| host_port(&rows[id])).collect();
    assert_eq!(
        ports,
        BTreeSet::from([42041, 42042]),
        "allocation must skip the held port 42040"
    );
    for id in &ids {
        assert_container_matches(&d, id, &rows[id]);
        wait_health_ok(host_port(&rows[id]));
    }
    let leases = d.ports();
    assert!(
        leases
            .iter()
            .any(|l| l["port"] == 42040 && l["status"] == "busy" && l["department"].is_null()),
        "ports --json must show 42040 busy (held by another process): {leases:?}"
    );
}

#[test]
fn invalid_specs_are_refused_naming_the_field_and_change_nothing() {
    let d = daemon("bad", (42050, 42059));
    let good = d.dept("good");
    let rows = apply_and_wait(&d, std::slice::from_ref(&good), |id| {
        spec_toml(id, IMAGE_V1, "host_port = 42050\n")
    });
    assert_eq!(host_port(&rows[&good]), 42050);
    let good_container = assert_container_matches(&d, &good, &rows[&good]);

    let bad2 = d.dept("b2");
    let bad3 = d.dept("b3");
    let bad4 = d.dept("b4");
    let bad5 = d.dept("b5");
    let cases = [
        ("id", spec_toml("../x", IMAGE_V1, ""), "id:"),
        (
            "unknown key",
            spec_toml(&bad2, IMAGE_V1, "colour = \"red\"\n"),
            "colour",
        ),
        (
            "memory above capacity",
            spec_toml(&bad3, IMAGE_V1, "[resources]\nmemory = \"100TiB\"\n"),
            "resources.memory:",
        ),
        (
            "duplicate host_port",
            spec_toml(&bad4, IMAGE_V1, "host_port = 42050\n"),
            "host_port:",
        ),
        (
            "host_port outside the pool",
            spec_toml(&bad5, IMAGE_V1, "host_port = 22\n"),
            "[ports] range 42050-42059",
        ),
    ];
    let events = d.docker_events();
    let bad_dir = d.dir().join("bad");
    fs::create_dir_all(&bad_dir).unwrap();
    for (i, (what, text, field)) in cases.iter().enumerate() {
        let path = bad_dir.join(format!("{i}.toml"));
        fs::write(&path, text).unwrap();
        let out = d.agentctl(&["apply", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a spec with a bad {what} was accepted:\n{text}"
        );
        let named = match field.strip_suffix(':') {
            Some(name) => names_field(&stderr, name),
            None => stderr.contains(field),
        };
        assert!(
            named,
            "refusing a bad {what}, stderr must name `{field}`; stderr: {stderr}"
        );
    }

    std::thread::sleep(QUIET);
    assert_eq!(
        department_ids(&d),
        BTreeSet::from([good.clone()]),
        "only the good department may exist"
    );
    for id in [&bad2, &bad3, &bad4, &bad5] {
        assert!(
            !container_exists(&container(id)),
            "a container was made for the refused {id}"
        );
    }
    let row = d.summary(&good).unwrap();
    assert_eq!(row["state"], "running");
    assert_eq!(
        assert_container_matches(&d, &good, &row),
        good_container,
        "the good department was touched"
    );
    assert_eq!(d.containers().len(), 1, "containers: {:?}", d.containers());
    assert_no_lifecycle(&events.finish(), "every spec was refused");
}

#[test]
fn a_secret_reaches_the_container_and_nowhere_else() {
    let d = TestDaemon::start(TestOptions {
        name: "sec",
        port_range: (42060, 42069),
        // Secrets must stay out of the log even at debug level.
        log_level: "debug",
        ..Default::default()
    });
    let id = d.dept("d1");
    let canary = format!("canary-{}-Zq9xK2pW", d.tag);
    let spec = spec_toml(
        &id,
        IMAGE_V1,
        &format!("[env]\nPLAIN = \"visible-value\"\n\n[secrets]\nDB_PASSWORD = \"{canary}\"\n"),
    );
    let path = d.write_spec(&id, &spec);
    let apply_out = d.agentctl_ok(&["apply", "-f", path.to_str().unwrap(), "--json"]);
    let row = d.wait_running(&id, UP);
    let port = host_port(&row);
    assert_container_matches(&d, &id, &row);

    // It is delivered.
    wait_until(UP, "the container to see DB_PASSWORD", || {
        http_get(port, "/env/DB_PASSWORD").is_ok_and(|r| r.status == 200 && r.body == "set")
    });
    assert_eq!(http_get(port, "/env/NOT_SET_ANYWHERE").unwrap().status, 404);
    let c = inspect(&container(&id)).unwrap();
    assert!(
        container_env(&c).contains(&format!("DB_PASSWORD={canary}")),
        "the secret is not in the container env"
    );

    // And nowhere else.
    let mut outputs: Vec<(String, String)> = vec![("agentctl apply --json".into(), apply_out)];
    for args in [
        vec!["show", id.as_str(), "--json"],
        vec!["show", id.as_str()],
        vec!["status", "--json"],
        vec!["status"],
        vec!["events", "--json"],
        vec!["ports", "--json"],
    ] {
        outputs.push((format!("agentctl {}", args.join(" ")), d.agentctl_ok(&args)));
    }
    let detail = d.agentctl_json(&["show", &id]);
    assert_eq!(
        detail["spec"]["secrets"]["DB_PASSWORD"], "********",
        "the secret must show masked: {detail}"
    );
    assert_eq!(
        detail["spec"]["env"]["PLAIN"], "visible-value",
        "plain env is shown: {detail}"
    );

    for path in [
        format!("/v1/departments/{id}"),
        "/v1/departments".to_string(),
        "/v1/node".to_string(),
        "/v1/events?after=0".to_string(),
        "/metrics".to_string(),
    ] {
        let reply = d
            .api_get(&path)
            .unwrap_or_else(|e| panic!("GET {path} on the API: {e}"));
        assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
        let headers: Vec<String> = reply
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        outputs.push((
            format!("GET {path}"),
            format!("{}\n{}", headers.join("\n"), reply.body),
        ));
    }
    let api_detail = d.api_get(&format!("/v1/departments/{id}")).unwrap();
    assert!(
        api_detail.body.contains(&id),
        "the API detail does not describe {id}: {}",
        api_detail.body
    );

    let labels = container_labels(&c).to_string();
    outputs.push(("docker inspect labels".into(), labels));
    let log = d.log_text();
    assert!(!log.trim().is_empty(), "the daemon wrote no log at all");
    outputs.push(("the daemon's log".into(), log));

    for (what, text) in &outputs {
        assert!(
            !text.contains(&canary),
            "the secret value leaked into {what}"
        );
    }
}

#[test]
fn explicit_host_ports_are_placed_before_pool_ports() {
    // A pool of three ports; the department that sorts first takes a pool
    // port, the one after it names the pool's lowest port explicitly. The
    // explicit port must be honoured and the pool department placed around it.
    let (low, high) = (47500, 47502);
    let d = daemon("explicit", (low, high));
    let pooled = d.dept("a");
    let pinned = d.dept("b");
    d.write_spec(&pooled, &spec_toml(&pooled, IMAGE_V1, ""));
    d.write_spec(
        &pinned,
        &spec_toml(&pinned, IMAGE_V1, &format!("host_port = {low}")),
    );
    d.apply(&d.specs_dir());
    let pinned_row = d.wait_running(&pinned, UP);
    let pooled_row = d.wait_running(&pooled, UP);
    assert_eq!(
        host_port(&pinned_row),
        low,
        "{pinned} must get its explicit host_port"
    );
    let pool_port = host_port(&pooled_row);
    assert!(
        pool_port > low && pool_port <= high,
        "{pooled} got {pool_port}: a pool department must not take {low}, which {pinned} names"
    );
    assert_container_matches(&d, &pinned, &pinned_row);
    assert_container_matches(&d, &pooled, &pooled_row);
    wait_health_ok(low);
    wait_health_ok(pool_port);
}

#[test]
fn stop_then_start_runs_the_same_container_again_on_its_port() {
    let d = daemon("stst", (42070, 42079));
    let id = d.dept("a");
    let rows = apply_and_wait(&d, std::slice::from_ref(&id), |id| {
        spec_toml(id, IMAGE_V1, "")
    });
    let port = host_port(&rows[&id]);
    let before = container_id(&container(&id)).expect("container of the department");

    // Back to back, as a script would: the late `die` of the operator's own
    // stop must not be judged as a failed run once the start is in.
    d.agentctl_ok(&["stop", &id]);
    assert!(
        !container_running(&container(&id)),
        "stop returned before the container stopped"
    );
    d.agentctl_ok(&["start", &id]);
    let row = d.wait_running(&id, UP);
    assert_eq!(host_port(&row), port, "same port after stop/start");
    assert_eq!(
        container_id(&container(&id)).as_deref(),
        Some(before.as_str())
    );
    wait_until(UP, "the restarted container to answer /health", || {
        http_get(port, "/health").is_ok_and(|r| r.status == 200)
    });
    // And it stays up: nothing judged the operator's stop afterwards.
    std::thread::sleep(QUIET);
    let row = d.summary(&id).expect("status row");
    assert_eq!(row["state"], "running", "after stop/start: {row}");
    assert!(container_running(&container(&id)));
}

#[test]
fn sighup_rereads_agent_toml_applies_the_log_level_and_refuses_a_bad_file() {
    let d = daemon("hup", (42080, 42089));
    let pid = d.pid().expect("daemon pid");
    let original = fs::read_to_string(&d.config_path).expect("read agent.toml");
    assert!(original.contains("resync_interval = \"1s\""), "{original}");
    assert!(!d.log_text().contains("\"level\":\"DEBUG\""));

    // A live setting and one that needs a restart.
    let edited = original
        .replace("resync_interval = \"1s\"", "resync_interval = \"2s\"")
        .replace("level = \"info\"", "level = \"debug\"");
    fs::write(&d.config_path, &edited).expect("write agent.toml");
    sighup(pid);
    wait_until(QUIET, "the reload to apply the log level", || {
        d.log_text().contains("log level is now debug")
    });
    // A malformed request makes the TCP API log a debug line, which only the
    // new level lets through.
    wait_until(QUIET, "debug lines after the reload", || {
        if let Ok(mut conn) = std::net::TcpStream::connect(d.api_addr) {
            use std::io::{Read, Write};
            let _ = conn.write_all(b"NOT HTTP AT ALL\r\n\r\n");
            let _ = conn.read(&mut [0u8; 512]);
        }
        d.log_text().contains("\"level\":\"DEBUG\"")
    });
    let log = d.log_text();
    assert!(
        log.contains("changed since the daemon started (resync_interval)"),
        "the reload must name what needs a restart:\n{}",
        d.log_tail(20)
    );

    // A bad file is refused whole, naming the key; the daemon keeps serving.
    fs::write(&d.config_path, format!("bogus_key = 1\n{edited}")).expect("write agent.toml");
    sighup(pid);
    wait_until(QUIET, "the bad reload to be refused", || {
        d.log_text().contains("Reload refused")
    });
    assert!(d.log_text().contains("bogus_key"), "{}", d.log_tail(10));
    assert!(d.status()["departments"].is_array());
}

/// A sample of the daemon's `/metrics` (TCP API), if present.
fn metric(d: &TestDaemon, series: &str) -> Option<f64> {
    let text = d.api_get("/metrics").ok()?.body;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_department_applied_at_run_time_gets_the_resync() {
    // Started empty, so the department exists only through a run-time apply.
    let d = daemon("rtres", (42100, 42109));
    let id = d.dept("a");
    apply_and_wait(&d, std::slice::from_ref(&id), |id| {
        spec_toml(id, IMAGE_V1, "")
    });
    d.agentctl_ok(&["stop", &id]);
    assert!(!container_running(&container(&id)));
    // A start behind the daemon's back: Docker's `start` event is not one the
    // department acts on, so only the resync can notice the operator's stop
    // is no longer what runs.
    docker_ok(&["start", &container(&id)]);
    wait_until(
        RESYNC,
        "the resync to stop again the container the operator stopped",
        || !container_running(&container(&id)),
    );
    let row = d.summary(&id).expect("status row");
    assert_eq!(row["state"], "stopped", "{row}");
}

#[test]
fn a_delete_waiting_on_a_hung_pull_blocks_no_other_department() {
    // A "registry" that accepts connections and never answers: the pull of
    // its image hangs until docker.pull_timeout.
    let registry = hold_port(42119);
    let d = TestDaemon::start(TestOptions {
        name: "hung",
        port_range: (42110, 42118),
        extra_toml: "[docker]\npull_timeout = \"10m\"\n".into(),
        ..Default::default()
    });
    let (hung, other) = (d.dept("a"), d.dept("b"));
    apply_and_wait(&d, std::slice::from_ref(&other), |id| {
        spec_toml(id, IMAGE_V1, "")
    });
    let other_before = container_id(&container(&other)).expect("container of b");
    d.write_spec(&hung, &spec_toml(&hung, "127.0.0.1:42119/fleet/hang:1", ""));
    d.agentctl_ok(&[
        "apply",
        "-f",
        d.specs_dir().join(format!("{hung}.toml")).to_str().unwrap(),
    ]);
    wait_until(UP, "the hung department to be pulling", || {
        d.summary(&hung).is_some_and(|r| r["state"] == "pulling")
    });

    // The delete is served by the department task while its pull hangs: the
    // pull is a cancellable job (machine.rs), aborted by the delete.
    let socket = d.socket.clone();
    let hung_id = hung.clone();
    let delete_started = std::time::Instant::now();
    let delete = std::thread::spawn(move || {
        std::process::Command::new(bin_dir().join("agentctl"))
            .arg("--socket")
            .arg(&socket)
            .args(["delete", &hung_id])
            .output()
    });
    std::thread::sleep(Duration::from_secs(2));
    let runs_before = metric(&d, "fleet_agent_reconcile_runs_total").expect("reconcile runs");

    let started = std::time::Instant::now();
    d.agentctl_ok(&["restart", &other]);
    let took = started.elapsed();
    eprintln!("restart of another department during the hung delete: {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "`agentctl restart` of another department took {took:?} while a delete waited on a pull"
    );
    d.wait_running(&other, UP);
    assert_eq!(
        container_id(&container(&other)).as_deref(),
        Some(other_before.as_str()),
        "restart keeps the container"
    );
    wait_until(RESYNC, "the resync loop to keep running", || {
        metric(&d, "fleet_agent_reconcile_runs_total").is_some_and(|n| n >= runs_before + 3.0)
    });
    // Applies of other departments do not wait for the delete either.
    let third = d.dept("c");
    let third_file = d.write_spec(&third, &spec_toml(&third, IMAGE_V1, ""));
    let started = std::time::Instant::now();
    d.apply(&third_file);
    let took = started.elapsed();
    eprintln!("apply of another department during the hung delete: {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "`agentctl apply` of another department took {took:?} while a delete waited on a pull"
    );
    d.wait_running(&third, UP);
    for beat in ["event", "resync"] {
        let age = metric(
            &d,
            &format!("fleet_agent_loop_heartbeat_age_seconds{{loop=\"{beat}\"}}"),
        )
        .expect("heartbeat metric");
        assert!(
            age < 5.0,
            "the {beat} loop's heartbeat is {age}s old during the delete"
        );
    }
    let deleted = delete
        .join()
        .expect("delete thread")
        .expect("run agentctl delete");
    assert!(
        deleted.status.success(),
        "agentctl delete during the hung pull failed: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let took = delete_started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "agentctl delete during a hung pull took {took:?}: the pull must be aborted, not waited for"
    );
    assert!(
        d.summary(&hung).is_none(),
        "the deleted department is still listed"
    );
    drop(registry);
}

/// How a test loses the daemon's store between a kill -9 and the restart.
#[derive(Clone, Copy, Debug)]
enum Loss {
    Garbage,
    Deleted,
}

fn lose_state(d: &TestDaemon, loss: Loss) {
    let db = d.dir().join("state").join("state.db");
    match loss {
        Loss::Garbage => {
            let garbage: Vec<u8> = (0..16_384u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect();
            // Into the WAL too: after a kill -9 it still holds the newest
            // pages (page 1 included), from which SQLite alone would recover.
            let wal = format!("{}-wal", db.display());
            if std::path::Path::new(&wal).exists() {
                fs::write(&wal, &garbage).unwrap();
            }
            fs::write(&db, garbage).unwrap();
        }
        Loss::Deleted => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
    }
}

fn node_json(d: &TestDaemon) -> Value {
    let reply = d.api_get("/v1/node").expect("GET /v1/node");
    assert_eq!(reply.status, 200, "{}", reply.body);
    fleet_tests::serde_json::from_str(&reply.body).unwrap()
}

/// After each loss: every department back on the same container and port,
/// the loss reported in /v1/node, /metrics and `agentctl doctor`.
fn assert_rebuilt(
    d: &TestDaemon,
    ids: &[String],
    before: &BTreeMap<String, (String, u16)>,
    loss: Loss,
) {
    for id in ids {
        let row = d.wait_running(id, UP);
        let (docker_id, port) = &before[id];
        assert_eq!(host_port(&row), *port, "{loss:?}: {id} changed port");
        assert_eq!(
            &assert_container_matches(d, id, &row),
            docker_id,
            "{loss:?}: {id} was replaced"
        );
    }
    let rebuilt = &node_json(d)["state_rebuilt"];
    let reason = match loss {
        Loss::Garbage => "corrupt",
        Loss::Deleted => "missing",
    };
    assert_eq!(
        rebuilt["reason"], reason,
        "{loss:?}: /v1/node says {rebuilt}"
    );
    assert_eq!(
        metric(
            d,
            &format!("fleet_agent_state_rebuilt{{reason=\"{reason}\"}}")
        ),
        Some(1.0)
    );
    let doctor = d.agentctl(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        !doctor.status.success() && text.contains("state.db"),
        "{loss:?}: doctor must fail naming state.db:\n{text}"
    );
    if let Loss::Garbage = loss {
        let kept = rebuilt["moved_to"].as_str().expect("moved_to").to_string();
        assert!(
            std::path::Path::new(&kept).exists() && kept.contains("state.db.corrupt-"),
            "the unreadable file is kept: {kept}"
        );
    }
}

#[test]
fn a_lost_or_garbage_state_db_after_kill9_adopts_every_container() {
    let mut d = daemon("lost", (42120, 42129));
    let ids: Vec<String> = (1..=3).map(|i| d.dept(&format!("d{i}"))).collect();
    // One explicit host_port (its own container holds it when the store is
    // gone) and one secret (it lives in the container's env, not a label).
    let rows = apply_and_wait(&d, &ids, |id| {
        if id.ends_with("d1") {
            spec_toml(id, IMAGE_V1, "host_port = 42129")
        } else if id.ends_with("d2") {
            spec_toml(id, IMAGE_V1, "[secrets]\nDB_PASSWORD = \"canary-lost-1\"")
        } else {
            spec_toml(id, IMAGE_V1, "")
        }
    });
    let before: BTreeMap<String, (String, u16)> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                (
                    assert_container_matches(&d, id, &rows[id]),
                    host_port(&rows[id]),
                ),
            )
        })
        .collect();
    let events = d.docker_events();
    for loss in [Loss::Garbage, Loss::Deleted] {
        d.kill9();
        lose_state(&d, loss);
        d.restart();
        assert_rebuilt(&d, &ids, &before, loss);
    }
    std::thread::sleep(QUIET);
    assert_no_lifecycle(
        &events.finish(),
        "a lost state.db must be rebuilt from labels, not by recreating containers",
    );
    let labels = container_labels(&inspect(&container(&ids[1])).unwrap());
    assert!(
        !labels.to_string().contains("canary-lost-1"),
        "a secret reached a label: {labels}"
    );
}

#[test]
fn coordinator_away_and_state_db_lost_keeps_every_container() {
    use fleet_tests::coordinator::StubCoordinator;
    let mut stub = StubCoordinator::start_on(48300);
    let mut d = TestDaemon::start(TestOptions {
        name: "lostc",
        port_range: (42130, 42139),
        extra_toml: format!(
            "[coordinator]\nurl = \"{}\"\npoll_interval = \"1s\"\n",
            stub.url()
        ),
        ..Default::default()
    });
    let ids: Vec<String> = (1..=2).map(|i| d.dept(&format!("d{i}"))).collect();
    let departments: Vec<Value> = ids
        .iter()
        .map(|id| {
            fleet_tests::serde_json::json!({
                "id": id,
                "image": IMAGE_V1,
                "secrets": {"API_KEY": format!("canary-{id}")},
                "health": {"path": "/health", "interval": "1s", "timeout": "500ms", "retries": 3, "start_period": "0s"},
                "restart": {"stop_timeout": "5s"},
            })
        })
        .collect();
    stub.set_document(&d.node_id, 1, Value::Array(departments));
    let before: BTreeMap<String, (String, u16)> = ids
        .iter()
        .map(|id| {
            let row = d.wait_running(id, UP);
            (
                id.clone(),
                (assert_container_matches(&d, id, &row), host_port(&row)),
            )
        })
        .collect();
    stub.go_away();
    let events = d.docker_events();
    for loss in [Loss::Garbage, Loss::Deleted] {
        d.kill9();
        lose_state(&d, loss);
        d.restart();
        assert_rebuilt(&d, &ids, &before, loss);
        // Several resyncs with the coordinator still away: nothing removed.
        std::thread::sleep(QUIET);
        for id in &ids {
            assert!(container_running(&container(id)), "{loss:?}: {id} is gone");
        }
    }
    assert_no_lifecycle(
        &events.finish(),
        "with the coordinator away, a lost store must keep every container as it is",
    );
    let env = container_env(&inspect(&container(&ids[0])).unwrap());
    assert!(env
        .iter()
        .any(|e| e == &format!("API_KEY=canary-{}", ids[0])));
}

#[test]
fn renaming_a_department_onto_its_own_port_in_one_document_works() {
    let d = daemon("renm", (42140, 42144));
    let (old, new) = (d.dept("old"), d.dept("new"));
    let row = apply_and_wait(&d, std::slice::from_ref(&old), |id| {
        spec_toml(id, IMAGE_V1, "host_port = 42143")
    })
    .remove(&old)
    .unwrap();
    assert_eq!(host_port(&row), 42143);
    // One document: `old` gone, `new` on the port `old`'s container holds.
    fs::remove_file(d.specs_dir().join(format!("{old}.toml"))).unwrap();
    d.write_spec(&new, &spec_toml(&new, IMAGE_V1, "host_port = 42143"));
    d.agentctl_ok(&["apply", "--prune", "-f", d.specs_dir().to_str().unwrap()]);
    let row = d.wait_running(&new, UP);
    assert_eq!(host_port(&row), 42143);
    assert!(
        !container_exists(&container(&old)),
        "the renamed department's old container is left"
    );
    assert!(d.summary(&old).is_none());
    wait_health_ok(42143);
}

#[test]
fn a_same_named_container_of_another_node_is_never_touched() {
    let d = daemon("foreign", (42150, 42159));
    let id = d.dept("a");
    // `aio-<id>` with the department label right, the node label not ours.
    let foreign = TestContainer::run(
        "some-other-node",
        &container(&id),
        &[
            "--label",
            "fleet-agent.managed=true",
            "--label",
            &format!("fleet-agent.department={id}"),
            "--label",
            "fleet-agent.spec-hash=0000",
            IMAGE_V1,
        ],
    );
    d.write_spec(&id, &spec_toml(&id, IMAGE_V1, ""));
    d.apply(&d.specs_dir());
    std::thread::sleep(QUIET);
    let c = foreign.inspect();
    assert_eq!(
        c["State"]["Running"], true,
        "the other node's container was stopped"
    );
    assert_eq!(
        c["State"]["StartedAt"],
        inspect(&foreign.id).unwrap()["State"]["StartedAt"]
    );
    let row = d.summary(&id).expect("status row");
    assert_ne!(
        row["state"], "running",
        "it adopted another node's container: {row}"
    );
    assert!(
        row["container_id"].is_null()
            || !foreign
                .id
                .starts_with(row["container_id"].as_str().unwrap_or("-")),
        "status claims the other node's container: {row}"
    );
    d.agentctl_ok(&["delete", &id]);
    assert!(
        container_running(&foreign.id),
        "deleting the department removed another node's container"
    );
}

#[test]
fn no_container_is_removed_as_an_orphan_before_the_first_sync() {
    use fleet_tests::coordinator::StubCoordinator;
    let mut stub = StubCoordinator::start_on(48301);
    stub.go_away();
    let d = TestDaemon::start(TestOptions {
        name: "orphan",
        port_range: (42160, 42169),
        extra_toml: format!(
            "[coordinator]\nurl = \"{}\"\npoll_interval = \"1s\"\n",
            stub.url()
        ),
        ..Default::default()
    });
    // A managed container of this node that no store and no label explains
    // (as one made by an older build, without fleet-agent.spec).
    let id = d.dept("old");
    let old = TestContainer::run(
        &d.node_id,
        &container(&id),
        &[
            "--label",
            "fleet-agent.managed=true",
            "--label",
            &format!("fleet-agent.department={id}"),
            "--label",
            "fleet-agent.role=primary",
            IMAGE_V1,
        ],
    );
    // Several resyncs (1s) with the coordinator away: the node does not know
    // its desired state yet, so nothing may go.
    std::thread::sleep(QUIET);
    assert!(
        container_running(&old.id),
        "a container was removed as an orphan before any desired state was known"
    );
    // The coordinator's document (without that department) applies: now it goes.
    stub.come_back();
    stub.set_document(&d.node_id, 1, Value::Array(vec![]));
    wait_until(
        RESYNC,
        "the orphan to be removed after the first sync",
        || !container_exists(&old.id),
    );
}

/// The LogConfig a department container was created with, as the engine has it.
fn log_config_of(id: &str) -> (String, BTreeMap<String, String>) {
    let c = inspect(&container(id)).unwrap_or_else(|| panic!("no container for {id}"));
    let log = &c["HostConfig"]["LogConfig"];
    let options = log["Config"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    (
        log["Type"].as_str().unwrap_or_default().to_string(),
        options,
    )
}

#[test]
fn container_logging_is_the_engines_driver_capped_or_what_docker_config_names() {
    let engine_driver = docker_ok(&["info", "--format", "{{.LoggingDriver}}"])
        .trim()
        .to_string();

    // Default: the engine's own driver; a size cap where it writes files.
    let d = daemon("lg1", (43600, 43609));
    let id = d.dept("a");
    d.write_spec(&id, &spec_toml(&id, IMAGE_V1, ""));
    d.apply(&d.specs_dir());
    d.wait_running(&id, UP);
    let (driver, options) = log_config_of(&id);
    assert_eq!(driver, engine_driver);
    if ["json-file", "local"].contains(&engine_driver.as_str()) {
        assert_eq!(options.get("max-size").map(String::as_str), Some("10m"));
        assert_eq!(options.get("max-file").map(String::as_str), Some("3"));
    }
    drop(d);

    // [docker] log_driver and log_options: taken as given, the missing cap filled.
    let d = TestDaemon::start(TestOptions {
        name: "lg2",
        port_range: (43610, 43619),
        extra_toml: "[docker]\nlog_driver = \"local\"\nlog_options = { max-size = \"2m\", compress = \"false\" }\n".into(),
        ..Default::default()
    });
    let id = d.dept("b");
    d.write_spec(&id, &spec_toml(&id, IMAGE_V1, ""));
    d.apply(&d.specs_dir());
    d.wait_running(&id, UP);
    let (driver, options) = log_config_of(&id);
    assert_eq!(driver, "local");
    assert_eq!(
        options,
        BTreeMap::from([
            ("compress".to_string(), "false".to_string()),
            ("max-file".to_string(), "3".to_string()),
            ("max-size".to_string(), "2m".to_string()),
        ])
    );
    // The driver is one `docker logs` (and so `agentctl logs`) can read.
    let logs = d.agentctl(&["logs", &id]);
    assert!(
        logs.status.success(),
        "agentctl logs failed with the local driver: {}",
        String::from_utf8_lossy(&logs.stderr)
    );
}

/// Restart counts and the crash-loop state are not in the store alone: after
/// a kill -9 and a lost `state.db`, a parked department comes back parked
/// with its restart count (rebuilt from Docker's own event record), and
/// nothing starts it again. Ports 43700-43709.
///
/// `serial_`: the rebuild reads Docker's event record, which the engine keeps
/// for the last 256 events of the whole host; the suite's parallel phase
/// makes that many in seconds and pushed this test's restarts out of it (seen:
/// "a parked crash loop was started again"). Alone, the record is this
/// test's, as on a node whose departments are all its daemon's.
#[test]
fn serial_a_crash_loop_and_its_restart_count_survive_a_lost_state_db() {
    let mut d = daemon("rcnt", (43700, 43709));
    let id = d.dept("loop");
    let path = d.write_spec(
        &id,
        &spec_toml_with_restart(
            &id,
            IMAGE_V1,
            "[env]\nCRASH_AFTER = \"1s\"\nEXIT_CODE = \"3\"",
            "max_retries = 2\nbackoff = \"1s\"\nwindow = \"10m\"\nstop_timeout = \"5s\"\n",
        ),
    );
    d.apply(&path);
    let parked = wait_for(UP, &format!("{id} to be crash_looping"), || {
        d.summary(&id).filter(|s| s["state"] == "crash_looping")
    });
    assert_eq!(parked["restarts"], 2, "{parked}");
    let docker_id = container_id(&container(&id)).expect("the parked container is kept");
    for loss in [Loss::Garbage, Loss::Deleted] {
        let events = d.docker_events();
        d.kill9();
        lose_state(&d, loss);
        d.restart();
        let row = wait_for(RESYNC, &format!("{loss:?}: {id} parked again"), || {
            d.summary(&id).filter(|s| s["state"] == "crash_looping")
        });
        assert_eq!(
            row["restarts"], 2,
            "{loss:?}: the restart count must come back: {row}"
        );
        assert!(node_json(&d)["state_rebuilt"]["reason"].is_string());
        std::thread::sleep(QUIET);
        let seen = events.finish();
        let starts: Vec<&Value> = seen
            .iter()
            .filter(|e| e["Action"] == "start" && e["Actor"]["ID"] == docker_id.as_str())
            .collect();
        assert!(
            starts.is_empty(),
            "{loss:?}: a parked crash loop was started again after the store was lost:\n{}",
            DockerEvents::describe(&seen)
        );
        assert_eq!(
            container_id(&container(&id)).as_deref(),
            Some(docker_id.as_str()),
            "{loss:?}: the container was replaced"
        );
    }
}

/// While a delete waits (a container that ignores SIGTERM, with a long stop
/// timeout), an apply naming that department answers 409 "being deleted" and
/// changes nothing; an apply of another department goes through at once; the
/// event and resync loops (the watchdog's heartbeat) keep beating; once the
/// delete is done the same apply works. Ports 43710-43719.
#[test]
fn an_apply_naming_a_department_being_deleted_answers_409_and_others_apply() {
    let d = daemon("dele", (43710, 43719));
    let (slow, other) = (d.dept("slow"), d.dept("other"));
    let slow_toml = spec_toml_with_restart(
        &slow,
        IMAGE_V1,
        "[env]\nIGNORE_SIGTERM = \"1\"",
        "stop_timeout = \"25s\"\n",
    );
    let slow_file = d.write_spec(&slow, &slow_toml);
    d.apply(&slow_file);
    d.wait_running(&slow, UP);

    let socket = d.socket.clone();
    let slow_id = slow.clone();
    let delete_started = std::time::Instant::now();
    let delete = std::thread::spawn(move || {
        std::process::Command::new(bin_dir().join("agentctl"))
            .arg("--socket")
            .arg(&socket)
            .args(["delete", &slow_id])
            .output()
    });
    // The same spec again (until the delete has begun an apply of it is
    // "unchanged"), by agentctl and on the wire: 409, nothing changed.
    let stderr = wait_for(RESYNC, "an apply refused as being deleted", || {
        let refused = d.agentctl(&["apply", "-f", slow_file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&refused.stderr).to_string();
        (!refused.status.success()).then_some(stderr)
    });
    assert!(stderr.contains("is being deleted"), "{stderr}");
    let body = format!(r#"{{"departments":[{{"id":"{slow}","image":"{IMAGE_V1}"}}]}}"#);
    let curl = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&d.socket)
        .args(["-H", "content-type: application/json", "-d", &body])
        .arg("http://fleet-agentd/v1/apply")
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "409");
    assert!(
        delete_started.elapsed() < Duration::from_secs(20),
        "the delete finished before the 409 could be seen; the test proves nothing"
    );

    // Another department applies meanwhile, at once.
    let other_file = d.write_spec(&other, &spec_toml(&other, IMAGE_V1, ""));
    let started = std::time::Instant::now();
    d.apply(&other_file);
    let took = started.elapsed();
    eprintln!("apply of another department during the waiting delete: {took:?}");
    assert!(
        took < Duration::from_secs(10),
        "`agentctl apply` of another department took {took:?} while a delete waited"
    );
    d.wait_running(&other, UP);
    for beat in ["event", "resync"] {
        let age = metric(
            &d,
            &format!("fleet_agent_loop_heartbeat_age_seconds{{loop=\"{beat}\"}}"),
        )
        .expect("heartbeat metric");
        assert!(
            age < 5.0,
            "the {beat} loop's heartbeat is {age}s old during the delete"
        );
    }
    assert!(container_exists(&container(&slow)), "deleted too early");

    let deleted = delete
        .join()
        .expect("delete thread")
        .expect("run agentctl delete");
    assert!(
        deleted.status.success(),
        "agentctl delete failed: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let took = delete_started.elapsed();
    eprintln!("delete of a container ignoring SIGTERM: {took:?}");
    assert!(!container_exists(&container(&slow)));
    // The refused apply left nothing behind; the same apply works now.
    assert!(
        d.summary(&slow).is_none(),
        "the refused apply changed state"
    );
    d.apply(&slow_file);
    d.wait_running(&slow, UP);
    assert!(container_running(&container(&other)));
}
