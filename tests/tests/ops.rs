//! Issue 14, the operator's side: `agentctl doctor`'s archive check against a
//! real WAL service, a real Prometheus server scraping daemons with the
//! shipped alert rules, and progress of image pulls in the API. Ports:
//! department pools and Prometheus 43650-43699.

// The helpers below are part of the tests: a failed set-up step should panic
// with its cause, which is what unwrap/expect do here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleet_tests::{
    docker, docker_ok, http_get, spec_toml_with_restart, wait_for, wait_until, workspace_root,
    TestDaemon, TestOptions, IMAGE_V1,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

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

/// Prometheus' own server (Debian's `prometheus`; scripts/test.sh
/// `service_prometheus`) on loopback, with its data in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` as job `fleet-agent` every second with the bearer
    /// token in `token_file` (the TCP API always asks for one; docs/install.md
    /// gives Prometheus a copy) and evaluates the shipped rules every second;
    /// the rules' own `for:` stay as shipped.
    fn start(port: u16, targets: &[String], token_file: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = workspace_root().join("packaging/prometheus/fleet-agent-rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\nscrape_configs:\n  - job_name: fleet-agent\n    authorization:\n      credentials_file: {token:?}\n    static_configs:\n      - targets: {targets:?}\n",
            rules = rules.display().to_string(),
            token = token_file.display().to_string(),
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run prometheus (scripts/test.sh installs it: service_prometheus)");
        let p = Prometheus { child, port, dir };
        wait_until(Duration::from_secs(30), "prometheus to be ready", || {
            http_get(port, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        p
    }

    fn get(&self, path: &str) -> Value {
        let reply = http_get(self.port, path).unwrap();
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        serde_json::from_str(&reply.body).unwrap()
    }

    /// `/api/v1/alerts`: every pending or firing alert.
    fn alerts(&self) -> Vec<Value> {
        self.get("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alert<'a>(alerts: &'a [Value], name: &str, label: &str, value: &str) -> Option<&'a Value> {
    alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == name && a["labels"][label] == value)
}

/// The shipped rules, loaded by a real Prometheus scraping two daemons: a
/// crash-looping department on one raises `FleetDepartmentCrashLooping`
/// (`for: 1m`), the other daemon stopped raises `FleetAgentDown` (`for: 2m`),
/// and neither alert names what is fine (the healthy daemon, the healthy
/// department). Waits out the rules' own `for:`, so it takes about 2.5 minutes.
#[test]
fn a_real_prometheus_raises_the_crash_loop_and_agent_down_alerts() {
    // One token for both daemons, so one scrape job reaches them.
    let tokens = tempfile::tempdir().unwrap();
    let token_file = tokens.path().join("scrape.token");
    std::fs::write(
        &token_file,
        format!("{}\n", fleet_tests::unique_name("scrape-token")),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let api_toml = format!("token_file = {:?}\n", token_file.display().to_string());
    let up = TestDaemon::start(TestOptions {
        name: "op2",
        port_range: (43652, 43655),
        api_toml: api_toml.clone(),
        ..Default::default()
    });
    let mut down = TestDaemon::start(TestOptions {
        name: "op3",
        port_range: (43656, 43657),
        api_toml,
        ..Default::default()
    });
    let ok = up.dept("ok");
    let crash = up.dept("crash");
    up.write_spec(
        &ok,
        &spec_toml_with_restart(&ok, IMAGE_V1, "", "stop_timeout = \"2s\"\n"),
    );
    up.write_spec(
        &crash,
        &spec_toml_with_restart(
            &crash,
            IMAGE_V1,
            "[env]\nCRASH_AFTER = \"1s\"\nEXIT_CODE = \"3\"\n",
            "stop_timeout = \"2s\"\nmax_retries = 2\nbackoff = \"1s\"\nwindow = \"10m\"\n",
        ),
    );
    up.apply(&up.specs_dir());
    let prom = Prometheus::start(
        43690,
        &[up.api_addr.to_string(), down.api_addr.to_string()],
        &token_file,
    );
    wait_until(
        Duration::from_secs(30),
        "both daemons scraped as up",
        || {
            let r = prom.get("/api/v1/query?query=up%7Bjob%3D%22fleet-agent%22%7D%20%3D%3D%201");
            r["data"]["result"].as_array().is_some_and(|a| a.len() == 2)
        },
    );
    down.stop(Duration::from_secs(60));
    let stopped_at = Instant::now();
    let (up_instance, down_instance) = (up.api_addr.to_string(), down.api_addr.to_string());

    let alerts = wait_for(
        Duration::from_secs(240),
        "FleetDepartmentCrashLooping and FleetAgentDown to fire",
        || {
            let alerts = prom.alerts();
            let firing = |a: Option<&Value>| a.is_some_and(|a| a["state"] == "firing");
            (firing(alert(
                &alerts,
                "FleetDepartmentCrashLooping",
                "department",
                &crash,
            )) && firing(alert(&alerts, "FleetAgentDown", "instance", &down_instance)))
            .then_some(alerts)
        },
    );
    let took = stopped_at.elapsed();
    assert!(
        alert(&alerts, "FleetAgentDown", "instance", &up_instance).is_none(),
        "the daemon that runs is reported down: {alerts:?}"
    );
    for name in ["FleetDepartmentCrashLooping", "FleetDepartmentFailed"] {
        assert!(
            alert(&alerts, name, "department", &ok).is_none(),
            "{name} for the healthy department: {alerts:?}"
        );
    }
    let crash_alert = alert(&alerts, "FleetDepartmentCrashLooping", "department", &crash).unwrap();
    assert!(
        crash_alert["annotations"]["runbook_url"]
            .as_str()
            .is_some_and(|u| u.ends_with("#fleetdepartmentcrashlooping")),
        "{crash_alert}"
    );
    assert!(
        !prom.log().contains("level=error"),
        "prometheus logged errors:\n{}",
        prom.log()
    );
    eprintln!("both alerts fired {took:?} after the daemon stopped");
}

/// Debian's `docker-registry` on loopback with its own storage; killed on drop.
struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry (scripts/test.sh installs it)");
        wait_until(Duration::from_secs(30), "the registry to answer", || {
            http_get(port, "/v2/").is_ok_and(|r| r.status == 200)
        });
        Registry { child, _dir: dir }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Images a test pulled, removed on drop. Declared before the daemon, so it
/// drops after it: the daemon's drop removes the containers using them first.
#[derive(Default)]
struct ImageCleanup(Vec<String>);

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = docker(&["rmi", image]);
        }
    }
}

/// A TCP relay from `listen` to `upstream` that hands out at most `rate`
/// bytes a second towards the client: a slow link to the registry, so a pull
/// of the small test image lasts long enough to be watched.
fn slow_link(listen: u16, upstream: u16, rate: usize) {
    let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
    thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            thread::spawn(move || {
                let chunk = 4096;
                let pause = Duration::from_secs_f64(chunk as f64 / rate as f64);
                let mut buf = vec![0u8; chunk];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            thread::sleep(pause);
                        }
                    }
                }
                let _ = c_write.shutdown(Shutdown::Write);
            });
        }
    });
}

/// Builds an image with a 640 KiB layer of its own (the test image's layers
/// are on this engine already, and a pull would move nothing), pushes it to
/// the registry and removes it here; returns its name through the slow link.
fn fresh_image(registry_port: u16, slow_port: u16, repo: &str, seed: u64) -> String {
    let pushed = format!("127.0.0.1:{registry_port}/{repo}:{seed}");
    let context = tempfile::tempdir().unwrap();
    let mut blob = vec![0u8; 640 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()) ^ (seed << 32);
    for b in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(context.path().join("blob"), &blob).unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {IMAGE_V1}\nCOPY blob /blob\n"),
    )
    .unwrap();
    docker_ok(&[
        "build",
        "-q",
        "-t",
        &pushed,
        context.path().to_str().unwrap(),
    ]);
    docker_ok(&["push", &pushed]);
    docker_ok(&["rmi", &pushed]);
    format!("127.0.0.1:{slow_port}/{repo}:{seed}")
}

/// A pull from a loopback registry over a slow link: while it runs the API
/// shows its bytes (growing) and rate in `progress`, and `agentctl apply
/// --wait` into a pipe prints plain progress lines (no bar, no terminal
/// codes); once the department runs, no progress is left. A second pull,
/// waited for on a pty, draws a bar and prints no plain progress lines.
#[test]
fn a_pull_shows_its_progress_in_the_api_as_plain_lines_and_as_a_bar() {
    let (registry_port, slow_port) = (43660, 43661);
    let _registry = Registry::start(registry_port);
    slow_link(slow_port, registry_port, 48 * 1024);
    let mut pulled = ImageCleanup::default();
    let d = TestDaemon::start(TestOptions {
        name: "op4",
        port_range: (43662, 43665),
        ..Default::default()
    });
    let image = fresh_image(registry_port, slow_port, &format!("agent-{}", d.tag), 1);
    pulled.0.push(image.clone());
    assert!(!docker(&["image", "inspect", &image]).status.success());

    let id = d.dept("pull");
    let path = d.write_spec(
        &id,
        &spec_toml_with_restart(&id, &image, "", "stop_timeout = \"2s\"\n"),
    );
    let apply = Command::new(fleet_tests::bin_dir().join("agentctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["apply", "--wait", "-f", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let mut seen: Vec<Value> = Vec::new();
    wait_until(Duration::from_secs(120), "the pull to be over", || {
        let reply = d.api_get(&format!("/v1/departments/{id}")).unwrap();
        let row: Value = serde_json::from_str(&reply.body).unwrap();
        if let Some(p) = row.get("progress").filter(|p| !p.is_null()) {
            seen.push(p.clone());
        }
        thread::sleep(Duration::from_millis(200));
        row["state"] == "running"
    });
    let output = apply.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "apply --wait failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "apply --wait printed:\n{stdout}\nthe API showed {} progress samples",
        seen.len()
    );

    let done: Vec<u64> = seen
        .iter()
        .map(|p| p["done_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        done.windows(2).any(|w| w[1] > w[0]),
        "the API's progress did not grow while the pull ran: {seen:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last["operation"], "pull");
    assert_eq!(last["subject"], image.as_str());
    assert!(last["bytes_per_second"].as_f64().unwrap() > 0.0, "{last}");
    assert!(
        last["detail"].as_str().unwrap().contains("layers"),
        "{last}"
    );

    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{id}: pull {image}: ")))
        .collect();
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.contains("/s")),
        "no plain progress lines:\n{stdout}"
    );
    assert!(
        !stdout.contains('\r') && !stdout.contains('\x1b'),
        "terminal codes in piped output:\n{stdout:?}"
    );
    let row: Value =
        serde_json::from_str(&d.api_get(&format!("/v1/departments/{id}")).unwrap().body).unwrap();
    assert!(row.get("progress").is_none(), "{row}");

    // On a terminal (a pty from script(1)) the same wait draws a bar instead.
    let image = fresh_image(registry_port, slow_port, &format!("agent-{}", d.tag), 2);
    pulled.0.push(image.clone());
    let id = d.dept("tty");
    let path = d.write_spec(
        &id,
        &spec_toml_with_restart(&id, &image, "", "stop_timeout = \"2s\"\n"),
    );
    let command = format!(
        "{} --socket {} apply --wait -f {}",
        fleet_tests::bin_dir().join("agentctl").display(),
        d.socket.display(),
        path.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("run script(1) (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apply --wait on a pty failed: {text:?}"
    );
    assert!(
        text.contains(&format!("{id}: pull {image} [")) && text.contains('\x1b'),
        "no progress bar on a terminal: {text:?}"
    );
    assert!(
        !text.contains(&format!("{id}: pull {image}: ")),
        "plain progress lines on a terminal: {text:?}"
    );
}
