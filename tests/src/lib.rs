//! Test harness: isolated daemons on temp dirs, the test-agent image, Docker helpers.
//!
//! Every test gets its own `TestDaemon`: a temp dir holding `agent.toml`, the state
//! dir, the control socket and the daemon's log, a `node_id` of its own (so the
//! daemon, and the clean-up on drop, touch only this test's containers), and the
//! port range the test chooses. Tests run in parallel in separate processes, so
//! nothing here is global; department ids come from `TestDaemon::dept` and are
//! unique across concurrent runs because container names are global on the host.
//!
//! Port ranges in use (pick a fresh one for a new test): `supervisor.rs` takes
//! 8001-8010 (one test only, as the issue demands) and 42000-42099.
//!
//! The harness is test code: it panics, with a message saying what it waited for
//! and the tail of the daemon's log, instead of returning errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use serde_json;

pub mod coordinator;

/// The test images built by `tests/images/build.sh`.
pub const IMAGE_V1: &str = "fleet-test-agent:1";
pub const IMAGE_V2: &str = "fleet-test-agent:2";
pub const IMAGE_BAD: &str = "fleet-test-agent:bad";

/// How long any single `agentctl` or `docker` command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Where `fleet-agentd` and `agentctl` are: `$FLEET_BIN_DIR`, else the workspace's
/// `target/debug` (honouring `CARGO_TARGET_DIR`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEET_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist; build the workspace first (`cargo build --workspace --bins`) or set FLEET_BIN_DIR",
        path.display()
    );
    path
}

/// Four base-36 characters that differ between test processes and runs, so names
/// and labels never collide with a concurrent or earlier run on the same host.
fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut n = (nanos as u64) ^ (u64::from(std::process::id()) << 20);
    // Mix so the low bits depend on all of it.
    n ^= n >> 33;
    n = n.wrapping_mul(0xff51_afd7_ed55_8ccd);
    n ^= n >> 33;
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..4)
        .map(|i| DIGITS[((n >> (i * 6)) % 36) as usize] as char)
        .collect()
}

#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Short lowercase tag naming the test (`sv1`); starts department ids and the node id.
    pub name: &'static str,
    /// Inclusive host port pool.
    pub port_range: (u16, u16),
    /// Raw TOML placed after the top-level keys and before `[ports]`: top-level
    /// keys (`max_departments = 3`) and whole tables (`[wal] ...`) both work; do
    /// not repeat `[ports]`, `[api]` or `[log]` (use the fields below).
    pub extra_toml: String,
    /// `[log] level`.
    pub log_level: &'static str,
    /// Extra lines of the `[api]` table (`token_file = "..."`, limits, TLS).
    pub api_toml: String,
    /// Extra lines of the `[ports]` table (`standby_range = "..."`).
    pub ports_toml: String,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            name: "t",
            port_range: (42090, 42099),
            extra_toml: String::new(),
            log_level: "info",
            api_toml: String::new(),
            ports_toml: String::new(),
        }
    }
}

/// One daemon under test, on its own temp dir. Dropping it kills the daemon and
/// force-removes every container carrying its node label.
pub struct TestDaemon {
    dir: tempfile::TempDir,
    pub node_id: String,
    /// `<name><suffix>`: prefix of this test's department ids.
    pub tag: String,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub api_addr: SocketAddr,
    pub log_path: PathBuf,
    pub options: TestOptions,
    child: Option<Child>,
}

impl TestDaemon {
    pub fn start(options: TestOptions) -> Self {
        assert!(
            !options.name.is_empty()
                && options.name.len() <= 8
                && options
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && options.name.as_bytes()[0].is_ascii_lowercase(),
            "TestOptions::name must be 1-8 characters of a-z and 0-9, starting with a letter"
        );
        let tag = format!("{}{}", options.name, unique_suffix());
        let node_id = format!("test-{tag}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleet-{tag}-"))
            .tempdir()
            .expect("create the test's temp dir");
        let root = dir.path();
        let state_dir = root.join("state");
        let departments_dir = root.join("departments.d");
        let socket = root.join("agentctl.sock");
        fs::create_dir_all(&state_dir).unwrap();
        fs::create_dir_all(&departments_dir).unwrap();
        fs::create_dir_all(root.join("specs")).unwrap();
        let api_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (low, high) = options.port_range;
        let config = format!(
            r#"node_id = "{node_id}"
state_dir = "{state_dir}"
socket = "{socket}"
departments_dir = "{departments_dir}"
resync_interval = "1s"
{extra}
[ports]
range = "{low}-{high}"
bind = "127.0.0.1"
{ports_extra}

[api]
listen = "{api_addr}"
{api_extra}

[log]
format = "json"
level = "{level}"
"#,
            state_dir = state_dir.display(),
            socket = socket.display(),
            departments_dir = departments_dir.display(),
            extra = options.extra_toml,
            api_extra = options.api_toml,
            ports_extra = options.ports_toml,
            level = options.log_level,
        );
        let config_path = root.join("agent.toml");
        fs::write(&config_path, config).unwrap();
        let log_path = root.join("daemon.log");

        let mut daemon = TestDaemon {
            dir,
            node_id,
            tag,
            config_path,
            socket,
            api_addr,
            log_path,
            options,
            child: None,
        };
        daemon.spawn();
        daemon
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn departments_dir(&self) -> PathBuf {
        self.dir.path().join("departments.d")
    }

    /// Where the daemon keeps the specs `agentctl apply` sent (`<state_dir>/applied.d`).
    pub fn applied_dir(&self) -> PathBuf {
        self.dir.path().join("state").join("applied.d")
    }

    /// A department id unique to this test run: `<tag>-<suffix>`.
    pub fn dept(&self, suffix: &str) -> String {
        let id = format!("{}-{suffix}", self.tag);
        assert!(
            fleet_model::spec::valid_id(&id),
            "department id `{id}` is not valid; use a shorter suffix of a-z, 0-9"
        );
        id
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(binary("fleet-agentd"))
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("FLEET_AGENT_CONFIG")
            .env_remove("FLEET_AGENT_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fleet-agentd");
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60));
    }

    /// Waits until `agentctl status` answers on the socket.
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "fleet-agentd exited during start-up ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            if self.socket.exists() && self.agentctl(&["status"]).status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "fleet-agentd did not answer `agentctl status` within {timeout:?}; log tail:\n{}",
                    self.log_tail(60)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILL, no chance to clean up: what a crash or the OOM killer does.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (what `systemctl stop` does); panics if
    /// the daemon needs more than `timeout`. Returns the exit status.
    pub fn stop(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the daemon is not running");
        sigterm(child.id());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "fleet-agentd did not exit within {timeout:?} of SIGTERM; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the daemon again on the same dir and config. A running daemon is
    /// stopped with SIGTERM first; use `kill9()` before it to test a crash.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(60));
        }
        self.spawn();
    }

    /// `agentctl --socket <sock> <args>`; never panics on a failed command.
    pub fn agentctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("agentctl"));
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.env_remove("FLEET_AGENT_SOCKET")
            .env_remove("FLEET_AGENT_CONFIG");
        run(cmd, &format!("agentctl {}", args.join(" ")))
    }

    /// Runs `agentctl <args> --json`, asserts success and parses stdout.
    pub fn agentctl_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        if !args.contains(&"--json") {
            args.push("--json");
        }
        let out = self.agentctl(&args);
        assert!(
            out.status.success(),
            "`agentctl {}` failed ({}):\nstderr: {}\nstdout: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`agentctl {}` printed no JSON ({e}):\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `agentctl <args>` and asserts it succeeded; returns stdout.
    pub fn agentctl_ok(&self, args: &[&str]) -> String {
        let out = self.agentctl(args);
        assert!(
            out.status.success(),
            "`agentctl {}` failed ({}):\nstderr: {}\nstdout: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `<dir>/specs/<id>.toml` (for `agentctl apply -f`) and returns its path.
    pub fn write_spec(&self, id: &str, toml: &str) -> PathBuf {
        let path = self.specs_dir().join(format!("{id}.toml"));
        fs::write(&path, toml).unwrap();
        path
    }

    /// The directory `write_spec` writes into.
    pub fn specs_dir(&self) -> PathBuf {
        self.dir.path().join("specs")
    }

    /// `agentctl apply -f <path>`, asserting success.
    pub fn apply(&self, path: &Path) -> String {
        self.agentctl_ok(&["apply", "-f", path.to_str().unwrap()])
    }

    /// `agentctl status --json`.
    pub fn status(&self) -> Value {
        self.agentctl_json(&["status"])
    }

    /// The department's row in `agentctl status --json`, if listed.
    pub fn summary(&self, id: &str) -> Option<Value> {
        self.status()["departments"]
            .as_array()
            .expect("status --json has a departments array")
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
    }

    /// Waits until the department is `running` with a host port and, when it
    /// probes, `healthy`; returns its status row.
    pub fn wait_running(&self, id: &str, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("department {id} to be running and healthy"),
            || {
                self.summary(id).filter(|d| {
                    d["state"] == "running"
                        && d["host_port"].as_u64().is_some()
                        && (d["health"] == "healthy" || d["health"] == "disabled")
                })
            },
        )
    }

    /// `agentctl ports --json`.
    pub fn ports(&self) -> Vec<Value> {
        self.agentctl_json(&["ports"])
            .as_array()
            .expect("ports --json is an array")
            .clone()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// GET on the daemon's TCP API, with the token the daemon generated when
    /// no `api.token_file` is configured (none otherwise).
    pub fn api_get(&self, path: &str) -> Result<HttpReply, String> {
        http_get_auth(self.api_addr, path, self.api_token().as_deref())
    }

    /// The token the daemon generated in its state directory
    /// (`<state_dir>/api.token`), if it did.
    pub fn api_token(&self) -> Option<String> {
        fs::read_to_string(self.dir.path().join("state").join("api.token"))
            .ok()
            .map(|t| t.trim().to_string())
    }

    /// Lists `(name, id)` of every container carrying this daemon's node label.
    pub fn containers(&self) -> Vec<(String, String)> {
        containers_with_label(&format!("fleet-agent.node={}", self.node_id))
    }

    /// A recorder of this daemon's Docker container events from now on.
    pub fn docker_events(&self) -> DockerEvents {
        DockerEvents::start(&self.node_id)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- fleet-agentd log tail ({}) ---\n{}\n--- end of log ---",
                self.log_path.display(),
                self.log_tail(80)
            );
        }
        self.kill9();
        let ids: Vec<String> = self.containers().into_iter().map(|(_, id)| id).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
    }
}

/// Runs a command with a timeout, capturing its output.
fn run(mut cmd: Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    // Drain both pipes on their own threads so a chatty command cannot block.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {COMMAND_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Sends SIGTERM through the shell's `kill` builtin (the tests forbid `unsafe`,
/// and a minimal Debian has no `/usr/bin/kill`).
pub fn sigterm(pid: u32) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status();
}

/// Sends SIGHUP (a reload) the same way as [`sigterm`].
pub fn sighup(pid: u32) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -HUP {pid}")])
        .status();
}

/// Polls `check` every 200 ms until it is true; panics naming `what` otherwise.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || check().then_some(()));
}

/// Polls `check` every 200 ms until it returns `Some`; panics naming `what` otherwise.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `docker <args>`, output captured, never panics on failure.
pub fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(cmd, &format!("docker {}", args.join(" ")))
}

/// `docker <args>`, asserting success; returns trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "`docker {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker inspect` of one container, or `None` if it does not exist.
pub fn inspect(name: &str) -> Option<Value> {
    let out = docker(&["container", "inspect", name]);
    if !out.status.success() {
        return None;
    }
    let all: Value = serde_json::from_slice(&out.stdout).expect("docker inspect prints JSON");
    all.as_array().and_then(|a| a.first()).cloned()
}

pub fn container_exists(name: &str) -> bool {
    inspect(name).is_some()
}

pub fn container_id(name: &str) -> Option<String> {
    inspect(name).and_then(|c| c["Id"].as_str().map(str::to_string))
}

pub fn container_running(name: &str) -> bool {
    inspect(name).is_some_and(|c| c["State"]["Running"] == true)
}

/// The container's labels as JSON (`{}` if it has none).
pub fn container_labels(c: &Value) -> Value {
    match &c["Config"]["Labels"] {
        Value::Null => Value::Object(Default::default()),
        labels => labels.clone(),
    }
}

/// The container's `KEY=VALUE` environment.
pub fn container_env(c: &Value) -> Vec<String> {
    c["Config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Where `container_port/tcp` is published: `(host ip, host port)` pairs.
pub fn published(c: &Value, container_port: u16) -> Vec<(String, u16)> {
    c["NetworkSettings"]["Ports"][format!("{container_port}/tcp")]
        .as_array()
        .map(|bindings| {
            bindings
                .iter()
                .filter_map(|b| {
                    Some((
                        b["HostIp"].as_str()?.to_string(),
                        b["HostPort"].as_str()?.parse().ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(name, id)` of every container, running or not, with the label `key=value`.
pub fn containers_with_label(label: &str) -> Vec<(String, String)> {
    let out = docker_ok(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label={label}"),
        "--format",
        "{{.Names}} {{.ID}}",
    ]);
    out.lines()
        .filter_map(|l| {
            let (name, id) = l.split_once(' ')?;
            Some((name.to_string(), id.to_string()))
        })
        .collect()
}

/// True when nothing listens on `127.0.0.1:port` (Docker's proxy holds a published port).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A loopback port nobody holds right now.
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

/// GET `http://127.0.0.1:<port><path>`, redirects not followed.
pub fn http_get(port: u16, path: &str) -> Result<HttpReply, String> {
    http_get_addr(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

pub fn http_get_addr(addr: SocketAddr, path: &str) -> Result<HttpReply, String> {
    http_get_auth(addr, path, None)
}

/// GET with `Authorization: Bearer <token>` when a token is given.
pub fn http_get_auth(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<HttpReply, String> {
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response.text().map_err(|e| e.to_string())?;
    Ok(HttpReply {
        status,
        body,
        headers,
    })
}

/// Records `docker events` for the containers of one node, to prove what the
/// daemon did (or did not do) to them. Starts with `--since` the moment it was
/// created, so no event is lost while the subscription is being set up.
pub struct DockerEvents {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

/// Container actions that mean a container was made, started, stopped or removed.
pub const LIFECYCLE_ACTIONS: &[&str] = &[
    "create", "start", "restart", "die", "kill", "stop", "destroy", "rename", "update", "pause",
    "unpause", "oom",
];

impl DockerEvents {
    pub fn start(node_id: &str) -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970");
        let since = format!("{}.{:09}", since.as_secs(), since.subsec_nanos());
        let mut child = Command::new("docker")
            .args([
                "events",
                "--since",
                &since,
                "--format",
                "{{json .}}",
                "--filter",
                &format!("label=fleet-agent.node={node_id}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker events");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(value);
                }
            }
        });
        DockerEvents { child, lines }
    }

    /// Every event so far.
    pub fn all(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Container lifecycle events so far (see `LIFECYCLE_ACTIONS`).
    pub fn lifecycle(&self) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|e| {
                e["Type"] == "container" && LIFECYCLE_ACTIONS.iter().any(|a| e["Action"] == *a)
            })
            .collect()
    }

    /// Lifecycle events of one department's containers (by the department label).
    pub fn lifecycle_of(&self, department: &str) -> Vec<Value> {
        self.lifecycle()
            .into_iter()
            .filter(|e| e["Actor"]["Attributes"]["fleet-agent.department"] == department)
            .collect()
    }

    /// One line per event, for assertion messages.
    pub fn describe(events: &[Value]) -> String {
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {} {} (exit {})",
                    e["Action"].as_str().unwrap_or("?"),
                    e["Actor"]["Attributes"]["name"].as_str().unwrap_or("?"),
                    e["Actor"]["ID"]
                        .as_str()
                        .map(|id| &id[..id.len().min(12)])
                        .unwrap_or("?"),
                    e["Actor"]["Attributes"]["exitCode"].as_str().unwrap_or("-"),
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lets Docker deliver what is in flight, then stops recording and returns
    /// every event seen.
    pub fn finish(mut self) -> Vec<Value> {
        thread::sleep(Duration::from_millis(1500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.all()
    }
}

impl Drop for DockerEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds a loopback port the way a foreign process would; released on drop.
pub fn hold_port(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:{port} to hold it: {e}"))
}

/// A department spec in TOML that probes fast, for tests: health every second,
/// no start period, quick stop. `extra` goes right after `id` and `image`:
/// top-level keys first (`host_port = 42050`), then tables (`[env]`, `[secrets]`,
/// `[resources]`); do not repeat `[health]` or `[restart]`.
pub fn spec_toml(id: &str, image: &str, extra: &str) -> String {
    spec_toml_with_restart(id, image, extra, "stop_timeout = \"5s\"\n")
}

/// [`spec_toml`] with the lines of its `[restart]` table given (they replace
/// its `stop_timeout = "5s"`).
pub fn spec_toml_with_restart(id: &str, image: &str, extra: &str, restart: &str) -> String {
    format!(
        r#"id = "{id}"
image = "{image}"
{extra}
[health]
path = "/health"
interval = "1s"
timeout = "500ms"
retries = 3
start_period = "0s"

[restart]
{restart}"#
    )
}

/// A container the test runs itself (not through the daemon), labelled with
/// `fleet-agent.node=<node>` so a `DockerEvents` for that node sees it; removed on drop.
pub struct TestContainer {
    pub name: String,
    pub id: String,
}

impl TestContainer {
    /// `docker run -d --name <name> --label fleet-agent.node=<node> <args...>`;
    /// `args` end with the image (and its command, if any).
    pub fn run(node: &str, name: &str, args: &[&str]) -> Self {
        let label = format!("fleet-agent.node={node}");
        let mut all = vec!["run", "-d", "--name", name, "--label", &label];
        all.extend_from_slice(args);
        let id = docker_ok(&all);
        TestContainer {
            name: name.to_string(),
            id,
        }
    }

    pub fn inspect(&self) -> Value {
        inspect(&self.id).unwrap_or_else(|| panic!("container {} is gone", self.name))
    }

    /// The host port `container_port/tcp` is published on (publish it as
    /// `-p 127.0.0.1::8080` to let Docker choose a free one).
    pub fn host_port(&self, container_port: u16) -> u16 {
        published(&self.inspect(), container_port)
            .first()
            .map(|(_, port)| *port)
            .unwrap_or_else(|| panic!("{} publishes no {container_port}/tcp", self.name))
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.id]);
    }
}

/// A name unique to this process and run, for things the test creates itself.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", unique_suffix())
}

/// Whether the kernel log (`dmesg`, as root) holds an OOM kill in the memory
/// cgroup of the container `id` (full id).
pub fn kernel_logged_oom_kill(id: &str) -> bool {
    let Ok(out) = Command::new("dmesg").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).lines().any(|line| {
        line.contains("oom-kill:")
            && line
                .split(',')
                .any(|f| f.starts_with("oom_memcg=") && f.contains(id))
    })
}
