//! What a department container is created with beyond its spec's image, env
//! and resources: its network, its hardening, how its secrets reach it. Pure
//! decisions: the spec's `network`, `secrets_mode` and `[security]` against the
//! node's `[containers]` (defaults and bounds). `check` is the apply-time (and
//! check-config) refusal naming the field; `resolve` the settings the create
//! request carries, and it never fails: a spec out of bounds never gets this
//! far.

use fleet_model::config::ContainersConfig;
use fleet_model::spec::{FieldError, SecretsMode};
use fleet_model::DepartmentSpec;

/// The effective settings of one department's containers.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardening {
    pub network: String,
    pub pids_limit: i64,
    /// Added back after `CapDrop: ALL`.
    pub cap_add: Vec<String>,
    pub init: bool,
    pub read_only_root: bool,
    /// The /tmp tmpfs of a read-only root, in bytes.
    pub tmpfs_bytes: Option<u64>,
    pub no_new_privileges: bool,
    pub secrets_mode: SecretsMode,
}

pub fn resolve(spec: &DepartmentSpec, node: &ContainersConfig) -> Hardening {
    let sec = &spec.security;
    let read_only_root = sec.read_only_root.unwrap_or(node.read_only_root);
    Hardening {
        network: spec.network.clone().unwrap_or_else(|| node.network.clone()),
        pids_limit: sec.pids_limit.unwrap_or(node.pids_limit),
        cap_add: sec.cap_add.clone().unwrap_or_default(),
        init: sec.init.unwrap_or(true),
        read_only_root,
        tmpfs_bytes: read_only_root.then(|| sec.tmpfs_size.unwrap_or(node.tmpfs_size).bytes()),
        no_new_privileges: sec.no_new_privileges.unwrap_or(true),
        secrets_mode: spec.secrets_mode.unwrap_or(node.secrets_mode),
    }
}

/// Every way `spec` asks for more than the node allows. Fields are the
/// spec's own (`security.pids_limit`); the caller prefixes the department.
pub fn check(spec: &DepartmentSpec, node: &ContainersConfig) -> Vec<FieldError> {
    let mut problems = Vec::new();
    if let Some(network) = &spec.network {
        if *network != node.network && !node.allowed_networks.contains(network) {
            problems.push(FieldError::new(
                "network",
                format!(
                    "`{network}` is neither the node's network `{}` nor in [containers] allowed_networks",
                    node.network
                ),
            ));
        }
    }
    let sec = &spec.security;
    if let Some(pids) = sec.pids_limit {
        if pids > node.max_pids_limit {
            problems.push(FieldError::new(
                "security.pids_limit",
                format!(
                    "{pids} is above this node's [containers] max_pids_limit {}",
                    node.max_pids_limit
                ),
            ));
        }
    }
    for (i, cap) in sec.cap_add.iter().flatten().enumerate() {
        if !node.allowed_capabilities.contains(cap) {
            problems.push(FieldError::new(
                format!("security.cap_add[{i}]"),
                format!(
                    "{cap} is not in this node's [containers] allowed_capabilities ({})",
                    node.allowed_capabilities.join(", ")
                ),
            ));
        }
    }
    if sec.read_only_root == Some(false) && !node.allow_writable_root {
        problems.push(FieldError::new(
            "security.read_only_root",
            "this node requires a read-only root ([containers] allow_writable_root = false)",
        ));
    }
    if sec.no_new_privileges == Some(false) && !node.allow_new_privileges {
        problems.push(FieldError::new(
            "security.no_new_privileges",
            "may be false only where [containers] allow_new_privileges = true",
        ));
    }
    // A spec that leaves secrets_mode to a node defaulting to files still
    // must not hide a secret's pointer behind an env key of the same name.
    if spec.secrets_mode.is_none() && node.secrets_mode == SecretsMode::Files {
        for key in spec.secrets.keys() {
            let pointer = format!("{key}_FILE");
            if spec.env.contains_key(&pointer) {
                problems.push(FieldError::new(
                    format!("env.{pointer}"),
                    format!(
                        "is where this node's secrets_mode = \"files\" points at secret {key}; rename it"
                    ),
                ));
            }
        }
    }
    problems
}

/// The `<NAME>_FILE=/run/secrets/<NAME>` lines of files mode.
pub fn file_pointers(spec: &DepartmentSpec) -> Vec<String> {
    spec.secrets
        .keys()
        .map(|k| format!("{k}_FILE={}/{k}", fleet_model::spec::SECRETS_MOUNT))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> DepartmentSpec {
        DepartmentSpec::from_toml("t", &format!("id = \"hr\"\nimage = \"a:1\"\n{extra}")).unwrap()
    }

    #[test]
    fn defaults_harden_every_container() {
        let h = resolve(&spec(""), &ContainersConfig::default());
        assert_eq!(h.network, "aio_network");
        assert_eq!(h.pids_limit, 512);
        assert!(h.cap_add.is_empty());
        assert!(h.init && h.no_new_privileges && !h.read_only_root);
        assert_eq!(h.tmpfs_bytes, None);
        assert_eq!(h.secrets_mode, SecretsMode::Env);
    }

    #[test]
    fn a_spec_chooses_within_the_node_bounds() {
        let s = spec(
            "network = \"aio_network\"\nsecrets_mode = \"files\"\n[security]\npids_limit = 64\ncap_add = [\"NET_BIND_SERVICE\"]\nread_only_root = true\ntmpfs_size = \"8MiB\"\ninit = false\n",
        );
        let node = ContainersConfig::default();
        assert!(check(&s, &node).is_empty());
        let h = resolve(&s, &node);
        assert_eq!(h.pids_limit, 64);
        assert_eq!(h.cap_add, vec!["NET_BIND_SERVICE".to_string()]);
        assert!(h.read_only_root && !h.init);
        assert_eq!(h.tmpfs_bytes, Some(8 << 20));
        assert_eq!(h.secrets_mode, SecretsMode::Files);
    }

    #[test]
    fn beyond_the_node_bounds_is_refused_naming_the_field() {
        let node = ContainersConfig {
            allow_writable_root: false,
            ..Default::default()
        };
        let s = spec(
            "network = \"elsewhere\"\n[security]\npids_limit = 100000\ncap_add = [\"CHOWN\", \"SYS_ADMIN\"]\nread_only_root = false\nno_new_privileges = false\n",
        );
        let fields: Vec<String> = check(&s, &node).into_iter().map(|f| f.field).collect();
        assert_eq!(
            fields,
            [
                "network",
                "security.pids_limit",
                "security.cap_add[1]",
                "security.read_only_root",
                "security.no_new_privileges"
            ]
        );
        let allowed = ContainersConfig {
            allowed_networks: vec!["elsewhere".into()],
            allowed_capabilities: vec!["CHOWN".into(), "SYS_ADMIN".into()],
            max_pids_limit: 200_000,
            allow_new_privileges: true,
            ..Default::default()
        };
        assert!(check(&s, &allowed).is_empty());
    }

    #[test]
    fn the_spec_alone_refuses_what_no_node_allows() {
        for (extra, field) in [
            ("network = \"host\"\n", "network"),
            ("network = \"a b\"\n", "network"),
            ("[security]\npids_limit = 3\n", "security.pids_limit"),
            ("[security]\ncap_add = [\"ALL\"]\n", "security.cap_add[0]"),
            (
                "[security]\ncap_add = [\"CAP_CHOWN\"]\n",
                "security.cap_add[0]",
            ),
            ("[security]\ntmpfs_size = \"1KiB\"\n", "security.tmpfs_size"),
            (
                "secrets_mode = \"files\"\n[env]\nDB_FILE = \"x\"\n[secrets]\nDB = \"y\"\n",
                "env.DB_FILE",
            ),
        ] {
            let text = format!("id = \"hr\"\nimage = \"a:1\"\n{extra}");
            let err = DepartmentSpec::from_toml("t", &text).unwrap_err();
            assert!(
                err.fields().iter().any(|f| f.field == field),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn a_node_defaulting_to_files_refuses_a_colliding_pointer() {
        let node = ContainersConfig {
            secrets_mode: SecretsMode::Files,
            ..Default::default()
        };
        let s = spec("[env]\nDB_FILE = \"x\"\n[secrets]\nDB = \"y\"\n");
        assert_eq!(check(&s, &node)[0].field, "env.DB_FILE");
    }
}
