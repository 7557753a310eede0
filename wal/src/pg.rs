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

/// A libpq key/value connection string (`host=/var/run/postgresql port=5432
/// user=postgres`) as libpq reads it: `key = value` with optional spaces around
/// `=`, values single-quoted or bare, `\\` escaping inside either. Errors name
/// the problem; nothing of a value is ever printed (it may be a password).
pub fn parse_conninfo(conninfo: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // A URI may carry a password: never echo it.
            if key.contains("://") {
                return Err("a postgres:// URI is not supported here; write libpq key=value pairs (host=... port=... user=...)".into());
            }
            return Err(format!("`{key}` has no `=` (libpq key=value pairs)"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("the value of `{key}` has no closing quote")),
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Pairs back to a string libpq reads as the same pairs.
pub fn render_conninfo(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The connection string for a child's argv without its password, and the
/// password to hand over in `PGPASSWORD` instead: argv is visible to every
/// user in `ps`, the environment is not.
pub fn split_password(conninfo: &str) -> Result<(String, Option<String>), String> {
    // A URI goes to pg_basebackup as it was (a password in it stays in argv:
    // docs/wal.md says to use key=value pairs).
    if conninfo.trim_start().starts_with("postgres://")
        || conninfo.trim_start().starts_with("postgresql://")
    {
        return Ok((conninfo.to_string(), None));
    }
    let pairs = parse_conninfo(conninfo)?;
    let password = pairs
        .iter()
        .rev()
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v.clone());
    let rest: Vec<_> = pairs.into_iter().filter(|(k, _)| k != "password").collect();
    Ok((render_conninfo(&rest), password))
}

/// The connection string to sqlx options. Keys sqlx has no use for are
/// ignored here (pg_basebackup gets the whole string).
pub fn connect_options(conninfo: &str) -> PgConnectOptions {
    let mut options = PgConnectOptions::new_without_pgpass();
    for (key, value) in parse_conninfo(conninfo).unwrap_or_default() {
        options = match key.as_str() {
            "host" => options.host(&value),
            "port" => match value.parse() {
                Ok(p) => options.port(p),
                Err(_) => options,
            },
            "user" => options.username(&value),
            "password" => options.password(&value),
            "dbname" => options.database(&value),
            "sslmode" => match value.parse() {
                Ok(mode) => options.ssl_mode(mode),
                Err(_) => options,
            },
            "sslrootcert" => options.ssl_root_cert(value.as_str()),
            "application_name" => options.application_name(&value),
            _ => options,
        };
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
    /// Read on the same connection; served judged, as `archiving` (archiving.rs).
    #[serde(skip)]
    pub settings: fleet_model::archiving::ArchiveSettings,
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
        settings: archive_settings(&mut conn).await?,
    })
}

async fn archive_settings(
    conn: &mut sqlx::PgConnection,
) -> Result<fleet_model::archiving::ArchiveSettings, sqlx::Error> {
    // archive_library is new in 15: missing_ok gives NULL before it.
    let row = sqlx::query(
        "SELECT current_setting('server_version_num')::int AS version, \
         current_setting('archive_mode') AS mode, \
         current_setting('archive_command') AS command, \
         coalesce(current_setting('archive_library', true), '') AS library, \
         current_setting('archive_timeout') AS timeout",
    )
    .fetch_one(conn)
    .await?;
    Ok(fleet_model::archiving::ArchiveSettings {
        server_version_num: row.try_get("version")?,
        archive_mode: row.try_get("mode")?,
        archive_command: row.try_get("command")?,
        archive_library: row.try_get("library")?,
        archive_timeout: row.try_get("timeout")?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_is_read_as_libpq_reads_it() {
        let pairs = parse_conninfo(
            "host = /var/run/postgresql port=5432 password='it\\'s \\\\ s' sslmode=require",
        )
        .unwrap();
        assert_eq!(
            pairs,
            vec![
                ("host".into(), "/var/run/postgresql".into()),
                ("port".into(), "5432".into()),
                ("password".into(), "it's \\ s".into()),
                ("sslmode".into(), "require".into()),
            ]
        );
        assert_eq!(parse_conninfo(&render_conninfo(&pairs)).unwrap(), pairs);
        let err = parse_conninfo("host=/tmp password='secret").unwrap_err();
        assert!(err.contains("password") && !err.contains("secret"), "{err}");
        assert!(parse_conninfo("host").unwrap_err().contains("host"));
        let err = parse_conninfo("postgres://u:secret@h/db").unwrap_err();
        assert!(
            !err.contains("secret") && err.contains("key=value"),
            "{err}"
        );
    }

    #[test]
    fn the_password_leaves_argv_and_other_keys_stay() {
        let (rest, password) =
            split_password("host=/tmp user=postgres password='p w' sslmode=verify-full").unwrap();
        assert_eq!(password.as_deref(), Some("p w"));
        assert!(
            !rest.contains("p w") && !rest.contains("password"),
            "{rest}"
        );
        assert!(rest.contains("sslmode='verify-full'"), "{rest}");
        let (rest, password) = split_password("host=/tmp").unwrap();
        assert_eq!((rest.as_str(), password), ("host='/tmp'", None));
    }
}
