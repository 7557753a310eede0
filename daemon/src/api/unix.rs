//! The local control socket. Each connection's peer credentials decide once who
//! the caller is (root / the daemon's user / the admin group: everything; the
//! PostgreSQL user: WAL push and fetch; anyone else: refused). The socket file is
//! world-connectable on purpose: the credential check is the gate, so the
//! PostgreSQL user can reach it without joining the admin group.

use super::Caller;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
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

/// Who may do what, resolved from names once at start.
#[derive(Debug, Clone)]
pub struct Policy {
    pub own_uid: u32,
    pub admin_gid: Option<u32>,
    pub admin_members: Vec<String>,
    pub wal_uid: Option<u32>,
}

impl Policy {
    pub fn resolve(admin_group: &str, postgres_user: Option<&str>) -> Self {
        let group = nix::unistd::Group::from_name(admin_group).ok().flatten();
        Self {
            own_uid: nix::unistd::geteuid().as_raw(),
            admin_gid: group.as_ref().map(|g| g.gid.as_raw()),
            admin_members: group.map(|g| g.mem).unwrap_or_default(),
            wal_uid: postgres_user
                .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
                .map(|u| u.uid.as_raw()),
        }
    }

    pub fn classify(&self, uid: u32, gid: u32) -> Caller {
        if uid == 0 || uid == self.own_uid {
            return Caller::Admin;
        }
        if self.admin_gid == Some(gid) {
            return Caller::Admin;
        }
        if self.admin_gid.is_some() {
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name);
            if let Some(name) = name {
                if self.admin_members.contains(&name) {
                    return Caller::Admin;
                }
            }
        }
        if self.wal_uid == Some(uid) {
            return Caller::Wal;
        }
        Caller::Denied
    }
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

pub async fn serve(listener: UnixListener, router: Router, policy: Policy) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Accept on the control socket failed.");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let caller = match stream.peer_cred() {
            Ok(cred) => policy.classify(cred.uid(), cred.gid()),
            Err(_) => Caller::Denied,
        };
        let router = router.clone().layer(axum::Extension(caller));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    router.clone().oneshot(request.map(axum::body::Body::new))
                },
            );
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
