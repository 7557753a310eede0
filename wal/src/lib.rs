//! WAL archiving (filled in by the WAL work).
