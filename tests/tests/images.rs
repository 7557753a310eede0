//! Image garbage collection with the disk-pressure guard, against the real
//! engine and Debian's `docker-registry` on loopback.
//!
//! The shared dockerd's data root cannot be filled for a test, so the guard
//! watches `images.disk_path` (documented: the filesystem it reads is
//! configurable), here a small tmpfs this test mounts and fills.
//!
//! Ports: the registry 43300, the department 43310-43319; the coordinator's
//! pre-pull: the registry 43350, the department 43360-43369.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fleet_tests::coordinator::StubCoordinator;
use fleet_tests::serde_json::{json, Value};
use fleet_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const REGISTRY_PORT: u16 = 43300;
const UP: Duration = Duration::from_secs(120);

struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(port: u16) -> Self {
        let binary = PathBuf::from("/usr/bin/docker-registry");
        assert!(
            binary.exists(),
            "/usr/bin/docker-registry is missing; `apt-get install docker-registry`"
        );
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
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
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

/// Removes the images the test made, whatever happened.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = docker(&["rmi", image]);
        }
    }
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleet-gc-disk-")
            .tempdir()
            .unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A distinct image (its own id) built on the test agent, tagged `tag`.
fn build_distinct(tag: &str, label: &str) {
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("FROM {IMAGE_V1}\nLABEL fleet-gc-test={label}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image_exists(image: &str) -> bool {
    docker(&["image", "inspect", image]).status.success()
}

fn image_id(image: &str) -> String {
    docker_ok(&["image", "inspect", "--format", "{{.Id}}", image])
        .trim()
        .to_string()
}

fn node_events(d: &TestDaemon) -> Vec<Value> {
    d.agentctl_json(&["events", "--after", "0"])["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn metric(d: &TestDaemon, name: &str) -> Option<f64> {
    let body = d.api_get("/metrics").ok()?.body;
    body.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
}

fn apply_image(d: &TestDaemon, id: &str, image: &str) {
    let path = d.write_spec(id, &spec_toml(id, image, ""));
    d.agentctl_ok(&["apply", "--wait", "-f", path.to_str().unwrap()]);
    wait_until(UP, &format!("{id} to run {image}"), || {
        d.summary(id)
            .is_some_and(|r| r["state"] == "running" && r["image"] == image)
    });
}

#[test]
fn disk_pressure_collects_an_unused_pulled_image_and_keeps_current_rollback_announced_and_foreign_ones(
) {
    let _registry = Registry::start(REGISTRY_PORT);
    let disk = Tmpfs::mount("8m");
    let d = TestDaemon::start(TestOptions {
        name: "gc",
        port_range: (43310, 43319),
        extra_toml: format!(
            "[images]\ngc_interval = \"1h\"\ndisk_check_interval = \"300ms\"\ndisk_high_watermark = 80\ndisk_low_watermark = 50\ndisk_path = \"{}\"\n",
            disk.path().display()
        ),
        ..Default::default()
    });
    let repo = format!("127.0.0.1:{REGISTRY_PORT}/gc-{}", d.tag);
    let [old, previous, current, next] = ["1", "2", "3", "4"].map(|t| format!("{repo}:{t}"));
    // Not pulled by the agent: built here, never in the registry.
    let foreign = format!("fleet-gc-foreign-{}:1", d.tag);
    let _made = Images(vec![
        old.clone(),
        previous.clone(),
        current.clone(),
        next.clone(),
        foreign.clone(),
    ]);
    for (image, label) in [(&old, "1"), (&previous, "2"), (&current, "3"), (&next, "4")] {
        build_distinct(image, &format!("{}-{label}", d.tag));
        docker_ok(&["push", image]);
        docker_ok(&["rmi", image]);
    }
    build_distinct(&foreign, &format!("{}-foreign", d.tag));
    let foreign_id = image_id(&foreign);

    // Three versions, each pulled by the agent: old, then previous, then current.
    let id = d.dept("web");
    for image in [&old, &previous, &current] {
        apply_image(&d, &id, image);
    }
    // The next version announced: pulled now, before any update names it.
    d.agentctl_ok(&["prepull", &id, &next]);
    wait_until(UP, "the announced image to be pulled", || {
        image_exists(&next)
    });
    wait_until(Duration::from_secs(10), "the prepulled event", || {
        node_events(&d)
            .iter()
            .any(|e| e["kind"] == "prepulled" && e["reason"] == "pulled")
    });
    let old_id = image_id(&old);

    // No pressure yet and the interval is an hour away: nothing goes.
    std::thread::sleep(Duration::from_secs(2));
    assert!(image_exists(&old), "collected without pressure");
    assert_eq!(metric(&d, "fleet_agent_disk_pressure"), Some(0.0));

    // Fill the watched disk past the high watermark.
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![7u8; 7 * 1024 * 1024]).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the old image to be collected",
        || !image_exists(&old),
    );
    assert_eq!(metric(&d, "fleet_agent_disk_pressure"), Some(1.0));
    // The image is gone from the engine before the daemon's remove call
    // returns and the counter moves (seen under load: read 0 at once).
    wait_until(
        Duration::from_secs(10),
        "fleet_agent_image_gc_removed_total to count the removal",
        || metric(&d, "fleet_agent_image_gc_removed_total").is_some_and(|v| v >= 1.0),
    );
    for (image, what) in [
        (&current, "current"),
        (&previous, "rollback"),
        (&next, "announced"),
    ] {
        assert!(image_exists(image), "the {what} image {image} was removed");
    }
    assert!(image_exists(&foreign), "the foreign image was removed");
    assert_eq!(image_id(&foreign), foreign_id);
    assert!(image_exists(IMAGE_V1), "{IMAGE_V1} was removed");
    let events = node_events(&d);
    assert!(
        events.iter().any(|e| e["kind"] == "disk_pressure"),
        "no disk_pressure event: {events:?}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "image_removed"
            && e["department"] == id.as_str()
            && e["message"].as_str().is_some_and(|m| m.contains(&old_id))),
        "no image_removed event for {old}: {events:?}"
    );
    // Still under pressure, collections go on, and still nothing else goes.
    std::thread::sleep(Duration::from_secs(2));
    for image in [&current, &previous, &next, &foreign] {
        assert!(
            image_exists(image),
            "{image} removed under lasting pressure"
        );
    }
    assert_eq!(
        d.summary(&id).unwrap()["state"],
        "running",
        "the department kept running"
    );

    // Room again: pressure ends at the low watermark.
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(30), "disk pressure to end", || {
        metric(&d, "fleet_agent_disk_pressure") == Some(0.0)
    });
    assert!(node_events(&d)
        .iter()
        .any(|e| e["kind"] == "disk_pressure_cleared"));

    // The update to the announced image fulfils the announcement: now
    // `current` is the rollback image and `previous` nobody's, so the next
    // pressure collects `previous` and nothing else.
    apply_image(&d, &id, &next);
    std::fs::write(&filler, vec![7u8; 7 * 1024 * 1024]).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the no longer used image to be collected",
        || !image_exists(&previous),
    );
    for image in [&current, &next, &foreign] {
        assert!(image_exists(image), "{image} removed");
    }
    std::fs::remove_file(&filler).unwrap();
}

/// A department as the coordinator sends it, with `next_image` when given.
fn coordinated_dept(id: &str, image: &str, next_image: Option<&str>) -> Value {
    let mut dept = json!({
        "id": id,
        "image": image,
        "health": {"path": "/health", "interval": "1s", "timeout": "500ms", "retries": 3, "start_period": "0s"},
        "restart": {"stop_timeout": "5s"},
    });
    if let Some(next) = next_image {
        dept["next_image"] = json!(next);
    }
    dept
}

fn applied_revision(d: &TestDaemon) -> Value {
    d.api_get("/v1/node")
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .map(|n| n["applied_revision"].clone())
        .unwrap_or(Value::Null)
}

fn container_id(d: &TestDaemon, id: &str) -> String {
    d.summary(id).expect("department listed")["container_id"]
        .as_str()
        .expect("a running department has a container")
        .to_string()
}

#[test]
fn the_coordinators_next_image_is_pulled_ahead_without_replacing_the_container() {
    let _registry = Registry::start(43350);
    let stub = StubCoordinator::start();
    let d = TestDaemon::start(TestOptions {
        name: "nextimg",
        port_range: (43360, 43369),
        extra_toml: format!(
            "[coordinator]\nurl = \"{}\"\npoll_interval = \"1s\"\n",
            stub.url()
        ),
        ..Default::default()
    });
    let repo = format!("127.0.0.1:43350/nextimg-{}", d.tag);
    let [current, next] = ["1", "2"].map(|t| format!("{repo}:{t}"));
    let _made = Images(vec![current.clone(), next.clone()]);
    for (image, label) in [(&current, "1"), (&next, "2")] {
        build_distinct(image, &format!("{}-next-{label}", d.tag));
        docker_ok(&["push", image]);
        docker_ok(&["rmi", image]);
    }
    assert!(!image_exists(&next));

    let id = d.dept("web");
    stub.set_document(
        &d.node_id,
        1,
        json!([coordinated_dept(&id, &current, None)]),
    );
    d.wait_running(&id, UP);
    wait_until(UP, "revision 1 applied", || applied_revision(&d) == 1);
    let serving = container_id(&d, &id);

    // Revision 2 only announces the next image.
    stub.set_document(
        &d.node_id,
        2,
        json!([coordinated_dept(&id, &current, Some(&next))]),
    );
    wait_until(UP, "the announced image to be pulled", || {
        image_exists(&next)
    });
    wait_until(Duration::from_secs(30), "the prepulled event", || {
        node_events(&d).iter().any(|e| {
            e["kind"] == "prepulled" && e["reason"] == "pulled" && e["department"] == id.as_str()
        })
    });
    assert_eq!(applied_revision(&d), 2);
    // A few more polls of the same document: still the same container.
    std::thread::sleep(Duration::from_secs(3));
    let summary = d.summary(&id).unwrap();
    assert_eq!(summary["state"], "running");
    assert_eq!(summary["image"], current.as_str());
    assert_eq!(
        container_id(&d, &id),
        serving,
        "announcing replaced the container"
    );
    let pulls_of_next = |events: &[Value]| {
        events
            .iter()
            .filter(|e| {
                e["kind"] == "pull_started"
                    && e["message"].as_str().is_some_and(|m| m.contains(&next))
            })
            .count()
    };
    assert_eq!(pulls_of_next(&node_events(&d)), 0);
    let prepull_starts = node_events(&d)
        .iter()
        .filter(|e| e["kind"] == "prepull_started")
        .count();
    assert_eq!(prepull_starts, 1, "pulled again at a later poll");

    // Revision 3 updates to it: no pull, the image was already here.
    stub.set_document(&d.node_id, 3, json!([coordinated_dept(&id, &next, None)]));
    wait_until(UP, "the update to the announced image", || {
        d.summary(&id).is_some_and(|r| {
            r["state"] == "running" && r["health"] == "healthy" && r["image"] == next.as_str()
        })
    });
    assert_ne!(container_id(&d, &id), serving);
    assert_eq!(
        pulls_of_next(&node_events(&d)),
        0,
        "the update pulled the announced image again"
    );
}
