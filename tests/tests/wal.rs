//! Issue 6 acceptance tests: WAL archiving through `agentctl wal push` into a
//! directory and into S3 (moto on loopback), against real PostgreSQL 15 and the
//! real fleet-agentd. Port ranges: daemons 46000-46499, PostgreSQL 46500-46599,
//! S3 46600-46699; the valve, schedule and conditional-PUT tests at the end use
//! 47000-47299 (see there).

// The helpers below are part of the tests: a failed set-up step should panic
// with its cause, which is what unwrap/expect do here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fleet_tests::{bin_dir, wait_until, TestDaemon, TestOptions};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run a command")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn postgres_ids() -> (u32, u32) {
    let uid = ok(Command::new("id").args(["-u", "postgres"]));
    let gid = ok(Command::new("id").args(["-g", "postgres"]));
    (uid.trim().parse().unwrap(), gid.trim().parse().unwrap())
}

fn give_to_postgres(path: &Path) {
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

fn open_up(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A throwaway PostgreSQL 15 cluster owned by the `postgres` user.
struct Pg {
    _root: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    running: bool,
}

impl Pg {
    /// Paths only; `init` creates the cluster.
    fn new(port: u16) -> Self {
        let root_dir = tempfile::Builder::new()
            .prefix("fleet-pg-")
            .tempdir()
            .unwrap();
        let root = root_dir.path().to_path_buf();
        open_up(&root);
        give_to_postgres(&root);
        let sock = root.join("sock");
        fs::create_dir(&sock).unwrap();
        give_to_postgres(&sock);
        Pg {
            data: root.join("data"),
            root,
            _root: root_dir,
            sock,
            port,
            running: false,
        }
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
        cmd.current_dir(&self.root);
        cmd
    }

    fn init(&mut self, archive_command: &str) {
        self.init_with(archive_command, &[]);
    }

    /// `init` with more initdb arguments (e.g. `--wal-segsize=64`).
    fn init_with(&mut self, archive_command: &str, initdb: &[&str]) {
        ok(self
            .as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .args(initdb)
            .arg("-D")
            .arg(&self.data));
        let conf = format!(
            "\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{sock}'\n\
             wal_level = replica\narchive_mode = on\narchive_command = '{archive_command}'\n\
             max_wal_senders = 4\nwal_keep_size = '2GB'\nmax_wal_size = '4GB'\n\
             shared_buffers = '64MB'\nfsync = off\nsynchronous_commit = off\nfull_page_writes = on\n",
            port = self.port,
            sock = self.sock.display(),
        );
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        f.write_all(conf.as_bytes()).unwrap();
        self.start();
    }

    fn start(&mut self) {
        let out = run(self
            .as_postgres("pg_ctl")
            .args(["-w", "-t", "120", "-l"])
            .arg(self.root.join("pg.log"))
            .arg("-D")
            .arg(&self.data)
            .arg("start"));
        assert!(
            out.status.success(),
            "PostgreSQL did not start; its log:\n{}",
            self.log()
        );
        self.running = true;
    }

    fn stop(&mut self) {
        if self.running {
            let _ = run(self
                .as_postgres("pg_ctl")
                .args(["-w", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop"));
            self.running = false;
        }
    }

    fn sql(&self, sql: &str) -> String {
        ok(Command::new(format!("{PG_BIN}/psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]))
        .trim()
        .to_string()
    }

    fn pgbench(&self, args: &[&str]) {
        ok(Command::new(format!("{PG_BIN}/pgbench"))
            .args(["-U", "postgres", "-h"])
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .arg("postgres"));
    }

    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.sock.display(),
            self.port
        )
    }

    fn sysid(&self) -> u64 {
        let bytes = fs::read(self.data.join("global/pg_control")).unwrap();
        u64::from_ne_bytes(bytes[..8].try_into().unwrap())
    }

    /// Switches to a new segment and waits until everything up to it is archived.
    fn switch_and_wait(&self, timeout: Duration) -> String {
        let switched = self.sql("SELECT pg_walfile_name(pg_switch_wal())");
        wait_until(timeout, "the archiver to catch up", || {
            let last = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            last.as_str() >= switched.as_str() && self.ready().is_empty()
        });
        switched
    }

    fn status_files(&self, suffix: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.data.join("pg_wal/archive_status"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(suffix))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }

    fn ready(&self) -> Vec<String> {
        self.status_files(".ready")
    }

    fn done(&self) -> Vec<String> {
        self.status_files(".done")
    }

    fn failed_count(&self) -> i64 {
        self.sql("SELECT failed_count FROM pg_stat_archiver")
            .parse()
            .unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.root.join("pg.log")).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

fn agentctl_path() -> PathBuf {
    bin_dir().join("agentctl")
}

/// The daemon with a `[wal]` table; its dir is opened so the postgres user can
/// reach the control socket (the socket itself is 0666; peer credentials gate it).
fn wal_daemon(name: &'static str, ports: (u16, u16), wal_toml: &str) -> TestDaemon {
    let daemon = TestDaemon::start(TestOptions {
        name,
        port_range: ports,
        extra_toml: format!("[wal]\n{wal_toml}\n"),
        ..Default::default()
    });
    open_up(daemon.dir());
    daemon
}

/// A daemon archiving `pg`'s WAL into the directory `archive`.
fn file_wal_daemon(name: &'static str, ports: (u16, u16), pg: &Pg, archive: &Path) -> TestDaemon {
    wal_daemon(
        name,
        ports,
        &format!(
            "target = \"file://{}\"\npostgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\n",
            archive.display(),
            pg.conninfo(),
            pg.data.display()
        ),
    )
}

/// The HTTP status of a raw request (curl with `args`) to `path` on the daemon's socket.
fn socket_status(daemon: &TestDaemon, args: &[&str], path: &str) -> String {
    let out = run(Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&daemon.socket)
        .args(args)
        .arg(format!("http://fleet{path}")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn archive_command(daemon: &TestDaemon) -> String {
    format!(
        "{} --socket {} wal push %p",
        agentctl_path().display(),
        daemon.socket.display()
    )
}

/// Every segment PostgreSQL marked `.done` is archived with the checksum of
/// the file in pg_wal. `get` reads an object by key.
fn assert_archived(pg: &Pg, get: impl Fn(&str) -> Option<Vec<u8>>) -> usize {
    let sysid = pg.sysid();
    let done = pg.done();
    assert!(!done.is_empty(), "PostgreSQL archived nothing");
    for name in &done {
        let key = format!("{sysid}/wal/{name}.zst");
        let object =
            get(&key).unwrap_or_else(|| panic!("{name} acknowledged but {key} is missing"));
        let original = fleet_wal::codec::decode(&object).unwrap_or_else(|e| panic!("{key}: {e}"));
        if fleet_wal::names::classify(name) == Some(fleet_wal::names::WalKind::Segment) {
            let local = fs::read(pg.data.join("pg_wal").join(name)).unwrap();
            assert!(original == local, "{key} differs from pg_wal/{name}");
        }
    }
    done.len()
}

fn file_get(root: &Path) -> impl Fn(&str) -> Option<Vec<u8>> + '_ {
    move |key| fs::read(root.join(key)).ok()
}

/// Archives the history file of timeline 2, as a promotion would; retention must keep it.
fn push_history_file(daemon: &TestDaemon, sysid: u64) {
    let work = tempfile::tempdir().unwrap();
    let history = work.path().join("00000002.history");
    fs::write(&history, "1\t0/9000000\tno recovery target specified\n").unwrap();
    let out = daemon.agentctl(&[
        "wal",
        "push",
        "--system-id",
        &sysid.to_string(),
        history.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
}

fn metrics(daemon: &TestDaemon) -> String {
    daemon.api_get("/metrics").expect("GET /metrics").body
}

// --- S3 (moto) -----------------------------------------------------------------

const MOTO: &str = "/opt/moto/bin/moto_server";

/// moto's S3 on loopback with one bucket. In-memory: it lives as long as this value.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(port: u16, bucket: &str) -> Self {
        assert!(
            Path::new(MOTO).exists(),
            "{MOTO} is missing; run scripts/test.sh (service_moto) first"
        );
        let port = (port..port + 10)
            .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free port for moto");
        let child = Command::new(MOTO)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        wait_until(Duration::from_secs(60), "moto to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let client = reqwest::blocking::Client::new();
        let r = client
            .put(format!("http://127.0.0.1:{port}/{bucket}"))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "create bucket: {}", r.status());
        moto
    }

    /// Reads an object through an authenticated S3 client (moto refuses
    /// anonymous reads).
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let creds = tempfile::NamedTempFile::new().unwrap();
        fs::write(
            creds.path(),
            "access_key_id = test\nsecret_access_key = test\n",
        )
        .unwrap();
        let config: fleet_model::config::WalConfig = serde_json::from_value(serde_json::json!({
            "target": format!("s3://{bucket}"),
            "s3": {
                "endpoint": format!("http://127.0.0.1:{}", self.port),
                "credentials_file": creds.path(),
            }
        }))
        .unwrap();
        let target = fleet_wal::target::Target::from_config(&config).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(target.get(key))
            .unwrap()
            .map(|b| b.to_vec())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_toml(dir: &Path, endpoint_port: u16, bucket: &str) -> String {
    let creds = dir.join("s3-credentials");
    fs::write(&creds, "access_key_id = test\nsecret_access_key = test\n").unwrap();
    format!(
        "target = \"s3://{bucket}/archive\"\n[wal.s3]\nendpoint = \"http://127.0.0.1:{endpoint_port}\"\nregion = \"us-east-1\"\ncredentials_file = \"{}\"\npath_style = true\n",
        creds.display()
    )
}

/// A TCP forwarder in front of S3 that can be switched off (connections
/// refused and cut) and on again: "S3 stopped for a while" without losing
/// what moto holds in memory.
struct Switch {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Switch {
    fn start(port: u16, upstream: u16) -> Self {
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (listener, port) = listen_from(port, "the S3 switch");
        let (up2, conns2) = (up.clone(), conns.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                if let Ok(mut c) = conns2.lock() {
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Switch { port, up, conns }
    }

    fn set(&self, on: bool) {
        self.up.store(on, Ordering::SeqCst);
        if !on {
            for c in self.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

// --- 1. pgbench with archiving ---------------------------------------------------

fn pgbench_archiving(daemon: &TestDaemon, pg: &mut Pg, get: impl Fn(&str) -> Option<Vec<u8>>) {
    pg.init(&archive_command(daemon));
    pg.pgbench(&["-i", "-s", "5", "-q"]);
    pg.pgbench(&["-c", "4", "-j", "2", "-T", "8"]);
    pg.switch_and_wait(Duration::from_secs(180));
    let count = assert_archived(pg, get);
    assert!(count >= 4, "only {count} segments archived");
    assert_eq!(
        pg.failed_count(),
        0,
        "archiver failures; log:\n{}",
        pg.log()
    );
    let status = daemon.agentctl_json(&["wal", "status"]);
    assert_eq!(status["archiver"]["failed_count"], 0, "{status}");
    // Read from the cluster: what it archives through, and nothing wrong with
    // it. The one hint: this test's cluster keeps archive_timeout at 0 (this
    // host has no packaged module, so no hint of it).
    assert_eq!(status["archiving"]["via"], "archive_command", "{status}");
    assert_eq!(
        status["archiving"]["setting"],
        archive_command(daemon),
        "{status}"
    );
    assert_eq!(status["archiving"]["major"], 15, "{status}");
    let findings = status["archiving"]["findings"]
        .as_array()
        .expect("findings");
    assert_eq!(findings.len(), 1, "{status}");
    assert_eq!(findings[0]["severity"], "hint", "{status}");
    assert!(
        findings[0]["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("archive_timeout is 0")),
        "{status}"
    );
    assert_eq!(status["ready_count"], 0, "{status}");
    // The TCP API shows the status but never serves WAL.
    let tcp = daemon.api_get("/v1/wal").expect("GET /v1/wal over TCP");
    assert_eq!(tcp.status, 200, "{}", tcp.body);
    let first = pg.done().into_iter().next().unwrap_or_default();
    let tcp = daemon
        .api_get(&format!("/v1/wal/fetch/{first}"))
        .expect("GET /v1/wal/fetch over TCP");
    assert_ne!(tcp.status, 200, "WAL served over TCP");
    let m = metrics(daemon);
    assert!(m.contains("fleet_agent_wal_shipped_segments_total"), "{m}");
    assert!(m.contains("fleet_agent_wal_backlog_segments 0"), "{m}");
}

#[test]
fn wal_pgbench_archives_everything_to_a_directory() {
    let mut pg = Pg::new(46500);
    let archive = tempfile::tempdir().unwrap();
    let daemon = file_wal_daemon("wal1", (46000, 46009), &pg, archive.path());
    pgbench_archiving(&daemon, &mut pg, file_get(archive.path()));
}

#[test]
fn wal_pgbench_archives_everything_to_s3() {
    let mut pg = Pg::new(46501);
    let moto = Moto::start(46600, "wal1");
    let dir = tempfile::tempdir().unwrap();
    let daemon = wal_daemon(
        "wal1s",
        (46010, 46019),
        &format!(
            "postgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\n{}",
            pg.conninfo(),
            pg.data.display(),
            s3_toml(dir.path(), moto.port, "wal1")
        ),
    );
    pgbench_archiving(&daemon, &mut pg, |key| {
        moto.get("wal1", &format!("archive/{key}"))
    });
}

// --- 2. the same name twice --------------------------------------------------------

fn segment_file(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let path = dir.join(name);
    let mut content = vec![fill; 16 << 20];
    content[0] = 0xD1;
    fs::write(&path, content).unwrap();
    path
}

#[test]
fn wal_same_segment_twice_ok_different_content_refused() {
    let archive = tempfile::tempdir().unwrap();
    let daemon = wal_daemon(
        "wal2",
        (46020, 46029),
        &format!("target = \"file://{}\"", archive.path().display()),
    );
    let work = tempfile::tempdir().unwrap();
    let name = "000000010000000000000007";
    let first = segment_file(work.path(), name, 1);
    let push = |path: &Path| {
        daemon.agentctl(&["wal", "push", "--system-id", "4242", path.to_str().unwrap()])
    };
    let out = push(&first);
    assert!(out.status.success(), "{out:?}");
    let key = archive.path().join(format!("4242/wal/{name}.zst"));
    let stored = fs::read(&key).unwrap();
    let out = push(&first);
    assert!(out.status.success(), "identical push must succeed: {out:?}");

    let other_dir = tempfile::tempdir().unwrap();
    let second = segment_file(other_dir.path(), name, 2);
    let out = push(&second);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("different content"),
        "{out:?}"
    );
    assert_eq!(fs::read(&key).unwrap(), stored, "the stored object changed");

    // Also when the daemon has forgotten (restart): the check reads the target.
    let mut daemon = daemon;
    daemon.restart();
    let out = daemon.agentctl(&[
        "wal",
        "push",
        "--system-id",
        "4242",
        second.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = daemon.agentctl(&[
        "wal",
        "push",
        "--system-id",
        "4242",
        first.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read(&key).unwrap(), stored);
    let m = metrics(&daemon);
    assert!(
        m.contains("fleet_agent_wal_failures_total{kind=\"conflict\"} 1"),
        "{m}"
    );
    let events = daemon.agentctl_json(&["events", "--after", "0"]);
    assert!(events.to_string().contains("wal_conflict"), "{events}");
}

// --- the caller's system_id ---------------------------------------------------

/// The PostgreSQL user names the cluster in each call: a host serves only the
/// cluster it runs (here: pinned by the first push, as without pg_wal_dir), so
/// another host's WAL in a shared bucket can be neither read nor planted.
#[test]
fn wal_another_clusters_push_and_fetch_are_refused() {
    let archive = tempfile::tempdir().unwrap();
    let mut daemon = wal_daemon(
        "walsys",
        (46080, 46089),
        &format!("target = \"file://{}\"", archive.path().display()),
    );
    let work = tempfile::tempdir().unwrap();
    let name = "000000010000000000000003";
    let seg = segment_file(work.path(), name, 3);
    let push = |d: &TestDaemon, sysid: &str, path: &Path| {
        d.agentctl(&["wal", "push", "--system-id", sysid, path.to_str().unwrap()])
    };
    let fetch = |d: &TestDaemon, sysid: &str, name: &str| {
        d.agentctl(&[
            "wal",
            "fetch",
            "--system-id",
            sysid,
            name,
            work.path().join("fetched").to_str().unwrap(),
        ])
    };
    let out = push(&daemon, "4343", &seg);
    assert!(out.status.success(), "{out:?}");
    // Another host's cluster: a planted future segment and a .history, a read.
    let history = work.path().join("00000002.history");
    fs::write(&history, "1\t0/9000000\tno recovery target specified\n").unwrap();
    for round in 0..2 {
        for path in [&seg, &history] {
            let out = push(&daemon, "4444", path);
            assert_eq!(out.status.code(), Some(2), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("4444 is not a cluster this host archives (4343)"),
                "{err}"
            );
        }
        let out = fetch(&daemon, "4343", name);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            fs::read(work.path().join("fetched")).unwrap(),
            fs::read(&seg).unwrap()
        );
        let out = fetch(&daemon, "4444", name);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        // The pin outlives a restart.
        if round == 0 {
            daemon.restart();
        }
    }
    assert!(
        !archive.path().join("4444").exists(),
        "another cluster's WAL was stored"
    );
    let m = metrics(&daemon);
    assert!(
        m.contains("fleet_agent_wal_failures_total{kind=\"foreign_cluster\"} 3"),
        "{m}"
    );
}

// --- 5. bad names, symlinks -------------------------------------------------------

#[test]
fn wal_bad_names_and_symlinks_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let archive = root.path().join("archive");
    let daemon = wal_daemon(
        "wal5",
        (46030, 46039),
        &format!("target = \"file://{}\"", archive.display()),
    );
    let work = tempfile::tempdir().unwrap();
    let push = |path: &str| daemon.agentctl(&["wal", "push", "--system-id", "5", path]);

    let bad_hex = segment_file(work.path(), "00000001000000000000000G", 1);
    let out = push(bad_hex.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let out = push("../../etc/passwd");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let link = work.path().join("000000010000000000000003");
    std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
    let out = push(link.to_str().unwrap());
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The daemon itself refuses names with a path in them, whoever sends them.
    for name in [
        "..%2F..%2Fetc%2Fpasswd",
        "00000001000000000000000G",
        "%2Fetc%2Fpasswd",
    ] {
        let code = socket_status(
            &daemon,
            &["-X", "POST", "--data-binary", "x"],
            &format!("/v1/wal/push?name={name}&system_id=5"),
        );
        assert_eq!(code, "400", "{name}");
        let code = socket_status(&daemon, &[], &format!("/v1/wal/fetch/{name}?system_id=5"));
        assert!(code == "400" || code == "404", "{name}: {code}");
    }
    // Nothing was written: not in the target, not beside it.
    let beside: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        beside,
        vec![std::ffi::OsString::from("archive")],
        "{beside:?}"
    );
    let mut inside = Vec::new();
    for e in walk(&archive) {
        inside.push(e);
    }
    assert!(inside.is_empty(), "{inside:?}");
    // A fetch of something not archived exits 1 (recovery ends normally on it).
    // The host serves only its own clusters: cluster 5 becomes one by a push.
    let seg = segment_file(work.path(), "000000010000000000000008", 1);
    let out = push(seg.to_str().unwrap());
    assert!(out.status.success(), "{out:?}");
    let out = daemon.agentctl(&[
        "wal",
        "fetch",
        "--system-id",
        "5",
        "000000010000000000000009",
        work.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

// --- 4. kill -9 during uploads ------------------------------------------------------

/// Every object under a final key decodes (a partial object would not).
fn assert_no_partial_objects(archive: &Path) -> usize {
    let mut count = 0;
    for path in walk(archive) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.')
            || !name.ends_with(".zst")
            || path.to_string_lossy().contains("/backups/")
        {
            continue;
        }
        let object = fs::read(&path).unwrap();
        fleet_wal::codec::decode(&object)
            .unwrap_or_else(|e| panic!("{}: partial or damaged object: {e}", path.display()));
        count += 1;
    }
    count
}

fn pgbench_in_background(pg: &Pg, seconds: u32) -> Child {
    Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&pg.sock)
        .args(["-p", &pg.port.to_string()])
        .args(["-c", "4", "-j", "2", "-T", &seconds.to_string(), "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn wal_kill9_during_uploads_leaves_no_partial_object() {
    let mut pg = Pg::new(46504);
    let archive = tempfile::tempdir().unwrap();
    let mut daemon = file_wal_daemon("wal4", (46040, 46049), &pg, archive.path());
    pg.init(&archive_command(&daemon));
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    let mut load = pgbench_in_background(&pg, 14);
    for _ in 0..2 {
        thread::sleep(Duration::from_secs(3));
        daemon.kill9();
        assert_no_partial_objects(archive.path());
        thread::sleep(Duration::from_secs(2));
        assert_no_partial_objects(archive.path());
        daemon.restart();
    }
    let status = load.wait().unwrap();
    assert!(status.success(), "pgbench failed");
    pg.switch_and_wait(Duration::from_secs(240));
    let acknowledged = assert_archived(&pg, file_get(archive.path()));
    let objects = assert_no_partial_objects(archive.path());
    assert!(
        objects >= acknowledged,
        "{objects} objects for {acknowledged} acknowledged"
    );
}

// --- 3. S3 stopped under load ---------------------------------------------------------

#[test]
fn wal_s3_stopped_under_load_then_drains_without_gap() {
    let mut pg = Pg::new(46505);
    let moto = Moto::start(46620, "wal3");
    let switch = Switch::start(46640, moto.port);
    let dir = tempfile::tempdir().unwrap();
    let daemon = wal_daemon(
        "wal3",
        (46050, 46059),
        &format!(
            "postgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\n{}",
            pg.conninfo(),
            pg.data.display(),
            s3_toml(dir.path(), switch.port, "wal3")
        ),
    );
    pg.init(&archive_command(&daemon));
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.switch_and_wait(Duration::from_secs(120));
    let mut load = pgbench_in_background(&pg, 25);
    thread::sleep(Duration::from_secs(3));
    switch.set(false);
    // PostgreSQL keeps its WAL (files wait as .ready) and counts failed pushes.
    pg.sql("CREATE TABLE ticks (x int)");
    wait_until(
        Duration::from_secs(120),
        "a backlog while S3 is down",
        || {
            // Complete segments even if pgbench is slow on a busy machine.
            pg.sql("INSERT INTO ticks VALUES (1)");
            pg.sql("SELECT pg_switch_wal()");
            pg.ready().len() >= 2 && pg.failed_count() > 0
        },
    );
    for name in pg.ready() {
        assert!(
            pg.data.join("pg_wal").join(&name).exists(),
            "pg_wal/{name} is gone while unarchived"
        );
    }
    let status = daemon.agentctl_json(&["wal", "status"]);
    assert!(status["ready_count"].as_u64().unwrap_or(0) >= 2, "{status}");
    let m = metrics(&daemon);
    assert!(
        !m.contains("fleet_agent_wal_failures_total{kind=\"target\"} 0"),
        "{m}"
    );
    thread::sleep(Duration::from_secs(5));
    switch.set(true);
    assert!(load.wait().unwrap().success(), "pgbench failed");
    pg.switch_and_wait(Duration::from_secs(300));
    let count = assert_archived(&pg, |key| moto.get("wal3", &format!("archive/{key}")));
    assert!(count >= 4, "{count}");
}

// --- 6. point-in-time recovery ------------------------------------------------------------

#[test]
fn wal_point_in_time_recovery_end_to_end() {
    let mut pg = Pg::new(46506);
    let archive = tempfile::tempdir().unwrap();
    let daemon = file_wal_daemon("wal6", (46060, 46069), &pg, archive.path());
    pg.init(&archive_command(&daemon));
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, phase text NOT NULL)");
    pg.sql("INSERT INTO t SELECT g, 'before-backup' FROM generate_series(1, 10) g");
    let manifest = daemon.agentctl_json(&["backup", "create"]);
    assert!(manifest["start_wal"].is_string(), "{manifest}");
    pg.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(101, 150) g");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(151, 200) g");
    thread::sleep(Duration::from_millis(1200));
    let target = pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    thread::sleep(Duration::from_millis(1200));
    pg.sql("INSERT INTO t SELECT g, 'b' FROM generate_series(1001, 1050) g");
    pg.sql("DELETE FROM t WHERE phase = 'before-backup'");
    pg.switch_and_wait(Duration::from_secs(120));

    let list = daemon.agentctl_json(&["backup", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    let mut restored = Pg::new(46507);
    fs::create_dir(&restored.data).unwrap();
    give_to_postgres(&restored.data);
    let report = daemon.agentctl_json(&[
        "restore",
        "--to",
        restored.data.to_str().unwrap(),
        "--target-time",
        &target,
    ]);
    assert_eq!(report["backup"], manifest["id"], "{report}");
    assert!(restored.data.join("recovery.signal").exists());
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(restored.data.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "\nport = {}\nunix_socket_directories = '{}'\narchive_mode = off\n",
        restored.port,
        restored.sock.display()
    )
    .unwrap();
    restored.start();
    wait_until(Duration::from_secs(120), "recovery to finish", || {
        restored.sql("SELECT pg_is_in_recovery()") == "f"
    });
    let counts =
        restored.sql("SELECT phase || '=' || count(*) FROM t GROUP BY phase ORDER BY phase");
    assert_eq!(
        counts.lines().collect::<Vec<_>>(),
        vec!["a=100", "before-backup=10"],
        "restored cluster log:\n{}",
        restored.log()
    );
    let m = metrics(&daemon);
    assert!(
        m.contains("fleet_agent_wal_last_base_backup_age_seconds"),
        "{m}"
    );
}

// --- 7. retention ---------------------------------------------------------------------------

#[test]
fn wal_retention_keeps_what_the_window_needs() {
    let mut pg = Pg::new(46508);
    let archive = tempfile::tempdir().unwrap();
    let daemon = file_wal_daemon("wal7", (46070, 46079), &pg, archive.path());
    pg.init(&archive_command(&daemon));
    let sysid = pg.sysid();
    let backup = || {
        let m = daemon.agentctl_json(&["backup", "create"]);
        pg.sql("CREATE TABLE IF NOT EXISTS filler (x int)");
        pg.sql("INSERT INTO filler SELECT generate_series(1, 1000)");
        pg.switch_and_wait(Duration::from_secs(120));
        pg.sql("INSERT INTO filler SELECT generate_series(1, 1000)");
        pg.switch_and_wait(Duration::from_secs(120));
        m
    };
    let b1 = backup();
    thread::sleep(Duration::from_secs(7));
    let b2 = backup();
    thread::sleep(Duration::from_secs(7));
    let b3 = backup();
    push_history_file(&daemon, sysid);

    let wal_dir = archive.path().join(format!("{sysid}/wal"));
    let before: Vec<String> = fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".zst")
                .to_string()
        })
        .collect();
    // A window that starts between B2 and B3 (7 s and more apart): B3 is
    // inside it, B2 is the newest backup older than it, B1 is not needed.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let window = now - b3["finished_unix"].as_u64().unwrap() + 3;
    assert!(now - window > b2["finished_unix"].as_u64().unwrap());
    let report = daemon.agentctl_json(&["backup", "prune", "--window", &format!("{window}s")]);
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&report["deleted_backups"]),
        vec![b1["id"].as_str().unwrap().to_string()],
        "{report}"
    );
    assert_eq!(
        ids(&report["kept_backups"]),
        vec![
            b2["id"].as_str().unwrap().to_string(),
            b3["id"].as_str().unwrap().to_string()
        ],
        "{report}"
    );
    let list = daemon.agentctl_json(&["backup", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    assert!(!archive
        .path()
        .join(format!("{sysid}/backups/{}", b1["id"].as_str().unwrap()))
        .join("manifest.json")
        .exists());

    let needed = fleet_wal::names::position(b2["start_wal"].as_str().unwrap()).unwrap();
    let after: Vec<String> = fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".zst")
                .to_string()
        })
        .collect();
    assert!(after.contains(&"00000002.history".to_string()), "{after:?}");
    let mut deleted = 0;
    for name in &before {
        let pos = fleet_wal::names::segment_of(name).and_then(fleet_wal::names::position);
        match pos {
            Some(p) if p < needed => {
                assert!(!after.contains(name), "{name} should be deleted");
                deleted += 1;
            }
            _ => assert!(after.contains(name), "{name} is needed but was deleted"),
        }
    }
    assert!(deleted > 0, "nothing was old enough to delete: {before:?}");
    // Everything PostgreSQL archived from B2's start on is still there.
    for name in pg.done() {
        if fleet_wal::names::segment_of(&name)
            .and_then(fleet_wal::names::position)
            .is_some_and(|p| p >= needed)
        {
            assert!(after.contains(&name), "{name} missing after retention");
        }
    }
}

// --- the valve, the schedule, conditional PUT -------------------------------------
// Port ranges of these tests: daemons 47000-47099, PostgreSQL 47100-47199,
// S3 47200-47299.

/// The value of an unlabelled metric line `name <value>`.
fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Every event in the daemon's log as (kind, message).
fn events(daemon: &TestDaemon) -> Vec<(String, String)> {
    let page = daemon.agentctl_json(&["events", "--after", "0"]);
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A loopback port from `from` on that nobody listens on: connections to it
/// are refused, as to an S3 endpoint that is down.
fn dead_port(from: u16) -> u16 {
    listen_from(from, "a dead S3 endpoint").1
}

/// A listener on the first loopback port from `from` on that is free (a
/// client's ephemeral port may hold one of a test's fixed ports).
fn listen_from(from: u16, what: &str) -> (TcpListener, u16) {
    (from..from + 20)
        .find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok().map(|l| (l, p)))
        .unwrap_or_else(|| panic!("no free port for {what} in {from}..{}", from + 20))
}

#[test]
fn wal_valve_acknowledges_past_the_backlog_while_s3_is_down() {
    let mut pg = Pg::new(47100);
    let dir = tempfile::tempdir().unwrap();
    let s3 = dead_port(47200);
    // 40 MiB: the valve opens when a push fails with 3 or more segments
    // (48 MiB) waiting, never with 1 or 2.
    let daemon = wal_daemon(
        "wal8",
        (47000, 47009),
        &format!(
            "postgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\nvalve_backlog = \"40MiB\"\n{}",
            pg.conninfo(),
            pg.data.display(),
            s3_toml(dir.path(), s3, "wal8")
        ),
    );
    pg.init(&archive_command(&daemon));
    pg.sql("CREATE TABLE ticks (x int)");
    let segment = || {
        pg.sql("INSERT INTO ticks VALUES (1)");
        pg.sql("SELECT pg_walfile_name(pg_switch_wal())")
    };
    let valve = || {
        metric_value(
            &metrics(&daemon),
            "fleet_agent_wal_valve_acknowledged_total",
        )
    };

    // Below the valve the archive's failure reaches PostgreSQL: it keeps the
    // segment and retries, nothing is acknowledged.
    let first = segment();
    wait_until(Duration::from_secs(60), "a failed push", || {
        pg.failed_count() > 0
    });
    assert_eq!(pg.ready(), vec![first.clone()]);
    assert!(pg.data.join("pg_wal").join(&first).exists());
    assert_eq!(valve(), Some(0.0));
    assert_eq!(
        pg.sql("SELECT archived_count FROM pg_stat_archiver"),
        "0",
        "archived while S3 is down and below the valve"
    );

    // Past it, segments are acknowledged unarchived: the backlog stops growing.
    let mut made = 1;
    for _ in 0..7 {
        segment();
        made += 1;
        thread::sleep(Duration::from_millis(300));
    }
    let archived = || -> u64 {
        pg.sql("SELECT archived_count FROM pg_stat_archiver")
            .parse()
            .unwrap()
    };
    // Settled: 2 left waiting, and PostgreSQL has counted what it renamed
    // .done (it does so just after the rename).
    wait_until(
        Duration::from_secs(90),
        "the valve to hold the backlog at 2",
        || pg.ready().len() <= 2 && archived() as f64 == valve().unwrap_or(-1.0),
    );
    let acknowledged = archived();
    assert!(
        acknowledged as usize >= made - 2,
        "{acknowledged} of {made} segments acknowledged; ready: {:?}",
        pg.ready()
    );
    // Every acknowledgement was the valve's: S3 never answered.
    let m = metrics(&daemon);
    assert_eq!(
        metric_value(&m, "fleet_agent_wal_valve_acknowledged_total"),
        Some(acknowledged as f64),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "fleet_agent_wal_shipped_segments_total"),
        Some(0.0)
    );
    assert!(
        !m.contains("fleet_agent_wal_failures_total{kind=\"target\"} 0"),
        "{m}"
    );
    // The oldest segments went first; the newest wait.
    let done = pg.done();
    assert!(done.contains(&first), "{done:?}");
    assert!(done.iter().all(|d| pg.ready().iter().all(|r| d < r)));

    // One loud event (not one per segment) that says what to do.
    let opened: Vec<_> = events(&daemon)
        .into_iter()
        .filter(|(kind, _)| kind == "wal_valve_open")
        .collect();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(
        opened[0].1.contains(&first) && opened[0].1.contains("new base backup"),
        "{opened:?}"
    );
    let status = daemon.agentctl_json(&["wal", "status"]);
    assert_eq!(status["valve_acknowledged"], acknowledged, "{status}");
    let text = daemon.agentctl_ok(&["wal", "status"]);
    assert!(
        text.contains(&format!("VALVE:              {acknowledged} segment(s)"))
            && text.contains("take a new base backup"),
        "{text}"
    );
}

/// Keys under `dir` (relative, `/`-separated), e.g. `<sysid>/wal/<name>.zst`.
fn keys(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(dir)
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .map(|p| p.strip_prefix(dir).unwrap().to_string_lossy().to_string())
        .collect();
    out.sort();
    out
}

/// The manifests of the whole backups in a directory archive, oldest first.
fn archived_backups(archive: &Path, sysid: u64) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = keys(archive)
        .into_iter()
        .filter(|k| k.starts_with(&format!("{sysid}/backups/")) && k.ends_with("/manifest.json"))
        .filter_map(|k| fs::read(archive.join(k)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    out.sort_by_key(|m| m["id"].as_str().unwrap_or_default().to_string());
    out
}

/// A cluster made with 64 MiB segments: the manifest names the segment
/// PostgreSQL itself names for the start point, so retention keeps what the
/// kept base backup needs.
#[test]
fn wal_64mib_segments_manifest_and_retention_follow_the_cluster() {
    let mut pg = Pg::new(47103);
    let archive = tempfile::tempdir().unwrap();
    let daemon = wal_daemon(
        "wal64",
        (47050, 47059),
        &format!(
            "target = \"file://{}\"\npostgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\n",
            archive.path().display(),
            pg.conninfo(),
            pg.data.display()
        ),
    );
    pg.init_with(&archive_command(&daemon), &["--wal-segsize=64"]);
    assert_eq!(pg.sql("SHOW wal_segment_size"), "64MB");
    // Into segment 3 and beyond, where 16 MiB arithmetic names segment 12+.
    for _ in 0..3 {
        pg.sql("CREATE TABLE IF NOT EXISTS t(x int); INSERT INTO t VALUES (1)");
        pg.switch_and_wait(Duration::from_secs(60));
    }
    let out = daemon.agentctl(&["backup", "create", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let start_lsn = manifest["start_lsn"].as_str().unwrap();
    let expected = pg.sql(&format!(
        "SELECT pg_walfile_name('{start_lsn}') /* timeline {} */",
        manifest["timeline"]
    ));
    assert_eq!(manifest["start_wal"], expected.as_str(), "{manifest}");
    assert_eq!(manifest["wal_segment_bytes"], 64u64 << 20, "{manifest}");
    // Retention to this backup keeps every segment from its start on.
    pg.switch_and_wait(Duration::from_secs(60));
    let out = daemon.agentctl(&["backup", "prune", "--window", "0s"]);
    assert!(out.status.success(), "{out:?}");
    let kept = keys(archive.path());
    let wal_dir = format!("{}/wal/", pg.sysid());
    let want = format!("{wal_dir}{expected}.zst");
    assert!(kept.contains(&want), "{want} was deleted: {kept:?}");
    let older = format!("{wal_dir}000000010000000000000001.zst");
    assert!(
        !kept.contains(&older),
        "retention deleted nothing: {kept:?}"
    );
}

#[test]
fn wal_scheduled_base_backups_without_a_command() {
    let mut pg = Pg::new(47101);
    let archive = tempfile::tempdir().unwrap();
    let daemon = wal_daemon(
        "wal10",
        (47030, 47039),
        &format!(
            "target = \"file://{}\"\npostgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\nbackup_interval = \"2s\"\n",
            archive.path().display(),
            pg.conninfo(),
            pg.data.display()
        ),
    );
    // No cluster yet, so no backup can have been taken: no age to show.
    let m = metrics(&daemon);
    assert!(
        !m.contains("fleet_agent_wal_last_base_backup_age_seconds"),
        "a backup age before any backup: {m}"
    );
    pg.init(&archive_command(&daemon));
    // Two, so it is a schedule and not a one-off at start.
    let list = fleet_tests::wait_for(Duration::from_secs(60), "two scheduled backups", || {
        let list = daemon.agentctl_json(&["backup", "list"]);
        (list.as_array().map_or(0, Vec::len) >= 2).then_some(list)
    });
    let newest = &list.as_array().unwrap()[list.as_array().unwrap().len() - 1];
    assert_eq!(
        newest["system_identifier"],
        pg.sysid().to_string(),
        "{newest}"
    );
    let base = archive.path().join(format!(
        "{}/backups/{}/base.tar.zst",
        pg.sysid(),
        newest["id"].as_str().unwrap()
    ));
    assert!(base.exists(), "{}", base.display());
    let m = metrics(&daemon);
    let age = metric_value(&m, "fleet_agent_wal_last_base_backup_age_seconds")
        .unwrap_or_else(|| panic!("no backup age metric: {m}"));
    assert!(age < 30.0, "{age}");
    let status = daemon.agentctl_json(&["wal", "status"]);
    assert!(
        status["last_backup_age_seconds"].as_u64().is_some(),
        "{status}"
    );
    assert!(
        events(&daemon)
            .iter()
            .any(|(kind, _)| kind == "wal_backup_created"),
        "no wal_backup_created event"
    );
}

#[test]
fn wal_retention_runs_after_each_scheduled_backup() {
    let mut pg = Pg::new(47102);
    let archive = tempfile::tempdir().unwrap();
    let mut daemon = wal_daemon(
        "wal11",
        (47040, 47049),
        &format!(
            "target = \"file://{}\"\npostgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\nbackup_interval = \"2s\"\nrecovery_window = \"6s\"\n",
            archive.path().display(),
            pg.conninfo(),
            pg.data.display()
        ),
    );
    pg.init(&archive_command(&daemon));
    let sysid = pg.sysid();
    pg.sql("CREATE TABLE filler (x int)");
    push_history_file(&daemon, sysid);
    let history_key = format!("{sysid}/wal/00000002.history.zst");

    let first = fleet_tests::wait_for(Duration::from_secs(60), "a scheduled backup", || {
        archived_backups(archive.path(), sysid).into_iter().next()
    });
    let first_id = first["id"].as_str().unwrap().to_string();
    let position =
        |name: &str| fleet_wal::names::segment_of(name).and_then(fleet_wal::names::position);
    let wal_names = || -> Vec<String> {
        keys(archive.path())
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(&format!("{sysid}/wal/"))
                    .and_then(|n| n.strip_suffix(".zst"))
                    .map(str::to_string)
            })
            .collect()
    };
    // WAL keeps coming while the schedule backs up and expires, with no
    // command given: the first backup goes, and with it all WAL before the
    // oldest backup kept.
    let mut deleted_wal = Vec::new();
    wait_until(
        Duration::from_secs(90),
        "the first backup and the WAL before the oldest kept one to expire",
        || {
            pg.sql("INSERT INTO filler SELECT generate_series(1, 100)");
            pg.sql("SELECT pg_switch_wal()");
            let kept = archived_backups(archive.path(), sysid);
            let Some(oldest) = kept.first() else {
                return false;
            };
            let needed = position(oldest["start_wal"].as_str().unwrap()).unwrap();
            let names = wal_names();
            deleted_wal = pg
                .done()
                .into_iter()
                .filter(|d| position(d).is_some_and(|p| p < needed))
                .collect();
            kept.iter().all(|m| m["id"] != first_id.as_str())
                && !deleted_wal.is_empty()
                && deleted_wal.iter().all(|d| !names.contains(d))
        },
    );
    // Freeze the archive, then check it as a restore would need it.
    daemon.stop(Duration::from_secs(20));
    let all = keys(archive.path());
    assert!(
        !all.iter()
            .any(|k| k.contains(&format!("/backups/{first_id}/"))),
        "{all:?}"
    );
    assert!(all.contains(&history_key), "{all:?}");
    let kept = archived_backups(archive.path(), sysid);
    assert!(!kept.is_empty());
    for m in &kept {
        let base = format!("{sysid}/backups/{}/base.tar.zst", m["id"].as_str().unwrap());
        assert!(all.contains(&base), "{base} missing: {all:?}");
    }
    // Nothing the oldest kept backup needs is gone: every segment PostgreSQL
    // acknowledged from its start on is archived.
    let needed = position(kept[0]["start_wal"].as_str().unwrap()).unwrap();
    let names = wal_names();
    for name in pg.done() {
        if position(&name).is_some_and(|p| p >= needed) {
            assert!(
                names.contains(&name),
                "{name} is needed but gone: {names:?}"
            );
        }
    }
    for name in &deleted_wal {
        assert!(!names.contains(name), "{name} outlived its backups");
    }
    // The daemon said so in its event log.
    daemon.restart();
    let retention: Vec<_> = events(&daemon)
        .into_iter()
        .filter(|(kind, _)| kind.starts_with("wal_retention"))
        .collect();
    assert!(
        retention.iter().any(|(kind, _)| kind == "wal_retention"),
        "{retention:?}"
    );
    assert!(
        retention.iter().all(|(kind, _)| kind == "wal_retention"),
        "{retention:?}"
    );
}

/// 4 MiB that zstd cannot shrink (the daemon takes any size; a smaller file
/// keeps the debug build's hashing quick).
fn random_segment(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut content = Vec::with_capacity(4 << 20);
    while content.len() < 4 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        content.extend_from_slice(&x.to_le_bytes());
    }
    let path = dir.join(name);
    fs::write(&path, content).unwrap();
    path
}

/// A TCP forwarder to S3 that passes what the client sends at `bytes_per_sec`
/// (answers at full speed) and counts it: a slow uplink, so a PUT can be held
/// on the wire while another writer stores under the same key.
struct SlowLink {
    port: u16,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl SlowLink {
    fn start(port: u16, upstream: u16, bytes_per_sec: usize) -> Self {
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (listener, port) = listen_from(port, "the slow link");
        let counter = sent.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut up_from, mut up_to) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let counter = counter.clone();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        match up_from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if up_to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                counter.fetch_add(n as u64, Ordering::SeqCst);
                                thread::sleep(Duration::from_secs_f64(
                                    n as f64 / bytes_per_sec as f64,
                                ));
                            }
                        }
                    }
                    let _ = up_to.shutdown(std::net::Shutdown::Write);
                });
                let (mut down_from, mut down_to) = (server, client);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut down_from, &mut down_to);
                    let _ = down_to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowLink { port, sent }
    }
}

#[test]
fn wal_s3_store_refuses_an_overwrite_the_daemon_cannot_see() {
    let moto = Moto::start(47240, "wal9");
    // Daemon B reaches S3 over a slow uplink (512 KiB/s: its 4 MiB PUT takes
    // about 8 s on the wire), daemon A directly. Two daemons that know
    // nothing of each other's pushes, as two hosts, or one daemon before and
    // after a restart, share a bucket and a cluster id.
    let slow = SlowLink::start(47260, moto.port, 512 << 10);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = wal_daemon(
        "wal9a",
        (47010, 47019),
        &s3_toml(dir_a.path(), moto.port, "wal9"),
    );
    let b = wal_daemon(
        "wal9b",
        (47020, 47029),
        &s3_toml(dir_b.path(), slow.port, "wal9"),
    );
    let work = tempfile::tempdir().unwrap();
    let name = "000000010000000000000042";
    let (fa, fb) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir_all(&fa).unwrap();
    fs::create_dir_all(&fb).unwrap();
    let pa = random_segment(&fa, name, 1);
    let pb = random_segment(&fb, name, 2);
    let push = |daemon: &TestDaemon, path: &Path| {
        daemon.agentctl(&["wal", "push", "--system-id", "99", path.to_str().unwrap()])
    };
    let (out_a, out_b) = thread::scope(|s| {
        // B checks (nothing there yet) and starts its PUT...
        let tb = s.spawn(|| push(&b, &pb));
        wait_until(Duration::from_secs(60), "B's PUT on the wire", || {
            slow.sent.load(Ordering::SeqCst) > 256 << 10
        });
        // ...A stores the same name meanwhile, before B's PUT is complete...
        let out_a = push(&a, &pa);
        assert!(
            slow.sent.load(Ordering::SeqCst) < 4 << 20,
            "B's PUT was done before A stored; the test proves nothing"
        );
        (out_a, tb.join().unwrap())
    });
    // ...and the store refuses B's PUT: nothing B's existence check could see.
    assert!(out_a.status.success(), "{out_a:?}");
    assert_eq!(out_b.status.code(), Some(3), "{out_b:?}");
    assert!(
        String::from_utf8_lossy(&out_b.stderr).contains("different content"),
        "{out_b:?}"
    );
    let stored = moto
        .get("wal9", &format!("archive/99/wal/{name}.zst"))
        .expect("stored");
    assert!(
        fleet_wal::codec::decode(&stored).unwrap() == fs::read(&pa).unwrap(),
        "A's object was replaced by B's"
    );
    let m = metrics(&b);
    assert!(
        m.contains("fleet_agent_wal_failures_total{kind=\"conflict\"} 1"),
        "{m}"
    );
    assert!(
        events(&b).iter().any(|(kind, _)| kind == "wal_conflict"),
        "no wal_conflict event on B"
    );
    // B asks again, now with its cache empty (restart): refused, unchanged.
    let mut b = b;
    b.restart();
    assert_eq!(push(&b, &pb).status.code(), Some(3));
    assert!(push(&b, &pa).status.success());
    let again = moto
        .get("wal9", &format!("archive/99/wal/{name}.zst"))
        .expect("stored");
    assert!(again == stored, "the stored object changed");
}

// --- verify and the restore drill (issue 13): daemons 43500-43539, PostgreSQL 43540-43559 ---

/// The archived names (without `.zst`) of cluster `sysid`, sorted.
fn archived_names(archive: &Path, sysid: u64) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(archive.join(format!("{sysid}/wal")))
        .unwrap()
        .flatten()
        .map(|e| {
            e.file_name()
                .to_string_lossy()
                .trim_end_matches(".zst")
                .to_string()
        })
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn wal_verify_names_a_gap_and_a_checksum_failure() {
    let mut pg = Pg::new(43540);
    let archive = tempfile::tempdir().unwrap();
    let daemon = file_wal_daemon("walverif", (43500, 43509), &pg, archive.path());
    pg.init(&archive_command(&daemon));
    let sysid = pg.sysid();
    let backup = daemon.agentctl_json(&["backup", "create"]);
    pg.sql("CREATE TABLE filler (x int)");
    for _ in 0..4 {
        pg.sql("INSERT INTO filler SELECT generate_series(1, 1000)");
        pg.switch_and_wait(Duration::from_secs(120));
    }
    let report = daemon.agentctl_json(&["wal", "verify"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["from"], backup["start_wal"], "{report}");
    assert!(report["segments"].as_u64().unwrap() >= 5, "{report}");
    assert!(metrics(&daemon).contains("fleet_agent_wal_verify_ok 1"));

    let segments: Vec<String> = archived_names(archive.path(), sysid)
        .into_iter()
        .filter(|n| n.len() == 24 && n.as_str() > backup["start_wal"].as_str().unwrap())
        .collect();
    assert!(segments.len() >= 4, "{segments:?}");
    let wal_dir = archive.path().join(format!("{sysid}/wal"));
    let missing = &segments[1];
    fs::remove_file(wal_dir.join(format!("{missing}.zst"))).unwrap();
    let damaged = &segments[2];
    let path = wal_dir.join(format!("{damaged}.zst"));
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, bytes).unwrap();

    let out = daemon.agentctl(&["wal", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["gaps"], serde_json::json!([missing]), "{report}");
    assert_eq!(
        report["checksum_failures"][0]["name"].as_str(),
        Some(damaged.as_str()),
        "{report}"
    );
    let text = metrics(&daemon);
    assert!(text.contains("fleet_agent_wal_verify_ok 0"), "{text}");
    assert!(text.contains("fleet_agent_wal_verify_problems 2"), "{text}");
    assert!(events(&daemon)
        .iter()
        .any(|(kind, message)| kind == "wal_verify_failed" && message.contains(missing.as_str())));
    // The age of the newest archived segment (the RPO bound) is exported.
    assert!(metric_value(&text, "fleet_agent_wal_newest_archived_age_seconds").is_some());
}

#[test]
fn wal_drill_restores_replays_and_names_a_missing_segment() {
    let mut pg = Pg::new(43541);
    let archive = tempfile::tempdir().unwrap();
    // The daemon runs as root here and its state dir is 0750: the drill's
    // server (as postgres) gets a scratch directory it can reach.
    let drills = tempfile::tempdir().unwrap();
    open_up(drills.path());
    let daemon = wal_daemon(
        "waldrill",
        (43510, 43519),
        &format!(
            "target = \"file://{}\"\npostgres = \"{}\"\npg_wal_dir = \"{}/pg_wal\"\ndrill_dir = \"{}/d\"\n",
            archive.path().display(),
            pg.conninfo(),
            pg.data.display(),
            drills.path().display()
        ),
    );
    pg.init(&archive_command(&daemon));
    let sysid = pg.sysid();
    pg.pgbench(&["-i", "-s", "2"]);
    let backup = daemon.agentctl_json(&["backup", "create"]);
    for _ in 0..3 {
        pg.pgbench(&["-t", "200", "-c", "2"]);
        pg.switch_and_wait(Duration::from_secs(120));
    }
    let newest = archived_names(archive.path(), sysid)
        .into_iter()
        .rfind(|n| n.len() == 24)
        .unwrap();

    let report = daemon.agentctl_json(&["wal", "drill"]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["backup"], backup["id"], "{report}");
    assert_eq!(
        report["expected_end"].as_str(),
        Some(newest.as_str()),
        "{report}"
    );
    // Replay reached the newest segment (the promoted server names it on its new timeline).
    assert_eq!(
        report["replayed_to"].as_str().map(|s| &s[8..]),
        Some(&newest[8..]),
        "{report}"
    );
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let text = metrics(&daemon);
    assert!(text.contains("fleet_agent_wal_drill_ok 1"), "{text}");
    assert!(metric_value(&text, "fleet_agent_wal_drill_rto_seconds").unwrap() > 0.0);
    assert!(events(&daemon)
        .iter()
        .any(|(kind, _)| kind == "wal_drill_ok"));
    // Cleaned up: no scratch directory, no server left running.
    let scratch = drills.path().join("d");
    let left: Vec<_> = fs::read_dir(&scratch)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A segment between the backup and the end goes missing: the drill fails and names it.
    let segments: Vec<String> = archived_names(archive.path(), sysid)
        .into_iter()
        .filter(|n| n.len() == 24 && n.as_str() > backup["start_wal"].as_str().unwrap())
        .collect();
    assert!(segments.len() >= 3, "{segments:?}");
    let missing = &segments[segments.len() - 2];
    fs::remove_file(archive.path().join(format!("{sysid}/wal/{missing}.zst"))).unwrap();
    let out = daemon.agentctl(&["wal", "drill", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(
        report["missing_segment"].as_str(),
        Some(missing.as_str()),
        "{report}"
    );
    assert!(
        report["error"].as_str().unwrap().contains(missing.as_str()),
        "{report}"
    );
    let text = metrics(&daemon);
    assert!(text.contains("fleet_agent_wal_drill_ok 0"), "{text}");
    assert!(events(&daemon)
        .iter()
        .any(|(kind, message)| kind == "wal_drill_failed" && message.contains(missing.as_str())));
}
