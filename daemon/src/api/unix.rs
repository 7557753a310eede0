//! The local control socket. Each connection's peer credentials decide once who
//! the caller is (root / the daemon's user / the admin group: everything; the
//! PostgreSQL user: WAL push and fetch; anyone else: refused). The socket file is
//! world-connectable on purpose: the credential check is the gate, so the
//! PostgreSQL user can reach it without joining the admin group.

use super::Caller;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::net::UnixListener;
use tower::ServiceExt;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another fleet-agentd already answers on {0}; stop it first or pick another socket")]
    InUse(PathBuf),
}

/// Who may do what. Names are resolved when asked, not once at start: the
/// PostgreSQL user may be created after the daemon (the package installs
/// before PostgreSQL), and group membership is the caller's own at connect
/// time (its process's groups, and the group's member list read per
/// connection), so adding a user to the admin group works for its
/// next login without a restart of the daemon.
#[derive(Debug, Clone)]
pub struct Policy {
    pub own_uid: u32,
    admin_group: String,
    postgres_user: Option<String>,
}

/// What the kernel says about the caller of one connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the connecting process (empty when unknown).
    pub groups: Vec<u32>,
}

impl Policy {
    pub fn resolve(admin_group: &str, postgres_user: Option<&str>) -> Self {
        Self {
            own_uid: nix::unistd::geteuid().as_raw(),
            admin_group: admin_group.to_string(),
            postgres_user: postgres_user.map(str::to_string),
        }
    }

    /// This process's view of the socket's rules for the WAL socket: its own
    /// user is the PostgreSQL user there, not an admin.
    pub fn without_own_uid(mut self) -> Self {
        self.own_uid = 0;
        self
    }

    fn wal_uid(&self) -> Option<u32> {
        self.postgres_user
            .as_deref()
            .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
            .map(|u| u.uid.as_raw())
    }

    pub fn classify(&self, peer: &Peer) -> Caller {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return Caller::Admin;
        }
        // Read now, not at start: a group created or changed since is seen.
        if let Some(group) = nix::unistd::Group::from_name(&self.admin_group)
            .ok()
            .flatten()
        {
            let admin = group.gid.as_raw();
            if peer.gid == admin || peer.groups.contains(&admin) {
                return Caller::Admin;
            }
            if !group.mem.is_empty() {
                let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name);
                if name.is_some_and(|n| group.mem.contains(&n)) {
                    return Caller::Admin;
                }
            }
        }
        if self.wal_uid() == Some(peer.uid) {
            return Caller::Wal;
        }
        Caller::Denied
    }
}

/// The caller's credentials: uid, gid and pid from `SO_PEERCRED`, and the
/// supplementary groups the connecting process holds, from
/// `/proc/<pid>/status` (`SO_PEERGROUPS` needs a raw getsockopt, and this
/// crate forbids `unsafe`). The groups count only while that status still
/// names the peer's uid, so a pid reused by another user's process gives
/// nothing.
pub fn peer_of(stream: &tokio::net::UnixStream) -> Option<Peer> {
    let cred = stream.peer_cred().ok()?;
    let groups = cred
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| groups_of(&status, cred.uid()))
        .unwrap_or_default();
    Some(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    })
}

/// `Groups:` of a `/proc/<pid>/status`, if its real and effective uid are `uid`.
fn groups_of(status: &str, uid: u32) -> Vec<u32> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_whitespace)
    };
    let same_user = field("Uid:").is_some_and(|mut ids| {
        let (real, effective) = (ids.next(), ids.next());
        let uid = uid.to_string();
        real == Some(uid.as_str()) && effective == Some(uid.as_str())
    });
    if !same_user {
        return vec![];
    }
    field("Groups:")
        .map(|ids| ids.filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// The socket's limits. Each class of caller has its own pool, so a flood of
/// refused callers (any local user can connect: the socket is 0666) never
/// takes a slot the admin or the PostgreSQL user needs; within a pool one uid
/// gets at most `per_uid`. A connection over its pool's cap is closed at once.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    pub admin: usize,
    pub wal: usize,
    pub denied: usize,
    pub per_uid: usize,
    /// A request head must arrive within this; also how long an idle
    /// keep-alive connection stays open.
    pub header_timeout: std::time::Duration,
}

impl Default for SocketLimits {
    fn default() -> Self {
        Self {
            admin: 256,
            wal: 128,
            denied: 16,
            per_uid: 64,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Open connections per class and per uid; a `Slot` gives its place back when
/// the connection ends.
#[derive(Default)]
struct Counts {
    by_class: HashMap<u8, usize>,
    by_uid: HashMap<u32, usize>,
}

struct Slot {
    counts: Arc<Mutex<Counts>>,
    class: u8,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.by_class.get_mut(&self.class) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = counts.by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_uid.remove(&self.uid);
            }
        }
    }
}

fn class_of(caller: Caller) -> u8 {
    match caller {
        Caller::Admin => 0,
        Caller::Wal => 1,
        Caller::Remote | Caller::Denied => 2,
    }
}

fn take_slot(
    counts: &Arc<Mutex<Counts>>,
    limits: &SocketLimits,
    caller: Caller,
    uid: u32,
) -> Option<Slot> {
    let class = class_of(caller);
    let cap = match caller {
        Caller::Admin => limits.admin,
        Caller::Wal => limits.wal,
        Caller::Remote | Caller::Denied => limits.denied,
    };
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    let in_class = c.by_class.get(&class).copied().unwrap_or(0);
    let of_uid = c.by_uid.get(&uid).copied().unwrap_or(0);
    if in_class >= cap || of_uid >= limits.per_uid {
        return None;
    }
    *c.by_class.entry(class).or_default() += 1;
    *c.by_uid.entry(uid).or_default() += 1;
    Some(Slot {
        counts: counts.clone(),
        class,
        uid,
    })
}

pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let create = |source| SocketError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        // A socket file left by a daemon that died.
        std::fs::remove_file(path).map_err(create)?;
    }
    let listener = UnixListener::bind(path).map_err(create)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(create)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, router: Router, policy: Policy, limits: SocketLimits) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut refused = http.clone();
    // A refused caller gets its 403 and the connection is closed with it; it
    // has two seconds to say what it wants.
    refused
        .keep_alive(false)
        .header_read_timeout(limits.header_timeout.min(std::time::Duration::from_secs(2)));
    loop {
        // Never wait for a slot before accepting: the backlog is shared by
        // every caller, so waiting there would let a flood delay the admin.
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Accept on the control socket failed.");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = peer_of(&stream);
        let caller = match &peer {
            Some(p) => policy.classify(p),
            None => Caller::Denied,
        };
        let uid = peer.map(|p| p.uid).unwrap_or(u32::MAX);
        let Some(slot) = take_slot(&counts, &limits, caller, uid) else {
            tracing::debug!(
                uid,
                ?caller,
                "Control socket connection over its cap; closed."
            );
            drop(stream);
            continue;
        };
        let router = router.clone().layer(axum::Extension(caller));
        let http = if caller == Caller::Denied {
            refused.clone()
        } else {
            http.clone()
        };
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    router.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let _ = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_count_only_for_the_peers_own_process() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t27 998 1000 \n";
        assert_eq!(groups_of(status, 1000), vec![27, 998, 1000]);
        // The pid now belongs to someone else.
        assert!(groups_of(status, 1001).is_empty());
        let setuid = "Uid:\t1000\t0\t0\t0\nGroups:\t998\n";
        assert!(groups_of(setuid, 1000).is_empty());
    }

    #[test]
    fn a_flood_of_refused_callers_never_takes_an_admin_slot() {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let limits = SocketLimits {
            admin: 4,
            wal: 2,
            denied: 3,
            per_uid: 3,
            header_timeout: std::time::Duration::from_secs(1),
        };
        let nobody = 65534;
        let flood: Vec<Slot> = (0..100)
            .filter_map(|_| take_slot(&counts, &limits, Caller::Denied, nobody))
            .collect();
        assert_eq!(flood.len(), 3);
        // Other refused uids share the refused pool.
        assert!(take_slot(&counts, &limits, Caller::Denied, 1234).is_none());
        let admins: Vec<Slot> = (0..3)
            .filter_map(|_| take_slot(&counts, &limits, Caller::Admin, 0))
            .collect();
        assert_eq!(admins.len(), 3, "per uid");
        assert!(take_slot(&counts, &limits, Caller::Admin, 1000).is_some());
        assert!(take_slot(&counts, &limits, Caller::Wal, 110).is_some());
        drop(flood);
        assert!(take_slot(&counts, &limits, Caller::Denied, nobody).is_some());
    }

    #[test]
    fn root_and_the_daemons_user_are_admins_and_others_are_not() {
        let policy = Policy::resolve("fleet-agent-no-such-group", Some("no-such-postgres-user"));
        let peer = |uid| Peer {
            uid,
            gid: uid,
            groups: vec![],
        };
        assert_eq!(policy.classify(&peer(0)), Caller::Admin);
        assert_eq!(policy.classify(&peer(policy.own_uid)), Caller::Admin);
        assert_eq!(policy.classify(&peer(65534)), Caller::Denied);
        // The admin group counts through any supplementary group of the caller.
        let root_group = Policy::resolve("root", None);
        let member = Peer {
            uid: 65534,
            gid: 65534,
            groups: vec![0],
        };
        assert_eq!(root_group.classify(&member), Caller::Admin);
        assert_eq!(
            root_group.without_own_uid().classify(&peer(65534)),
            Caller::Denied
        );
    }
}
