//! Zero-downtime restarts, updates, rollbacks and deletes behind Debian's real
//! HAProxy (issue 15). Each test runs its own `haproxy` process on loopback,
//! configured from `agentctl haproxy-config`, in front of two departments of
//! the test image, and sends a steady stream of short requests to both plus
//! long requests (`/sleep/10s`, a call in progress) to the one it changes.
//!
//! Ports (fixed, this file only): 43100-43101 department ports, 43110-43111
//! their standby ports, 43120 the agent listener, 43130-43131 the HAProxy
//! frontends (first test); 43140-43141, 43150-43151, 43160, 43170-43171 (the
//! kill -9 test).
//!
//! With `DRAIN_BENCH=1` the first test prints, per change, the worst short
//! request latency beside the steady-state p99 of the same run (bench/drain.sh).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::*;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

struct Ports {
    dept: (u16, u16),
    standby: (u16, u16),
    agent: u16,
    front: (u16, u16),
}

const MAIN: Ports = Ports {
    dept: (43100, 43101),
    standby: (43110, 43111),
    agent: 43120,
    front: (43130, 43131),
};

const KILL: Ports = Ports {
    dept: (43140, 43141),
    standby: (43150, 43151),
    agent: 43160,
    front: (43170, 43171),
};

/// The images of this file: `tests/images/build.sh` with `TAG_PREFIX=drain-`
/// (the agent's `/sleep` and graceful SIGTERM, under tags no other checkout's
/// build replaces).
const V1: &str = "fleet-test-agent:drain-1";
const V2: &str = "fleet-test-agent:drain-2";
const BAD: &str = "fleet-test-agent:drain-bad";

fn build_images() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let out = Command::new("bash")
            .arg(workspace_root().join("tests/images/build.sh"))
            .env("TAG_PREFIX", "drain-")
            .output()
            .expect("run tests/images/build.sh");
        assert!(
            out.status.success(),
            "tests/images/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn daemon(name: &'static str, p: &Ports) -> TestDaemon {
    build_images();
    TestDaemon::start(TestOptions {
        name,
        port_range: p.dept,
        ports_toml: format!("standby_range = \"{}-{}\"", p.standby.0, p.standby.1),
        extra_toml: format!(
            "[haproxy]\nagent_listen = \"127.0.0.1:{}\"\ncheck_inter = \"500ms\"\nrise = 2\nfall = 2\nagent_inter = \"500ms\"\n",
            p.agent
        ),
        ..Default::default()
    })
}

fn spec(id: &str, image: &str) -> String {
    spec_toml_with_restart(
        id,
        image,
        "",
        "stop_timeout = \"5s\"\ndrain_timeout = \"20s\"\nupdate_deadline = \"8s\"\n",
    )
}

/// Our own haproxy process (`-db`: foreground), killed on drop.
struct Haproxy {
    child: Child,
}

impl Haproxy {
    fn start(dir: &Path, fronts: &[(u16, String)], backends: &str) -> Haproxy {
        let mut cfg = String::from(
            "global\n    maxconn 2000\n\ndefaults\n    mode http\n    timeout client 60s\n    timeout connect 2s\n    timeout server 60s\n",
        );
        for (port, backend) in fronts {
            cfg.push_str(&format!(
                "\nfrontend fe_{port}\n    bind 127.0.0.1:{port}\n    default_backend {backend}\n"
            ));
        }
        cfg.push('\n');
        cfg.push_str(backends);
        let path = dir.join("haproxy.cfg");
        fs::write(&path, &cfg).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run haproxy -c (is Debian's haproxy installed? scripts/test.sh installs it)");
        assert!(
            check.status.success(),
            "haproxy refused the generated config:\n{}\n{cfg}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        Haproxy { child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    latency: Duration,
    /// `Ok(status)` or the transport error (refused, reset, timeout).
    result: Result<u16, String>,
}

fn client(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .no_proxy()
        // A new connection per request: a refused connection shows.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

fn get(client: &reqwest::blocking::Client, port: u16, path: &str) -> Sample {
    let at = Instant::now();
    let result = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"));
    Sample {
        at,
        latency: at.elapsed(),
        result,
    }
}

/// Short requests, back to back, until stopped.
struct Stream {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: Option<JoinHandle<()>>,
}

impl Stream {
    fn start(port: u16) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let handle = thread::spawn(move || {
            let c = client(Duration::from_secs(10));
            while !s.load(Ordering::SeqCst) {
                let sample = get(&c, port, "/version");
                out.lock().unwrap().push(sample);
                thread::sleep(Duration::from_millis(20));
            }
        });
        Stream {
            stop,
            samples,
            handle: Some(handle),
        }
    }

    fn finish(&mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.samples.lock().unwrap().clone()
    }
}

/// Long requests started now; joined later.
fn long_requests(port: u16, n: usize) -> Vec<JoinHandle<Sample>> {
    (0..n)
        .map(|i| {
            thread::sleep(Duration::from_millis(150 * i as u64));
            thread::spawn(move || get(&client(Duration::from_secs(40)), port, "/sleep/10s"))
        })
        .collect()
}

fn all_ok(what: &str, samples: &[Sample]) {
    let bad: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.result
                .as_ref()
                .map(|c| !(200..300).contains(c))
                .unwrap_or(true)
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requests failed, first: {:?}",
        bad.len(),
        samples.len(),
        bad.iter().take(5).collect::<Vec<_>>()
    );
}

/// The department is back to one container on its own port, serving, with
/// no drain or stand-in left.
fn wait_settled(d: &TestDaemon, id: &str, timeout: Duration) -> serde_json::Value {
    let next = format!("aio-{id}-next");
    wait_for(timeout, &format!("{id} to settle after the change"), || {
        let s = d.summary(id)?;
        let active = s["drain"]["active"].as_bool().unwrap_or(false);
        (s["state"] == "running" && s["health"] == "healthy" && !active && !container_exists(&next))
            .then_some(s)
    })
}

fn wait_front(port: u16, want_version: &str) {
    let c = client(Duration::from_secs(2));
    wait_until(
        Duration::from_secs(30),
        &format!("HAProxy on {port} to serve version {want_version}"),
        || match c.get(format!("http://127.0.0.1:{port}/version")).send() {
            Ok(r) if r.status() == 200 => r.text().unwrap_or_default() == want_version,
            _ => false,
        },
    );
}

fn events_of(d: &TestDaemon, id: &str) -> String {
    d.agentctl_ok(&["events", "--department", id])
}

struct Phase {
    name: &'static str,
    from: Instant,
    to: Instant,
}

fn p99(mut l: Vec<Duration>) -> Duration {
    if l.is_empty() {
        return Duration::ZERO;
    }
    l.sort();
    l[((l.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(l.len() - 1)]
}

#[test]
fn restart_update_rollback_and_delete_refuse_no_request_behind_haproxy() {
    let d = daemon("dr", &MAIN);
    let a = d.dept("a");
    let b = d.dept("b");
    d.apply(&d.write_spec(&a, &spec(&a, V1)));
    d.apply(&d.write_spec(&b, &spec(&b, V1)));
    let sa = d.wait_running(&a, Duration::from_secs(60));
    d.wait_running(&b, Duration::from_secs(60));
    assert!(sa["standby_port"].as_u64().is_some(), "{sa}");

    let backends = d.agentctl_ok(&["haproxy-config"]);
    let _haproxy = Haproxy::start(
        d.dir(),
        &[
            (MAIN.front.0, format!("fleet_{a}")),
            (MAIN.front.1, format!("fleet_{b}")),
        ],
        &backends,
    );
    wait_front(MAIN.front.0, "1");
    wait_front(MAIN.front.1, "1");

    let mut stream_a = Stream::start(MAIN.front.0);
    let mut stream_b = Stream::start(MAIN.front.1);
    let mut phases = Vec::new();
    let mut longs = Vec::new();
    thread::sleep(Duration::from_secs(3)); // steady state

    // Restart: a stand-in on the standby port, drain, stop, start, retire.
    let from = Instant::now();
    longs.extend(long_requests(MAIN.front.0, 3));
    let out = d.agentctl_ok(&["restart", &a]);
    assert!(out.contains("restarted"), "{out}");
    let shown = d.agentctl_ok(&["show", &a]);
    let settled = wait_settled(&d, &a, Duration::from_secs(90));
    // The last drain (the stand-in's) is shown, with a count: docker-proxy's
    // sockets of the port are in the daemon's network namespace here.
    assert_eq!(settled["drain"]["active"], false, "{settled}");
    assert!(settled["drain"]["connections"].is_u64(), "{settled}");
    phases.push(Phase {
        name: "restart",
        from,
        to: Instant::now(),
    });
    let events = events_of(&d, &a);
    for want in ["stand_in_up", "state_draining", "drained"] {
        assert!(events.contains(want), "no {want} event:\n{events}");
    }
    assert!(shown.contains("standby"), "{shown}");

    // Update to :2: the candidate proves itself on the standby port and takes
    // over while the old container drains.
    let from = Instant::now();
    longs.extend(long_requests(MAIN.front.0, 3));
    d.apply(&d.write_spec(&a, &spec(&a, V2)));
    wait_for(Duration::from_secs(90), "update to :2", || {
        let s = d.summary(&a)?;
        (s["image"] == V2).then_some(())
    });
    wait_settled(&d, &a, Duration::from_secs(90));
    wait_front(MAIN.front.0, "2");
    phases.push(Phase {
        name: "update",
        from,
        to: Instant::now(),
    });

    // A bad image: never healthy, rolled back; the old container never stops.
    let from = Instant::now();
    longs.extend(long_requests(MAIN.front.0, 2));
    d.apply(&d.write_spec(&a, &spec(&a, BAD)));
    wait_until(
        Duration::from_secs(60),
        "the bad update to roll back",
        || events_of(&d, &a).contains("update_failed"),
    );
    let s = wait_settled(&d, &a, Duration::from_secs(60));
    assert_eq!(s["image"], V2, "{s}");
    phases.push(Phase {
        name: "rollback",
        from,
        to: Instant::now(),
    });

    // Delete: the long requests started before it finish; the short stream
    // to it ends as the delete begins (afterwards nothing serves it, as documented).
    let short_a = stream_a.finish();
    let from = Instant::now();
    let before_delete = long_requests(MAIN.front.0, 2);
    thread::sleep(Duration::from_millis(500));
    d.agentctl_ok(&["delete", &a]);
    phases.push(Phase {
        name: "delete",
        from,
        to: Instant::now(),
    });
    thread::sleep(Duration::from_secs(2));
    let short_b = stream_b.finish();

    all_ok(&format!("short requests to {a}"), &short_a);
    all_ok(
        &format!("short requests to {b} (the other department)"),
        &short_b,
    );
    let long: Vec<Sample> = longs
        .into_iter()
        .chain(before_delete)
        .map(|h| h.join().unwrap())
        .collect();
    all_ok("long requests (10s) started before a change", &long);
    assert!(short_a.len() > 100, "too few requests: {}", short_a.len());
    assert!(!container_exists(&format!("aio-{a}")));

    if std::env::var_os("DRAIN_BENCH").is_some() {
        let first = phases.first().map(|p| p.from).unwrap();
        let steady: Vec<Duration> = short_a
            .iter()
            .chain(&short_b)
            .filter(|s| s.at < first)
            .map(|s| s.latency)
            .collect();
        let steady_b: Vec<Duration> = short_b.iter().map(|s| s.latency).collect();
        let base = p99(steady.clone());
        println!(
            "DRAIN_BENCH steady p99 {:.1}ms over {} requests (other department whole run p99 {:.1}ms)",
            base.as_secs_f64() * 1e3,
            steady.len(),
            p99(steady_b).as_secs_f64() * 1e3
        );
        for p in &phases {
            let during: Vec<Duration> = short_a
                .iter()
                .filter(|s| s.at >= p.from && s.at <= p.to)
                .map(|s| s.latency)
                .collect();
            let worst = during.iter().max().copied().unwrap_or_default();
            println!(
                "DRAIN_BENCH {} took {:.1}s: {} short requests, worst {:.1}ms = {:.2}x steady p99",
                p.name,
                (p.to - p.from).as_secs_f64(),
                during.len(),
                worst.as_secs_f64() * 1e3,
                worst.as_secs_f64() / base.as_secs_f64().max(1e-6)
            );
        }
        let worst_long = long.iter().map(|s| s.latency).max().unwrap_or_default();
        println!(
            "DRAIN_BENCH long requests: {} of 10s each, worst {:.2}s",
            long.len(),
            worst_long.as_secs_f64()
        );
    }
}

#[test]
fn a_killed_daemon_does_not_disturb_traffic_behind_haproxy() {
    let mut d = daemon("drk", &KILL);
    let a = d.dept("a");
    let b = d.dept("b");
    d.apply(&d.write_spec(&a, &spec(&a, V1)));
    d.apply(&d.write_spec(&b, &spec(&b, V1)));
    d.wait_running(&a, Duration::from_secs(60));
    d.wait_running(&b, Duration::from_secs(60));
    let backends = d.agentctl_ok(&["haproxy-config"]);
    let _haproxy = Haproxy::start(
        d.dir(),
        &[
            (KILL.front.0, format!("fleet_{a}")),
            (KILL.front.1, format!("fleet_{b}")),
        ],
        &backends,
    );
    wait_front(KILL.front.0, "1");
    wait_front(KILL.front.1, "1");
    let mut stream_a = Stream::start(KILL.front.0);
    let mut stream_b = Stream::start(KILL.front.1);
    let longs = long_requests(KILL.front.0, 2);
    thread::sleep(Duration::from_secs(2));
    d.kill9();
    // The agent listener is gone: HAProxy keeps the last answers.
    thread::sleep(Duration::from_secs(4));
    d.restart();
    d.wait_running(&a, Duration::from_secs(60));
    thread::sleep(Duration::from_secs(4));
    let short_a = stream_a.finish();
    let short_b = stream_b.finish();
    all_ok("short requests across kill -9 and restart", &short_a);
    all_ok("short requests to the other department", &short_b);
    let long: Vec<Sample> = longs.into_iter().map(|h| h.join().unwrap()).collect();
    all_ok("long requests across kill -9", &long);
    assert!(
        container_running(&format!("aio-{a}")),
        "the container must have been adopted, not replaced"
    );
}
