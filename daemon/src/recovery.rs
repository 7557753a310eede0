//! Rebuilding the node from Docker's labels when `state.db` is lost or
//! unreadable. Every department container carries, besides its department,
//! node, host port and spec hash, the whole spec with secret values masked
//! (`fleet-agent.spec`). The secret values themselves live where the container
//! needs them anyway, in its environment (Docker keeps that in the container's
//! config under its data root, readable by root only); they are never in a
//! label.
//!
//! The department core puts that label on every container it creates
//! (`Machine::create_request`). `recover_spec` is the way back: label + environment -> the spec, accepted
//! only when it hashes to the container's own spec hash, so a rebuilt
//! department adopts its container untouched instead of replacing it.
//!
//! Restart history comes back from the engine too: `restarts_from_events`
//! reads Docker's own record of what the node's primary containers did (its
//! event buffer, replayed with `since`/`until`) and finds the restarts in it.
//! Docker keeps that buffer in memory (the last 256 events of the host, gone
//! when dockerd restarts), so it answers for the recent past: enough for the
//! crash-loop window and the backoff, which only look at recent failures, and
//! a lower bound for the all-time counts.

use crate::restart::FailureReason;
use crate::runtime::{ContainerConfig, RuntimeEvent};
use fleet_model::spec::{HashKey, Secret};
use fleet_model::{labels, DepartmentSpec};
use std::collections::BTreeMap;

/// The label value: the spec with its secrets masked.
pub fn spec_label(spec: &DepartmentSpec) -> String {
    serde_json::to_string(&spec.redacted()).unwrap_or_default()
}

/// The spec a container was created from, rebuilt from its labels and
/// environment. Refused (with why) unless it hashes to `labels`' spec hash
/// with `labels`' host port under the node's key (`key`; the key file
/// outlives `state.db`).
pub fn recover_spec(
    config: &ContainerConfig,
    key: &HashKey,
) -> Result<(DepartmentSpec, u16), String> {
    let label = config
        .labels
        .get(labels::SPEC)
        .ok_or("the container has no fleet-agent.spec label (created by an older fleet-agentd)")?;
    let port: u16 = config
        .labels
        .get(labels::HOST_PORT)
        .and_then(|p| p.parse().ok())
        .ok_or("the container has no usable fleet-agent.host-port label")?;
    let expected = config
        .labels
        .get(labels::SPEC_HASH)
        .ok_or("the container has no fleet-agent.spec-hash label")?;
    let mut spec: DepartmentSpec = serde_json::from_str(label)
        .map_err(|e| format!("its fleet-agent.spec label does not parse: {e}"))?;
    let env: BTreeMap<&str, &str> = config
        .env
        .iter()
        .filter_map(|line| line.split_once('='))
        .collect();
    for (key, value) in spec.secrets.iter_mut() {
        // Files mode: the value is in the container's secrets directory.
        let found = env
            .get(key.as_str())
            .copied()
            .or_else(|| config.secret_files.get(key).map(String::as_str))
            .ok_or_else(|| {
                format!("secret {key} is neither in the container's environment nor in its secret files")
            })?;
        *value = Secret::new(found);
    }
    spec.validate().map_err(|errors| {
        format!(
            "its spec is not valid here: {}",
            fleet_model::spec::join_fields(&errors)
        )
    })?;
    // The keyed hash, or the unkeyed one of a container an earlier version
    // created: either way the label and the environment rebuild exactly the
    // spec the container was made from.
    if !spec.hash_matches(expected, port, key) {
        return Err("the spec rebuilt from its labels does not hash to its spec-hash label".into());
    }
    Ok((spec, port))
}

/// One restart seen in Docker's events: the failure (a `die`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct PastRestart {
    /// The container that failed (and was started again).
    pub container_id: String,
    /// When it failed, Unix nanoseconds (Docker's `timeNano` of the `die`).
    pub failed_at_nano: i64,
    pub reason: FailureReason,
}

/// The restarts per department in `events` (oldest first), in time order.
///
/// A restart is a `die` followed by a `start` of the same department. A `die`
/// after a `kill` (any requested stop: `docker stop`, our stop for an update,
/// a delete, an unhealthy container, `agentctl restart`) is not a failure; a
/// `die` after `oom` is an OOM kill. The last `die` of a department with no
/// `start` after it is left out: that run is still down, and the department
/// judges it itself when it adopts the exited container (so it is not
/// counted twice).
pub fn restarts_from_events(events: &[RuntimeEvent]) -> BTreeMap<String, Vec<PastRestart>> {
    #[derive(Default)]
    struct Walk {
        requested_stop: bool,
        oom: bool,
        died: Option<PastRestart>,
    }
    let mut sorted: Vec<&RuntimeEvent> = events.iter().collect();
    sorted.sort_by_key(|RuntimeEvent::Container { time_nano, .. }| *time_nano);
    let mut walks: BTreeMap<&str, Walk> = BTreeMap::new();
    let mut out: BTreeMap<String, Vec<PastRestart>> = BTreeMap::new();
    for RuntimeEvent::Container {
        id,
        department,
        action,
        exit_code,
        time_nano,
        ..
    } in sorted
    {
        let walk = walks.entry(department.as_str()).or_default();
        match action.as_str() {
            "kill" => walk.requested_stop = true,
            "oom" => walk.oom = true,
            "die" => {
                let failure = !std::mem::take(&mut walk.requested_stop);
                let oom = std::mem::take(&mut walk.oom);
                walk.died = failure.then(|| PastRestart {
                    container_id: id.clone(),
                    failed_at_nano: *time_nano,
                    reason: if oom {
                        FailureReason::Oom
                    } else {
                        FailureReason::Exited {
                            code: exit_code.unwrap_or(-1),
                        }
                    },
                });
            }
            "start" => {
                walk.requested_stop = false;
                walk.oom = false;
                if let Some(restart) = walk.died.take() {
                    out.entry(department.clone()).or_default().push(restart);
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ev(department: &str, action: &str, exit_code: Option<i64>, t: i64) -> RuntimeEvent {
        RuntimeEvent::Container {
            id: format!("{department}-c"),
            department: department.into(),
            action: action.into(),
            exit_code,
            time_nano: t,
        }
    }

    #[test]
    fn restarts_are_dies_followed_by_a_start_and_requested_stops_are_not() {
        let events = vec![
            ev("hr", "create", None, 1),
            ev("hr", "start", None, 2),
            ev("hr", "die", Some(3), 10),
            ev("hr", "start", None, 11),
            ev("hr", "oom", None, 20),
            ev("hr", "die", Some(137), 21),
            ev("hr", "start", None, 22),
            // An update or `agentctl restart`: kill, die, start. Not a failure.
            ev("hr", "kill", None, 30),
            ev("hr", "die", Some(143), 31),
            ev("hr", "start", None, 32),
            // Down now, nobody started it yet: the department judges it itself.
            ev("hr", "die", Some(1), 40),
            // Out of order from the engine: sorted by time first.
            ev("ops", "start", None, 6),
            ev("ops", "die", Some(2), 5),
            ev("ops", "start", None, 4),
        ];
        let found = restarts_from_events(&events);
        assert_eq!(
            found["hr"],
            vec![
                PastRestart {
                    container_id: "hr-c".into(),
                    failed_at_nano: 10,
                    reason: FailureReason::Exited { code: 3 }
                },
                PastRestart {
                    container_id: "hr-c".into(),
                    failed_at_nano: 21,
                    reason: FailureReason::Oom
                },
            ]
        );
        assert_eq!(
            found["ops"],
            vec![PastRestart {
                container_id: "ops-c".into(),
                failed_at_nano: 5,
                reason: FailureReason::Exited { code: 2 }
            }]
        );
    }

    fn spec() -> DepartmentSpec {
        DepartmentSpec::from_toml(
            "t",
            "id = \"hr\"\nimage = \"aio:1\"\n[env]\nMODE = \"x\"\n[secrets]\nDB_PASSWORD = \"canary-42\"\n",
        )
        .unwrap()
    }

    fn key() -> HashKey {
        HashKey::from_bytes([9; 32])
    }

    fn config_of(spec: &DepartmentSpec, port: u16, env: &[&str]) -> ContainerConfig {
        ContainerConfig {
            labels: HashMap::from([
                (labels::SPEC.to_string(), spec_label(spec)),
                (labels::HOST_PORT.to_string(), port.to_string()),
                (
                    labels::SPEC_HASH.to_string(),
                    spec.container_hash(port, &key()),
                ),
            ]),
            env: env.iter().map(|s| s.to_string()).collect(),
            secret_files: HashMap::new(),
        }
    }

    #[test]
    fn the_label_never_holds_a_secret_and_the_env_gives_it_back() {
        let spec = spec();
        assert!(!spec_label(&spec).contains("canary-42"));
        let config = config_of(
            &spec,
            8003,
            &["PATH=/bin", "MODE=x", "DB_PASSWORD=canary-42"],
        );
        let (back, port) = recover_spec(&config, &key()).unwrap();
        assert_eq!(port, 8003);
        assert_eq!(back, spec);
    }

    #[test]
    fn a_rebuilt_spec_must_hash_like_the_container() {
        let spec = spec();
        let wrong_secret = config_of(&spec, 8003, &["MODE=x", "DB_PASSWORD=other"]);
        assert!(recover_spec(&wrong_secret, &key())
            .unwrap_err()
            .contains("does not hash"));
        let missing = config_of(&spec, 8003, &["MODE=x"]);
        assert!(recover_spec(&missing, &key())
            .unwrap_err()
            .contains("DB_PASSWORD"));
        // Rebuilt right, but checked under another node's key.
        let right = config_of(&spec, 8003, &["MODE=x", "DB_PASSWORD=canary-42"]);
        assert!(recover_spec(&right, &HashKey::from_bytes([8; 32]))
            .unwrap_err()
            .contains("does not hash"));
        let mut old = config_of(&spec, 8003, &[]);
        old.labels.remove(labels::SPEC);
        assert!(recover_spec(&old, &key()).unwrap_err().contains("older"));
    }

    #[test]
    fn a_container_labelled_by_an_earlier_version_is_recovered_too() {
        let spec = spec();
        let mut config = config_of(&spec, 8003, &["MODE=x", "DB_PASSWORD=canary-42"]);
        config.labels.insert(
            labels::SPEC_HASH.to_string(),
            spec.legacy_container_hash(8003),
        );
        let (back, _) = recover_spec(&config, &key()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn in_files_mode_the_secret_files_give_the_values_back() {
        let mut spec = spec();
        spec.secrets_mode = Some(fleet_model::spec::SecretsMode::Files);
        let mut config = config_of(
            &spec,
            8003,
            &["MODE=x", "DB_PASSWORD_FILE=/run/secrets/DB_PASSWORD"],
        );
        assert!(recover_spec(&config, &key())
            .unwrap_err()
            .contains("neither in the container's environment nor in its secret files"));
        config
            .secret_files
            .insert("DB_PASSWORD".into(), "canary-42".into());
        let (back, _) = recover_spec(&config, &key()).unwrap();
        assert_eq!(back, spec);
    }
}
