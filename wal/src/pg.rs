//! What the WAL service reads from PostgreSQL: the system identifier (from
//! `global/pg_control` or a connection) and `pg_stat_archiver` through sqlx.

use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Row};
use std::path::Path;

/// The cluster's system identifier: the first 8 bytes (native endian) of
/// `global/pg_control`. Every cluster made by initdb has its own.
pub fn system_identifier_from_control(data_dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(data_dir.join("global/pg_control")).ok()?;
    let first: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(first))
}

/// libpq key/value connection string (`host=/var/run/postgresql port=5432 user=postgres`)
/// to sqlx options. Values with spaces may be single-quoted.
pub fn connect_options(conninfo: &str) -> PgConnectOptions {
    let mut options = PgConnectOptions::new_without_pgpass();
    let mut rest = conninfo.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('\'') {
            match quoted.split_once('\'') {
                Some((v, n)) => (v.to_string(), n),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(char::is_whitespace) {
                Some((v, n)) => (v.to_string(), n),
                None => (after.to_string(), ""),
            }
        };
        options = match key.trim() {
            "host" => options.host(&value),
            "port" => match value.parse() {
                Ok(p) => options.port(p),
                Err(_) => options,
            },
            "user" => options.username(&value),
            "password" => options.password(&value),
            "dbname" => options.database(&value),
            _ => options,
        };
        rest = next.trim_start();
    }
    options
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiverStats {
    pub archived_count: i64,
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<f64>,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<f64>,
}

pub async fn archiver_stats(conninfo: &str) -> Result<ArchiverStats, sqlx::Error> {
    let mut conn = connect_options(conninfo).connect().await?;
    let row = sqlx::query(
        "SELECT archived_count, failed_count, last_archived_wal, \
         extract(epoch from last_archived_time)::float8 AS last_archived_time, \
         last_failed_wal, extract(epoch from last_failed_time)::float8 AS last_failed_time \
         FROM pg_stat_archiver",
    )
    .fetch_one(&mut conn)
    .await?;
    Ok(ArchiverStats {
        archived_count: row.try_get("archived_count")?,
        failed_count: row.try_get("failed_count")?,
        last_archived_wal: row.try_get("last_archived_wal")?,
        last_archived_time: row.try_get("last_archived_time")?,
        last_failed_wal: row.try_get("last_failed_wal")?,
        last_failed_time: row.try_get("last_failed_time")?,
    })
}

pub async fn system_identifier(conninfo: &str) -> Result<u64, sqlx::Error> {
    let mut conn = connect_options(conninfo).connect().await?;
    let row = sqlx::query("SELECT system_identifier::text AS id FROM pg_control_system()")
        .fetch_one(&mut conn)
        .await?;
    let id: String = row.try_get("id")?;
    id.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// `wal_segment_size` in bytes (set by `initdb --wal-segsize`, 16 MiB by default).
pub async fn wal_segment_bytes(conninfo: &str) -> Result<u64, sqlx::Error> {
    let mut conn = connect_options(conninfo).connect().await?;
    // pg_settings gives it in bytes (unit 'B') on every supported version.
    let row = sqlx::query(
        "SELECT setting::bigint AS bytes FROM pg_settings WHERE name = 'wal_segment_size'",
    )
    .fetch_one(&mut conn)
    .await?;
    let bytes: i64 = row.try_get("bytes")?;
    u64::try_from(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}
