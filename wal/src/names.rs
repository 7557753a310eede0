//! WAL file names. Only what PostgreSQL itself hands to `archive_command` is
//! accepted, so a name can never climb out of the archive's key space.

/// What kind of file a valid name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalKind {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`: a segment.
    Segment,
    /// `TTTTTTTT.history`: a timeline history file; kept forever.
    History,
    /// A segment name plus `.partial` (end of an old timeline after promotion).
    Partial,
    /// A segment name plus `.XXXXXXXX.backup` (backup history file).
    Backup,
}

fn is_upper_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn is_segment(s: &str) -> bool {
    s.len() == 24 && is_upper_hex(s)
}

/// Classifies a WAL file name; `None` for anything PostgreSQL would not archive
/// (paths, lower-case or non-hex digits, other suffixes).
pub fn classify(name: &str) -> Option<WalKind> {
    if is_segment(name) {
        return Some(WalKind::Segment);
    }
    if let Some(tli) = name.strip_suffix(".history") {
        return (tli.len() == 8 && is_upper_hex(tli)).then_some(WalKind::History);
    }
    if let Some(seg) = name.strip_suffix(".partial") {
        return is_segment(seg).then_some(WalKind::Partial);
    }
    if let Some(rest) = name.strip_suffix(".backup") {
        let (seg, offset) = rest.split_once('.')?;
        return (is_segment(seg) && offset.len() == 8 && is_upper_hex(offset))
            .then_some(WalKind::Backup);
    }
    None
}

pub fn is_valid(name: &str) -> bool {
    classify(name).is_some()
}

/// The segment a name belongs to (`None` for `.history`): retention compares these.
pub fn segment_of(name: &str) -> Option<&str> {
    match classify(name)? {
        WalKind::History => None,
        _ => name.get(..24),
    }
}

/// The position of a segment name ignoring its timeline (log and segment number):
/// WAL on a newer timeline continues the numbering of the old one.
pub fn position(segment: &str) -> Option<u64> {
    if !is_segment(segment) {
        return None;
    }
    let log = u64::from_str_radix(segment.get(8..16)?, 16).ok()?;
    let seg = u64::from_str_radix(segment.get(16..24)?, 16).ok()?;
    Some((log << 32) | seg)
}

/// PostgreSQL's default segment size; what an old manifest without
/// `wal_segment_bytes` was taken with.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 << 20;

/// A segment size PostgreSQL can have (`initdb --wal-segsize`): a power of two
/// from 1 MiB to 1 GiB.
pub fn is_segment_size(bytes: u64) -> bool {
    bytes.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&bytes)
}

/// Segments per log file (the middle 8 hex digits of a name count these).
fn segments_per_log(segment_bytes: u64) -> Option<u64> {
    is_segment_size(segment_bytes).then(|| (1u64 << 32) / segment_bytes)
}

/// The next `count` segment names after `segment` on the same timeline, for
/// prefetch, with `segment_bytes` segments (names skip differently: 256 per log
/// file at 16 MiB, 64 at 64 MiB).
pub fn next_segments(segment: &str, count: usize, segment_bytes: u64) -> Vec<String> {
    let Some(tli) = segment.get(..8).filter(|_| is_segment(segment)) else {
        return vec![];
    };
    let Some(per_log) = segments_per_log(segment_bytes) else {
        return vec![];
    };
    let (Ok(mut log), Ok(mut seg)) = (
        u32::from_str_radix(&segment[8..16], 16),
        u64::from_str_radix(&segment[16..24], 16),
    ) else {
        return vec![];
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        seg += 1;
        if seg >= per_log {
            seg = 0;
            log = match log.checked_add(1) {
                Some(l) => l,
                None => break,
            };
        }
        out.push(format!("{tli}{log:08X}{seg:08X}"));
    }
    out
}

/// The segment holding `lsn` (as PostgreSQL prints it, `0/2000028`) on
/// `timeline`, with `segment_bytes` segments: what `pg_walfile_name` says.
pub fn segment_for_lsn(timeline: u32, lsn: &str, segment_bytes: u64) -> Option<String> {
    let (hi, lo) = lsn.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u64::from(u32::from_str_radix(lo, 16).ok()?);
    segments_per_log(segment_bytes)?;
    Some(format!("{timeline:08X}{hi:08X}{:08X}", lo / segment_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_postgres_archives() {
        assert_eq!(classify("000000010000000000000001"), Some(WalKind::Segment));
        assert_eq!(classify("00000002.history"), Some(WalKind::History));
        assert_eq!(
            classify("000000010000000000000001.partial"),
            Some(WalKind::Partial)
        );
        assert_eq!(
            classify("000000010000000000000002.00000028.backup"),
            Some(WalKind::Backup)
        );
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "../../etc/passwd",
            "00000001000000000000000G",
            "00000001000000000000000a",
            "0000000100000000000000011",
            "pg_wal/000000010000000000000001",
            "000000010000000000000001/",
            "x.history",
            "00000001.history/..",
            "000000010000000000000001.backup",
            ".history",
        ] {
            assert!(!is_valid(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn other_segment_sizes_name_as_postgres_does() {
        const MB64: u64 = 64 << 20;
        // pg_walfile_name('0/C000028') on a cluster made with --wal-segsize=64.
        assert_eq!(
            segment_for_lsn(1, "0/C000028", MB64).as_deref(),
            Some("000000010000000000000003")
        );
        assert_eq!(
            segment_for_lsn(1, "1/FC000000", MB64).as_deref(),
            Some("00000001000000010000003F")
        );
        // 64 segments per log file: ...3F is followed by the next log's 00.
        assert_eq!(
            next_segments("00000001000000000000003E", 2, MB64),
            vec!["00000001000000000000003F", "000000010000000100000000"]
        );
        assert_eq!(
            segment_for_lsn(2, "0/40000000", 1 << 30).as_deref(),
            Some("000000020000000000000001")
        );
        for bad in [0, 3 << 20, 1 << 19, 2 << 30] {
            assert!(segment_for_lsn(1, "0/1", bad).is_none(), "{bad}");
            assert!(next_segments("000000010000000000000001", 1, bad).is_empty());
        }
    }

    #[test]
    fn next_and_positions() {
        assert_eq!(
            next_segments("0000000100000000000000FE", 3, DEFAULT_SEGMENT_BYTES),
            vec![
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert_eq!(
            segment_for_lsn(1, "0/2000028", DEFAULT_SEGMENT_BYTES).as_deref(),
            Some("000000010000000000000002")
        );
        assert!(position("000000020000000000000003") > position("000000010000000000000002"));
    }
}
