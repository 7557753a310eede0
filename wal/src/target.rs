//! Archive targets: a directory (`file:///...`) and S3-compatible storage
//! (`s3://bucket/prefix`, through the `object_store` crate). Keys are
//! `/`-separated and built only by this crate from validated names.
//!
//! Neither target ever shows a partial object under a final key: the directory
//! writes a hidden temp file, fsyncs it, hard-links it to the final name (which
//! fails if the name exists, so nothing is overwritten) and fsyncs the
//! directory; S3 makes a PUT visible only once complete.
//!
//! New objects go to S3 as conditional PUTs (`If-None-Match: *`), so the store
//! itself refuses to overwrite, also against a writer outside this daemon. A
//! store that answers 501 / `NotImplemented` to that gets an existence check
//! then a plain PUT instead, from then on (see `put_new`).

use bytes::Bytes;
use fleet_model::config::{S3Config, WalConfig};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig, WriteMultipart};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("bad target: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Shown with its whole chain of causes: object_store's own text of a
    /// failed request ends at reqwest's "error sending request", and the
    /// reason (rustls' "invalid peer certificate: UnknownIssuer", "connection
    /// refused") is only in the sources, which the operator would never see.
    /// Not a `#[source]` itself, so a caller printing causes does not repeat them.
    #[error("object store: {}", error_chain(.0))]
    Store(object_store::Error),
}

impl From<object_store::Error> for TargetError {
    fn from(e: object_store::Error) -> Self {
        TargetError::Store(e)
    }
}

/// `e`, then each cause not already in the text so far, joined by ": ".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TargetError + '_ {
    move |source| TargetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One listed object.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    /// Something already exists under the key; nothing was written.
    Exists,
}

#[derive(Clone)]
pub enum Target {
    File {
        root: PathBuf,
    },
    S3 {
        store: Arc<AmazonS3>,
        prefix: String,
        url: String,
        /// Set once the store has answered a conditional PUT with "not
        /// implemented": asking again on every push would only cost retries.
        no_conditional_put: Arc<AtomicBool>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// `access_key_id = ...` / `secret_access_key = ...` lines (also `KEY=value`).
fn read_credentials(path: &Path) -> Result<(String, String), TargetError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "access_key_id" | "aws_access_key_id" => id = Some(v),
            "secret_access_key" | "aws_secret_access_key" => secret = Some(v),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => Err(TargetError::Config(format!(
            "{}: needs access_key_id and secret_access_key lines",
            path.display()
        ))),
    }
}

/// Whether SigV4 covers the request body (its SHA-256 in
/// `x-amz-content-sha256`). Over TLS it need not: the connection already
/// protects the body in transit and the object's header digest is checked on
/// every fetch, while hashing each ~1 MiB object was ~3.5% of the WAL
/// service's CPU in a drain to S3 (docs/benchmarks.md). A plain `http://`
/// endpoint keeps the signed body: there it is the only integrity check.
fn signs_payload(endpoint: Option<&str>) -> bool {
    // No endpoint: AWS itself, always https.
    endpoint.is_some_and(|e| !e.trim_start().to_ascii_lowercase().starts_with("https://"))
}

/// The certificates of `wal.s3.ca_file`, added to the system roots. Refused
/// at start when unreadable or without a certificate, naming the file, so a
/// wrong path is not reported later as an opaque TLS failure of every push.
fn read_ca_file(path: &Path) -> Result<Vec<object_store::Certificate>, TargetError> {
    let pem = std::fs::read(path).map_err(|e| {
        TargetError::Config(format!(
            "wal.s3.ca_file {}: cannot read: {e}",
            path.display()
        ))
    })?;
    let certificates = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
        TargetError::Config(format!(
            "wal.s3.ca_file {}: not a PEM certificate bundle: {e}",
            path.display()
        ))
    })?;
    if certificates.is_empty() {
        return Err(TargetError::Config(format!(
            "wal.s3.ca_file {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certificates)
}

/// `fleet-agentd check-config`'s look at `wal.s3.ca_file`: the same read as
/// the WAL service's start, so both refuse the same file with the same words.
/// Returns how many certificates it holds.
pub fn check_ca_file(path: &Path) -> Result<usize, TargetError> {
    read_ca_file(path).map(|certificates| certificates.len())
}

impl Target {
    pub fn from_config(config: &WalConfig) -> Result<Self, TargetError> {
        if let Some(path) = config.target.strip_prefix("file://") {
            let root = PathBuf::from(path);
            if !root.is_absolute() {
                return Err(TargetError::Config("file:// needs an absolute path".into()));
            }
            std::fs::create_dir_all(&root).map_err(io(&root))?;
            return Ok(Target::File { root });
        }
        if let Some(rest) = config.target.strip_prefix("s3://") {
            let s3 = config
                .s3
                .as_ref()
                .ok_or_else(|| TargetError::Config("an s3:// target needs [wal.s3]".into()))?;
            return Self::s3(&config.target, rest, s3, config.parallel_uploads.max(1));
        }
        Err(TargetError::Config(format!(
            "`{}`: use file:///path or s3://bucket/prefix",
            config.target
        )))
    }

    fn s3(url: &str, rest: &str, s3: &S3Config, parallel: usize) -> Result<Self, TargetError> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(TargetError::Config("s3:// needs a bucket".into()));
        }
        // Fail fast: PostgreSQL retries a failed archive_command itself, and a
        // push that hangs for minutes holds up the archiver.
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(15),
            ..Default::default()
        };
        let mut options = ClientOptions::new()
            .with_allow_http(true)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(120))
            // reqwest keeps every idle connection by default; the look-ahead's
            // uploads plus archive_command's push and a fetch or listing need
            // no more than this many open, each with its TLS and HTTP buffers.
            .with_pool_max_idle_per_host(parallel + 1);
        if let Some(file) = &s3.ca_file {
            for certificate in read_ca_file(file)? {
                options = options.with_root_certificate(certificate);
            }
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&s3.region)
            .with_virtual_hosted_style_request(!s3.path_style)
            .with_unsigned_payload(!signs_payload(s3.endpoint.as_deref()))
            .with_retry(retry)
            .with_client_options(options);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(file) = &s3.credentials_file {
            let (id, secret) = read_credentials(file)?;
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let store = builder.build()?;
        Ok(Target::S3 {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            no_conditional_put: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The directory of a `file://` target, where pushes stream their objects
    /// ([`file_put_streamed`]).
    pub fn directory(&self) -> Option<&Path> {
        match self {
            Target::File { root } => Some(root),
            Target::S3 { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::File { root } => format!("file://{}", root.display()),
            Target::S3 { url, .. } => url.clone(),
        }
    }

    fn object_path(prefix: &str, key: &str) -> ObjectPath {
        if prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{prefix}/{key}"))
        }
    }

    /// Stores `bytes` under `key` unless something is there already.
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<Put, TargetError> {
        self.put_new_chunks(key, vec![bytes]).await
    }

    /// As [`Target::put_new`] for an object made of `chunks` in order: an S3
    /// PUT sends them as one body without joining them in memory first.
    pub async fn put_new_chunks(&self, key: &str, chunks: Vec<Bytes>) -> Result<Put, TargetError> {
        match self {
            Target::File { root } => {
                let root = root.clone();
                let key = key.to_string();
                blocking(move || {
                    file_put_new(&root, &key, |f| {
                        chunks.iter().try_for_each(|chunk| f.write_all(chunk))
                    })
                })
                .await
            }
            Target::S3 {
                store,
                prefix,
                no_conditional_put,
                ..
            } => {
                let path = Self::object_path(prefix, key);
                let payload = object_store::PutPayload::from_iter(chunks);
                if !no_conditional_put.load(Ordering::Relaxed) {
                    // `If-None-Match: *`: the store refuses to replace an
                    // existing object, whoever else writes to the bucket.
                    let create = object_store::PutOptions::from(object_store::PutMode::Create);
                    match store.put_opts(&path, payload.clone(), create).await {
                        Ok(_) => return Ok(Put::Created),
                        Err(object_store::Error::AlreadyExists { .. }) => return Ok(Put::Exists),
                        Err(e) if refuses_conditional_put(&e) => {
                            no_conditional_put.store(true, Ordering::Relaxed);
                            tracing::warn!(
                                target = %self.describe(),
                                error = %e,
                                "The S3 store does not support conditional PUT (If-None-Match); \
                                 falling back to an existence check before each PUT, which \
                                 cannot stop a second writer outside this daemon."
                            );
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                // Fallback: the daemon serialises pushes of one name, so
                // check-then-put cannot race with itself, only with another
                // writer to the same bucket.
                match store.head(&path).await {
                    Ok(_) => return Ok(Put::Exists),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                store.put(&path, payload).await?;
                Ok(Put::Created)
            }
        }
    }

    /// Uploads a local file (base backups) under a new key.
    pub async fn put_file(&self, key: &str, local: &Path) -> Result<Put, TargetError> {
        match self {
            Target::File { root } => {
                let root = root.clone();
                let key = key.to_string();
                let local = local.to_path_buf();
                blocking(move || {
                    file_put_new(&root, &key, |f| {
                        let mut src = std::fs::File::open(&local)?;
                        std::io::copy(&mut src, f).map(|_| ())
                    })
                })
                .await
            }
            Target::S3 { store, prefix, .. } => {
                let path = Self::object_path(prefix, key);
                let upload = store.put_multipart(&path).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
                let mut file = tokio::fs::File::open(local).await.map_err(io(local))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    use tokio::io::AsyncReadExt;
                    let n = file.read(&mut buf).await.map_err(io(local))?;
                    if n == 0 {
                        break;
                    }
                    writer.wait_for_capacity(4).await?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await?;
                Ok(Put::Created)
            }
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, TargetError> {
        match self {
            Target::File { root } => {
                let path = root.join(key);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(Bytes::from(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Target::S3 { store, prefix, .. } => {
                match store.get(&Self::object_path(prefix, key)).await {
                    Ok(r) => Ok(Some(r.bytes().await?)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// The first `n` bytes of an object (its header), if it exists.
    pub async fn head_bytes(&self, key: &str, n: usize) -> Result<Option<Bytes>, TargetError> {
        match self {
            Target::File { .. } => Ok(self.get(key).await?.map(|b| b.slice(..n.min(b.len())))),
            Target::S3 { store, prefix, .. } => {
                let path = Self::object_path(prefix, key);
                let size = match store.head(&path).await {
                    Ok(meta) => meta.size,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                let end = (n as u64).min(size);
                Ok(Some(store.get_range(&path, 0..end).await?))
            }
        }
    }

    /// Streams an object into a local file (restore).
    pub async fn get_to_file(&self, key: &str, local: &Path) -> Result<bool, TargetError> {
        match self {
            Target::File { root } => {
                let path = root.join(key);
                match tokio::fs::copy(&path, local).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Target::S3 { store, prefix, .. } => {
                use tokio::io::AsyncWriteExt;
                let result = match store.get(&Self::object_path(prefix, key)).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
                let mut out = tokio::fs::File::create(local).await.map_err(io(local))?;
                let mut stream = result.into_stream();
                while let Some(chunk) = stream.next().await {
                    out.write_all(&chunk?).await.map_err(io(local))?;
                }
                out.sync_all().await.map_err(io(local))?;
                Ok(true)
            }
        }
    }

    /// Every object under `prefix` (a key prefix ending in `/`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, TargetError> {
        match self {
            Target::File { root } => {
                let root = root.clone();
                let prefix = prefix.to_string();
                blocking(move || {
                    let mut out = Vec::new();
                    file_list(&root, &root.join(&prefix), &mut out)?;
                    Ok(out)
                })
                .await
            }
            Target::S3 {
                store,
                prefix: base,
                ..
            } => {
                let path = Self::object_path(base, prefix.trim_end_matches('/'));
                let strip = if base.is_empty() {
                    String::new()
                } else {
                    format!("{base}/")
                };
                let mut stream = store.list(Some(&path));
                let mut out = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta?;
                    let full = meta.location.to_string();
                    out.push(Entry {
                        key: full.strip_prefix(&strip).unwrap_or(&full).to_string(),
                        size: meta.size,
                        modified: meta.last_modified.into(),
                    });
                }
                Ok(out)
            }
        }
    }

    /// The names directly under the target's root (for a WAL archive: the
    /// clusters' system identifiers), without listing every object below them.
    pub async fn top_level(&self) -> Result<Vec<String>, TargetError> {
        match self {
            Target::File { root } => {
                let root = root.clone();
                blocking(move || {
                    let entries = match std::fs::read_dir(&root) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                        Err(e) => return Err(io(&root)(e)),
                    };
                    let mut out = Vec::new();
                    for entry in entries {
                        let entry = entry.map_err(io(&root))?;
                        let name = entry.file_name().to_string_lossy().to_string();
                        if !name.starts_with('.') && entry.path().is_dir() {
                            out.push(name);
                        }
                    }
                    Ok(out)
                })
                .await
            }
            Target::S3 {
                store,
                prefix: base,
                ..
            } => {
                let at = (!base.is_empty()).then(|| ObjectPath::from(base.as_str()));
                let listing = store.list_with_delimiter(at.as_ref()).await?;
                Ok(listing
                    .common_prefixes
                    .iter()
                    .filter_map(|p| p.filename().map(str::to_string))
                    .collect())
            }
        }
    }

    /// Whether the archive answers as a push needs it to. A file target must
    /// list its root and take a new file there (an unmounted or read-only
    /// archive fails both); an S3 target must list under its prefix, which
    /// proves the endpoint, the bucket and the credentials without writing.
    pub async fn probe(&self) -> Result<(), TargetError> {
        match self {
            Target::File { root } => {
                let root = root.clone();
                blocking(move || {
                    std::fs::read_dir(&root).map_err(io(&root))?;
                    let probe = root.join(format!(".fleet-probe-{}", std::process::id()));
                    std::fs::write(&probe, b"probe").map_err(io(&root))?;
                    std::fs::remove_file(&probe).map_err(io(&probe))?;
                    Ok(())
                })
                .await
            }
            Target::S3 {
                store,
                prefix: base,
                ..
            } => {
                let at = (!base.is_empty()).then(|| ObjectPath::from(base.as_str()));
                store.list_with_delimiter(at.as_ref()).await?;
                Ok(())
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), TargetError> {
        match self {
            Target::File { root } => {
                let path = root.join(key);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io(&path)(e)),
                }
            }
            Target::S3 { store, prefix, .. } => {
                match store.delete(&Self::object_path(prefix, key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// Whether `error` says the store does not implement conditional PUT: the
/// crate's own `NotImplemented`, or the store's 501 / `NotImplemented` answer
/// (the crate does not export its HTTP error type, so the status is read from
/// the error's text, down its chain of sources).
fn refuses_conditional_put(error: &object_store::Error) -> bool {
    if matches!(error, object_store::Error::NotImplemented) {
        return true;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.contains("501 Not Implemented") || text.contains("<Code>NotImplemented</Code>")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::Config(format!("worker failed: {e}")))?
}

fn file_put_new(
    root: &Path,
    key: &str,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<Put, TargetError> {
    if root.join(key).symlink_metadata().is_ok() {
        return Ok(Put::Exists);
    }
    file_put_streamed(root, key, write).map(|(put, ())| put)
}

/// Writes a new object under `key` of a directory target from what `write`
/// puts into a hidden temp file, so the object is streamed to disk rather
/// than held in memory: fsync, hard link to the final name (refused if the
/// name exists: nothing is overwritten), fsync of the directory. Unlike
/// `put_new` it writes before looking; its caller (the WAL push) has just
/// checked the key under the key's lock.
pub fn file_put_streamed<T>(
    root: &Path,
    key: &str,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<T>,
) -> Result<(Put, T), TargetError> {
    let path = root.join(key);
    let dir = path
        .parent()
        .ok_or_else(|| TargetError::Config(format!("bad key {key}")))?
        .to_path_buf();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| TargetError::Config(format!("bad key {key}")))?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Hidden temp names are skipped by `list`; a crash leaves at most one of
    // these behind, never a partial file under the final name.
    let temp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io(&temp))?;
        let written = write(&mut file).map_err(io(&temp))?;
        file.sync_all().map_err(io(&temp))?;
        drop(file);
        let put = match std::fs::hard_link(&temp, &path) {
            Ok(()) => Put::Created,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Put::Exists,
            Err(e) => return Err(io(&path)(e)),
        };
        let _ = std::fs::remove_file(&temp);
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok((put, written))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn file_list(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), TargetError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = entry.metadata().map_err(io(&entry.path()))?;
        if meta.is_dir() {
            file_list(root, &entry.path(), out)?;
        } else if meta.is_file() {
            let key = entry
                .path()
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().to_string())
                .unwrap_or_default();
            out.push(Entry {
                key,
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{read_ca_file, refuses_conditional_put, signs_payload, Target};

    #[test]
    fn a_ca_file_is_read_or_refused_naming_the_file_and_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("ca.pem");
        // A test CA's certificate only (no key), made with openssl req -x509.
        std::fs::write(&good, include_bytes!("../testdata/test-ca.pem")).unwrap();
        assert_eq!(read_ca_file(&good).unwrap().len(), 1);

        let missing = dir.path().join("missing.pem");
        let error = read_ca_file(&missing).err().unwrap().to_string();
        assert!(error.contains("wal.s3.ca_file"), "{error}");
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(error.contains("cannot read"), "{error}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "access_key_id = not a certificate\n").unwrap();
        let error = read_ca_file(&junk).err().unwrap().to_string();
        assert!(error.contains(&junk.display().to_string()), "{error}");
        assert!(error.contains("certificate"), "{error}");

        // The S3 target is refused at construction, not at the first push.
        let config: fleet_model::config::WalConfig = toml::from_str(&format!(
            "target = \"s3://bucket/p\"\n[s3]\nendpoint = \"https://127.0.0.1:1\"\nca_file = \"{}\"\n",
            junk.display()
        ))
        .unwrap();
        let error = Target::from_config(&config).err().unwrap().to_string();
        assert!(error.contains(&junk.display().to_string()), "{error}");
        let config: fleet_model::config::WalConfig = toml::from_str(&format!(
            "target = \"s3://bucket/p\"\n[s3]\nendpoint = \"https://127.0.0.1:1\"\nca_file = \"{}\"\n",
            good.display()
        ))
        .unwrap();
        Target::from_config(&config).expect("a readable CA bundle is accepted");
    }

    #[tokio::test]
    async fn a_file_archive_that_vanished_or_is_no_directory_fails_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("archive");
        std::fs::create_dir(&root).unwrap();
        let target = Target::File { root: root.clone() };
        target.probe().await.expect("a present archive answers");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "the probe leaves nothing behind"
        );
        std::fs::remove_dir(&root).unwrap();
        let gone = target.probe().await.unwrap_err().to_string();
        assert!(gone.contains(&root.display().to_string()), "{gone}");
        std::fs::write(&root, "not a directory").unwrap();
        assert!(target.probe().await.is_err());
    }

    #[test]
    fn a_store_error_shows_its_causes_once() {
        // As a refused TLS handshake arrives: object_store's text ends at
        // reqwest's, the reason is two sources further down.
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let cause = Layer(
            "error sending request",
            Some(Box::new(Layer(
                "client error (Connect)",
                Some(Box::new(Layer(
                    "invalid peer certificate: UnknownIssuer",
                    None,
                ))),
            ))),
        );
        let error = super::TargetError::from(object_store::Error::Generic {
            store: "S3",
            source: Box::new(cause),
        })
        .to_string();
        assert!(
            error.ends_with(
                "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer"
            ),
            "{error}"
        );
        assert_eq!(error.matches("error sending request").count(), 1, "{error}");
        assert!(std::error::Error::source(&super::TargetError::Config(String::new())).is_none());
    }

    #[test]
    fn the_body_is_signed_only_where_tls_does_not_protect_it() {
        assert!(!signs_payload(None), "AWS itself is https");
        assert!(!signs_payload(Some("https://127.0.0.1:9000")));
        assert!(!signs_payload(Some("HTTPS://minio.lan")));
        assert!(signs_payload(Some("http://127.0.0.1:9000")));
    }

    #[test]
    fn knows_a_store_without_conditional_put() {
        assert!(refuses_conditional_put(
            &object_store::Error::NotImplemented
        ));
        let answer = |text: &str| object_store::Error::Generic {
            store: "S3",
            source: text.to_string().into(),
        };
        assert!(refuses_conditional_put(&answer(
            "Error performing PUT http://s3/b/k in 2ms - Server returned non-2xx status code: 501 Not Implemented: "
        )));
        assert!(refuses_conditional_put(&answer(
            "Server returned non-2xx status code: 400 Bad Request: <Error><Code>NotImplemented</Code></Error>"
        )));
        // A store that is down is not a store without the feature.
        assert!(!refuses_conditional_put(&answer(
            "Error performing PUT http://s3/b/k - error sending request: connection refused"
        )));
        assert!(!refuses_conditional_put(&answer(
            "Server returned non-2xx status code: 503 Service Unavailable: "
        )));
    }
}
