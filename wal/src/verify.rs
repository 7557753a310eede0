//! `agentctl wal verify`: walks the archive from the oldest kept base backup's
//! first segment to the newest segment, as WAL-G's `wal-verify` does, and
//! reports gaps, timeline switches and objects whose checksum fails. The walk
//! over names is pure ([`walk`]); the service fetches and decodes every object.

use crate::names;
use crate::service::{now_unix, WalError, WalService};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TimelineSwitch {
    pub from: u32,
    pub to: u32,
    /// The first segment on the new timeline.
    pub at: String,
    /// Whether `<to>.history` is archived (recovery across the switch needs it).
    pub history_archived: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChecksumFailure {
    pub name: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct Walk {
    /// The first segment the walk expects (the oldest kept base backup's `start_wal`).
    pub from: Option<String>,
    /// The newest segment in the archive.
    pub to: Option<String>,
    /// Segments present in the walked range.
    pub segments: u64,
    /// Segments missing in the walked range, by the name they would have.
    pub gaps: Vec<String>,
    pub timeline_switches: Vec<TimelineSwitch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub system_identifier: String,
    /// The base backup the walk starts from (none: the archive has none, and
    /// the walk starts at its oldest segment).
    pub base_backup: Option<String>,
    #[serde(flatten)]
    pub walk: Walk,
    /// Objects checked (segments, `.partial`, `.history`, `.backup` files).
    pub objects_checked: u64,
    pub checksum_failures: Vec<ChecksumFailure>,
    pub ok: bool,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn problems(&self) -> u64 {
        (self.walk.gaps.len()
            + self.checksum_failures.len()
            + self
                .walk
                .timeline_switches
                .iter()
                .filter(|s| !s.history_archived)
                .count()) as u64
    }
}

/// (timeline, linear segment number) of a segment name with `segment_bytes`
/// segments; the linear number counts every segment (256 per log file at 16 MiB).
pub fn split(segment: &str, segment_bytes: u64) -> Option<(u32, u64)> {
    if names::classify(segment) != Some(names::WalKind::Segment)
        || !names::is_segment_size(segment_bytes)
    {
        return None;
    }
    let per_log = (1u64 << 32) / segment_bytes;
    let tli = u32::from_str_radix(&segment[..8], 16).ok()?;
    let log = u64::from_str_radix(&segment[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&segment[16..24], 16).ok()?;
    Some((tli, log * per_log + seg))
}

fn name_of(tli: u32, linear: u64, segment_bytes: u64) -> String {
    let per_log = (1u64 << 32) / segment_bytes;
    format!("{tli:08X}{:08X}{:08X}", linear / per_log, linear % per_log)
}

/// The walk over archived names (without `.zst`): from `start` (default: the
/// oldest segment) to the newest segment, following the highest timeline at
/// each position. A position with no segment on the current timeline or a
/// newer one is a gap; a newer timeline is a switch, which needs its
/// `.history` file.
pub fn walk(archived: &[String], start: Option<&str>, segment_bytes: u64) -> Walk {
    let mut by_position: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
    let mut histories = BTreeSet::new();
    for name in archived {
        match names::classify(name) {
            Some(names::WalKind::Segment) => {
                if let Some((tli, pos)) = split(name, segment_bytes) {
                    by_position.entry(pos).or_default().insert(tli);
                }
            }
            Some(names::WalKind::History) => {
                if let Ok(tli) = u32::from_str_radix(&name[..8], 16) {
                    histories.insert(tli);
                }
            }
            _ => {}
        }
    }
    let mut out = Walk::default();
    let (Some((&first, _)), Some((&last, last_tlis))) =
        (by_position.first_key_value(), by_position.last_key_value())
    else {
        out.from = start.map(str::to_string);
        if let Some(start) = start {
            out.gaps.push(start.to_string());
        }
        return out;
    };
    let (mut tli, begin) = match start.and_then(|s| split(s, segment_bytes)) {
        Some((t, p)) => (t, p),
        None => (*by_position[&first].iter().next().unwrap_or(&1), first),
    };
    out.from = Some(name_of(tli, begin, segment_bytes));
    out.to = Some(name_of(
        *last_tlis.iter().last().unwrap_or(&tli),
        last,
        segment_bytes,
    ));
    for pos in begin..=last.max(begin) {
        let best = by_position
            .get(&pos)
            .and_then(|tlis| tlis.range(tli..).last().copied());
        match best {
            None => out.gaps.push(name_of(tli, pos, segment_bytes)),
            Some(t) => {
                if t > tli {
                    out.timeline_switches.push(TimelineSwitch {
                        from: tli,
                        to: t,
                        at: name_of(t, pos, segment_bytes),
                        history_archived: histories.contains(&t),
                    });
                    tli = t;
                }
                out.segments += 1;
            }
        }
    }
    out
}

impl WalService {
    /// Verifies cluster `sysid`'s archive (default: the configured cluster's).
    /// Every object from the walk's first segment on is fetched and its
    /// checksum checked (SHA-256 for FWAL1 objects, BLAKE3 for FWAL2). The
    /// result is also kept for `/metrics`.
    pub async fn verify(&self, sysid: Option<u64>) -> Result<VerifyReport, WalError> {
        let began = std::time::Instant::now();
        let sysid = self.resolve_sysid(sysid)?;
        let backups = self.list_backups(sysid).await?;
        let oldest = backups.first();
        let segment_bytes = oldest.map_or(names::DEFAULT_SEGMENT_BYTES, |m| m.wal_segment_bytes);
        let prefix = format!("{sysid}/wal/");
        let mut archived: Vec<String> = self
            .target
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|e| {
                e.key
                    .strip_prefix(&prefix)
                    .and_then(|k| k.strip_suffix(".zst"))
                    .map(str::to_string)
            })
            .filter(|n| names::is_valid(n))
            .collect();
        archived.sort();
        let start = oldest.map(|m| m.start_wal.clone());
        let walk = walk(&archived, start.as_deref(), segment_bytes);
        let from = walk
            .from
            .as_deref()
            .and_then(|f| split(f, segment_bytes))
            .map(|(_, p)| p);
        let mut checked = 0;
        let mut failures = Vec::new();
        for name in &archived {
            // History files are kept forever and always checked; WAL before
            // the walk's start is retention's to delete, not a restore's need.
            let before = names::segment_of(name)
                .and_then(|s| split(s, segment_bytes))
                .zip(from)
                .is_some_and(|((_, p), f)| p < f);
            if before {
                continue;
            }
            checked += 1;
            let key = format!("{prefix}{name}.zst");
            match self.target.get(&key).await {
                Ok(Some(object)) => {
                    // Decoded into nothing: only the checksum is wanted, not 16 MiB in memory.
                    let decoded = crate::service::blocking(move || {
                        Ok(crate::codec::decode_to(&object, &mut std::io::sink()).map(|_| ()))
                    })
                    .await?;
                    if let Err(e) = decoded {
                        failures.push(ChecksumFailure {
                            name: name.clone(),
                            error: e.to_string(),
                        });
                    }
                }
                Ok(None) => failures.push(ChecksumFailure {
                    name: name.clone(),
                    error: "listed but gone when read".into(),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        let mut report = VerifyReport {
            system_identifier: sysid.to_string(),
            base_backup: oldest.map(|m| m.id.clone()),
            walk,
            objects_checked: checked,
            checksum_failures: failures,
            ok: false,
            seconds: began.elapsed().as_secs_f64(),
        };
        report.ok = report.problems() == 0 && report.walk.to.is_some();
        let c = &self.counters;
        c.verify_ok.store(u64::from(report.ok), Ordering::Relaxed);
        c.verify_problems
            .store(report.problems(), Ordering::Relaxed);
        c.verify_unix.store(now_unix(), Ordering::Relaxed);
        self.save_verify_mark();
        if !report.ok {
            (self.events)(
                "wal_verify_failed",
                &format!(
                    "archive of cluster {sysid} from {} to {}: {} gap(s){}, {} checksum failure(s){}, {} timeline switch(es) without .history",
                    report.walk.from.as_deref().unwrap_or("-"),
                    report.walk.to.as_deref().unwrap_or("-"),
                    report.walk.gaps.len(),
                    report.walk.gaps.first().map(|g| format!(" (first {g})")).unwrap_or_default(),
                    report.checksum_failures.len(),
                    report.checksum_failures.first().map(|f| format!(" (first {})", f.name)).unwrap_or_default(),
                    report.walk.timeline_switches.iter().filter(|s| !s.history_archived).count(),
                ),
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const MIB16: u64 = 16 << 20;

    #[test]
    fn an_unbroken_archive_across_a_log_file_boundary_has_no_gap() {
        let walk = walk(
            &names(&[
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
            ]),
            Some("0000000100000000000000FE"),
            MIB16,
        );
        assert_eq!(walk.gaps, Vec::<String>::new());
        assert_eq!(walk.segments, 3);
        assert_eq!(walk.to.as_deref(), Some("000000010000000100000000"));
    }

    #[test]
    fn a_missing_segment_is_named_and_so_is_a_missing_start() {
        let archived = names(&["000000010000000000000003", "000000010000000000000005"]);
        let walk = walk(&archived, Some("000000010000000000000002"), MIB16);
        assert_eq!(
            walk.gaps,
            names(&["000000010000000000000002", "000000010000000000000004"])
        );
        // 64 MiB segments: 64 per log file, so 3F is followed by the next log's 00.
        let walk = super::walk(
            &names(&["00000001000000000000003F", "000000010000000100000001"]),
            None,
            64 << 20,
        );
        assert_eq!(walk.gaps, names(&["000000010000000100000000"]));
    }

    #[test]
    fn a_promotion_is_a_timeline_switch_that_needs_its_history() {
        let archived = names(&[
            "000000010000000000000003",
            "000000010000000000000004.partial",
            "000000020000000000000004",
            "000000020000000000000005",
            "00000002.history",
            "000000020000000000000006",
            "000000030000000000000006",
        ]);
        let walk = walk(&archived, Some("000000010000000000000003"), MIB16);
        assert!(walk.gaps.is_empty(), "{walk:?}");
        assert_eq!(
            walk.timeline_switches,
            vec![
                TimelineSwitch {
                    from: 1,
                    to: 2,
                    at: "000000020000000000000004".into(),
                    history_archived: true
                },
                TimelineSwitch {
                    from: 2,
                    to: 3,
                    at: "000000030000000000000006".into(),
                    history_archived: false
                },
            ]
        );
    }

    #[test]
    fn an_old_timeline_does_not_fill_a_gap_on_the_new_one() {
        let archived = names(&[
            "000000020000000000000004",
            "000000010000000000000005",
            "000000020000000000000006",
            "00000002.history",
        ]);
        let walk = walk(&archived, Some("000000020000000000000004"), MIB16);
        assert_eq!(walk.gaps, names(&["000000020000000000000005"]));
    }
}
