//! Sticky host-port allocation from the pool. Pure decisions: the caller says
//! which ports are leased and which are busy (held by some other process); this
//! module picks. A department keeps its lease for as long as it exists.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("host_port {port} is already used by department `{holder}`; pick another port or leave host_port out")]
    LeasedToOther { port: u16, holder: String },
    #[error(
        "host_port {port} is held by another process on this host; free it or pick another port"
    )]
    Busy { port: u16 },
    #[error(
        "host_port {port} is outside the [ports] range {low}-{high}, the only ports HAProxy and the firewall know; pick a port in {low}-{high} or leave host_port out"
    )]
    OutsidePool { port: u16, low: u16, high: u16 },
    #[error(
        "no free port left in the pool {low}-{high}; widen [ports] range or remove a department"
    )]
    PoolExhausted { low: u16, high: u16 },
}

#[derive(Debug, Clone)]
pub struct PortPool {
    pub low: u16,
    pub high: u16,
    /// port -> department
    leases: BTreeMap<u16, String>,
}

impl PortPool {
    pub fn new(low: u16, high: u16, leases: impl IntoIterator<Item = (u16, String)>) -> Self {
        Self {
            low,
            high,
            leases: leases.into_iter().collect(),
        }
    }

    pub fn lease_of(&self, department: &str) -> Option<u16> {
        self.leases
            .iter()
            .find(|(_, d)| d.as_str() == department)
            .map(|(p, _)| *p)
    }

    pub fn holder(&self, port: u16) -> Option<&str> {
        self.leases.get(&port).map(String::as_str)
    }

    pub fn leases(&self) -> &BTreeMap<u16, String> {
        &self.leases
    }

    /// Whether a new spec's explicit `host_port` is one of the pool's. Checked when
    /// a desired state is applied, not when the store is loaded at start, so a
    /// department applied before this rule keeps running and only a new apply is
    /// refused (visibly) until its spec is fixed.
    pub fn admit_explicit(&self, explicit: Option<u16>) -> Result<(), PortError> {
        match explicit {
            Some(port) if port < self.low || port > self.high => Err(PortError::OutsidePool {
                port,
                low: self.low,
                high: self.high,
            }),
            _ => Ok(()),
        }
    }

    /// Decides the port of `department`: its explicit `host_port` if it has one,
    /// else the lease it already holds, else the lowest free pool port that
    /// `is_busy` does not report as held by another process.
    pub fn assign(
        &mut self,
        department: &str,
        explicit: Option<u16>,
        is_busy: impl Fn(u16) -> bool,
    ) -> Result<u16, PortError> {
        let current = self.lease_of(department);
        let port = match explicit {
            Some(port) => {
                if let Some(holder) = self.holder(port) {
                    if holder != department {
                        return Err(PortError::LeasedToOther {
                            port,
                            holder: holder.to_string(),
                        });
                    }
                } else if is_busy(port) {
                    return Err(PortError::Busy { port });
                }
                port
            }
            None => match current {
                Some(port) => port,
                None => (self.low..=self.high)
                    .find(|p| !self.leases.contains_key(p) && !is_busy(*p))
                    .ok_or(PortError::PoolExhausted {
                        low: self.low,
                        high: self.high,
                    })?,
            },
        };
        if let Some(old) = current {
            self.leases.remove(&old);
        }
        self.leases.insert(port, department.to_string());
        Ok(port)
    }

    /// Records a lease found elsewhere (a container's host-port label).
    pub fn insert_lease(&mut self, port: u16, department: &str) {
        self.leases.insert(port, department.to_string());
    }

    /// Keeps only the leases of departments `keep` names.
    pub fn retain_departments(&mut self, keep: impl Fn(&str) -> bool) {
        self.leases.retain(|_, d| keep(d));
    }

    pub fn release(&mut self, department: &str) {
        self.leases.retain(|_, d| d != department);
    }

    pub fn free_count(&self) -> usize {
        (self.low..=self.high)
            .filter(|p| !self.leases.contains_key(p))
            .count()
    }
}

/// The ports of a whole desired state, decided on a copy of `current` so a
/// refusal changes nothing. `wanted` is (department, explicit host_port);
/// `keep` says which departments stay (the others' leases go, including
/// leases rebuilt from labels for departments the desired state dropped);
/// `removed` are departments this change deletes, whose ports are free for
/// the others although their containers still hold them (they are gone before
/// any new department starts): so a department renamed onto its own port in
/// one document is not refused. Explicit ports are placed first, so a pool
/// department never takes a port a later spec names. Returns the new pool,
/// the port of each department placed, and (department, explicit?, error)
/// for each refused.
#[allow(clippy::type_complexity)]
pub fn plan(
    current: &PortPool,
    wanted: &[(String, Option<u16>)],
    keep: impl Fn(&str) -> bool,
    removed: &[String],
    is_busy: impl Fn(u16) -> bool,
) -> (
    PortPool,
    BTreeMap<String, u16>,
    Vec<(String, bool, PortError)>,
) {
    let freed: std::collections::BTreeSet<u16> = removed
        .iter()
        .filter_map(|id| current.lease_of(id))
        .collect();
    let mut pool = current.clone();
    pool.retain_departments(|d| keep(d));
    let mut order: Vec<&(String, Option<u16>)> = wanted.iter().collect();
    order.sort_by_key(|(_, explicit)| explicit.is_none());
    let mut ports = BTreeMap::new();
    let mut refused = Vec::new();
    for (id, explicit) in order {
        let busy = |p: u16| !freed.contains(&p) && is_busy(p);
        match pool.assign(id, *explicit, busy) {
            Ok(port) => {
                ports.insert(id.clone(), port);
            }
            Err(e) => refused.push((id.clone(), explicit.is_some(), e)),
        }
    }
    (pool, ports, refused)
}

/// Whether another process holds `port` on `bind` (we try to bind it ourselves).
pub fn port_busy(bind: std::net::IpAddr, port: u16) -> bool {
    std::net::TcpListener::bind((bind, port)).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_ports_outside_the_pool_are_refused_naming_the_range() {
        let pool = PortPool::new(8001, 8010, []);
        let err = pool.admit_explicit(Some(22)).unwrap_err();
        assert_eq!(
            err,
            PortError::OutsidePool {
                port: 22,
                low: 8001,
                high: 8010
            }
        );
        assert!(err.to_string().contains("[ports] range 8001-8010"), "{err}");
        assert!(pool.admit_explicit(Some(8011)).is_err());
        assert!(pool.admit_explicit(Some(8001)).is_ok());
        assert!(pool.admit_explicit(Some(8010)).is_ok());
        assert!(pool.admit_explicit(None).is_ok());
    }

    #[test]
    fn leases_are_sticky_and_busy_ports_skipped() {
        let mut pool = PortPool::new(8001, 8003, []);
        assert_eq!(pool.assign("a", None, |p| p == 8001).unwrap(), 8002);
        assert_eq!(pool.assign("b", None, |_| false).unwrap(), 8001);
        // A busy report later does not move a department off its lease.
        assert_eq!(pool.assign("a", None, |_| true).unwrap(), 8002);
        assert_eq!(pool.assign("c", None, |_| false).unwrap(), 8003);
        assert_eq!(
            pool.assign("d", None, |_| false).unwrap_err(),
            PortError::PoolExhausted {
                low: 8001,
                high: 8003
            }
        );
        pool.release("b");
        assert_eq!(pool.assign("d", None, |_| false).unwrap(), 8001);
    }

    fn want(id: &str, explicit: Option<u16>) -> (String, Option<u16>) {
        (id.to_string(), explicit)
    }

    #[test]
    fn a_rename_onto_the_same_port_in_one_document_is_placed() {
        // `old` holds 8005 and its container still runs (busy to the OS).
        let current = PortPool::new(8001, 8010, [(8005, "old".to_string())]);
        let busy = |p: u16| p == 8005;
        let (pool, ports, refused) = plan(
            &current,
            &[want("new", Some(8005))],
            |d| d == "new",
            &["old".to_string()],
            busy,
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(ports["new"], 8005);
        assert_eq!(pool.holder(8005), Some("new"));
        assert_eq!(pool.lease_of("old"), None);
        // Without the removal the same port is someone else's.
        let (_, _, refused) = plan(
            &current,
            &[want("new", Some(8005))],
            |d| d == "new" || d == "old",
            &[],
            busy,
        );
        assert!(matches!(refused[0].2, PortError::LeasedToOther { .. }));
    }

    #[test]
    fn a_departments_own_lease_is_never_busy_and_dropped_ones_free_their_port() {
        // Leases rebuilt from labels: `a` (explicit 8007, held by its own
        // container) and `gone` (no longer in the desired state).
        let current = PortPool::new(
            8001,
            8010,
            [(8007, "a".to_string()), (8001, "gone".to_string())],
        );
        let busy = |p: u16| p == 8007 || p == 8001;
        let (pool, ports, refused) = plan(
            &current,
            &[want("a", Some(8007)), want("b", None)],
            |d| d == "a" || d == "b",
            &[],
            busy,
        );
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(ports["a"], 8007);
        // 8001 is no one's lease any more but still busy to the OS: skipped.
        assert_eq!(ports["b"], 8002);
        assert_eq!(pool.lease_of("gone"), None);
    }

    #[test]
    fn explicit_ports_are_placed_before_pool_ports() {
        let current = PortPool::new(8001, 8002, []);
        let (_, ports, refused) = plan(
            &current,
            &[want("pool", None), want("named", Some(8001))],
            |_| true,
            &[],
            |_| false,
        );
        assert!(refused.is_empty());
        assert_eq!((ports["named"], ports["pool"]), (8001, 8002));
    }

    #[test]
    fn explicit_ports_must_be_free() {
        let mut pool = PortPool::new(8001, 8010, [(8005, "x".to_string())]);
        assert!(matches!(
            pool.assign("a", Some(8005), |_| false),
            Err(PortError::LeasedToOther { port: 8005, .. })
        ));
        assert_eq!(
            pool.assign("a", Some(9000), |_| true).unwrap_err(),
            PortError::Busy { port: 9000 }
        );
        assert_eq!(pool.assign("x", Some(8005), |_| true).unwrap(), 8005);
    }
}
