//! Unit tests of the pure department core: inputs in, effects out, no Docker,
//! no tokio, no clock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use fleet_model::api::DeptState as S;

const NOW_WALL: i64 = 1_800_000_000_000_000_000;

fn spec(id: &str, image: &str, extra: &str) -> DepartmentSpec {
    DepartmentSpec::from_toml(
        "test",
        &format!(
            "id = \"{id}\"\nimage = \"{image}\"\n[health]\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 3\nstart_period = \"0s\"\n[restart]\nbackoff = \"100ms\"\nmax_retries = 3\n{extra}"
        ),
    )
    .unwrap()
}

struct T {
    m: Machine,
    t0: Instant,
    elapsed: Duration,
}

impl T {
    fn new(spec: DepartmentSpec) -> T {
        let t0 = Instant::now();
        let m = Machine::new(
            MachineInit {
                node_id: "n1".into(),
                bind: "127.0.0.1".parse().unwrap(),
                spec,
                previous: None,
                port: 8001,
                desired_running: true,
                failed_hash: None,
                restarts_by_reason: BTreeMap::new(),
                containers: Default::default(),
                drain: None,
                hash_key: fleet_model::spec::HashKey::from_bytes(crate::store::TEST_HASH_KEY),
                restarted_ago: Vec::new(),
            },
            t0,
        );
        T {
            m,
            t0,
            elapsed: Duration::ZERO,
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            now: self.t0 + self.elapsed,
            wall_nanos: NOW_WALL + self.elapsed.as_nanos() as i64,
            jitter: 0.0,
            engine_epoch: 1,
            shutting_down: false,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
    }

    fn wall(&self) -> i64 {
        self.ctx().wall_nanos
    }

    fn send(&mut self, input: Input) -> Vec<Effect> {
        let ctx = self.ctx();
        self.m.handle(ctx, input)
    }

    fn container(&self, id: &str, running: bool) -> ObservedContainer {
        ObservedContainer {
            id: id.into(),
            name: container_name(self.m.id()),
            department: self.m.id().into(),
            node: Some("n1".into()),
            role: "primary".into(),
            spec_hash: Some(self.m.hash()),
            running,
            status: if running { "running" } else { "exited" }.into(),
            exit_code: if running { None } else { Some(1) },
            oom_killed: false,
            started_at: Some(1000),
            published_port: Some(8001),
            image: Some(self.m.spec().image.clone()),
        }
    }

    /// Init, nothing there, image present: created and started, running.
    fn start_fresh(&mut self, id: &str) {
        self.send(Input::Init);
        self.send(Input::Inspected {
            look: Look::Converge,
            result: Ok(None),
            oom_reported: false,
        });
        let image_for = ImageFor::Create { is_update: false };
        self.send(Input::ImageChecked {
            image_for,
            result: Ok(true),
        });
        self.send(Input::Created {
            is_update: false,
            result: Ok(id.into()),
        });
        let c = self.container(id, false);
        let mut created = c.clone();
        created.status = "created".into();
        created.exit_code = None;
        self.send(Input::Inspected {
            look: Look::AfterCreate { is_update: false },
            result: Ok(Some(created)),
            oom_reported: false,
        });
        self.send(Input::StartDone { result: Ok(()) });
        let running = self.container(id, true);
        self.send(Input::Inspected {
            look: Look::AfterStart,
            result: Ok(Some(running)),
            oom_reported: false,
        });
        assert_eq!(self.m.state(), S::Running);
    }

    fn healthy(&mut self) {
        let generation = self.m.probe_generation();
        self.send(Input::Probe {
            generation,
            record: ProbeRecord {
                at_ms: 0,
                ok: true,
                latency_ms: Some(1.0),
                status: Some(200),
                error: None,
            },
        });
        assert_eq!(self.m.health(), Health::Healthy);
    }

    fn die(&mut self, id: &str, code: i64) -> Vec<Effect> {
        let time_nano = self.wall();
        self.send(Input::Docker {
            container_id: id.into(),
            action: DockerAction::Die {
                exit_code: Some(code),
            },
            time_nano,
            oom_reported: false,
        })
    }
}

fn job_of(effects: &[Effect]) -> Option<(JobId, Work)> {
    effects.iter().find_map(|e| match e {
        Effect::Begin { job, work } => Some((*job, work.clone())),
        _ => None,
    })
}

fn has(effects: &[Effect], pred: impl Fn(&Effect) -> bool) -> bool {
    effects.iter().any(pred)
}

fn events(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::RecordEvent { kind, .. } => Some(kind.clone()),
            _ => None,
        })
        .collect()
}

fn docker_calls(effects: &[Effect]) -> usize {
    effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::Inspect { .. }
                    | Effect::CheckImage { .. }
                    | Effect::Create { .. }
                    | Effect::Start { .. }
                    | Effect::Remove { .. }
                    | Effect::Begin { .. }
            )
        })
        .count()
}

// --- the table -------------------------------------------------------------------

#[test]
fn the_allowed_pairs_are_exactly_the_diagram() {
    let expected: &[(S, S)] = &[
        (S::Pending, S::Pulling),
        (S::Starting, S::Pulling),
        (S::Running, S::Pulling),
        (S::Backoff, S::Pulling),
        (S::Failed, S::Pulling),
        (S::Stopped, S::Pulling),
        (S::CrashLooping, S::Pulling),
        (S::Updating, S::Pulling),
        (S::RollingBack, S::Pulling),
        (S::Pending, S::Starting),
        (S::Pulling, S::Starting),
        (S::Running, S::Starting),
        (S::Backoff, S::Starting),
        (S::Failed, S::Starting),
        (S::Stopped, S::Starting),
        (S::CrashLooping, S::Starting),
        (S::Updating, S::Starting),
        (S::RollingBack, S::Starting),
        (S::Pending, S::Running),
        (S::Pulling, S::Running),
        (S::Starting, S::Running),
        (S::Backoff, S::Running),
        (S::Failed, S::Running),
        (S::Stopped, S::Running),
        (S::RollingBack, S::Running),
        (S::Pending, S::Backoff),
        (S::Starting, S::Backoff),
        (S::Running, S::Backoff),
        (S::RollingBack, S::Backoff),
        (S::Pending, S::CrashLooping),
        (S::Starting, S::CrashLooping),
        (S::Running, S::CrashLooping),
        (S::RollingBack, S::CrashLooping),
        (S::Pending, S::Updating),
        (S::Pulling, S::Updating),
        (S::Starting, S::Updating),
        (S::Running, S::Updating),
        (S::Backoff, S::Updating),
        (S::Failed, S::Updating),
        (S::Stopped, S::Updating),
        (S::CrashLooping, S::Updating),
        (S::Updating, S::RollingBack),
        (S::Pending, S::Stopped),
        (S::Pulling, S::Stopped),
        (S::Starting, S::Stopped),
        (S::Running, S::Stopped),
        (S::Backoff, S::Stopped),
        (S::CrashLooping, S::Stopped),
        (S::Updating, S::Stopped),
        (S::RollingBack, S::Stopped),
        (S::Failed, S::Stopped),
        (S::Pending, S::Failed),
        (S::Pulling, S::Failed),
        (S::Starting, S::Failed),
        (S::Running, S::Failed),
        (S::Updating, S::Failed),
        (S::RollingBack, S::Failed),
        // Draining: from what may stop a serving container, to what follows a stop.
        (S::Pending, S::Draining),
        (S::Starting, S::Draining),
        (S::Running, S::Draining),
        (S::Backoff, S::Draining),
        (S::CrashLooping, S::Draining),
        (S::Updating, S::Draining),
        (S::RollingBack, S::Draining),
        (S::Failed, S::Draining),
        (S::Draining, S::Pulling),
        (S::Draining, S::Starting),
        (S::Draining, S::Running),
        (S::Draining, S::Backoff),
        (S::Draining, S::CrashLooping),
        (S::Draining, S::Updating),
        (S::Draining, S::Stopped),
        (S::Draining, S::Failed),
    ];
    for from in S::ALL {
        for to in S::ALL {
            if from == to {
                continue;
            }
            assert_eq!(
                allowed(from, to),
                expected.contains(&(from, to)),
                "{from:?} -> {to:?}"
            );
        }
    }
    // Every state but the initial one has a reason leading to it.
    for (to, froms) in EDGES {
        assert_eq!(froms.is_empty(), reasons_into(*to).is_empty(), "{to:?}");
    }
    assert_eq!(EDGES.len(), S::ALL.len(), "one row per state");
}

#[test]
fn docs_show_the_code_s_transition_table() {
    let docs = include_str!("../../../docs/architecture.md");
    let table = transition_table_markdown();
    assert!(
        docs.contains(&table),
        "docs/architecture.md must carry the table of machine::EDGES; expected:\n{table}"
    );
}

#[test]
#[should_panic(expected = "not in EDGES")]
fn a_transition_outside_the_diagram_is_refused() {
    let mut t = T::new(spec("hr", "img:1", ""));
    // pending -> rolling_back is not an edge.
    t.m.transition(TransitionReason::UpdateFailed { why: "x".into() });
}

// --- start, adoption, state loss ----------------------------------------------------

#[test]
fn a_running_container_of_the_same_spec_is_adopted_untouched() {
    let mut t = T::new(spec("hr", "img:1", ""));
    let e = t.send(Input::Init);
    assert!(has(&e, |e| matches!(e, Effect::RemoveCandidate)));
    assert!(has(&e, |e| matches!(
        e,
        Effect::Inspect {
            look: Look::Converge,
            ..
        }
    )));
    let c = t.container("c1", true);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(c)),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);
    assert_eq!(events(&e), vec!["adopted", "state_running"]);
    assert!(has(&e, |e| matches!(
        e,
        Effect::StartProbe { port: 8001, .. }
    )));
    assert!(!has(&e, |e| matches!(
        e,
        Effect::Create { .. } | Effect::Start { .. } | Effect::Remove { .. } | Effect::Begin { .. }
    )));
}

#[test]
fn a_container_an_earlier_version_labelled_with_the_unkeyed_hash_is_adopted_untouched() {
    // The upgrade to the keyed spec hash: the running container's label holds
    // the old digest, which Docker cannot relabel; it is still this spec.
    let mut t = T::new(spec("hr", "img:1", "[secrets]\nDB_PASSWORD = \"s3cret\"\n"));
    t.send(Input::Init);
    let mut c = t.container("c1", true);
    c.spec_hash = Some(t.m.spec().legacy_container_hash(8001));
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(c.clone())),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);
    assert_eq!(events(&e), vec!["adopted", "state_running"]);
    assert!(!has(&e, |e| matches!(
        e,
        Effect::Create { .. } | Effect::Start { .. } | Effect::Remove { .. } | Effect::Begin { .. }
    )));
    // What is shown is the keyed hash, never the old guessable digest.
    assert!(t.m.hash().starts_with(fleet_model::spec::KEYED_PREFIX));
    assert_ne!(Some(t.m.hash()), c.spec_hash);
    // The unkeyed digest of another spec is still a change.
    let mut t = T::new(spec("hr", "img:1", "[secrets]\nDB_PASSWORD = \"s3cret\"\n"));
    t.send(Input::Init);
    let mut other = t.container("c1", true);
    other.spec_hash = Some(spec("hr", "img:0", "").legacy_container_hash(8001));
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(other)),
        oom_reported: false,
    });
    assert!(!events(&e).contains(&"adopted".to_string()), "{e:?}");
}

#[test]
fn a_container_of_another_department_under_the_name_is_not_adopted() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    let mut c = t.container("c1", true);
    c.department = "other".into();
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(c)),
        oom_reported: false,
    });
    assert!(has(&e, |e| matches!(e, Effect::CheckImage { .. })), "{e:?}");
    assert!(t.m.container().is_none());
}

#[test]
fn nothing_there_creates_through_the_gate_and_ends_running() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Create { is_update: false },
        result: Ok(true),
    });
    let Some(Effect::Create { request, .. }) =
        e.iter().find(|e| matches!(e, Effect::Create { .. }))
    else {
        panic!("no create: {e:?}")
    };
    assert_eq!(request.name, "aio-hr");
    assert_eq!(request.host_port, Some(8001));
    assert_eq!(request.labels[labels::NODE], "n1");
    assert_eq!(request.labels[labels::HOST_PORT], "8001");
    // The request carries what a node that lost its store rebuilds it from.
    let config = crate::runtime::ContainerConfig {
        labels: request.labels.clone(),
        env: request.env.clone(),
        secret_files: Default::default(),
    };
    let (rebuilt, port) = crate::recovery::recover_spec(
        &config,
        &fleet_model::spec::HashKey::from_bytes(crate::store::TEST_HASH_KEY),
    )
    .expect("rebuilt from the request's labels");
    assert_eq!((rebuilt.id.as_str(), port), ("hr", 8001));
    assert_eq!(t.m.state(), S::Starting);
    t.send(Input::Created {
        is_update: false,
        result: Ok("c1".into()),
    });
    let e = t.send(Input::Inspected {
        look: Look::AfterCreate { is_update: false },
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert!(has(&e, |e| matches!(e, Effect::Start { gated: true, .. })));
}

#[test]
fn a_missing_image_is_pulled_then_created_and_a_failed_pull_retries_later() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Create { is_update: false },
        result: Ok(false),
    });
    assert_eq!(t.m.state(), S::Pulling);
    let (job, work) = job_of(&e).unwrap();
    assert!(matches!(work, Work::Pull { ref image } if image == "img:1"));
    // Resyncs during the pull do not start a second one.
    let e = t.send(Input::Resync);
    assert_eq!(docker_calls(&e), 0, "{e:?}");
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Pulled(Err("manifest unknown".into())),
    });
    assert_eq!(t.m.state(), S::Failed);
    assert!(events(&e).contains(&"pull_failed".to_string()));
    assert!(has(&e, |e| matches!(
        e,
        Effect::ArmTimer {
            timer: Timer::PullRetry,
            ..
        }
    )));
    // The look after the pull (asked for by the resync) does not pull again at once.
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    assert!(
        !has(&e, |e| matches!(e, Effect::CheckImage { .. })),
        "{e:?}"
    );
    t.advance(PULL_RETRY);
    let e = t.send(Input::TimerFired(Timer::PullRetry));
    assert!(has(&e, |e| matches!(
        e,
        Effect::Inspect {
            look: Look::Converge,
            ..
        }
    )));
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    assert!(has(&e, |e| matches!(e, Effect::CheckImage { .. })));
}

// --- failures and restarts ----------------------------------------------------------

#[test]
fn a_die_with_its_exit_code_restarts_without_an_inspect_counted_from_the_die() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let died_wall = t.wall();
    let died_at = t.ctx().now;
    // The event reaches us 30 ms after Docker's own time stamp.
    t.advance(Duration::from_millis(30));
    let e = t.send(Input::Docker {
        container_id: "c1".into(),
        action: DockerAction::Die { exit_code: Some(3) },
        time_nano: died_wall,
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Backoff);
    assert!(
        !has(&e, |e| matches!(e, Effect::Inspect { .. })),
        "the hot path must not inspect: {e:?}"
    );
    let at = e
        .iter()
        .find_map(|e| match e {
            Effect::ArmTimer {
                timer: Timer::Restart,
                at,
            } => Some(*at),
            _ => None,
        })
        .unwrap();
    assert_eq!(at, died_at + Duration::from_millis(100));
    assert!(t.m.reason().unwrap().contains("exited with code 3"));
    t.advance(Duration::from_millis(70));
    let e = t.send(Input::TimerFired(Timer::Restart));
    // The start is the first Docker call, not through the gate; history after.
    let first_call = e
        .iter()
        .find(|e| docker_calls(std::slice::from_ref(e)) == 1)
        .unwrap();
    assert!(
        matches!(first_call, Effect::Start { container_id, gated: false } if container_id == "c1"),
        "{e:?}"
    );
    assert!(has(&e, |e| matches!(
        e,
        Effect::RecordRestart {
            reason: "exit",
            exit_code: Some(3)
        }
    )));
    assert_eq!(t.m.state(), S::Starting);
    assert_eq!(t.m.view().restarts_by_reason["exit"], 1);
}

#[test]
fn a_die_older_than_our_last_start_is_ignored() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let e = t.send(Input::Docker {
        container_id: "c1".into(),
        action: DockerAction::Die { exit_code: Some(1) },
        time_nano: NOW_WALL - 1,
        oom_reported: false,
    });
    assert!(e.is_empty(), "{e:?}");
    assert_eq!(t.m.state(), S::Running);
}

fn crash_and_restart(t: &mut T, id: &str) -> Vec<Effect> {
    let e = t.die(id, 1);
    if t.m.state() != S::Backoff {
        return e;
    }
    t.advance(Duration::from_secs(2));
    t.send(Input::TimerFired(Timer::Restart));
    t.send(Input::StartDone { result: Ok(()) });
    let running = t.container(id, true);
    t.send(Input::Inspected {
        look: Look::AfterStart,
        result: Ok(Some(running)),
        oom_reported: false,
    });
    t.advance(Duration::from_millis(10));
    e
}

#[test]
fn a_crash_loop_parks_after_max_retries_until_restart() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    for _ in 0..3 {
        crash_and_restart(&mut t, "c1");
        assert_eq!(t.m.state(), S::Running);
    }
    let e = t.die("c1", 1);
    assert_eq!(t.m.state(), S::CrashLooping);
    assert!(events(&e).contains(&"crash_looping".to_string()));
    assert!(t.m.reason().unwrap().contains("crash loop"));
    // Parked means parked: a resync does not start it.
    t.send(Input::Resync);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert_eq!(docker_calls(&e), 0, "{e:?}");
    // agentctl restart un-parks.
    let e = t.send(Input::Command {
        command: OperatorCommand::Restart,
        reply: 7,
    });
    let (job, work) = job_of(&e).unwrap();
    assert!(matches!(work, Work::Stop { .. }));
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Stopped(Ok(Some(t.container("c1", false)))),
    });
    assert!(has(&e, |e| matches!(e, Effect::Start { .. })));
    assert!(has(&e, |e| matches!(
        e,
        Effect::Reply {
            to: 7,
            result: Ok(_)
        }
    )));
    assert_eq!(t.m.state(), S::Starting);
}

#[test]
fn exit_137_is_rechecked_for_a_late_oom_report() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let e = t.die("c1", 137);
    let Some(Effect::Inspect { look, .. }) = e.iter().find(|e| matches!(e, Effect::Inspect { .. }))
    else {
        panic!("137 must be inspected: {e:?}")
    };
    let mut dead = t.container("c1", false);
    dead.exit_code = Some(137);
    let e = t.send(Input::Inspected {
        look: *look,
        result: Ok(Some(dead)),
        oom_reported: false,
    });
    let (job, work) = job_of(&e).unwrap();
    assert!(matches!(work, Work::OomCheck { .. }));
    assert_eq!(t.m.state(), S::Running, "not judged before the verdict");
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::OomVerdict { oom: true },
    });
    assert!(events(&e).contains(&"oom".to_string()));
    assert_eq!(t.m.state(), S::Backoff);
    assert!(t.m.reason().unwrap().contains("out of memory"));
}

#[test]
fn exit_0_under_on_failure_stays_stopped() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let e = t.die("c1", 0);
    assert_eq!(t.m.state(), S::Running, "an exit 0 is looked at first");
    let Some(Effect::Inspect { look, .. }) = e.iter().find(|e| matches!(e, Effect::Inspect { .. }))
    else {
        panic!("exit 0 must be inspected: {e:?}")
    };
    let mut dead = t.container("c1", false);
    dead.exit_code = Some(0);
    t.send(Input::Inspected {
        look: *look,
        result: Ok(Some(dead)),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Stopped);
}

#[test]
fn an_exit_nobody_watched_is_started_again_not_judged() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    let mut c = t.container("c1", false);
    c.exit_code = Some(0);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(c)),
        oom_reported: false,
    });
    assert!(events(&e).contains(&"recovering".to_string()), "{e:?}");
    assert!(has(&e, |e| matches!(e, Effect::Start { .. })));
}

#[test]
fn a_lost_die_is_caught_by_the_next_resync() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    // The die never arrives; the resync sees the exit.
    t.send(Input::Resync);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Backoff);
    assert!(events(&e).contains(&"exited".to_string()));
    // And it is judged once: the next resync does nothing more.
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert_eq!(docker_calls(&e), 0, "{e:?}");
}

#[test]
fn unhealthy_after_retries_stops_it_during_the_backoff() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    t.healthy();
    let mut last = vec![];
    for _ in 0..3 {
        let generation = t.m.probe_generation();
        last = t.send(Input::Probe {
            generation,
            record: ProbeRecord {
                at_ms: 0,
                ok: false,
                latency_ms: None,
                status: Some(500),
                error: Some("HTTP 500".into()),
            },
        });
    }
    assert_eq!(t.m.state(), S::Backoff);
    assert!(events(&last).contains(&"probe_failed".to_string()));
    let (job, work) = job_of(&last).unwrap();
    assert!(matches!(work, Work::Stop { .. }));
    // The backoff ends while it still stops: started once the stop is done.
    t.advance(Duration::from_millis(200));
    let e = t.send(Input::TimerFired(Timer::Restart));
    assert!(!has(&e, |e| matches!(e, Effect::Start { .. })));
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Stopped(Ok(Some(t.container("c1", false)))),
    });
    assert!(has(&e, |e| matches!(e, Effect::Start { .. })), "{e:?}");
}

#[test]
fn stale_probe_results_are_dropped_by_generation() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let old = t.m.probe_generation() - 1;
    t.send(Input::Probe {
        generation: old,
        record: ProbeRecord {
            at_ms: 0,
            ok: true,
            latency_ms: None,
            status: Some(200),
            error: None,
        },
    });
    assert_eq!(t.m.health(), Health::Unknown);
    assert_eq!(t.m.view().probe_total, 0);
}

// --- updates -----------------------------------------------------------------------

fn running_healthy_with_new_spec(image: &str) -> T {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    t.healthy();
    let e = t.send(Input::SetSpec {
        spec: Box::new(spec("hr", image, "update_deadline = \"10s\"")),
        host_port: 8001,
    });
    assert!(has(&e, |e| matches!(
        e,
        Effect::Inspect {
            look: Look::Converge,
            ..
        }
    )));
    // Docker still runs the container of the old spec.
    let mut old = t.container("c1", true);
    old.spec_hash = Some("old-hash".into());
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(old)),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Updating);
    assert!(has(&e, |e| matches!(
        e,
        Effect::CheckImage {
            image_for: ImageFor::Candidate,
            ..
        }
    )));
    t
}

#[test]
fn a_healthy_update_proves_a_candidate_then_swaps() {
    let mut t = running_healthy_with_new_spec("img:2");
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Candidate,
        result: Ok(true),
    });
    let (job, work) = job_of(&e).unwrap();
    let Work::Prove { request, .. } = work else {
        panic!("{e:?}")
    };
    assert_eq!(request.name, "aio-hr-next");
    assert_eq!(request.host_port, None, "the candidate takes a spare port");
    assert_eq!(request.labels[labels::ROLE], "candidate");
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Proven(Ok(())),
    });
    let (job, work) = job_of(&e).unwrap();
    assert!(matches!(work, Work::Stop { ref container_id, .. } if container_id == "c1"));
    let mut stopped = t.container("c1", false);
    stopped.spec_hash = Some("old-hash".into());
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Stopped(Ok(Some(stopped))),
    });
    assert!(has(
        &e,
        |e| matches!(e, Effect::Remove { container_id } if container_id == "c1")
    ));
    let e = t.send(Input::Removed { result: Ok(()) });
    assert!(has(&e, |e| matches!(
        e,
        Effect::Create {
            is_update: true,
            ..
        }
    )));
    t.send(Input::Created {
        is_update: true,
        result: Ok("c2".into()),
    });
    t.send(Input::Inspected {
        look: Look::AfterCreate { is_update: true },
        result: Ok(Some(t.container("c2", false))),
        oom_reported: false,
    });
    t.send(Input::StartDone { result: Ok(()) });
    let e = t.send(Input::Inspected {
        look: Look::AfterStart,
        result: Ok(Some(t.container("c2", true))),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);
    assert!(events(&e).contains(&"updated".to_string()));
    assert_eq!(t.m.spec().image, "img:2");
}

#[test]
fn a_candidate_that_never_gets_healthy_rolls_back_and_is_not_retried() {
    let mut t = running_healthy_with_new_spec("img:bad");
    let bad_hash = t.m.hash();
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Candidate,
        result: Ok(true),
    });
    let (job, _) = job_of(&e).unwrap();
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Proven(Err("the new version was not healthy within 10s".into())),
    });
    assert_eq!(t.m.state(), S::RollingBack);
    assert!(events(&e).contains(&"update_failed".to_string()));
    assert!(has(
        &e,
        |e| matches!(e, Effect::PersistRollBack { failed_hash } if *failed_hash == bad_hash)
    ));
    assert_eq!(t.m.spec().image, "img:1");
    // The old container (old spec's hash again) still runs: back to running.
    let old = t.container("c1", true);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(old.clone())),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);
    assert!(t.m.reason().unwrap().contains("rolled back"));
    assert!(t.m.reason().unwrap().contains("not healthy within"));
    assert!(!has(&e, |e| matches!(
        e,
        Effect::Begin { .. } | Effect::Remove { .. }
    )));
    // The same bad spec applied again is not tried again.
    t.send(Input::SetSpec {
        spec: Box::new(spec("hr", "img:bad", "update_deadline = \"10s\"")),
        host_port: 8001,
    });
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(old)),
        oom_reported: false,
    });
    assert_eq!(docker_calls(&e), 0, "{e:?}");
}

#[test]
fn a_failed_candidate_pull_rolls_back_leaving_the_old_one_serving() {
    let mut t = running_healthy_with_new_spec("img:missing");
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Candidate,
        result: Ok(false),
    });
    assert_eq!(t.m.state(), S::Updating);
    let (job, _) = job_of(&e).unwrap();
    t.send(Input::JobDone {
        job,
        outcome: Outcome::Pulled(Err("not found".into())),
    });
    assert_eq!(t.m.state(), S::RollingBack);
    t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(t.container("c1", true))),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);
    let reason = t.m.reason().unwrap();
    assert!(reason.contains("rolled back") && reason.contains("pull of img:missing failed"));
}

// --- operator and delete --------------------------------------------------------------

#[test]
fn stop_waits_for_the_stop_and_its_die_is_not_a_failure() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let e = t.send(Input::Command {
        command: OperatorCommand::Stop,
        reply: 1,
    });
    assert!(has(&e, |e| matches!(
        e,
        Effect::PersistDesiredRunning(false)
    )));
    let (job, _) = job_of(&e).unwrap();
    let e = t.die("c1", 143);
    assert!(docker_calls(&e) == 0 && events(&e).is_empty(), "{e:?}");
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Stopped(Ok(Some(t.container("c1", false)))),
    });
    assert_eq!(t.m.state(), S::Stopped);
    assert!(has(&e, |e| matches!(
        e,
        Effect::Reply {
            to: 1,
            result: Ok(_)
        }
    )));
    // Start runs the same container again.
    let e = t.send(Input::Command {
        command: OperatorCommand::Start,
        reply: 2,
    });
    assert!(has(&e, |e| matches!(
        e,
        Effect::Inspect {
            look: Look::ForStart { reply: 2 },
            ..
        }
    )));
    let e = t.send(Input::Inspected {
        look: Look::ForStart { reply: 2 },
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert!(has(
        &e,
        |e| matches!(e, Effect::Start { container_id, .. } if container_id == "c1")
    ));
    assert!(has(&e, |e| matches!(
        e,
        Effect::Reply {
            to: 2,
            result: Ok(_)
        }
    )));
}

#[test]
fn delete_during_a_pull_aborts_it_and_answers_when_removed() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Create { is_update: false },
        result: Ok(false),
    });
    let (pull, _) = job_of(&e).unwrap();
    let e = t.send(Input::Delete { reply: 9 });
    assert!(has(
        &e,
        |e| matches!(e, Effect::Abort { job } if *job == pull)
    ));
    let (delete, work) = job_of(&e).unwrap();
    assert!(matches!(work, Work::Delete { ref department, .. } if department == "hr"));
    // The aborted pull's late result, events and commands change nothing.
    let e = t.send(Input::JobDone {
        job: pull,
        outcome: Outcome::Pulled(Ok(())),
    });
    assert!(e.is_empty(), "{e:?}");
    let e = t.send(Input::Command {
        command: OperatorCommand::Restart,
        reply: 3,
    });
    assert!(matches!(
        e.as_slice(),
        [Effect::Reply {
            to: 3,
            result: Err(CommandError::Deleting(_))
        }]
    ));
    let e = t.send(Input::JobDone {
        job: delete,
        outcome: Outcome::Deleted(Ok(())),
    });
    assert!(has(&e, |e| matches!(
        e,
        Effect::ReplyDeleted {
            to: 9,
            result: Ok(())
        }
    )));
    assert!(has(&e, |e| matches!(e, Effect::Exit)));
}

#[test]
fn rollback_without_a_previous_spec_is_an_error() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let e = t.send(Input::Command {
        command: OperatorCommand::Rollback,
        reply: 4,
    });
    assert!(has(&e, |e| matches!(
        e,
        Effect::Reply {
            to: 4,
            result: Err(CommandError::NoPrevious(_))
        }
    )));
}

#[test]
fn a_removed_container_is_recreated_on_its_port() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.start_fresh("c1");
    let time_nano = t.wall();
    let e = t.send(Input::Docker {
        container_id: "c1".into(),
        action: DockerAction::Destroy,
        time_nano,
        oom_reported: false,
    });
    assert!(events(&e).contains(&"lost".to_string()));
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(None),
        oom_reported: false,
    });
    assert!(has(&e, |e| matches!(e, Effect::CheckImage { .. })));
}

#[test]
fn a_die_during_the_swap_stop_does_not_start_a_second_create() {
    let mut t = running_healthy_with_new_spec("img:2");
    let e = t.send(Input::ImageChecked {
        image_for: ImageFor::Candidate,
        result: Ok(true),
    });
    let (job, _) = job_of(&e).unwrap();
    let e = t.send(Input::JobDone {
        job,
        outcome: Outcome::Proven(Ok(())),
    });
    let (stop, _) = job_of(&e).unwrap();
    // The old container's `die` (our own stop) arrives before the stop returns.
    let e = t.die("c1", 143);
    assert!(e.is_empty(), "{e:?}");
    let mut stopped = t.container("c1", false);
    stopped.spec_hash = Some("old-hash".into());
    let e = t.send(Input::JobDone {
        job: stop,
        outcome: Outcome::Stopped(Ok(Some(stopped))),
    });
    assert!(has(&e, |e| matches!(e, Effect::Remove { .. })));
    assert!(
        !has(&e, |e| matches!(
            e,
            Effect::Inspect {
                look: Look::Converge,
                ..
            }
        )),
        "a converge beside the swap would create a second container: {e:?}"
    );
}

#[test]
fn a_restart_after_an_exit_nobody_watched_waits_for_the_start_gate() {
    // After a host reboot every department finds its container exited.
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(t.container("c1", false))),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Backoff, "{e:?}");
    t.advance(Duration::from_millis(200));
    let e = t.send(Input::TimerFired(Timer::Restart));
    assert!(
        has(&e, |e| matches!(e, Effect::Start { gated: true, .. })),
        "{e:?}"
    );
}

#[test]
fn a_container_of_another_node_under_the_name_is_not_adopted() {
    let mut t = T::new(spec("hr", "img:1", ""));
    t.send(Input::Init);
    let mut c = t.container("c1", true);
    c.node = Some("other-node".into());
    let e = t.send(Input::Inspected {
        look: Look::Converge,
        result: Ok(Some(c)),
        oom_reported: false,
    });
    assert!(t.m.container().is_none());
    assert!(!events(&e).contains(&"adopted".to_string()), "{e:?}");
}

#[test]
fn every_create_request_is_hardened_and_joins_the_network() {
    let t = T::new(spec(
        "hr",
        "img:1",
        "[secrets]\nDB_PASSWORD = \"canary-77\"\n",
    ));
    let r = t.m.create_request(false);
    assert_eq!(r.network, "aio_network");
    assert_eq!(r.pids_limit, 512);
    assert!(r.cap_add.is_empty() && r.init && r.no_new_privileges);
    assert!(!r.read_only_root && r.tmpfs_bytes.is_none());
    // Env mode (the node default): the value is in the environment.
    assert!(r.env.contains(&"DB_PASSWORD=canary-77".to_string()));
    assert!(r.secret_files.is_none());
    assert!(!r.labels.contains_key(labels::SECRETS));
}

#[test]
fn files_mode_keeps_secret_values_out_of_env_and_labels() {
    let extra = "[security]\nread_only_root = true\npids_limit = 64\n[secrets]\nDB_PASSWORD = \"canary-77\"\n";
    let files_spec = |extra: &str| {
        let mut s = spec("hr", "img:1", extra);
        s.secrets_mode = Some(fleet_model::spec::SecretsMode::Files);
        s
    };
    let t = T::new(files_spec(extra));
    for candidate in [false, true] {
        let r = t.m.create_request(candidate);
        let shown = format!("{:?} {:?} {:?}", r.env, r.labels, r.secret_files);
        assert!(!shown.contains("canary-77"), "{shown}");
        assert!(r
            .env
            .contains(&"DB_PASSWORD_FILE=/run/secrets/DB_PASSWORD".to_string()));
        let files = r.secret_files.expect("files mode carries the files");
        assert_eq!(files.files[0].0, "DB_PASSWORD");
        assert_eq!(files.files[0].1.expose(), "canary-77");
        // One directory per container and spec hash: an update's candidate
        // never rewrites the files of the container still serving.
        let name = if candidate { "aio-hr-next" } else { "aio-hr" };
        assert_eq!(files.key, format!("{name}.{}", t.m.hash()));
        assert_eq!(r.labels[labels::SECRETS], files.key);
        assert!(r.read_only_root);
        assert_eq!(r.tmpfs_bytes, Some(64 << 20));
        assert_eq!(r.pids_limit, 64);
    }
    // A rotated secret is a new hash, so a new container (and directory).
    let rotated = T::new(files_spec(&extra.replace("canary-77", "canary-78")));
    assert_ne!(rotated.m.hash(), t.m.hash());
}

// --- draining behind HAProxy ------------------------------------------------------

fn drain_config() -> DrainConfig {
    DrainConfig {
        range_low: 8001,
        range_high: 8010,
        standby_low: 8101,
        settle: Duration::from_secs(4),
        agent_inter: Duration::from_secs(1),
    }
}

impl T {
    /// Running and healthy with `[haproxy]`; the start-up retire (nothing on
    /// the standby port) is done.
    fn draining_ready(id: &str) -> T {
        let mut t = T::new(spec("hr", "img:1", ""));
        t.m.drain = Some(drain_config());
        t.m.agent.standby_drain_from = Some(t.ctx().now);
        t.start_fresh(id);
        t.send(Input::JobDone {
            job: 1,
            outcome: Outcome::Retired(Ok(())),
        });
        t.healthy();
        t
    }
}

#[test]
fn a_restart_behind_haproxy_hands_over_to_a_stand_in_then_drains_and_retires_it() {
    let mut t = T::draining_ready("c1");
    let now = t.ctx().now;
    assert!(t
        .m
        .view()
        .agent
        .standby_drain_from
        .is_some_and(|f| f <= now));
    assert_eq!(t.m.view().standby_port, Some(8101));

    // The stand-in first: the current spec, proven on the standby port, kept.
    let out = t.send(Input::Command {
        command: OperatorCommand::Restart,
        reply: 7,
    });
    let (bridge, work) = job_of(&out).expect("a stand-in job");
    match work {
        Work::Prove { request, keep, .. } => {
            assert!(keep);
            assert_eq!(request.host_port, Some(8101));
            assert_eq!(request.name, candidate_container_name("hr"));
        }
        other => panic!("expected the stand-in's proof, got {other:?}"),
    }
    assert_eq!(
        t.m.state(),
        S::Running,
        "it serves while the stand-in comes up"
    );

    // Proven: the standby port is ready; the old one drains once HAProxy had
    // time to see the stand-in up (settle), then waits for its connections.
    t.advance(Duration::from_secs(1));
    let proven_at = t.ctx().now;
    let out = t.send(Input::JobDone {
        job: bridge,
        outcome: Outcome::Proven(Ok(())),
    });
    let (stop, work) = job_of(&out).expect("a stop job");
    match work {
        Work::Stop { drain, .. } => {
            let wait = drain.expect("the stop drains");
            assert_eq!(wait.port, 8001);
            assert_eq!(
                wait.after,
                Duration::from_secs(4) + drain_config().noticed()
            );
            assert_eq!(
                wait.timeout,
                Duration::from_secs(30),
                "drain_timeout's default"
            );
        }
        other => panic!("expected a draining stop, got {other:?}"),
    }
    assert_eq!(t.m.state(), S::Draining);
    assert!(events(&out).contains(&"state_draining".to_string()));
    let agent = t.m.view().agent;
    assert_eq!(agent.standby_drain_from, None);
    assert_eq!(
        agent.primary_drain_from,
        Some(proven_at + Duration::from_secs(4))
    );

    // Drained: reported with its count, then stopped and started again.
    t.send(Input::DrainProgress {
        job: stop,
        connections: Some(2),
        done: false,
    });
    assert_eq!(t.m.view().drain.unwrap().connections, Some(2));
    t.advance(Duration::from_secs(6));
    let out = t.send(Input::DrainProgress {
        job: stop,
        connections: Some(0),
        done: true,
    });
    assert!(events(&out).contains(&"drained".to_string()));
    let drained = t.m.view().drain.unwrap();
    assert_eq!(drained.took, Some(Duration::from_secs(2)));
    let out = t.send(Input::JobDone {
        job: stop,
        outcome: Outcome::Stopped(Ok(Some(t.container("c1", false)))),
    });
    assert!(has(&out, |e| matches!(e, Effect::Start { .. })));
    assert!(
        t.m.view().agent.primary_drain_from.is_some(),
        "drained until its probe passes again"
    );
    t.send(Input::StartDone { result: Ok(()) });
    let running = t.container("c1", true);
    t.send(Input::Inspected {
        look: Look::AfterStart,
        result: Ok(Some(running)),
        oom_reported: false,
    });
    assert_eq!(t.m.state(), S::Running);

    // Healthy again: ready, and the stand-in is drained and removed.
    let generation = t.m.probe_generation();
    let out = t.send(Input::Probe {
        generation,
        record: ProbeRecord {
            at_ms: 0,
            ok: true,
            latency_ms: Some(1.0),
            status: Some(200),
            error: None,
        },
    });
    assert_eq!(t.m.view().agent.primary_drain_from, None);
    let (retire, work) = job_of(&out).expect("the stand-in is retired");
    match work {
        Work::Retire { wait, .. } => assert_eq!(wait.port, 8101),
        other => panic!("expected the retire, got {other:?}"),
    }
    assert!(t.m.view().agent.standby_drain_from.is_some());
    t.send(Input::JobDone {
        job: retire,
        outcome: Outcome::Retired(Ok(())),
    });
    assert!(
        t.m.view().agent.standby_drain_from.is_some(),
        "nothing serves there now"
    );
    assert_eq!(t.m.state(), S::Running);
}

#[test]
fn an_operator_stop_behind_haproxy_drains_first_and_a_stand_in_that_fails_is_skipped() {
    let mut t = T::draining_ready("c1");
    let out = t.send(Input::Command {
        command: OperatorCommand::Stop,
        reply: 1,
    });
    let (stop, work) = job_of(&out).expect("a stop job");
    assert!(matches!(
        work,
        Work::Stop {
            drain: Some(DrainWait { port: 8001, .. }),
            ..
        }
    ));
    assert_eq!(t.m.state(), S::Draining);
    let stopped = t.container("c1", false);
    t.send(Input::JobDone {
        job: stop,
        outcome: Outcome::Stopped(Ok(Some(stopped))),
    });
    assert_eq!(t.m.state(), S::Stopped);

    // A restart whose stand-in never gets healthy stops without one.
    let mut t = T::draining_ready("c2");
    let out = t.send(Input::Command {
        command: OperatorCommand::Restart,
        reply: 2,
    });
    let (bridge, _) = job_of(&out).unwrap();
    let out = t.send(Input::JobDone {
        job: bridge,
        outcome: Outcome::Proven(Err("never healthy".into())),
    });
    assert!(events(&out).contains(&"stand_in_failed".to_string()));
    let (_, work) = job_of(&out).expect("the stop goes on");
    assert!(matches!(work, Work::Stop { drain: Some(_), .. }));
}
