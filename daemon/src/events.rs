//! The event log: every department transition and node happening is appended to
//! the store with a sequence number (the `/v1/events` cursor), logged through
//! tracing with structured fields, and announced so long-polls wake at once.

use crate::store::Store;
use fleet_model::api::Event;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Clone)]
pub struct EventLog {
    store: Arc<Store>,
    latest: Arc<watch::Sender<i64>>,
}

impl EventLog {
    pub fn new(store: Arc<Store>) -> Self {
        let last = store.last_event_seq().unwrap_or(0);
        let (tx, _) = watch::channel(last);
        Self {
            store,
            latest: Arc::new(tx),
        }
    }

    /// Records one event. Messages must never contain a secret: callers build
    /// them from ids, states and Docker's answers, never from env values.
    pub fn record(
        &self,
        department: Option<&str>,
        kind: &str,
        reason: Option<&str>,
        message: &str,
    ) {
        match self.store.append_event(department, kind, reason, message) {
            Ok(event) => {
                tracing::info!(
                    department = department.unwrap_or(""),
                    event = kind,
                    reason = reason.unwrap_or(""),
                    seq = event.seq,
                    "{message}"
                );
                self.latest.send_replace(event.seq);
            }
            Err(e) => {
                tracing::error!(
                    department = department.unwrap_or(""),
                    event = kind,
                    error = %e,
                    "Could not record event: {message}"
                );
            }
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }

    pub fn latest(&self) -> i64 {
        *self.latest.borrow()
    }

    pub fn page(&self, after: i64, department: Option<&str>, limit: usize) -> Vec<Event> {
        self.store
            .events_after(after, department, limit)
            .unwrap_or_default()
    }

    /// The events of `after < seq <= upto` that pass the filter: the oldest
    /// `limit`, or with `newest` the newest `limit` (`agentctl events -n`).
    pub fn query(
        &self,
        range: (i64, i64),
        department: Option<&str>,
        since_ms: Option<i64>,
        limit: usize,
        newest: bool,
    ) -> Vec<Event> {
        self.store
            .events_matching(range, department, since_ms, limit, newest)
            .unwrap_or_default()
    }
}
