//! Memory admission of a whole desired state: the one decision both the
//! supervisor's apply and `fleet-agentd check-config` make, so an operator's
//! check reports the verdict the daemon will reach.
//!
//! Two sums, as Nomad (`memory` reserved, `memory_max` the ceiling) and kubelet
//! (requests scheduled against allocatable, limits allowed above it) split them:
//!
//! - **reservations** (`resources.memory_reservation`, Docker's
//!   MemoryReservation; defaults to `resources.memory`) must fit the budget,
//!   host memory minus `reserved_memory`: what the departments are promised;
//! - **hard limits** (`resources.memory`, Docker's Memory) must fit the budget
//!   times `memory_oversubscription` (1.0 by default: limits fit the budget
//!   too, nothing is oversubscribed unless the operator says so).
//!
//! A spec without `resources.memory` has no hard limit in Docker; it counts
//! as `department_memory_default` in both sums (at least its reservation), so
//! it never counts as nothing. Every sum saturates.

use fleet_model::size::ByteSize;
use fleet_model::spec::FieldError;
use fleet_model::{Config, DepartmentSpec};

/// The node's side of the decision, from `agent.toml` and the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node {
    pub host_memory: u64,
    pub reserved_memory: u64,
    pub oversubscription: f64,
    pub default_memory: u64,
}

impl Node {
    /// `host_memory` must be read as the daemon reads it
    /// (`crate::host::total_memory_bytes`).
    pub fn of(config: &Config, host_memory: u64) -> Self {
        Self {
            host_memory,
            reserved_memory: config.reserved_memory.bytes(),
            oversubscription: config.memory_oversubscription,
            default_memory: config.department_memory_default.bytes(),
        }
    }

    /// What the departments' reservations may add up to.
    pub fn budget(&self) -> u64 {
        self.host_memory.saturating_sub(self.reserved_memory)
    }

    /// What their hard limits may add up to.
    pub fn limit_ceiling(&self) -> u64 {
        // f64 keeps 53 bits: exact for any memory size a host has.
        let ceiling = self.budget() as f64 * self.oversubscription.max(1.0);
        if ceiling >= u64::MAX as f64 {
            u64::MAX
        } else {
            ceiling as u64
        }
    }
}

/// What one spec counts as: (reservation, hard limit).
pub fn counted(spec: &DepartmentSpec, node: &Node) -> (u64, u64) {
    let limit = spec.resources.memory.map(ByteSize::bytes);
    let reservation = spec
        .resources
        .memory_reservation
        .map(ByteSize::bytes)
        .or(limit)
        .unwrap_or(node.default_memory);
    (
        reservation,
        limit.unwrap_or(node.default_memory.max(reservation)),
    )
}

/// Sizes in messages: one decimal of GiB reads at a glance ("15.6 GiB").
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The sums of an admitted set, for `check-config` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub reserved: u64,
    pub budget: u64,
    pub limits: u64,
    pub ceiling: u64,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory reservations {} of {} budget, hard limits {} of {}",
            gib(self.reserved),
            gib(self.budget),
            gib(self.limits),
            gib(self.ceiling)
        )
    }
}

/// Admits `next`, the node's whole set of departments after a change, or
/// names the department that asks for the most and what to lower: the biggest
/// of those `changing` (the ones the change brings, so an apply of one spec
/// is not blamed on a department it did not touch), else of the whole set.
pub fn admit<'a>(
    next: impl IntoIterator<Item = &'a DepartmentSpec>,
    changing: impl Fn(&str) -> bool,
    node: &Node,
) -> Result<Verdict, Vec<FieldError>> {
    let mut reserved = 0u64;
    let mut limits = 0u64;
    // (changing, amount, id): the greatest is blamed.
    let mut biggest_reservation: Option<(bool, u64, &str)> = None;
    let mut biggest_limit: Option<(bool, u64, &str)> = None;
    for spec in next {
        let (r, l) = counted(spec, node);
        reserved = reserved.saturating_add(r);
        limits = limits.saturating_add(l);
        let changed = changing(&spec.id);
        if biggest_reservation.is_none_or(|b| (changed, r) > (b.0, b.1)) {
            biggest_reservation = Some((changed, r, &spec.id));
        }
        if biggest_limit.is_none_or(|b| (changed, l) > (b.0, b.1)) {
            biggest_limit = Some((changed, l, &spec.id));
        }
    }
    let verdict = Verdict {
        reserved,
        budget: node.budget(),
        limits,
        ceiling: node.limit_ceiling(),
    };
    let mut problems = Vec::new();
    if reserved > verdict.budget {
        let culprit = biggest_reservation.map(|b| b.2).unwrap_or_default();
        problems.push(FieldError::new(
            format!("{culprit}.resources.memory_reservation"),
            format!(
                "memory reservations would total {} but this host has {} for departments (host memory {} minus reserved_memory {}); lower resources.memory_reservation (or resources.memory where it is not set), or run fewer departments here",
                gib(reserved),
                gib(verdict.budget),
                gib(node.host_memory),
                ByteSize(node.reserved_memory)
            ),
        ));
    }
    if limits > verdict.ceiling {
        let culprit = biggest_limit.map(|b| b.2).unwrap_or_default();
        problems.push(FieldError::new(
            format!("{culprit}.resources.memory"),
            format!(
                "memory limits would total {} but may reach {} (the {} budget times memory_oversubscription {}); lower resources.memory, or raise memory_oversubscription in agent.toml",
                gib(limits),
                gib(verdict.ceiling),
                gib(verdict.budget),
                node.oversubscription
            ),
        ));
    }
    if problems.is_empty() {
        Ok(verdict)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;

    fn spec(id: &str, memory: Option<u64>, reservation: Option<u64>) -> DepartmentSpec {
        let mut text = format!("id = \"{id}\"\nimage = \"a:1\"\n[resources]\n");
        if let Some(m) = memory {
            text.push_str(&format!("memory = \"{}MiB\"\n", m / MIB));
        }
        if let Some(r) = reservation {
            text.push_str(&format!("memory_reservation = \"{}MiB\"\n", r / MIB));
        }
        DepartmentSpec::from_toml("t", &text).unwrap()
    }

    /// A 16 GB VPS as the kernel reports it (MemTotal of such hosts is a little
    /// under 16 GiB), with the default reserved_memory of 2 GiB.
    fn vps(oversubscription: f64) -> Node {
        Node {
            host_memory: 15_990 * MIB,
            reserved_memory: 2 * GIB,
            oversubscription,
            default_memory: 512 * MIB,
        }
    }

    fn seed_packing(reservation: Option<u64>) -> Vec<DepartmentSpec> {
        (0..10)
            .map(|i| spec(&format!("d{i}"), Some(1600 * MIB), reservation))
            .collect()
    }

    #[test]
    fn ten_at_1600mib_with_hard_limits_only_are_refused_naming_the_field() {
        let err = admit(&seed_packing(None), |_| false, &vps(1.0)).unwrap_err();
        let text = fleet_model::spec::join_fields(&err);
        assert!(
            text.contains(
                "d0.resources.memory_reservation: memory reservations would total 15.6 GiB"
            ),
            "{text}"
        );
        assert!(
            text.contains("d0.resources.memory: memory limits"),
            "{text}"
        );
    }

    #[test]
    fn ten_at_1600mib_limit_1200mib_reserved_fit_with_oversubscription() {
        let verdict = admit(&seed_packing(Some(1200 * MIB)), |_| false, &vps(1.25)).unwrap();
        assert_eq!(verdict.reserved, 12_000 * MIB);
        assert_eq!(verdict.limits, 16_000 * MIB);
        assert!(verdict.limits <= verdict.ceiling && verdict.reserved <= verdict.budget);
        // Without the oversubscription the same reservations still fail on limits.
        let err = admit(&seed_packing(Some(1200 * MIB)), |_| false, &vps(1.0)).unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].field, "d0.resources.memory");
        // Reservations alone do not make room: 10 x 1500 MiB is over 13.6 GiB.
        let err = admit(&seed_packing(Some(1500 * MIB)), |_| false, &vps(1.25)).unwrap_err();
        assert_eq!(err[0].field, "d0.resources.memory_reservation");
    }

    #[test]
    fn a_spec_without_memory_counts_as_the_default_never_as_nothing() {
        let node = vps(1.0);
        assert_eq!(
            counted(&spec("aa", None, None), &node),
            (512 * MIB, 512 * MIB)
        );
        assert_eq!(
            counted(&spec("bb", None, Some(700 * MIB)), &node),
            (700 * MIB, 700 * MIB)
        );
        let many: Vec<DepartmentSpec> = (0..28)
            .map(|i| spec(&format!("n{i}"), None, None))
            .collect();
        let err = admit(&many, |_| false, &node).unwrap_err();
        assert!(err[0].message.contains("14.0 GiB"), "{}", err[0].message);
        assert!(admit(&many[..27], |_| false, &node).is_ok());
    }

    #[test]
    fn the_department_being_applied_is_blamed_before_one_it_did_not_touch() {
        // 13000 MiB reserved already; the newcomer's 1000 MiB crosses 13942 MiB.
        let mut node_set = seed_packing(Some(1300 * MIB));
        node_set.push(spec("newcomer", Some(1000 * MIB), Some(1000 * MIB)));
        let node = vps(1.25);
        let err = admit(&node_set, |id| id == "newcomer", &node).unwrap_err();
        assert_eq!(
            err[0].field, "newcomer.resources.memory_reservation",
            "{err:?}"
        );
        let err = admit(&node_set, |_| false, &node).unwrap_err();
        assert_eq!(err[0].field, "d0.resources.memory_reservation", "{err:?}");
    }

    #[test]
    fn sums_saturate_and_a_tiny_host_refuses_instead_of_wrapping() {
        let node = Node {
            host_memory: u64::MAX,
            reserved_memory: 0,
            oversubscription: 4.0,
            default_memory: u64::MAX,
        };
        let specs = [spec("aa", None, None), spec("bb", None, None)];
        let verdict = admit(&specs, |_| false, &node).unwrap();
        assert_eq!(verdict.reserved, u64::MAX);
        assert_eq!(verdict.ceiling, u64::MAX);
        let small = Node {
            host_memory: GIB,
            ..vps(1.0)
        };
        assert_eq!(small.budget(), 0);
        assert!(admit(&[spec("aa", Some(64 * MIB), None)], |_| false, &small).is_err());
        assert!(admit(&[], |_| false, &small).is_ok());
    }
}
