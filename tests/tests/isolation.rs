//! Acceptance tests of host hygiene (issue 16, part 1) against the real engine:
//! the department network (created with inter-container communication off,
//! adopted when present), departments that cannot reach each other but reach
//! a host service, hardening that shows in `docker inspect` and contains a
//! thread bomb, and secrets as files absent from `docker inspect` and from the
//! engine's `config.v2.json`.
//!
//! Ports: 43200-43299 (ten per daemon; the host service of the network test
//! listens on 43290). Each test names its own network (`<tag>_net`, removed at
//! the end) so tests side by side never share one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::serde_json::Value;
use fleet_tests::*;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const UP: Duration = Duration::from_secs(90);

/// Removes a test's network once its daemon (declared after it) has gone and
/// taken its containers along.
struct NetworkGuard(String);

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.0]);
    }
}

fn daemon(name: &'static str, port_range: (u16, u16), containers: &str) -> TestDaemon {
    TestDaemon::start(TestOptions {
        name,
        port_range,
        extra_toml: format!("[containers]\n{containers}\n"),
        ..Default::default()
    })
}

fn container(id: &str) -> String {
    format!("aio-{id}")
}

fn port_of(row: &Value) -> u16 {
    row["host_port"].as_u64().expect("a host port") as u16
}

fn network_inspect(name: &str) -> Value {
    let out = docker_ok(&["network", "inspect", name]);
    let v: Value = fleet_tests::serde_json::from_str(&out).expect("network inspect is JSON");
    v[0].clone()
}

fn ip_on(c: &Value, network: &str) -> String {
    c["NetworkSettings"]["Networks"][network]["IPAddress"]
        .as_str()
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| panic!("container is not on {network}: {}", c["NetworkSettings"]))
        .to_string()
}

fn apply(d: &TestDaemon, id: &str, extra: &str) -> Value {
    let path = d.write_spec(id, &spec_toml(id, IMAGE_V1, extra));
    d.agentctl_ok(&["apply", "-f", path.to_str().unwrap()]);
    d.wait_running(id, UP)
}

#[test]
fn departments_cannot_reach_each_other_but_reach_the_host() {
    let probe_name = format!("iso{}", std::process::id());
    let net = format!("{probe_name}_net");
    let _guard = NetworkGuard(net.clone());
    let d = daemon(
        "isonet",
        (43200, 43209),
        &format!("network = \"{net}\"\nbridge_name = \"\"\n"),
    );
    let a = d.dept("a");
    let b = d.dept("b");
    let row_a = apply(&d, &a, "");
    let row_b = apply(&d, &b, "");
    let (port_a, port_b) = (port_of(&row_a), port_of(&row_b));

    // Created by the daemon, with its label and inter-container communication off.
    let n = network_inspect(&net);
    assert_eq!(n["Labels"]["fleet-agent.managed"], "true", "{n}");
    assert_eq!(
        n["Options"]["com.docker.network.bridge.enable_icc"], "false",
        "{n}"
    );
    let gateway = n["IPAM"]["Config"][0]["Gateway"]
        .as_str()
        .expect("the network has a gateway")
        .to_string();

    let ca = inspect(&container(&a)).unwrap();
    let cb = inspect(&container(&b)).unwrap();
    let ip_b = ip_on(&cb, &net);
    ip_on(&ca, &net);
    assert_eq!(ca["HostConfig"]["NetworkMode"], net.as_str());

    // b listens on its container address: the host reaches it there, so a
    // refusal below is the network's doing, not a wrong address.
    let from_host = http_get_addr(format!("{ip_b}:8080").parse().unwrap(), "/health")
        .expect("the host reaches b's container address");
    assert_eq!(from_host.status, 200);

    // a cannot reach b's container, by address and port.
    let tried = http_get(port_a, &format!("/connect/{ip_b}:8080")).unwrap();
    assert_eq!(
        tried.status, 502,
        "department a reached department b's container: {}",
        tried.body
    );
    // Nor b's host port through the host's address on the network: the
    // ports are bound to loopback (`ports.bind`), which is the container's own.
    let tried = http_get(port_a, &format!("/connect/{gateway}:{port_b}")).unwrap();
    assert_eq!(
        tried.status, 502,
        "department a reached b's host port through the gateway: {}",
        tried.body
    );

    // What the node allows: a service on the host (PostgreSQL's place),
    // reached at the network's gateway address.
    let service = TcpListener::bind(("0.0.0.0", 43290)).expect("bind the host service");
    let tried = http_get(port_a, &format!("/connect/{gateway}:43290")).unwrap();
    assert_eq!(
        tried.status, 200,
        "department a did not reach the host service: {}",
        tried.body
    );
    drop(service);
}

#[test]
fn a_network_that_exists_is_adopted_as_it_is() {
    let net = format!("iso{}_own", std::process::id());
    let _guard = NetworkGuard(net.clone());
    docker_ok(&["network", "create", "--label", "made-by=the-test", &net]);
    let before = network_inspect(&net)["Id"].clone();
    let d = daemon("isoown", (43210, 43219), &format!("network = \"{net}\"\n"));
    let id = d.dept("a");
    apply(&d, &id, "");
    let c = inspect(&container(&id)).unwrap();
    ip_on(&c, &net);
    let after = network_inspect(&net);
    assert_eq!(after["Id"], before, "the network was replaced");
    assert_eq!(after["Labels"]["made-by"], "the-test");
    // Adopted as it is, inter-container communication on (the daemon warns):
    // here one department reaches the other, so the refusal the isolation
    // test sees is the agent's network and not a probe that cannot connect.
    let other = d.dept("c");
    let row = apply(&d, &other, "");
    let ip = ip_on(&inspect(&container(&id)).unwrap(), &net);
    let tried = http_get(port_of(&row), &format!("/connect/{ip}:8080")).unwrap();
    assert_eq!(tried.status, 200, "{}", tried.body);
    assert!(
        d.log_text()
            .contains("allows inter-container communication"),
        "no warning about the shared network"
    );
    // A spec naming a network the node does not allow is refused, naming it.
    let bad = d.dept("b");
    let path = d.write_spec(
        &bad,
        &spec_toml(&bad, IMAGE_V1, "network = \"somewhere-else\"\n"),
    );
    let out = d.agentctl(&["apply", "-f", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{bad}.network")), "{stderr}");
    assert!(!container_exists(&container(&bad)));
}

#[test]
fn hardening_shows_in_inspect_and_a_thread_bomb_stays_inside_its_department() {
    let net = format!("iso{}_hard", std::process::id());
    let _guard = NetworkGuard(net.clone());
    let d = daemon(
        "isohard",
        (43220, 43229),
        &format!("network = \"{net}\"\nbridge_name = \"\"\nmax_pids_limit = 1024\n"),
    );
    let bomb = d.dept("bomb");
    let calm = d.dept("calm");
    let row = apply(
        &d,
        &bomb,
        "[security]\npids_limit = 64\nread_only_root = true\ntmpfs_size = \"8MiB\"\n",
    );
    let calm_row = apply(&d, &calm, "");
    let (port, calm_port) = (port_of(&row), port_of(&calm_row));

    let c = inspect(&container(&bomb)).unwrap();
    let hc = &c["HostConfig"];
    assert_eq!(hc["PidsLimit"], 64, "{hc}");
    assert_eq!(
        hc["CapDrop"],
        fleet_tests::serde_json::json!(["ALL"]),
        "{hc}"
    );
    assert!(hc["CapAdd"].is_null(), "{hc}");
    assert_eq!(hc["Init"], true, "{hc}");
    assert_eq!(hc["ReadonlyRootfs"], true, "{hc}");
    assert!(
        hc["Tmpfs"]["/tmp"]
            .as_str()
            .unwrap_or("")
            .contains("size=8388608"),
        "{hc}"
    );
    assert!(
        hc["SecurityOpt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "no-new-privileges:true"),
        "{hc}"
    );
    let calm_hc = inspect(&container(&calm)).unwrap()["HostConfig"].clone();
    assert_eq!(calm_hc["PidsLimit"], 512, "the node default: {calm_hc}");
    assert_eq!(calm_hc["ReadonlyRootfs"], false);

    // The root is read-only.
    let w = http_get(port, "/write-root").unwrap();
    assert_eq!(w.status, 409, "{}", w.body);
    assert_eq!(http_get(calm_port, "/write-root").unwrap().status, 200);

    // A thread bomb gets what its limit allows, not what it asks for.
    let r = http_get(port, "/spawn/5000").unwrap();
    let got: u64 = r.body.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(got < 64, "{}", r.body);
    // Meanwhile the other department is not touched by that limit.
    let r = http_get(calm_port, "/spawn/200").unwrap();
    assert_eq!(r.body, "spawned 200 of 200");
    // The bombed department recovers once its threads end; the probe and
    // the metrics keep working throughout.
    wait_until(UP, "the bombed department to answer again", || {
        http_get(port, "/health").is_ok_and(|r| r.status == 200)
    });
    let row = d.wait_running(&bomb, UP);
    assert_eq!(row["health"], "healthy");
    let metrics = d.api_get("/metrics").unwrap().body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fleet_agent_department_up") && l.contains(&bomb)),
        "no fleet_agent_department_up for {bomb}"
    );

    // Beyond the node's bounds: refused naming the field.
    let greedy = d.dept("greedy");
    let path = d.write_spec(
        &greedy,
        &spec_toml(
            &greedy,
            IMAGE_V1,
            "[security]\npids_limit = 100000\ncap_add = [\"SYS_ADMIN\"]\n",
        ),
    );
    let out = d.agentctl(&["apply", "-f", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("{greedy}.security.pids_limit")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{greedy}.security.cap_add[0]")),
        "{stderr}"
    );
}

fn fnv(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in bytes {
        hash = (hash ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{} {hash:016x}", bytes.len())
}

fn config_v2(id: &str) -> String {
    fs::read_to_string(format!("/var/lib/docker/containers/{id}/config.v2.json"))
        .expect("read the engine's config.v2.json (the tests run as root)")
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn secrets_as_files_are_in_neither_inspect_nor_config_v2() {
    let net = format!("iso{}_sec", std::process::id());
    let _guard = NetworkGuard(net.clone());
    let secrets_root = tempfile::tempdir().unwrap();
    let secrets_dir = secrets_root.path().join("secrets");
    let d = daemon(
        "isosec",
        (43230, 43239),
        &format!(
            "network = \"{net}\"\nbridge_name = \"\"\nsecrets_dir = \"{}\"\n",
            secrets_dir.display()
        ),
    );
    let id = d.dept("a");
    let canary = format!("canary-{}-Fq7Lm3", d.tag);
    let spec = |value: &str| {
        spec_toml(
            &id,
            IMAGE_V1,
            &format!(
                "secrets_mode = \"files\"\n[security]\nread_only_root = true\n[secrets]\nDB_PASSWORD = \"{value}\"\n"
            ),
        )
    };
    let path = d.write_spec(&id, &spec(&canary));
    d.agentctl_ok(&["apply", "-f", path.to_str().unwrap()]);
    let port = port_of(&d.wait_running(&id, UP));

    // The container reads it (a read-only root, no capabilities), as a file.
    let r = http_get(port, "/file/DB_PASSWORD").unwrap();
    assert_eq!((r.status, r.body), (200, fnv(canary.as_bytes())));
    assert_eq!(http_get(port, "/env/DB_PASSWORD").unwrap().status, 404);
    assert_eq!(http_get(port, "/env/DB_PASSWORD_FILE").unwrap().status, 200);

    // The canary is in neither docker inspect nor config.v2.json.
    let c = inspect(&container(&id)).unwrap();
    let cid = c["Id"].as_str().unwrap().to_string();
    let inspected = docker_ok(&["inspect", &container(&id)]);
    assert!(
        !inspected.contains(&canary),
        "the canary is in docker inspect"
    );
    assert!(container_env(&c).contains(&"DB_PASSWORD_FILE=/run/secrets/DB_PASSWORD".to_string()));
    let v2 = config_v2(&cid);
    assert!(
        v2.contains("DB_PASSWORD_FILE"),
        "not the right config.v2.json"
    );
    assert!(!v2.contains(&canary), "the canary is in config.v2.json");

    // On the host: only the daemon's user (and root) get to the files.
    let key = container_labels(&c)["fleet-agent.secrets"]
        .as_str()
        .expect("a fleet-agent.secrets label")
        .to_string();
    let dir = secrets_dir.join(&key);
    assert_eq!(mode(&secrets_dir), 0o700);
    assert_eq!(mode(&dir), 0o755);
    assert_eq!(mode(&dir.join("DB_PASSWORD")), 0o444);
    let mounts = c["Mounts"].as_array().unwrap();
    assert!(
        mounts.iter().any(|m| m["Destination"] == "/run/secrets"
            && m["Source"] == dir.to_str().unwrap()
            && m["RW"] == false),
        "{mounts:?}"
    );

    // A rotated secret replaces the container (the spec hash covers it)
    // and the old files go with the old container.
    let rotated = format!("{canary}-rotated");
    fs::write(&path, spec(&rotated)).unwrap();
    d.agentctl_ok(&["apply", "-f", path.to_str().unwrap()]);
    wait_until(UP, "the rotated secret to reach the container", || {
        http_get(port, "/file/DB_PASSWORD").is_ok_and(|r| r.body == fnv(rotated.as_bytes()))
    });
    let c2 = inspect(&container(&id)).unwrap();
    assert_ne!(c2["Id"], c["Id"], "the container was not replaced");
    wait_until(
        Duration::from_secs(30),
        "the old secret files to go",
        || !dir.exists(),
    );
    let v2 = config_v2(c2["Id"].as_str().unwrap());
    assert!(!v2.contains(&rotated));

    // Deleted: the files go too.
    let key2 = container_labels(&c2)["fleet-agent.secrets"]
        .as_str()
        .unwrap()
        .to_string();
    d.agentctl_ok(&["delete", &id]);
    assert!(!secrets_dir.join(key2).exists());
}
