//! The configuration reference, derived from the types themselves so it cannot
//! drift: the keys are what serde accepts (each table is asked with an unknown
//! key, and its `deny_unknown_fields` refusal lists the real ones), the defaults
//! are what an empty table deserializes to. Only the one-line descriptions are
//! written here, and a test fails when a key has none or a description names a
//! key that no longer exists.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One key of a document: its dotted path, whether it is a table, its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub path: String,
    pub table: bool,
    /// Set by the sample because the document is refused without it.
    pub required: bool,
    /// The value an absent key takes, as TOML; `None`: no default (absent means off,
    /// or the key is required).
    pub default: Option<String>,
}

const PROBE: &str = "__fleet_probe__";

/// The fields serde accepts in the table at `prefix` of `T` (`prefix` empty: the
/// top level), read from its refusal of an unknown key.
fn fields_of<T: DeserializeOwned>(prefix: &str, base: &str) -> Option<Vec<String>> {
    let text = if prefix.is_empty() {
        format!("{base}\n{PROBE} = 1\n")
    } else {
        format!("{base}\n[{prefix}]\n{PROBE} = 1\n")
    };
    let err = toml::from_str::<T>(&text).err()?;
    let message = err.message();
    // serde: "unknown field `x`, expected `a`", "... expected `a` or `b`",
    // "... expected one of `a`, `b`, `c`" (an enum says "unknown variant": a leaf).
    let rest = message
        .strip_prefix(&format!("unknown field `{PROBE}`, expected "))?
        .trim_start_matches("one of ");
    Some(
        rest.split(['`'])
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every key of `T`, depth first in declaration order. `base` is TOML that makes
/// the document valid apart from the probe (required keys of required tables).
pub fn keys_of<T: DeserializeOwned + Serialize>(base: &str, sample: &str) -> Vec<Key> {
    let defaults: Option<toml::Value> = toml::from_str::<T>(sample)
        .ok()
        .and_then(|v| toml::Value::try_from(v).ok());
    let mut out = Vec::new();
    walk::<T>("", base, defaults.as_ref(), &mut out);
    // What the sample sets is there because it is required: it has no default.
    if let Ok(set) = toml::from_str::<toml::Value>(sample) {
        for key in out.iter_mut().filter(|k| !k.table) {
            if lookup(&set, &key.path).is_some_and(|v| !v.is_table()) {
                key.required = true;
                key.default = None;
            }
        }
    }
    out
}

fn walk<T: DeserializeOwned>(
    prefix: &str,
    base: &str,
    defaults: Option<&toml::Value>,
    out: &mut Vec<Key>,
) {
    let Some(fields) = fields_of::<T>(prefix, base) else {
        return;
    };
    for field in fields {
        let path = if prefix.is_empty() {
            field.clone()
        } else {
            format!("{prefix}.{field}")
        };
        let value = defaults.and_then(|d| lookup(d, &path));
        let is_table = fields_of::<T>(&path, base).is_some();
        if is_table {
            out.push(Key {
                path: path.clone(),
                table: true,
                required: false,
                default: None,
            });
            walk::<T>(&path, base, defaults, out);
        } else {
            out.push(Key {
                path,
                table: false,
                required: false,
                default: value.map(show_value),
            });
        }
    }
}

fn lookup<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |v, part| v.get(part))
}

fn show_value(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) if t.is_empty() => "{}".into(),
        other => other.to_string(),
    }
}

/// One line per key of `agent.toml`.
pub const CONFIG_DOCS: &[(&str, &str)] = &[
    ("node_id", "Names the node to the coordinator and in container labels; defaults to the hostname."),
    ("state_dir", "state.db, applied.d and the daemon's other state (0750)."),
    ("socket", "The local control socket agentctl talks to (0666; peer credentials are the gate)."),
    ("departments_dir", "Hand-written department specs, *.toml; the daemon only reads it."),
    ("max_departments", "A desired state with more departments is refused whole (1-1000)."),
    ("reserved_memory", "Host memory kept from the departments; their reservations may add up to the rest (the budget)."),
    ("memory_oversubscription", "Hard memory limits may add up to the budget times this (1.25: 125%)."),
    ("department_memory_default", "What a spec without resources.memory counts as in memory admission."),
    ("resync_interval", "Full list-and-compare against Docker beside the event stream (at least 500ms)."),
    ("stats_interval", "How often container CPU and memory are read for /metrics and agentctl top (at least 1s)."),
    ("start_concurrency", "How many departments start at once after a boot."),
    ("admin_group", "Unix group (besides root) allowed full use of the control socket."),
    ("log", "Logging."),
    ("log.level", "tracing filter (info, debug, fleet_agentd=debug); RUST_LOG overrides it; SIGHUP re-reads it."),
    ("log.format", "auto (journald when present, else text on stderr), text, json or journald."),
    ("ports", "The host-port pool departments are published on."),
    ("ports.range", "low-high; a department keeps its port; an explicit host_port must be inside it."),
    ("ports.bind", "Address the department ports are published on (HAProxy's side)."),
    ("ports.standby_range", "low-high, as many ports as range: each department's hand-over port (its port's offset in range); needed by [haproxy]."),
    ("api", "The read-only TCP API and /metrics."),
    ("api.listen", "host:port; an empty string turns the TCP listener off."),
    ("api.token_file", "Bearer token(s), one per line (two during rotation; a third is an error), re-read on SIGHUP; required off loopback. Unset: the daemon generates <state_dir>/api.token (0640) and requires it."),
    ("api.tls_cert", "PEM certificate chain; with tls_key the listener speaks TLS."),
    ("api.tls_key", "PEM private key of tls_cert."),
    ("api.tls_client_ca", "PEM bundle of CAs whose client certificates are then required."),
    ("api.max_connections", "Open connections at most; more wait in the kernel's backlog."),
    ("api.requests_per_second", "Per client address; 0 turns the limit off (benchmarks only)."),
    ("api.header_timeout", "A request head must arrive within this; also the idle keep-alive limit."),
    ("api.request_timeout", "A handler must answer within this (long-polls get their wait on top)."),
    ("api.max_event_wait", "The longest /v1/events long-poll; a longer wait is shortened to it."),
    ("docker", "The Docker engine."),
    ("docker.socket", "The engine's unix socket."),
    ("docker.registry_auth_file", "Docker config.json-shaped file ({\"auths\": {...}}) used for pulls."),
    ("docker.pull_timeout", "An image pull taking longer fails (retried in 30s)."),
    ("containers", "What every department container is created with, and the bounds of a spec's network, secrets_mode and [security]."),
    ("containers.network", "Docker network the departments join; created when missing (inter-container communication off), adopted when present."),
    ("containers.allowed_networks", "Other networks a spec's network may name."),
    ("containers.bridge_name", "Linux bridge name of a network the agent creates, for host firewall rules (docs/install.md); empty: Docker's br-<id>."),
    ("containers.pids_limit", "PID limit (processes and threads) of a department without security.pids_limit."),
    ("containers.max_pids_limit", "The largest security.pids_limit a spec may ask for."),
    ("containers.allowed_capabilities", "Capabilities a spec may add back with security.cap_add; all others are dropped."),
    ("containers.read_only_root", "Read-only root file system (a tmpfs on /tmp) for departments that do not say."),
    ("containers.allow_writable_root", "Whether a spec may set security.read_only_root = false."),
    ("containers.tmpfs_size", "Size of the /tmp tmpfs of a read-only root, unless the spec says."),
    ("containers.allow_new_privileges", "Whether a spec may set security.no_new_privileges = false."),
    ("containers.secrets_mode", "secrets_mode of a spec without one: \"files\" (recommended) or \"env\"."),
    ("containers.secrets_dir", "Where files-mode secrets are written (a tmpfs the engine can read; the unit allows /run/fleet-agent only)."),
    ("docker.log_driver", "Logging driver of department containers (json-file, local, journald, ...); absent: the engine's default. Applies to containers created after the change."),
    ("docker.log_options", "The driver's options (--log-opt); with json-file or local a missing max-size/max-file becomes 10m/3 (an engine-wide cap in daemon.json is overridden: repeat it here)."),
    ("images", "Image garbage collection and the disk-pressure guard on Docker's data root."),
    ("images.gc", "Remove images the agent pulled for a department once no department's current, previous or announced image is one of them; false: only watch the disk."),
    ("images.gc_interval", "How often images are collected without disk pressure (at least 1s)."),
    ("images.disk_check_interval", "How often the disk is looked at; under pressure a collection runs at every look."),
    ("images.disk_high_watermark", "Percent used at which disk pressure starts: event, metric, collection at once (1-99)."),
    ("images.disk_low_watermark", "Percent used at or below which disk pressure ends; below the high watermark."),
    ("images.disk_path", "The filesystem watched; absent: Docker's data root (DockerRootDir from the engine)."),
    ("coordinator", "Pull the desired state from a coordinator instead of departments_dir (absent: standalone)."),
    ("coordinator.url", "Base URL; the node calls POST {url}/v1/nodes/{node_id}/sync. Required."),
    ("coordinator.node_id", "The name the coordinator knows this node by; defaults to the top-level node_id."),
    ("coordinator.token_file", "Bearer token presented to the coordinator (mode 0600)."),
    ("coordinator.poll_interval", "Time between syncs, each shortened by up to 20% at random."),
    ("coordinator.backoff_max", "Backoff cap while the coordinator is unreachable; defaults to poll_interval."),
    ("coordinator.ca_file", "Extra CA bundle (PEM) trusted for the coordinator's certificate."),
    ("haproxy", "Zero-downtime hand-over behind HAProxy (absent: off): agent-check answers per department port; agentctl haproxy-config prints the backends."),
    ("haproxy.agent_listen", "host:port of the agent-check listener HAProxy asks `<department>/<primary|standby>`. Required."),
    ("haproxy.check_inter", "HAProxy's `inter` between health checks, as printed by agentctl haproxy-config."),
    ("haproxy.rise", "HAProxy's `rise`: passed checks before a server is up; the hand-over waits (rise+1)*check_inter+agent_inter."),
    ("haproxy.fall", "HAProxy's `fall`: failed checks before a server is down."),
    ("haproxy.agent_inter", "HAProxy's `agent-inter`: how often it asks the agent listener."),
    ("wal", "PostgreSQL WAL archiving on this host (absent: off); docs/wal.md."),
    ("wal.target", "file:///path or s3://bucket/prefix. Required."),
    ("wal.postgres", "libpq key/value string for base backups and monitoring."),
    ("wal.postgres_user", "Unix user of the PostgreSQL server, allowed WAL push/fetch on the socket."),
    ("wal.s3", "S3 settings of an s3:// target."),
    ("wal.s3.endpoint", "Endpoint URL for S3-compatible stores; absent: AWS."),
    ("wal.s3.region", "Region of the bucket."),
    ("wal.s3.credentials_file", "File with access_key_id = and secret_access_key = lines; absent: the environment."),
    ("wal.s3.path_style", "Path-style requests (most S3-compatible stores need them)."),
    ("wal.s3.ca_file", "Extra CA bundle (PEM) trusted for the endpoint's certificate (a private CA); it must be readable by the WAL service's user, e.g. /etc/ssl/fleet-agent/s3-ca.pem; absent: the system roots only."),
    ("wal.recovery_window", "Retention: base backups and WAL needed to restore any point this far back are kept."),
    ("wal.parallel_uploads", "Segments uploaded at once by the look-ahead uploader (1-64)."),
    ("wal.pg_wal_dir", "pg_wal directory whose archive_status/*.ready the daemon uploads ahead."),
    ("wal.backup_interval", "Base backup schedule (24h); absent: by hand only (agentctl backup create)."),
    ("wal.valve_backlog", "Protective valve: acknowledge segments unarchived past this backlog (absent: off)."),
    ("wal.compression_level", "zstd level of stored segments (1-22)."),
    ("wal.backup_timeout", "A base backup still running after this is killed and fails with an event."),
    ("wal.backup_max_rate", "Bandwidth cap of a base backup per second (\"50MiB\"; 32KiB to 1GiB), passed to pg_basebackup --max-rate so a backup leaves the cluster disk to serve; absent: no cap."),
    ("wal.pg_bin_dir", "PostgreSQL's programs (pg_ctl, psql) for the restore drill; absent: /usr/lib/postgresql/<PG_VERSION of the backup>/bin."),
    ("wal.drill_dir", "Scratch directory of restore drills (agentctl wal drill); absent: <state_dir>/wal-drill. The PostgreSQL user must reach it; it needs room for one restored cluster."),
    ("wal.object_checksum", "Checksum new archive objects record: \"xxh3\" (FWAL3, XXH3-128, the cheapest), \"blake3\" (FWAL2, BLAKE3-256) or \"sha256\" (FWAL1); all three are always read. An agent reads only the formats it knows: agents up to 0.2.1 cannot read FWAL3, agents before 0.2.0 neither FWAL2 nor FWAL3. Pick a format every host that may restore or verify this archive can read."),
    ("wal.drill_interval", "Restore drill schedule (7d): restore the newest base backup, replay, query, measure the RTO, clean up; absent: by hand only (agentctl wal drill)."),
    ("wal.verify_interval", "agentctl wal verify on a schedule (24h; 1m to 365d): walk the archive from the oldest kept base backup, read every object back, set the fleet_agent_wal_verify_* metrics (alert FleetWalVerifyFailed); absent: by hand only. Each run reads the whole archive back (one GET per object on S3)."),
    ("wal.socket", "The WAL service's socket (fleet-agent-wal.service); set: fleet-agentd relays /v1/wal and WAL metrics from it and does no WAL work itself."),
];

/// One line per key of a department spec.
pub const SPEC_DOCS: &[(&str, &str)] = &[
    ("id", "a-z, 0-9 and '-', 2-32 characters, starting with a letter; the container is aio-<id>. Required."),
    ("name", "A human name, shown by agentctl."),
    ("image", "The container image (a tag or a digest). Required."),
    ("next_image", "The image the next update will use, announced ahead (the coordinator's pre-pull): pulled in the background and kept by image collection; not part of the container hash, so setting or clearing it never replaces the container; cleared, the announcement is withdrawn."),
    ("container_port", "The port the container listens on."),
    ("host_port", "A fixed host port inside [ports] range; absent: one from the pool, kept."),
    ("resources", "Docker resource limits."),
    ("resources.cpus", "CPU limit (1.5 = one and a half cores); absent: none."),
    ("resources.memory", "Hard memory limit (2GiB); absent: none, counted as department_memory_default."),
    ("resources.memory_reservation", "What memory admission sums (Docker's MemoryReservation); defaults to memory."),
    ("env", "Environment of the container, NAME = \"value\"."),
    ("secrets", "Environment too, but never shown in output, logs, metrics or labels."),
    ("health", "The HTTP health probe."),
    ("health.path", "Path probed on container_port; must stay inside the department."),
    ("health.interval", "Time between probes (at least 100ms)."),
    ("health.timeout", "A probe answering later fails."),
    ("health.retries", "Consecutive failures that make the department unhealthy (1-100)."),
    ("health.start_period", "Failures in this time after a start do not count."),
    ("health.enabled", "false turns the probe off (running is then healthy)."),
    ("restart", "What the daemon does when the container exits or turns unhealthy."),
    ("restart.policy", "on-failure, always or never."),
    ("restart.max_retries", "Failures inside window before the department is parked as crash_looping."),
    ("restart.window", "The sliding window failures are counted in."),
    ("restart.backoff", "First restart delay, doubled per failure (up to 20% jitter)."),
    ("restart.backoff_max", "Cap of the restart delay."),
    ("restart.stop_timeout", "SIGTERM, then SIGKILL after this."),
    ("restart.update_deadline", "An updated version must be healthy within this, or the previous spec returns."),
    ("network", "Docker network of the container; default [containers] network, else one of its allowed_networks."),
    ("secrets_mode", "\"files\" (recommended): each secret a read-only file /run/secrets/<NAME> with <NAME>_FILE set, not in docker inspect; \"env\": in the environment. Default [containers] secrets_mode."),
    ("security", "Container hardening; unset keys take the node's [containers] defaults and bounds."),
    ("security.pids_limit", "PID limit (processes and threads), 16 to [containers] max_pids_limit; default [containers] pids_limit."),
    ("security.cap_add", "Capabilities added back after dropping all, each in [containers] allowed_capabilities; default none."),
    ("security.init", "Docker's init as PID 1 (signals, zombies); default true."),
    ("security.read_only_root", "Read-only root file system with a tmpfs on /tmp; default [containers] read_only_root."),
    ("security.tmpfs_size", "Size of that /tmp tmpfs; default [containers] tmpfs_size."),
    ("security.no_new_privileges", "no-new-privileges; default true, false only with [containers] allow_new_privileges."),
    ("restart.drain_timeout", "Behind HAProxy ([haproxy]): in-flight requests may finish this long after the container leaves rotation, then SIGTERM (at most 1h)."),
    ("postgres_check", "A SELECT 1 against the department's database, reported beside the probe."),
    ("postgres_check.url_from", "Name of the env or secrets key holding the libpq URL. Required in the table."),
    ("postgres_check.interval", "Time between checks."),
];

/// TOML that completes `agent.toml` for the walk: the optional tables present,
/// with their required keys.
const CONFIG_SAMPLE: &str = "[coordinator]\nurl = \"https://coordinator.invalid\"\n[wal]\ntarget = \"file:///var/lib/fleet-wal\"\n[wal.s3]\n";
const SPEC_SAMPLE: &str = "id = \"hr\"\nimage = \"registry.example.com/aio-agent:1\"\n";

/// Every key of agent.toml with its default.
pub fn config_keys() -> Vec<Key> {
    keys_of::<crate::Config>("", CONFIG_SAMPLE)
}

/// Every key of a department spec with its default.
pub fn spec_keys() -> Vec<Key> {
    keys_of::<crate::DepartmentSpec>(SPEC_SAMPLE, SPEC_SAMPLE)
}

fn doc<'a>(docs: &'a [(&str, &str)], path: &str) -> &'a str {
    docs.iter()
        .find(|(k, _)| *k == path)
        .map_or("(undocumented)", |(_, d)| d)
}

/// Keys the walk found without a description, and descriptions of keys that do
/// not exist: both must be empty.
pub fn drift(keys: &[Key], docs: &[(&str, &str)]) -> (Vec<String>, Vec<String>) {
    let undocumented = keys
        .iter()
        .filter(|k| !docs.iter().any(|(d, _)| *d == k.path))
        .map(|k| k.path.clone())
        .collect();
    let stale = docs
        .iter()
        .filter(|(d, _)| !keys.iter().any(|k| k.path == *d))
        .map(|(d, _)| d.to_string())
        .collect();
    (undocumented, stale)
}

/// Escapes roff's special characters at the start of a line and backslashes.
fn roff(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with(['.', '\'']) {
        format!("\\&{text}")
    } else {
        text
    }
}

fn default_text(k: &Key) -> String {
    match (&k.default, k.required) {
        (Some(d), _) => d.clone(),
        (None, true) => "required".into(),
        (None, false) => "none".into(),
    }
}

/// `agent.toml(5)`.
pub fn config_man_page(version: &str) -> String {
    man_page(
        "AGENT.TOML",
        version,
        "agent.toml \\- fleet\\-agentd configuration",
        "/etc/fleet\\-agent/agent.toml is read by fleet\\-agentd(8) at start (and for log.level on SIGHUP). \
Unknown keys are errors; every refusal names the file, line, column and dotted key. \
fleet\\-agentd config show prints the effective configuration. \
This page is generated from the configuration types (fleet\\-agentd config reference).",
        &config_keys(),
        CONFIG_DOCS,
        "FILES\n.TP\n/etc/fleet\\-agent/agent.toml\nThe system configuration; $FLEET_AGENT_CONFIG or \\-\\-config name another.\n\
.SH ENVIRONMENT\n.TP\nFLEET_AGENT_CONFIG\nPath of the configuration file.\n.TP\nRUST_LOG\nOverrides log.level.\n\
.SH EXAMPLES\n.nf\nnode_id = \"app\\-1\"\n[ports]\nrange = \"8001\\-8010\"\n[api]\nlisten = \"10.0.0.5:7070\"\ntoken_file = \"/etc/fleet\\-agent/api.token\"\n.fi\n\
.SH SEE ALSO\nfleet\\-agentd(8), agentctl(1), fleet\\-department(5)\n",
    )
}

/// `fleet-department(5)`: a department spec.
pub fn spec_man_page(version: &str) -> String {
    man_page(
        "FLEET-DEPARTMENT",
        version,
        "fleet\\-department \\- a fleet\\-agent department spec",
        "A department spec is a TOML file in departments_dir (or sent by agentctl apply \\-f, or JSON from the coordinator). \
Unknown keys are errors; every refusal names the file, line, column and dotted key, and never shows a secret. \
This page is generated from the spec type (fleet\\-agentd config reference \\-\\-spec).",
        &spec_keys(),
        SPEC_DOCS,
        "EXAMPLES\n.nf\nid = \"hr\"\nimage = \"registry.example.com/aio\\-agent:1.4.2\"\n[resources]\nmemory = \"2GiB\"\n[env]\nDEPARTMENT_ID = \"hr\"\n[secrets]\nDB_PASSWORD = \"...\"\n.fi\n\
.SH SEE ALSO\nagent.toml(5), agentctl(1)\n",
    )
}

fn man_page(
    title: &str,
    version: &str,
    name: &str,
    description: &str,
    keys: &[Key],
    docs: &[(&str, &str)],
    tail: &str,
) -> String {
    let mut out = format!(
        ".TH {title} 5 \"\" \"fleet\\-agent {}\" \"fleet\\-agent\"\n.SH NAME\n{name}\n.SH DESCRIPTION\n{description}\n.SH KEYS\n",
        roff(version)
    );
    for k in keys {
        if k.table {
            out.push_str(&format!(
                ".SS [{}]\n{}\n",
                roff(&k.path),
                roff(doc(docs, &k.path))
            ));
        } else {
            out.push_str(&format!(
                ".TP\n.B {}\n{} Default: {}.\n",
                roff(&k.path),
                roff(doc(docs, &k.path)),
                roff(&default_text(k))
            ));
        }
    }
    out.push_str(".SH ");
    out.push_str(tail);
    out
}

/// A Markdown table of the keys, for docs/.
pub fn markdown(title: &str, intro: &str, keys: &[Key], docs: &[(&str, &str)]) -> String {
    let mut out = format!(
        "# {title}\n\n<!-- Generated by `fleet-agentd config reference`; do not edit (a test compares). -->\n\n{intro}\n\n| key | default | meaning |\n|---|---|---|\n"
    );
    for k in keys {
        let key = if k.table {
            format!("`[{}]`", k.path)
        } else {
            format!("`{}`", k.path)
        };
        let default = if k.table {
            String::new()
        } else {
            format!("`{}`", default_text(k)).replace('|', "\\|")
        };
        out.push_str(&format!(
            "| {key} | {default} | {} |\n",
            doc(docs, &k.path).replace('|', "\\|")
        ));
    }
    out
}

pub fn config_markdown() -> String {
    markdown(
        "agent.toml reference",
        "Every key of `/etc/fleet-agent/agent.toml` (also `man 5 agent.toml`). Unknown keys are errors; `fleet-agentd config show` prints the effective configuration.",
        &config_keys(),
        CONFIG_DOCS,
    )
}

pub fn spec_markdown() -> String {
    markdown(
        "Department spec reference",
        "Every key of a department spec (`departments.d/<id>.toml`, `agentctl apply -f`, or JSON from the coordinator; also `man 5 fleet-department`). Unknown keys are errors.",
        &spec_keys(),
        SPEC_DOCS,
    )
}

/// The leaf keys of `keys` that a sample `agent.toml` (keys may be commented
/// out, `#key = value` under `[table]` or `#[table]`) does not show.
pub fn missing_from_sample(keys: &[Key], text: &str) -> Vec<String> {
    let mut shown = std::collections::BTreeSet::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#');
        // A trailing comment (`[wal]   # absent: off`); keys' values may hold '#'.
        let line = match line.split_once('#') {
            Some((head, _)) if head.trim_start().starts_with('[') => head,
            _ => line,
        }
        .trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = header.trim().to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                shown.insert(if table.is_empty() {
                    key.to_string()
                } else {
                    format!("{table}.{key}")
                });
            }
        }
    }
    keys.iter()
        .filter(|k| !k.table && !shown.contains(&k.path))
        .map(|k| k.path.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_key_is_documented_and_no_description_is_stale() {
        let keys = config_keys();
        assert!(keys.iter().any(|k| k.path == "wal.s3.credentials_file"));
        assert!(keys.iter().any(|k| k.path == "api.tls_client_ca"));
        assert_eq!(drift(&keys, CONFIG_DOCS), (vec![], vec![]));
    }

    #[test]
    fn every_spec_key_is_documented_and_no_description_is_stale() {
        let keys = spec_keys();
        assert!(keys.iter().any(|k| k.path == "postgres_check.interval"));
        assert_eq!(drift(&keys, SPEC_DOCS), (vec![], vec![]));
    }

    #[test]
    fn defaults_come_from_the_types() {
        let keys = config_keys();
        let get = |p: &str| keys.iter().find(|k| k.path == p).unwrap().default.clone();
        assert_eq!(get("ports.range").as_deref(), Some("\"8001-8010\""));
        assert_eq!(get("wal.parallel_uploads").as_deref(), Some("4"));
        assert_eq!(get("api.token_file"), None);
    }

    #[test]
    fn the_shipped_references_are_the_generated_ones() {
        // Regenerate with: fleet-agentd config reference > docs/agent.toml.md
        //                  fleet-agentd config reference --spec > docs/department-spec.md
        assert_eq!(include_str!("../../docs/agent.toml.md"), config_markdown());
        assert_eq!(
            include_str!("../../docs/department-spec.md"),
            spec_markdown()
        );
    }

    #[test]
    fn the_shipped_agent_toml_files_show_every_key() {
        let keys = config_keys();
        for (name, text) in [
            (
                "packaging/agent.toml",
                include_str!("../../packaging/agent.toml"),
            ),
            (
                "examples/agent.toml",
                include_str!("../../examples/agent.toml"),
            ),
        ] {
            assert_eq!(
                missing_from_sample(&keys, text),
                Vec::<String>::new(),
                "{name}"
            );
        }
        // The check itself: a key left out is found.
        assert_eq!(
            missing_from_sample(&keys[..2], "node_id = \"x\"\n"),
            vec!["state_dir".to_string()]
        );
    }
}
