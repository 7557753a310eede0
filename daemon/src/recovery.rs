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

use crate::runtime::ContainerConfig;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
