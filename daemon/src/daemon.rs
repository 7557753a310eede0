//! Start-up and shutdown: open the store, connect the runtime, start the
//! supervisor, bind the listeners, tell systemd we are ready, then wait for a
//! signal. SIGHUP re-reads `departments.d` and `agent.toml`; SIGTERM/SIGINT stop the daemon and
//! leave every container running (they belong to Docker, not to us).

use crate::api::{self, ApiState, Mode, SyncStatus};
use crate::events::EventLog;
use crate::runtime::{load_registry_auth, BollardRuntime};
use crate::store::Store;
use crate::supervisor::Supervisor;
use axum::Router;
use fleet_model::config::ConfigSource;
use fleet_model::Config;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::SupervisorError),
    #[error(transparent)]
    Socket(#[from] api::unix::SocketError),
    #[error(transparent)]
    Token(#[from] api::tcp::TokenError),
    #[error(transparent)]
    Tls(#[from] api::tcp::TlsError),
    #[error("coordinator: {0}")]
    Coordinator(#[from] crate::coordinator::SyncError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// What `check-config` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckScope {
    /// `agent.toml` and the files it names (tokens, TLS, registry auth): what
    /// the daemon needs to start (`wal.s3.ca_file` only when fleet-agentd runs
    /// the WAL service itself, without `wal.socket`). The unit's `ExecStartPre=` runs this, so a
    /// bad spec file never keeps the daemon (and its supervision) down.
    ConfigOnly,
    /// Also the files the separate WAL service reads (`wal.s3.ca_file`, as
    /// `wal.postgres_user`), and standalone mode's whole desired state, judged as the daemon will
    /// judge it at the next reload or start (ids, files, capacity, host ports,
    /// memory admission against this host's memory).
    Everything,
}

/// Validates the config and, with `CheckScope::Everything` in standalone mode,
/// the desired state. Returns the lines to print.
pub fn check_config(
    config: &Config,
    source: &ConfigSource,
    scope: CheckScope,
) -> Result<Vec<String>, Vec<String>> {
    let mut ok = vec![match source {
        ConfigSource::File(p) => format!("{}: valid", p.display()),
        ConfigSource::EmbeddedDefault => "embedded default config: valid".to_string(),
    }];
    let mut problems = Vec::new();
    if let Some(token) = &config.api.token_file {
        if let Err(e) = api::tcp::Tokens::load(token) {
            problems.push(format!("api.token_file: {e}"));
        }
    }
    if let Err(e) = api::tcp::tls_acceptor(&config.api) {
        problems.push(format!("api.tls: {e}"));
    }
    if let Some(path) = &config.docker.registry_auth_file {
        if let Err(e) = load_registry_auth(path) {
            problems.push(format!("docker.registry_auth_file: {e}"));
        }
    }
    if let Some(wal) = &config.wal {
        // ConfigOnly is what fleet-agentd needs to start: with `wal.socket`
        // the WAL service (its own unit) reads the CA, not fleet-agentd, and
        // a WAL file must not keep department supervision down.
        if scope == CheckScope::Everything || wal.socket.is_none() {
            problems.extend(crate::walfiles::check(wal));
        }
    }
    if scope == CheckScope::Everything && config.coordinator.is_none() {
        let sources = crate::desired::Sources::of(config);
        let shown = format!(
            "{} and {}",
            sources.hand_written.display(),
            sources.applied.display()
        );
        match crate::desired::load(&sources) {
            Ok(desired) => match judge_desired(config, &desired) {
                Ok(verdict) => ok.push(format!(
                    "{shown}: {} department spec(s) valid; {verdict}",
                    desired.specs.len()
                )),
                Err(mut refused) => problems.append(&mut refused),
            },
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err(problems)
    }
}

/// The node-wide checks of a whole standalone set that need no running daemon,
/// the supervisor's own rules: capacity, unique host ports, memory admission
/// (`admission.rs`, with host memory read as the daemon reads it). A host port
/// another program holds is only found by the daemon.
fn judge_desired(
    config: &Config,
    desired: &crate::desired::Desired,
) -> Result<crate::admission::Verdict, Vec<String>> {
    let specs = &desired.specs;
    let mut problems = Vec::new();
    if specs.len() > config.max_departments {
        problems.push(format!(
            "departments: {} specs but max_departments is {}; remove one or raise max_departments",
            specs.len(),
            config.max_departments
        ));
    }
    let mut ports = std::collections::BTreeMap::new();
    let (low, high) = config.ports.parsed_range().unwrap_or((0, u16::MAX));
    let pool = crate::ports::PortPool::new(low, high, []);
    for spec in specs {
        if let Err(e) = pool.admit_explicit(spec.host_port) {
            let field = format!("{}.host_port", spec.id);
            problems.push(format!("{}: {e}", in_file(&field, desired)));
        }
        if let Some(port) = spec.host_port {
            if let Some(other) = ports.insert(port, spec.id.clone()) {
                problems.push(format!(
                    "{}: {port} is also the host_port of `{other}`",
                    in_file(&format!("{}.host_port", spec.id), desired)
                ));
            }
        }
    }
    for spec in specs {
        for f in crate::hardening::check(spec, &config.containers) {
            let field = format!("{}.{}", spec.id, f.field);
            problems.push(format!("{}: {}", in_file(&field, desired), f.message));
        }
    }
    let node = crate::admission::Node::of(config, crate::host::total_memory_bytes());
    let verdict = crate::admission::admit(specs, |_| false, &node).map_err(|fields| {
        problems.extend(
            fields
                .iter()
                .map(|f| format!("{}: {}", in_file(&f.field, desired), f.message)),
        )
    });
    match verdict {
        Ok(verdict) if problems.is_empty() => Ok(verdict),
        _ => Err(problems),
    }
}

pub async fn run(config: Config, source: ConfigSource) -> Result<(), RunError> {
    let started = Instant::now();
    // What agent.toml said at start, so that a SIGHUP can tell the operator an
    // edit of it is not applied until a restart.
    let config_text = config_file_text(&source);
    let config = Arc::new(config);
    let node_id = config.node_id();
    match &source {
        ConfigSource::File(p) => {
            tracing::info!(config = %p.display(), node = %node_id, "Starting fleet-agentd.")
        }
        ConfigSource::EmbeddedDefault => tracing::info!(
            state_dir = %config.state_dir.display(),
            socket = %config.socket.display(),
            node = %node_id,
            "Starting fleet-agentd on the embedded default config (no {} found).",
            fleet_model::config::SYSTEM_CONFIG_PATH
        ),
    }

    // Refuse a TCP listener off loopback without a token before touching anything.
    let listen = config.api.listen_addr().map_err(RunError::Config)?;
    // Without `api.token_file` the daemon makes its own token (0640 under the
    // state directory): loopback is open to every local user, and the read API
    // shows env values and events the control socket refuses them.
    let tokens = match listen {
        Some(_) => {
            api::tcp::Tokens::configured(config.api.token_file.as_deref(), &config.state_dir)?
        }
        None => api::tcp::Tokens::none(),
    };
    if let Some(addr) = listen {
        if !addr.ip().is_loopback() && config.api.token_file.is_none() {
            return Err(RunError::Config(format!(
                "api.listen {addr} is not loopback, so api.token_file is required"
            )));
        }
    }
    let tls = api::tcp::tls_acceptor(&config.api)?;
    if let Some(watchdog) = crate::systemd::watchdog_interval() {
        crate::systemd::check_resync_interval(config.resync_interval, watchdog)
            .map_err(RunError::Config)?;
    }

    let store = Arc::new(Store::open(&config.state_dir)?);
    let events = EventLog::new(store.clone());
    let registry_auth = match &config.docker.registry_auth_file {
        Some(path) => load_registry_auth(path).map_err(RunError::Config)?,
        None => Default::default(),
    };
    let runtime = Arc::new(
        BollardRuntime::new(
            config.docker.socket.clone(),
            registry_auth,
            config.docker.pull_timeout,
        )
        .with_logging(
            config.docker.log_driver.clone(),
            config.docker.log_options.clone(),
        )
        .scoped_to_node(node_id.clone())
        .with_containers(&config.containers),
    );
    let host = crate::host::HostSampler::start(Duration::from_secs(5));
    let supervisor = Supervisor::start(
        config.clone(),
        store.clone(),
        runtime,
        events.clone(),
        crate::host::total_memory_bytes(),
    )
    .await?;
    let mode = if config.coordinator.is_some() {
        Mode::Coordinator
    } else {
        Mode::Standalone
    };
    let state = ApiState {
        supervisor: supervisor.clone(),
        started,
        mode,
        coordinator_url: config.coordinator.as_ref().map(|c| c.url.clone()),
        sync: Arc::new(RwLock::new(SyncStatus {
            applied_revision: store
                .meta("applied_revision")
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok()),
            coordinator: None,
            desired_state: None,
        })),
        host,
        usage: crate::usage::UsageCache::start(supervisor.shared.clone()),
        extra_metrics: Arc::new(RwLock::new(Vec::new())),
    };

    if mode == Mode::Standalone {
        load_desired(&supervisor, &config, &state.sync).await;
    }
    // In both modes, so a dashboard or rule on it never meets an absent series.
    if let Ok(mut extra) = state.extra_metrics.write() {
        extra.push(desired_state_metric(state.sync.clone()));
    }
    let mut coordinator_task = None;
    if let Some(coordinator) = &config.coordinator {
        coordinator_task = Some(
            crate::coordinator::start(
                coordinator.clone(),
                node_id.clone(),
                state.sources(),
                &state.extra_metrics,
            )
            .await?,
        );
    }

    // WAL archiving, when `[wal]` is configured: its routes join the unix
    // socket (push/fetch are the PostgreSQL user's only rights there), its
    // figures join /metrics and its happenings the event log. With
    // `wal.socket` set the service runs on its own as the PostgreSQL user
    // (walserve.rs) and this daemon only relays its status and metrics.
    let wal_remote = config
        .wal
        .as_ref()
        .and_then(|w| w.socket.clone())
        .map(crate::walserve::Remote::new);
    let wal = match &config.wal {
        Some(wal_config) if wal_remote.is_none() => {
            let sink_events = events.clone();
            let sink: fleet_wal::EventSink = Arc::new(move |kind: &str, message: &str| {
                sink_events.record(None, kind, None, message)
            });
            let service = fleet_wal::WalService::new(wal_config.clone(), &config.state_dir, sink)
                .map_err(|e| {
                RunError::Config(format!("wal: {e}{}", crate::walserve::inline_hint()))
            })?;
            let metrics_service = service.clone();
            if let Ok(mut extra) = state.extra_metrics.write() {
                extra.push(Arc::new(move |out: &mut String| {
                    metrics_service.render_metrics(out)
                }));
            }
            tracing::info!(target = %service.target.describe(), "WAL archiving enabled.");
            Some(service)
        }
        _ => None,
    };
    if let Some(remote) = &wal_remote {
        let metrics_remote = remote.clone();
        if let Ok(mut extra) = state.extra_metrics.write() {
            extra.push(Arc::new(move |out: &mut String| {
                metrics_remote.render_metrics(out)
            }));
        }
    }
    let wal_status_router = || match (&wal, &wal_remote) {
        (Some(service), _) => fleet_wal::http::read_router(service.clone()),
        (None, Some(remote)) => remote.status_router(),
        (None, None) => fleet_wal::http::absent_router(),
    };
    let mut unix_router: Router = api::read_routes()
        .merge(api::admin_routes())
        .with_state(state.clone());
    unix_router = unix_router.merge(match (&wal, &wal_remote) {
        (Some(service), _) => fleet_wal::http::router(service.clone()),
        (None, Some(remote)) => remote.router(),
        (None, None) => fleet_wal::http::absent_router(),
    });
    let unix_router = unix_router.layer(axum::middleware::from_fn(api::authorize));
    let policy = api::unix::Policy::resolve(
        &config.admin_group,
        config.wal.as_ref().map(|w| w.postgres_user.as_str()),
    );
    let unix_listener = api::unix::bind(&config.socket)?;
    let mut tasks = supervisor.spawn_background();
    {
        let counters = Arc::new(crate::imagegc::GcCounters::default());
        let metrics_counters = counters.clone();
        if let Ok(mut extra) = state.extra_metrics.write() {
            extra.push(Arc::new(move |out: &mut String| {
                crate::imagegc::Collector::render_metrics(&metrics_counters, out)
            }));
        }
        let shared = supervisor.shared.clone();
        let collector = crate::imagegc::Collector {
            runtime: shared.runtime.clone(),
            store: shared.store.clone(),
            events: shared.events.clone(),
            counters,
            settings: crate::imagegc::GcSettings::from_config(&config.images),
        };
        tasks.push(collector.spawn(shared));
    }
    if let Some(service) = &wal {
        tasks.extend(service.spawn_background());
    }
    tasks.extend(wal_remote.as_ref().map(|remote| remote.spawn()));
    tasks.push(tokio::spawn(api::unix::serve(
        unix_listener,
        unix_router,
        policy,
        api::unix::SocketLimits::default(),
    )));

    if let Some(haproxy) = &config.haproxy {
        // Validated at load; HAProxy asks it which port of a department takes
        // new connections (drain.rs). It reads the status board only.
        let addr = haproxy.agent_addr().map_err(RunError::Config)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(listen = %addr, "HAProxy agent listener up.");
        tasks.push(tokio::spawn(crate::drain::serve_agent(
            listener,
            supervisor.shared.board.clone(),
        )));
    }

    if let Some(addr) = listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let limits = api::tcp::Limits::from_config(&config.api);
        // Read-only over TCP: `GET /v1/wal` only, never push, fetch or backups.
        let read_router: Router = api::read_routes()
            .merge(api::socket_only_routes())
            .fallback(api::not_served_on_tcp)
            .layer(axum::middleware::map_response(api::json_rejections))
            .with_state(state.clone())
            .merge(wal_status_router());
        let tcp_router: Router = api::tcp::harden(read_router, tokens.clone(), limits);
        api::tcp::raise_fd_limit();
        tracing::info!(
            listen = %addr,
            token = tokens.required(),
            tls = tls.is_some(),
            client_certificates = config.api.tls_client_ca.is_some(),
            "API listening."
        );
        tasks.push(tokio::spawn(api::tcp::serve(
            listener, tcp_router, limits, tls,
        )));
    }
    tasks.extend(coordinator_task);

    crate::systemd::ready(&status_line(&supervisor, &state.sync).await);
    events.record(
        None,
        "daemon_started",
        None,
        &format!("fleet-agentd {} started", env!("CARGO_PKG_VERSION")),
    );

    wait_for_signals(
        &supervisor,
        &config,
        &source,
        config_text.as_deref(),
        &state.sync,
        &tokens,
    )
    .await?;

    crate::systemd::stopping();
    supervisor.shutdown().await;
    events.record(
        None,
        "daemon_stopped",
        None,
        "fleet-agentd stopping; containers keep running",
    );
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// `<id>.<field>` with the file that defines department `<id>` in front, so
/// a node-wide refusal (memory, ports) names the file to edit too.
fn in_file(field: &str, desired: &crate::desired::Desired) -> String {
    let Some((id, rest)) = field.split_once('.') else {
        return field.to_string();
    };
    match desired.files.get(id) {
        Some((_, path)) => {
            // file:line:column of the key at fault, as the parse refusals say
            // it (a list element is found by its key).
            let key = rest.split('[').next().unwrap_or(rest);
            let at = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| fleet_model::located::locate_toml(&text, key));
            format!(
                "{}: {field}",
                fleet_model::located::at_prefix(&path.display().to_string(), at)
            )
        }
        None => field.to_string(),
    }
}

/// Standalone mode's load of both spec directories (start and SIGHUP). A
/// refusal changes nothing: the departments keep their last applied specs and
/// go on being supervised; it is reported as an event, in `/v1/node`
/// (`agentctl doctor`), in `fleet_agent_desired_state_valid` and on the unit's
/// STATUS line until a later load succeeds.
async fn load_desired(supervisor: &Supervisor, config: &Config, sync: &RwLock<SyncStatus>) {
    let sources = crate::desired::Sources::of(config);
    let outcome = match crate::desired::load(&sources) {
        Ok(desired) => {
            let count = desired.specs.len();
            match supervisor.apply(desired.specs.clone(), true).await {
                Ok(report) => Ok((count, report)),
                Err(crate::supervisor::SupervisorError::Invalid(fields)) => Err(fields
                    .iter()
                    .map(|f| format!("{}: {}", in_file(&f.field, &desired), f.message))
                    .collect::<Vec<_>>()
                    .join("; ")),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    let loaded_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let status = match outcome {
        Ok((count, report)) => {
            tracing::info!(
                departments = count,
                created = report.created.len(),
                updated = report.updated.len(),
                deleted = report.deleted.len(),
                "Loaded {} and {}.",
                sources.hand_written.display(),
                sources.applied.display()
            );
            fleet_model::api::DesiredStateStatus {
                valid: true,
                problem: None,
                loaded_at,
            }
        }
        Err(problem) => {
            tracing::error!(
                error = %problem,
                "Desired state refused; the departments keep their last applied specs and stay supervised."
            );
            supervisor.shared.events.record(
                None,
                "desired_state_refused",
                Some("invalid"),
                &format!(
                    "desired state refused, the departments keep their last applied specs: {problem}"
                ),
            );
            fleet_model::api::DesiredStateStatus {
                valid: false,
                problem: Some(problem),
                loaded_at,
            }
        }
    };
    if let Ok(mut sync) = sync.write() {
        sync.desired_state = Some(status);
    }
}

/// The unit's STATUS= line: what runs, and loudly when the desired state is refused.
async fn status_line(supervisor: &Supervisor, sync: &RwLock<SyncStatus>) -> String {
    let mut running = format!("supervising {} departments", supervisor.specs().len());
    if let Some(rebuilt) = &supervisor.state_rebuilt {
        running.push_str(&format!(
            "; state.db was {} and was rebuilt from Docker labels ({} recovered){}; see agentctl doctor",
            if rebuilt.reason == "corrupt" {
                "unreadable"
            } else {
                "missing"
            },
            rebuilt.recovered.len(),
            rebuilt
                .moved_to
                .as_deref()
                .map(|p| format!(", old file kept as {p}"))
                .unwrap_or_default()
        ));
    }
    let refused = sync
        .read()
        .ok()
        .and_then(|s| s.desired_state.clone())
        .and_then(|d| d.problem);
    match refused {
        None => running,
        Some(problem) => {
            // systemctl status shows one line; the journal and doctor have it all.
            let mut short: String = problem.chars().take(300).collect();
            if short.len() < problem.len() {
                short.push_str("...");
            }
            format!("{running}; desired state REFUSED, last applied specs kept: {short}")
        }
    }
}

/// `fleet_agent_desired_state_valid`: 1 while the last load of the spec
/// directories was accepted (always 1 in coordinator mode, whose refusals
/// have their own metric), 0 while it is refused.
fn desired_state_metric(sync: Arc<RwLock<SyncStatus>>) -> api::MetricsSource {
    Arc::new(move |out: &mut String| {
        let valid = sync
            .read()
            .ok()
            .and_then(|s| s.desired_state.as_ref().map(|d| d.valid))
            .unwrap_or(true);
        out.push_str("# HELP fleet_agent_desired_state_valid 1 when the last load of departments_dir and the applied specs was accepted; 0 while refused (the departments keep their last applied specs).\n# TYPE fleet_agent_desired_state_valid gauge\n");
        out.push_str(&format!(
            "fleet_agent_desired_state_valid {}\n",
            u8::from(valid)
        ));
    })
}

fn config_file_text(source: &ConfigSource) -> Option<String> {
    match source {
        ConfigSource::File(path) => std::fs::read_to_string(path).ok(),
        ConfigSource::EmbeddedDefault => None,
    }
}

/// SIGHUP's half about `agent.toml`: the file is read and checked whole again.
/// A bad file is refused and nothing changes; `[log] level` takes effect at once;
/// every other setting that changed is named as applying at the next restart,
/// since the listeners, the store and the port pool are built from it at start.
fn reread_config(path: &std::path::Path, source: &ConfigSource, start_text: Option<&str>) {
    let new = match Config::load_file(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(config = %path.display(), "Reload refused: {e}; the running configuration is unchanged.");
            return;
        }
    };
    if let Err(problems) = check_config(&new, source, CheckScope::ConfigOnly) {
        tracing::error!(
            config = %path.display(),
            "Reload refused: {}; the running configuration is unchanged.",
            problems.join("; ")
        );
        return;
    }
    // Compared with the file as it was at start (not with the running config,
    // which `--log-format` may have overridden).
    let Some(old) = start_text.and_then(|text| Config::from_toml_str(path, text).ok()) else {
        return;
    };
    let (Ok(serde_json::Value::Object(old_fields)), Ok(serde_json::Value::Object(new_fields))) =
        (serde_json::to_value(&old), serde_json::to_value(&new))
    else {
        return;
    };
    let mut needs_restart: Vec<String> = Vec::new();
    // Every key of either side, so a table removed from the file counts too.
    let keys: std::collections::BTreeSet<&String> =
        old_fields.keys().chain(new_fields.keys()).collect();
    for key in keys {
        let old_value = old_fields.get(key).unwrap_or(&serde_json::Value::Null);
        let new_value = new_fields.get(key).unwrap_or(&serde_json::Value::Null);
        if key == "log" {
            if old.log.format != new.log.format {
                needs_restart.push("log.format".into());
            }
        } else if old_value != new_value {
            needs_restart.push(key.clone());
        }
    }
    if old.log.level != new.log.level {
        match crate::logging::set_level(&new.log.level) {
            Ok(crate::logging::LevelChange::Applied) => {
                tracing::info!(config = %path.display(), level = %new.log.level, "Reload: log level is now {}.", new.log.level)
            }
            Ok(crate::logging::LevelChange::OverriddenByRustLog) => tracing::warn!(
                "Reload: [log] level changed, but RUST_LOG is set and keeps deciding the level."
            ),
            Err(e) => tracing::warn!("Reload: could not change the log level: {e}"),
        }
    }
    if needs_restart.is_empty() {
        tracing::info!(config = %path.display(), "Reload: {} re-read and valid.", path.display());
    } else {
        tracing::warn!(
            config = %path.display(),
            "{} changed since the daemon started ({}); a reload does not apply that, a restart does (systemctl restart fleet-agentd; containers keep running).",
            path.display(),
            needs_restart.join(", ")
        );
    }
}

/// SIGHUP's half about the API token file: read again, so a token is rotated
/// without a restart. A bad file (missing, open to others, empty, more than
/// two tokens) is refused loudly and the tokens in force stay.
fn reload_tokens(tokens: &api::tcp::Tokens) {
    let Some(path) = tokens.path() else {
        return;
    };
    match tokens.reload() {
        Ok(count) => tracing::info!(
            token_file = %path.display(),
            tokens = count,
            "Reload: API token file re-read; {count} token(s) accepted."
        ),
        Err(e) => tracing::error!(
            token_file = %path.display(),
            "Reload: API token file refused, the tokens in force stay: {e}"
        ),
    }
}

async fn wait_for_signals(
    supervisor: &Supervisor,
    config: &Config,
    source: &ConfigSource,
    config_text: Option<&str>,
    sync: &RwLock<SyncStatus>,
    tokens: &api::tcp::Tokens,
) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                crate::systemd::reloading();
                tracing::info!(
                    "SIGHUP: re-reading {} and {}.",
                    config.departments_dir.display(),
                    config.applied_dir().display()
                );
                if let ConfigSource::File(path) = source {
                    reread_config(path, source, config_text);
                }
                reload_tokens(tokens);
                if config.coordinator.is_none() {
                    load_desired(supervisor, config, sync).await;
                }
                crate::systemd::ready(&status_line(supervisor, sync).await);
            }
        }
    }
}
