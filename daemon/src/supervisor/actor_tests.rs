//! The department actor and the supervisor around it, against `FakeRuntime`
//! on paused tokio time: what Docker was asked to do, and when.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::events::EventLog;
use crate::fake_runtime::{Call, FakeRuntime, PullScript};
use crate::store::Store;
use crate::supervisor::department::{DeptActor, DeptInit, DeptMsg, OperatorCommand};
use crate::supervisor::machine::{Machine, MachineInit};
use crate::supervisor::Supervisor;
use fleet_model::api::DeptState;
use fleet_model::{Config, DepartmentSpec};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const NODE: &str = "fake-node";

fn spec(id: &str, image: &str, restart: &str) -> DepartmentSpec {
    DepartmentSpec::from_toml(
        "test",
        &format!(
            "id = \"{id}\"\nimage = \"{image}\"\n[health]\nenabled = false\n[restart]\nstop_timeout = \"2s\"\n{restart}"
        ),
    )
    .unwrap()
}

async fn node(fake: &FakeRuntime, store: Arc<Store>, range: &str) -> Supervisor {
    let mut config = Config::embedded_default();
    config.node_id = Some(NODE.into());
    config.ports.range = range.into();
    config.ports.bind = "127.0.0.1".parse().unwrap();
    config.resync_interval = Duration::from_secs(2);
    let events = EventLog::new(store.clone());
    let sup = Supervisor::start(
        Arc::new(config),
        store,
        Arc::new(fake.clone()),
        events,
        64 << 30,
    )
    .await
    .unwrap();
    sup.spawn_background();
    sup
}

fn memory_store() -> Arc<Store> {
    Arc::new(Store::open_in_memory().unwrap())
}

/// Waits (in virtual time) until `f` holds; panics naming `what` after `limit`.
async fn until(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(sup: &Supervisor, id: &str) -> Option<DeptState> {
    sup.shared.board.get(id).map(|v| v.state)
}

fn reason(sup: &Supervisor, id: &str) -> String {
    sup.shared
        .board
        .get(id)
        .and_then(|v| v.reason)
        .unwrap_or_default()
}

fn starts(fake: &FakeRuntime) -> usize {
    fake.count(|c| matches!(c, Call::Start(_)))
}

fn creates(fake: &FakeRuntime) -> usize {
    fake.count(|c| matches!(c, Call::Create(_)))
}

/// The container a daemon before us would have made for `spec` on `port`.
fn as_before(fake: &FakeRuntime, spec: &DepartmentSpec, port: u16, node: &str) -> String {
    let m = Machine::new(
        MachineInit {
            node_id: node.into(),
            bind: "127.0.0.1".parse().unwrap(),
            spec: spec.clone(),
            previous: None,
            port,
            desired_running: true,
            failed_hash: None,
            restarts_by_reason: BTreeMap::new(),
            containers: Default::default(),
            drain: None,
            hash_key: fleet_model::spec::HashKey::from_bytes(crate::store::TEST_HASH_KEY),
            restarted_ago: Vec::new(),
        },
        std::time::Instant::now(),
    );
    fake.insert(&m.create_request(false), true)
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_is_parked_after_max_retries() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.exit_after_start(Some((1, Duration::from_secs(2))));
    let sup = node(&fake, memory_store(), "47610-47619").await;
    sup.apply(
        vec![spec("crash", "img:1", "max_retries = 2\nbackoff = \"1s\"")],
        false,
    )
    .await
    .unwrap();
    until(Duration::from_secs(120), "crash_looping", || {
        state(&sup, "crash") == Some(DeptState::CrashLooping)
    })
    .await;
    assert_eq!(creates(&fake), 1, "{:?}", fake.calls());
    assert_eq!(starts(&fake), 3, "one start and max_retries restarts");
    assert!(reason(&sup, "crash").contains("exited with code 1"));
    // Parked means parked, resyncs included.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(starts(&fake), 3);
    let view = sup.shared.board.get("crash").unwrap();
    assert_eq!(view.restarts_by_reason.get("exit"), Some(&2));
    // agentctl restart un-parks.
    sup.command("crash", OperatorCommand::Restart)
        .await
        .unwrap();
    until(Duration::from_secs(5), "a start after restart", || {
        starts(&fake) == 4
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_is_not_held_by_an_inspect_or_the_store() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let sup = node(&fake, memory_store(), "47620-47629").await;
    sup.apply(vec![spec("fast", "img:1", "backoff = \"100ms\"")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "running", || {
        state(&sup, "fast") == Some(DeptState::Running)
    })
    .await;
    let id = fake.by_name("aio-fast").unwrap().observed.id;
    fake.clear_calls();
    let died = Instant::now();
    fake.exit(&id, 3);
    until(Duration::from_secs(5), "the restart", || starts(&fake) == 1).await;
    let took = died.elapsed();
    assert!(
        took >= Duration::from_millis(80) && took <= Duration::from_millis(150),
        "die -> start took {took:?}; backoff is 100ms (-20% jitter)"
    );
    // Between the die and the start: no inspect (the event carried the exit code).
    let calls = fake.calls();
    let start_at = calls
        .iter()
        .position(|c| matches!(c, Call::Start(_)))
        .unwrap();
    assert!(
        !calls[..start_at]
            .iter()
            .any(|c| matches!(c, Call::Inspect(_))),
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_running_container_is_adopted_with_zero_creates() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let store = memory_store();
    let s = spec("keep", "img:1", "");
    store.put_spec(&s).unwrap();
    store.set_lease("keep", 47630).unwrap();
    let id = as_before(&fake, &s, 47630, NODE);
    let sup = node(&fake, store, "47630-47639").await;
    until(Duration::from_secs(10), "running", || {
        state(&sup, "keep") == Some(DeptState::Running)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(creates(&fake), 0);
    assert_eq!(starts(&fake), 0);
    assert_eq!(
        fake.count(|c| matches!(c, Call::Stop(_) | Call::Remove(_))),
        0
    );
    assert_eq!(
        sup.shared
            .board
            .get("keep")
            .unwrap()
            .container_id
            .as_deref(),
        Some(id.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn with_no_store_history_the_running_container_is_adopted() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let s = spec("lost", "img:1", "");
    // The store is new (lost or moved aside); the spec comes back by apply and
    // the pool gives the same lowest port.
    let id = as_before(&fake, &s, 47640, NODE);
    let sup = node(&fake, memory_store(), "47640-47649").await;
    sup.apply(vec![s], false).await.unwrap();
    until(Duration::from_secs(10), "running", || {
        state(&sup, "lost") == Some(DeptState::Running)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(creates(&fake) + starts(&fake), 0, "{:?}", fake.calls());
    assert_eq!(
        sup.shared
            .board
            .get("lost")
            .unwrap()
            .container_id
            .as_deref(),
        Some(id.as_str())
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_die_event_is_caught_by_the_resync() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let sup = node(&fake, memory_store(), "47650-47659").await;
    sup.apply(vec![spec("quiet", "img:1", "backoff = \"1s\"")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "running", || {
        state(&sup, "quiet") == Some(DeptState::Running)
    })
    .await;
    let id = fake.by_name("aio-quiet").unwrap().observed.id;
    fake.lose_events(true);
    fake.exit(&id, 1);
    // resync_interval 2s, backoff 1s.
    until(
        Duration::from_secs(6),
        "a restart without the die event",
        || starts(&fake) == 2,
    )
    .await;
    until(Duration::from_secs(5), "running again", || {
        state(&sup, "quiet") == Some(DeptState::Running)
    })
    .await;
    assert_eq!(creates(&fake), 1);
}

#[tokio::test(start_paused = true)]
async fn an_update_replaces_and_a_failed_pull_rolls_back_leaving_it_running() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.add_image("img:2");
    let sup = node(&fake, memory_store(), "47660-47669").await;
    sup.apply(vec![spec("upd", "img:1", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "v1 running", || {
        state(&sup, "upd") == Some(DeptState::Running)
    })
    .await;
    sup.apply(vec![spec("upd", "img:2", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "v2 running", || {
        fake.by_name("aio-upd")
            .is_some_and(|c| c.observed.image.as_deref() == Some("img:2") && c.observed.running)
            && state(&sup, "upd") == Some(DeptState::Running)
    })
    .await;
    assert_eq!(creates(&fake), 2);
    let v2 = fake.by_name("aio-upd").unwrap().observed.id;

    // An image the registry does not have: the pull fails, v2 keeps running.
    fake.script_pull(PullScript::Fail("manifest unknown".into()));
    sup.apply(vec![spec("upd", "img:missing", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(30), "the rollback", || {
        reason(&sup, "upd").contains("rolled back")
    })
    .await;
    assert_eq!(state(&sup, "upd"), Some(DeptState::Running));
    assert!(reason(&sup, "upd").contains("pull of img:missing failed"));
    let now = fake.by_name("aio-upd").unwrap().observed;
    assert_eq!(now.id, v2, "the serving container was not touched");
    assert!(now.running);
    assert_eq!(
        sup.shared.board.get("upd").unwrap().spec.image,
        "img:2",
        "back on the previous spec"
    );
    // The failed spec is not retried in a loop.
    let pulls = fake.count(|c| matches!(c, Call::Pull(_)));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(fake.count(|c| matches!(c, Call::Pull(_))), pulls);
}

#[tokio::test(start_paused = true)]
async fn delete_during_a_hanging_pull_answers_at_once_and_removes_only_its_own() {
    let fake = FakeRuntime::new();
    fake.add_image("img:other");
    fake.script_pull(PullScript::Hang);
    // Someone else's containers under names this department would use, and
    // another department's on the same engine: none of them may go.
    let not_ours_next = {
        let m = Machine::new(
            MachineInit {
                node_id: "other-node".into(),
                bind: "127.0.0.1".parse().unwrap(),
                // The same department id, but another node's.
                spec: spec("hr", "img:other", ""),
                previous: None,
                port: 9000,
                desired_running: true,
                failed_hash: None,
                restarts_by_reason: BTreeMap::new(),
                containers: Default::default(),
                drain: None,
                hash_key: fleet_model::spec::HashKey::from_bytes(crate::store::TEST_HASH_KEY),
                restarted_ago: Vec::new(),
            },
            std::time::Instant::now(),
        );
        let mut r = m.create_request(true);
        r.name = "aio-hr-next".into();
        fake.insert(&r, true)
    };
    let other_dept = as_before(&fake, &spec("sales", "img:other", ""), 9001, "other-node");

    let sup = node(&fake, memory_store(), "47670-47679").await;
    sup.apply(vec![spec("hr", "img:never", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "pulling", || {
        state(&sup, "hr") == Some(DeptState::Pulling)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), sup.delete("hr"))
        .await
        .expect("delete during a pull must answer within stop_timeout")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(sup.shared.board.get("hr").is_none());
    let removed: Vec<Call> = fake
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Remove(_) | Call::Stop(_)))
        .collect();
    assert!(
        !removed.contains(&Call::Remove(not_ours_next.clone()))
            && !removed.contains(&Call::Stop(not_ours_next.clone()))
            && !removed.contains(&Call::Remove(other_dept.clone())),
        "{removed:?}"
    );
    assert!(fake.by_name("aio-hr-next").is_some());
    assert_eq!(fake.containers().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_restarted_with_reason_oom() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let sup = node(&fake, memory_store(), "47680-47689").await;
    sup.apply(vec![spec("mem", "img:1", "backoff = \"1s\"")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "running", || {
        state(&sup, "mem") == Some(DeptState::Running)
    })
    .await;
    let id = fake.by_name("aio-mem").unwrap().observed.id;
    fake.oom_kill(&id);
    until(Duration::from_secs(10), "the restart", || {
        starts(&fake) == 2
    })
    .await;
    let view = sup.shared.board.get("mem").unwrap();
    assert_eq!(view.restarts_by_reason.get("oom"), Some(&1), "{view:?}");
}

/// One actor on its own, so the test can hand it probe results (real probes
/// cannot pass on paused time: the clock jumps past their timeout).
fn lone_actor(
    fake: &FakeRuntime,
    spec: DepartmentSpec,
    port: u16,
) -> (
    Arc<crate::supervisor::Shared>,
    tokio::sync::mpsc::Sender<DeptMsg>,
) {
    use crate::supervisor::{Counters, OomEvents, Shared};
    use std::sync::atomic::{AtomicBool, AtomicU64};
    let store = memory_store();
    let mut config = Config::embedded_default();
    config.node_id = Some(NODE.into());
    let shared = Arc::new(Shared {
        node_id: NODE.into(),
        config: Arc::new(config),
        store: store.clone(),
        runtime: Arc::new(fake.clone()),
        events: EventLog::new(store),
        board: crate::supervisor::board::Board::default(),
        bind: "127.0.0.1".parse().unwrap(),
        http: crate::supervisor::probe::client(),
        start_gate: Arc::new(tokio::sync::Semaphore::new(2)),
        docker_up: AtomicBool::new(true),
        engine_epoch: AtomicU64::new(1),
        shutdown: AtomicBool::new(false),
        counters: Counters::default(),
        host_memory_bytes: 64 << 30,
        oom_events: OomEvents::default(),
    });
    let (tx, _task) = DeptActor::spawn(
        shared.clone(),
        DeptInit {
            spec,
            previous: None,
            port,
            desired_running: true,
            failed_hash: None,
            restarts_by_reason: BTreeMap::new(),
            restarted_ago: Vec::new(),
        },
    );
    (shared, tx)
}

fn healthy_spec(id: &str, image: &str) -> DepartmentSpec {
    DepartmentSpec::from_toml(
        "test",
        &format!(
            "id = \"{id}\"\nimage = \"{image}\"\n[health]\ninterval = \"30s\"\nstart_period = \"1h\"\n[restart]\nstop_timeout = \"2s\"\nupdate_deadline = \"2m\"\n"
        ),
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn delete_during_a_failing_update_proof_answers_within_stop_timeout() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.add_image("img:2");
    let v1 = healthy_spec("pay", "img:1");
    let old = as_before(&fake, &v1, 47690, NODE);
    let (shared, tx) = lone_actor(&fake, v1, 47690);
    until(Duration::from_secs(5), "adopted", || {
        shared.board.get("pay").map(|v| v.state) == Some(DeptState::Running)
    })
    .await;
    for generation in 0..20 {
        tx.send(DeptMsg::Probe {
            generation,
            record: fleet_model::api::ProbeRecord {
                at_ms: 0,
                ok: true,
                latency_ms: Some(1.0),
                status: Some(200),
                error: None,
            },
        })
        .await
        .unwrap();
    }
    until(Duration::from_secs(1), "healthy", || {
        shared.board.get("pay").map(|v| v.health) == Some(fleet_model::api::Health::Healthy)
    })
    .await;
    // The candidate never answers (it publishes no port): the proof would run
    // for the whole update_deadline of 2 minutes.
    tx.send(DeptMsg::SetSpec {
        spec: Box::new(healthy_spec("pay", "img:2")),
        host_port: 47690,
    })
    .await
    .unwrap();
    until(Duration::from_secs(5), "the candidate", || {
        fake.by_name("aio-pay-next")
            .is_some_and(|c| c.observed.running)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(shared.board.get("pay").unwrap().state, DeptState::Updating);
    let asked = Instant::now();
    let (reply, answer) = tokio::sync::oneshot::channel();
    tx.send(DeptMsg::Delete { reply }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), answer)
        .await
        .expect("delete must answer within stop_timeout, not after the proof")
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() <= Duration::from_secs(3));
    assert!(
        fake.by_name("aio-pay-next").is_none(),
        "candidate left behind"
    );
    assert!(fake.by_name("aio-pay").is_none());
    assert!(fake.count(|c| *c == Call::Remove(old.clone())) >= 1);
}

/// While a pull runs, the board (what the API reads) carries its bytes and
/// rate; once the pull is aborted by a delete nothing stale is left.
#[tokio::test(start_paused = true)]
async fn a_running_pull_shows_its_bytes_and_rate_on_the_board() {
    let fake = FakeRuntime::new();
    fake.script_pull(PullScript::Hang);
    let sup = node(&fake, memory_store(), "47680-47689").await;
    sup.apply(vec![spec("hr", "img:slow", "")], false)
        .await
        .unwrap();
    until(
        Duration::from_secs(10),
        "pull progress on the board",
        || {
            sup.shared
                .board
                .get("hr")
                .is_some_and(|v| v.progress.is_some())
        },
    )
    .await;
    let view = sup.shared.board.get("hr").unwrap();
    assert_eq!(view.state, DeptState::Pulling);
    let progress = view.progress.unwrap();
    assert_eq!(progress.operation, "pull");
    assert_eq!(progress.subject, "img:slow");
    // The fake engine reports one layer half downloaded.
    assert_eq!(
        (progress.done_bytes, progress.total_bytes),
        (512, Some(1024))
    );
    let summary = crate::api::summary("hr", &sup.shared.board.get("hr").unwrap());
    assert_eq!(summary.progress.map(|p| p.done_bytes), Some(512));
    sup.delete("hr").await.unwrap();
    assert!(sup.shared.board.get("hr").is_none());
}

/// What a daemon before us did: the container crashed and was started again
/// `restarts` times, then crashed once more and was left down (the daemon was
/// killed, or parked it). Only the engine's own event record remains.
async fn crashed_before(fake: &FakeRuntime, id: &str, restarts: usize) {
    use crate::runtime::ContainerRuntime;
    for _ in 0..restarts {
        fake.exit(id, 1);
        fake.start(id).await.unwrap();
    }
    fake.exit(id, 1);
    fake.clear_calls();
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_stays_parked_when_the_store_is_lost() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let s = spec("loop", "img:1", "max_retries = 2\nbackoff = \"1s\"");
    let id = as_before(&fake, &s, 43700, NODE);
    crashed_before(&fake, &id, 2).await;
    // A new, empty store: the department comes back from the labels, its
    // restarts from Docker's events, and it is still a crash loop.
    let sup = node(&fake, memory_store(), "43700-43709").await;
    assert!(sup.state_rebuilt.is_some());
    until(Duration::from_secs(30), "crash_looping", || {
        state(&sup, "loop") == Some(DeptState::CrashLooping)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(creates(&fake) + starts(&fake), 0, "{:?}", fake.calls());
    let view = sup.shared.board.get("loop").unwrap();
    assert_eq!(view.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(view.restarts_by_reason.get("exit"), Some(&2), "{view:?}");
    assert_eq!(
        sup.shared.store.restart_history("loop", 10).unwrap().len(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn the_backoff_goes_on_growing_after_a_lost_store() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let s = spec("slow", "img:1", "max_retries = 5\nbackoff = \"1s\"");
    let id = as_before(&fake, &s, 43710, NODE);
    crashed_before(&fake, &id, 2).await;
    let sup = node(&fake, memory_store(), "43710-43719").await;
    // Two restarts remembered: this is the third, after 4s (at least 3.2s
    // with the jitter), not the first one's 1s.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(starts(&fake), 0, "{:?}", fake.calls());
    until(Duration::from_secs(2), "the third restart", || {
        starts(&fake) == 1
    })
    .await;
    until(Duration::from_secs(5), "running", || {
        state(&sup, "slow") == Some(DeptState::Running)
    })
    .await;
    let view = sup.shared.board.get("slow").unwrap();
    assert_eq!(view.restarts_by_reason.get("exit"), Some(&3), "{view:?}");
}

#[tokio::test(start_paused = true)]
async fn restarts_of_an_older_container_do_not_count_against_the_new_one() {
    use crate::runtime::ContainerRuntime;
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let s = spec("moved", "img:1", "max_retries = 2\nbackoff = \"1s\"");
    // Two restarts of a container since replaced (an update: a new container).
    let old = as_before(&fake, &s, 43720, NODE);
    crashed_before(&fake, &old, 2).await;
    fake.remove(&old).await.unwrap();
    let id = as_before(&fake, &s, 43720, NODE);
    fake.exit(&id, 1);
    fake.clear_calls();
    let sup = node(&fake, memory_store(), "43720-43729").await;
    until(Duration::from_secs(10), "restarted", || starts(&fake) == 1).await;
    until(Duration::from_secs(5), "running", || {
        state(&sup, "moved") == Some(DeptState::Running)
    })
    .await;
    // The lost store's counts come back whole (all containers).
    let view = sup.shared.board.get("moved").unwrap();
    assert_eq!(view.restarts_by_reason.get("exit"), Some(&3), "{view:?}");
}

/// A health endpoint on loopback that answers every request with `status`:
/// what an update candidate's proof probes (the fake publishes candidates on
/// it, see `FakeRuntime::publish_ephemeral_on`).
/// Also how many requests it has had.
async fn health_server(status: u16) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = socket.read(&mut request).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (port, hits)
}

/// `id` on img:1, adopted running and healthy by a lone actor.
async fn healthy_v1(
    fake: &FakeRuntime,
    id: &str,
    port: u16,
) -> (
    Arc<crate::supervisor::Shared>,
    tokio::sync::mpsc::Sender<DeptMsg>,
    String,
) {
    let v1 = healthy_spec(id, "img:1");
    let old = as_before(fake, &v1, port, NODE);
    let (shared, tx) = lone_actor(fake, v1, port);
    until(Duration::from_secs(5), "adopted", || {
        shared.board.get(id).map(|v| v.state) == Some(DeptState::Running)
    })
    .await;
    for generation in 0..20 {
        tx.send(DeptMsg::Probe {
            generation,
            record: fleet_model::api::ProbeRecord {
                at_ms: 0,
                ok: true,
                latency_ms: Some(1.0),
                status: Some(200),
                error: None,
            },
        })
        .await
        .unwrap();
    }
    until(Duration::from_secs(1), "healthy", || {
        shared.board.get(id).map(|v| v.health) == Some(fleet_model::api::Health::Healthy)
    })
    .await;
    (shared, tx, old)
}

fn position(fake: &FakeRuntime, call: &Call) -> usize {
    fake.calls()
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no {call:?} in {:?}", fake.calls()))
}

#[tokio::test(start_paused = true)]
async fn a_gated_update_proves_a_candidate_on_a_spare_port_then_swaps() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.add_image("img:2");
    let (probe_port, hits) = health_server(200).await;
    fake.publish_ephemeral_on(Some(probe_port));
    let (shared, tx, old) = healthy_v1(&fake, "swap", 43730).await;
    tx.send(DeptMsg::SetSpec {
        spec: Box::new(healthy_spec("swap", "img:2")),
        host_port: 43730,
    })
    .await
    .unwrap();
    until(Duration::from_secs(60), "v2 serving on the port", || {
        fake.by_name("aio-swap").is_some_and(|c| {
            c.observed.image.as_deref() == Some("img:2")
                && c.observed.running
                && c.observed.id != old
        }) && shared.board.get("swap").map(|v| v.state) == Some(DeptState::Running)
    })
    .await;
    // The candidate on a port Docker picks (no host port asked), then the
    // real one on the department's port.
    assert_eq!(
        fake.created(),
        vec![
            ("aio-swap-next".to_string(), None),
            ("aio-swap".to_string(), Some(43730))
        ]
    );
    assert!(
        fake.by_name("aio-swap-next").is_none(),
        "candidate left behind"
    );
    // The old container served until the candidate had been created, started
    // and proven: nothing touched it before.
    let candidate_created = position(&fake, &Call::Create("aio-swap-next".into()));
    let first_touch = fake
        .calls()
        .iter()
        .position(|c| *c == Call::Stop(old.clone()) || *c == Call::Remove(old.clone()))
        .expect("the old container is stopped or removed at the swap");
    assert!(candidate_created < first_touch, "{:?}", fake.calls());
    assert!(fake.containers().iter().all(|c| c.observed.id != old));
    assert!(
        hits.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the candidate was never probed"
    );
    let view = shared.board.get("swap").unwrap();
    assert_eq!(view.spec.image, "img:2");
    assert_eq!(view.previous.map(|p| p.image).as_deref(), Some("img:1"));
}

#[tokio::test(start_paused = true)]
async fn a_gated_update_whose_proof_fails_rolls_back_leaving_the_old_one_serving() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.add_image("img:2");
    let (probe_port, hits) = health_server(500).await;
    fake.publish_ephemeral_on(Some(probe_port));
    let (shared, tx, old) = healthy_v1(&fake, "sick", 43731).await;
    tx.send(DeptMsg::SetSpec {
        spec: Box::new(healthy_spec("sick", "img:2")),
        host_port: 43731,
    })
    .await
    .unwrap();
    until(Duration::from_secs(5), "the candidate", || {
        fake.by_name("aio-sick-next").is_some()
    })
    .await;
    // update_deadline is 2m: the candidate answers 500 all that time.
    until(Duration::from_secs(200), "the rollback", || {
        shared
            .board
            .get("sick")
            .and_then(|v| v.reason)
            .is_some_and(|r| r.contains("rolled back"))
    })
    .await;
    let view = shared.board.get("sick").unwrap();
    assert_eq!(view.state, DeptState::Running);
    assert_eq!(view.spec.image, "img:1", "back on the previous spec");
    assert!(
        view.reason
            .as_deref()
            .unwrap_or_default()
            .contains("not healthy within"),
        "{:?}",
        view.reason
    );
    assert!(
        hits.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the candidate was never probed"
    );
    let serving = fake.by_name("aio-sick").unwrap().observed;
    assert_eq!(serving.id, old, "the serving container was replaced");
    assert!(serving.running);
    assert_eq!(
        fake.count(|c| *c == Call::Stop(old.clone()) || *c == Call::Remove(old.clone())),
        0,
        "the old container was touched: {:?}",
        fake.calls()
    );
    assert!(
        fake.by_name("aio-sick-next").is_none(),
        "candidate left behind"
    );
    // The failed spec is not tried again by itself.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(fake.created().len(), 1, "{:?}", fake.created());
}

#[tokio::test(start_paused = true)]
async fn delete_during_an_updates_pull_cancels_it_and_removes_the_old_one() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    fake.script_pull(PullScript::Hang);
    let (shared, tx, old) = healthy_v1(&fake, "gone", 43732).await;
    tx.send(DeptMsg::SetSpec {
        spec: Box::new(healthy_spec("gone", "img:3")),
        host_port: 43732,
    })
    .await
    .unwrap();
    until(Duration::from_secs(5), "the pull of img:3", || {
        fake.count(|c| *c == Call::Pull("img:3".into())) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let asked = Instant::now();
    tx.send(DeptMsg::Delete { reply }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), answer)
        .await
        .expect("delete must not wait for the hung pull")
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() <= Duration::from_secs(3));
    assert!(fake.by_name("aio-gone").is_none());
    assert!(fake.count(|c| *c == Call::Remove(old.clone())) >= 1);
    // Cancelled: nothing created from it, the pull not tried again.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(fake.created().is_empty(), "{:?}", fake.created());
    assert_eq!(fake.count(|c| matches!(c, Call::Pull(_))), 1);
    let _ = shared;
}

#[tokio::test(start_paused = true)]
async fn a_spec_announcing_next_image_pulls_it_without_replacing_the_container() {
    let fake = FakeRuntime::new();
    fake.add_image("img:1");
    let store = memory_store();
    let sup = node(&fake, store.clone(), "43350-43359").await;
    sup.apply(vec![spec("nxt", "img:1", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(10), "v1 running", || {
        state(&sup, "nxt") == Some(DeptState::Running)
    })
    .await;
    let v1 = fake.by_name("aio-nxt").unwrap().observed.id;

    // The coordinator's document now names the next image.
    let mut announcing = spec("nxt", "img:1", "");
    announcing.next_image = Some("img:2".into());
    let report = sup.apply(vec![announcing.clone()], false).await.unwrap();
    assert_eq!(report.updated, vec!["nxt".to_string()]);
    until(Duration::from_secs(10), "img:2 pulled", || {
        fake.count(|c| *c == Call::Pull("img:2".into())) == 1
            && store
                .pulled_images()
                .unwrap()
                .iter()
                .any(|p| p.reference == "img:2")
    })
    .await;
    assert_eq!(
        store.announced_images().unwrap(),
        vec![("nxt".to_string(), "img:2".to_string())]
    );
    // Re-sent unchanged (the coordinator's next poll): nothing pulled again.
    sup.apply(vec![announcing.clone()], false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(fake.count(|c| *c == Call::Pull("img:2".into())), 1);
    let now = fake.by_name("aio-nxt").unwrap().observed;
    assert_eq!(now.id, v1, "announcing replaced the container");
    assert!(now.running);
    assert_eq!(creates(&fake), 1);
    assert_eq!(state(&sup, "nxt"), Some(DeptState::Running));
    // An announcement is no new version: no rollback spec was made of v1.
    assert!(sup.shared.board.get("nxt").unwrap().previous.is_none());
    assert!(store.departments().unwrap()[0].previous.is_none());

    // Cleared: the announcement is withdrawn, the container still untouched.
    sup.apply(vec![spec("nxt", "img:1", "")], false)
        .await
        .unwrap();
    assert!(store.announced_images().unwrap().is_empty());
    // Announced again, then the update to it: no second pull.
    sup.apply(vec![announcing], false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    sup.apply(vec![spec("nxt", "img:2", "")], false)
        .await
        .unwrap();
    until(Duration::from_secs(30), "v2 running", || {
        fake.by_name("aio-nxt")
            .is_some_and(|c| c.observed.image.as_deref() == Some("img:2") && c.observed.running)
            && state(&sup, "nxt") == Some(DeptState::Running)
    })
    .await;
    assert_eq!(fake.count(|c| *c == Call::Pull("img:2".into())), 1);
    assert_eq!(creates(&fake), 2);
    // The rollback is v1's image, not an announcing copy of it.
    let view = sup.shared.board.get("nxt").unwrap();
    assert_eq!(view.previous.map(|p| p.image).as_deref(), Some("img:1"));
    let stored = store
        .departments()
        .unwrap()
        .into_iter()
        .find(|d| d.spec.id == "nxt")
        .unwrap();
    assert_eq!(stored.previous.map(|p| p.image).as_deref(), Some("img:1"));
}
