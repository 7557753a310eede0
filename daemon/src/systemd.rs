//! systemd's notify protocol (`Type=notify`): READY once the socket is bound and
//! the store open, STATUS lines, STOPPING, and the watchdog fed by the reconcile
//! loop, so a wedged loop gets the daemon restarted. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

pub fn reloading() {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
}

pub fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}
