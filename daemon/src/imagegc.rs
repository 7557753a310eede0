//! Image garbage collection and the disk-pressure guard: the decisions, pure
//! (values in, a verdict out), and the thin task that carries them out.
//!
//! What may be removed is decided from three things only: the images the
//! engine has now, the record of what this agent pulled for a department
//! (`Store::pulled_images`: reference and the image id the pull produced), and
//! the references that must stay (every department's current and previous
//! spec image, every announced next image, every image a container uses).
//! An image is removed only when every one of its tags is a reference the agent
//! pulled *and* the recorded id is still the image's id: an image someone else
//! pulled or built, or a tag that now names a different image, is never
//! touched. A lost store loses the record, so nothing is removed until the
//! agent pulls again: conservative by construction.

use crate::events::EventLog;
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::store::Store;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One image as the engine lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// `sha256:...`
    pub id: String,
    /// `RepoTags` (`<none>:<none>` already dropped).
    pub tags: Vec<String>,
    /// `RepoDigests` (`name@sha256:...`).
    pub digests: Vec<String>,
    pub size_bytes: u64,
}

/// One pull the agent made for a department, as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub reference: String,
    pub image_id: String,
    pub department: String,
}

/// What must stay whatever else is true.
#[derive(Debug, Clone, Default)]
pub struct Keep {
    /// Image references: current and previous spec images, announced images.
    pub references: BTreeSet<String>,
    /// Image ids (or references) any container on the engine is made from.
    pub container_images: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub image_id: String,
    /// The references (all pulled by the agent) that named it.
    pub references: Vec<String>,
    /// Departments it was pulled for.
    pub departments: Vec<String>,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    pub remove: Vec<Removal>,
    /// Pull records that no longer describe an image on the engine (the image
    /// is gone, or the tag now names another image): forgotten, never acted on.
    pub forget: Vec<String>,
}

/// Docker's canonical form of a reference, as `RepoTags` shows it: a missing
/// tag is `latest`, Docker Hub's `docker.io/` and `library/` are dropped.
pub fn normalize(reference: &str) -> String {
    let mut r = reference.trim();
    for prefix in ["docker.io/", "index.docker.io/"] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest;
        }
    }
    if let Some(rest) = r.strip_prefix("library/") {
        r = rest;
    }
    if r.contains('@') {
        return r.to_string();
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

/// The images to remove now, and the stale pull records to forget.
pub fn decide(images: &[Image], pulled: &[Pulled], keep: &Keep) -> Verdict {
    let keep_refs: BTreeSet<String> = keep.references.iter().map(|r| normalize(r)).collect();
    let in_containers: BTreeSet<String> = keep
        .container_images
        .iter()
        .map(|r| {
            if r.starts_with("sha256:") {
                r.clone()
            } else {
                normalize(r)
            }
        })
        .collect();
    let mut by_ref: BTreeMap<String, Vec<&Pulled>> = BTreeMap::new();
    for p in pulled {
        by_ref.entry(normalize(&p.reference)).or_default().push(p);
    }
    let mut verdict = Verdict::default();
    let mut still_true: BTreeSet<&str> = BTreeSet::new();

    for image in images {
        let tags: Vec<String> = image.tags.iter().map(|t| normalize(t)).collect();
        for t in &tags {
            if let Some(records) = by_ref.get(t) {
                for r in records.iter().filter(|r| r.image_id == image.id) {
                    still_true.insert(r.reference.as_str());
                }
            }
        }
        // An untagged image is nobody's reference any more; whose it was is
        // not provable from the record (which names a reference), so it stays.
        if tags.is_empty() {
            continue;
        }
        let protected = in_containers.contains(&image.id)
            || tags
                .iter()
                .chain(image.digests.iter())
                .any(|t| keep_refs.contains(t) || in_containers.contains(t));
        if protected {
            continue;
        }
        let mut departments = BTreeSet::new();
        let ours = tags.iter().all(|t| {
            by_ref.get(t).is_some_and(|records| {
                let matching: Vec<_> = records.iter().filter(|r| r.image_id == image.id).collect();
                departments.extend(matching.iter().map(|r| r.department.clone()));
                !matching.is_empty()
            })
        });
        if ours {
            verdict.remove.push(Removal {
                image_id: image.id.clone(),
                references: tags,
                departments: departments.into_iter().collect(),
                size_bytes: image.size_bytes,
            });
        }
    }
    verdict.forget = pulled
        .iter()
        .filter(|p| !still_true.contains(p.reference.as_str()))
        .map(|p| p.reference.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    verdict
}

/// Disk pressure with hysteresis: on at or above `high` percent used, off
/// again only at or below `low`, so a disk hovering at the line does not flap.
pub fn pressure(was: bool, used_percent: f64, high: u8, low: u8) -> bool {
    if was {
        used_percent > f64::from(low)
    } else {
        used_percent >= f64::from(high)
    }
}

pub fn used_percent(total_bytes: u64, available_bytes: u64) -> f64 {
    if total_bytes == 0 {
        return 0.0;
    }
    let used = total_bytes.saturating_sub(available_bytes);
    used as f64 * 100.0 / total_bytes as f64
}

// --- the task ------------------------------------------------------------------

/// Figures for `/metrics`.
#[derive(Default)]
pub struct GcCounters {
    pub pressure: AtomicBool,
    /// Used share of the watched filesystem, in hundredths of a percent.
    pub used_basis_points: AtomicU64,
    pub runs: AtomicU64,
    pub removed: AtomicU64,
    pub removed_bytes: AtomicU64,
    pub errors: AtomicU64,
    pub pressure_episodes: AtomicU64,
}

pub struct GcSettings {
    pub enabled: bool,
    pub interval: Duration,
    pub check_interval: Duration,
    pub high: u8,
    pub low: u8,
    /// The filesystem to watch; `None`: Docker's data root.
    pub disk_path: Option<PathBuf>,
}

/// What the task needs from the rest of the daemon.
pub struct Collector {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub store: Arc<Store>,
    pub events: EventLog,
    pub counters: Arc<GcCounters>,
    pub settings: GcSettings,
}

impl GcSettings {
    pub fn from_config(c: &fleet_model::config::ImagesConfig) -> Self {
        Self {
            enabled: c.gc,
            interval: c.gc_interval,
            check_interval: c.disk_check_interval,
            high: c.disk_high_watermark,
            low: c.disk_low_watermark,
            disk_path: c.disk_path.clone(),
        }
    }
}

/// The references that must stay: from the store (current and previous
/// specs, announcements), so what an apply just wrote counts at once.
pub fn keep_from_store(store: &Store) -> Result<BTreeSet<String>, crate::store::StoreError> {
    let mut keep = BTreeSet::new();
    for d in store.departments()? {
        keep.insert(d.spec.image.clone());
        if let Some(p) = d.previous {
            keep.insert(p.image.clone());
        }
    }
    for (_, image) in store.announced_images()? {
        keep.insert(image);
    }
    Ok(keep)
}

impl Collector {
    pub fn spawn(self, shared: Arc<crate::supervisor::Shared>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run(shared).await })
    }

    async fn run(self, shared: Arc<crate::supervisor::Shared>) {
        let mut check = tokio::time::interval(self.settings.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_gc = tokio::time::Instant::now();
        let mut data_root: Option<PathBuf> = self.settings.disk_path.clone();
        loop {
            check.tick().await;
            if shared.shutting_down() {
                return;
            }
            if data_root.is_none() {
                data_root = self.runtime.data_root().await.ok().flatten();
            }
            let was = self.counters.pressure.load(Ordering::Relaxed);
            let mut now = was;
            if let Some(path) = data_root.clone() {
                let sample = tokio::task::spawn_blocking(move || statvfs_used(&path))
                    .await
                    .ok()
                    .flatten();
                if let Some((used, total, available)) = sample {
                    self.counters
                        .used_basis_points
                        .store((used * 100.0) as u64, Ordering::Relaxed);
                    now = pressure(was, used, self.settings.high, self.settings.low);
                    if now != was {
                        self.counters.pressure.store(now, Ordering::Relaxed);
                        let message = format!(
                            "{:.1}% used ({} of {} bytes free) on {}; watermarks {}%/{}%",
                            used,
                            available,
                            total,
                            data_root
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default(),
                            self.settings.high,
                            self.settings.low
                        );
                        if now {
                            self.counters
                                .pressure_episodes
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("Disk pressure: {message}; collecting images now.");
                            self.events.record(
                                None,
                                "disk_pressure",
                                Some("high_watermark"),
                                &message,
                            );
                        } else {
                            tracing::info!("Disk pressure over: {message}.");
                            self.events.record(
                                None,
                                "disk_pressure_cleared",
                                Some("low_watermark"),
                                &message,
                            );
                        }
                    }
                }
            }
            if !self.settings.enabled {
                continue;
            }
            // Early on pressure (at every check while it lasts: an update may
            // have just freed an image), otherwise on the interval.
            if now || last_gc.elapsed() >= self.settings.interval {
                last_gc = tokio::time::Instant::now();
                if let Err(e) = self.collect_once().await {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "Image collection failed; trying again later.");
                }
            }
        }
    }

    /// One collection: read, decide, remove (each removal re-checked against
    /// the store just before, so an apply in between wins).
    pub async fn collect_once(&self) -> Result<Vec<Removal>, GcError> {
        self.counters.runs.fetch_add(1, Ordering::Relaxed);
        // An announcement the department's spec now names is fulfilled: the
        // image is kept as the current (later the previous) image from here.
        let current: BTreeMap<String, String> = self
            .store
            .departments()?
            .into_iter()
            .map(|d| (d.spec.id.clone(), normalize(&d.spec.image)))
            .collect();
        for (department, image) in self.store.announced_images()? {
            if current.get(&department) == Some(&normalize(&image)) {
                self.store.clear_announcement(&department)?;
            }
        }
        let images = self.runtime.list_images().await?;
        let container_images = self.runtime.container_images().await?;
        let pulled = self.store.pulled_images()?;
        let keep = Keep {
            references: keep_from_store(&self.store)?,
            container_images,
        };
        let verdict = decide(&images, &pulled, &keep);
        for reference in &verdict.forget {
            self.store.forget_pulled(reference)?;
        }
        let mut removed = Vec::new();
        for removal in verdict.remove {
            let now_keep: BTreeSet<String> = keep_from_store(&self.store)?
                .iter()
                .map(|r| normalize(r))
                .collect();
            if removal.references.iter().any(|r| now_keep.contains(r)) {
                continue;
            }
            match self.runtime.remove_image(&removal.image_id).await {
                Ok(()) => {
                    let bytes = removal.size_bytes;
                    // Counted first: the engine no longer has the image,
                    // whatever the store's bookkeeping below does.
                    self.counters.removed.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .removed_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                    for r in &removal.references {
                        self.store.forget_pulled(r)?;
                    }
                    let message = format!(
                        "removed image {} ({}), pulled for {}, used by no department",
                        removal.references.join(", "),
                        removal.image_id,
                        removal.departments.join(", ")
                    );
                    tracing::info!("{message}");
                    for d in &removal.departments {
                        self.events
                            .record(Some(d), "image_removed", Some("unused"), &message);
                    }
                    removed.push(removal);
                }
                // In use by a container Docker knows of (any node's): it stays.
                Err(RuntimeError::Conflict(m)) => {
                    tracing::debug!(image = %removal.image_id, "Image in use, kept: {m}");
                }
                Err(RuntimeError::NotFound(_)) => {
                    for r in &removal.references {
                        self.store.forget_pulled(r)?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }

    pub fn render_metrics(counters: &GcCounters, out: &mut String) {
        use crate::metrics::single;
        let c = counters;
        single(
            out,
            "fleet_agent_disk_pressure",
            "gauge",
            "1 while the filesystem under Docker's data root (or images.disk_path) is above images.disk_high_watermark, until it falls to images.disk_low_watermark.",
            u8::from(c.pressure.load(Ordering::Relaxed)),
        );
        single(
            out,
            "fleet_agent_disk_used_ratio",
            "gauge",
            "Used share (0-1) of the filesystem the disk-pressure guard watches, at its last check.",
            c.used_basis_points.load(Ordering::Relaxed) as f64 / 10_000.0,
        );
        single(
            out,
            "fleet_agent_disk_pressure_episodes_total",
            "counter",
            "Times the disk crossed the high watermark.",
            c.pressure_episodes.load(Ordering::Relaxed),
        );
        single(
            out,
            "fleet_agent_image_gc_runs_total",
            "counter",
            "Image collections run (on the interval and early on disk pressure).",
            c.runs.load(Ordering::Relaxed),
        );
        single(
            out,
            "fleet_agent_image_gc_removed_total",
            "counter",
            "Images the agent had pulled for a department and removed because no department uses them.",
            c.removed.load(Ordering::Relaxed),
        );
        single(
            out,
            "fleet_agent_image_gc_removed_bytes_total",
            "counter",
            "Sizes of those images as Docker listed them (shared layers may make the space freed smaller).",
            c.removed_bytes.load(Ordering::Relaxed),
        );
        single(
            out,
            "fleet_agent_image_gc_errors_total",
            "counter",
            "Image collections that failed (Docker or the store unavailable).",
            c.errors.load(Ordering::Relaxed),
        );
    }
}

/// A reference an operator may announce: what Docker would take, bounded.
pub fn check_reference(image: &str) -> Result<(), String> {
    if image.is_empty() || image.len() > 512 {
        return Err("must be 1-512 characters".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace".into());
    }
    if !image
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._:/@".contains(c))
    {
        return Err("must be a Docker image reference (letters, digits, - . _ : / @)".into());
    }
    Ok(())
}

/// Announces `image` as `department`'s next image (kept by collection from
/// now on) and pulls it in the background unless the engine has it already.
/// An image already present is not recorded as pulled: the agent cannot prove
/// it brought it, so it never collects it.
pub fn prepull(
    shared: Arc<crate::supervisor::Shared>,
    department: &str,
    image: &str,
) -> Result<String, crate::store::StoreError> {
    shared.store.announce_image(department, image)?;
    let (department, image) = (department.to_string(), image.to_string());
    let message = format!(
        "{department}: {image} announced as the next image; pulling it now (agentctl events shows prepulled)"
    );
    tokio::spawn(async move {
        match shared.runtime.image_present(&image).await {
            Ok(true) => {
                shared.events.record(
                    Some(&department),
                    "prepulled",
                    Some("present"),
                    &format!("{image} is already on this host"),
                );
                return;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(image, error = %e, "Could not look for the image; pulling.");
            }
        }
        shared.events.record(
            Some(&department),
            "prepull_started",
            None,
            &format!("pulling {image} ahead of the update"),
        );
        let (progress, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        match shared.runtime.pull(&image, progress).await {
            Ok(()) => {
                crate::supervisor::department::record_pull(&shared, &department, &image).await;
                shared.events.record(
                    Some(&department),
                    "prepulled",
                    Some("pulled"),
                    &format!("pulled {image} ahead of the update"),
                );
            }
            Err(e) => shared.events.record(
                Some(&department),
                "prepull_failed",
                Some("pull"),
                &format!("pull of {image} failed: {e}"),
            ),
        }
    });
    Ok(message)
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

// statvfs field widths differ between platforms (32-bit c_ulong, u64 here).
#[allow(clippy::unnecessary_cast)]
fn statvfs_used(path: &std::path::Path) -> Option<(f64, u64, u64)> {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let unit = s.fragment_size() as u64;
            let total = (s.blocks() as u64).saturating_mul(unit);
            let available = (s.blocks_available() as u64).saturating_mul(unit);
            Some((used_percent(total, available), total, available))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "Cannot stat the filesystem the disk-pressure guard watches.");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tags: &[&str]) -> Image {
        Image {
            id: id.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            digests: vec![],
            size_bytes: 1,
        }
    }
    fn pulled(reference: &str, id: &str, dept: &str) -> Pulled {
        Pulled {
            reference: reference.into(),
            image_id: id.into(),
            department: dept.into(),
        }
    }
    fn keep(refs: &[&str]) -> Keep {
        Keep {
            references: refs.iter().map(|r| r.to_string()).collect(),
            container_images: BTreeSet::new(),
        }
    }
    fn removed_ids(v: &Verdict) -> Vec<&str> {
        v.remove.iter().map(|r| r.image_id.as_str()).collect()
    }

    #[test]
    fn removes_only_unused_images_the_agent_pulled() {
        let images = [
            image("sha256:a", &["reg:5000/app:1"]),   // pulled, old: goes
            image("sha256:b", &["reg:5000/app:2"]),   // previous: stays
            image("sha256:c", &["reg:5000/app:3"]),   // current: stays
            image("sha256:d", &["postgres:15"]),      // someone else's: stays
            image("sha256:e", &["reg:5000/other:1"]), // pulled, unused: goes
        ];
        let pulled = [
            pulled("reg:5000/app:1", "sha256:a", "web"),
            pulled("reg:5000/app:2", "sha256:b", "web"),
            pulled("reg:5000/app:3", "sha256:c", "web"),
            pulled("reg:5000/other:1", "sha256:e", "api"),
        ];
        let v = decide(
            &images,
            &pulled,
            &keep(&["reg:5000/app:3", "reg:5000/app:2"]),
        );
        assert_eq!(removed_ids(&v), ["sha256:a", "sha256:e"]);
        assert_eq!(v.remove[1].departments, ["api"]);
        assert!(v.forget.is_empty());
    }

    #[test]
    fn never_removes_without_a_record_so_a_lost_store_removes_nothing() {
        let images = [
            image("sha256:a", &["reg/app:1"]),
            image("sha256:b", &["x:1"]),
        ];
        let v = decide(&images, &[], &keep(&[]));
        assert!(v.remove.is_empty());
    }

    #[test]
    fn a_tag_that_moved_to_another_image_is_not_ours() {
        // The agent pulled app:1 as image a; someone re-tagged app:1 onto b.
        let images = [image("sha256:b", &["reg/app:1"])];
        let v = decide(
            &images,
            &[pulled("reg/app:1", "sha256:a", "web")],
            &keep(&[]),
        );
        assert!(v.remove.is_empty());
        assert_eq!(v.forget, ["reg/app:1"]);
    }

    #[test]
    fn an_image_with_a_tag_the_agent_did_not_pull_stays() {
        // Same image under the agent's reference and an operator's own tag.
        let images = [image("sha256:a", &["reg/app:1", "mine:keep"])];
        let v = decide(
            &images,
            &[pulled("reg/app:1", "sha256:a", "web")],
            &keep(&[]),
        );
        assert!(v.remove.is_empty());
        assert!(v.forget.is_empty());
    }

    #[test]
    fn the_same_image_under_a_protected_tag_stays() {
        // app:2 and app:latest are one image; the current spec says latest.
        let images = [image("sha256:a", &["reg/app:2", "reg/app:latest"])];
        let pulled = [
            pulled("reg/app:2", "sha256:a", "web"),
            pulled("reg/app", "sha256:a", "web"),
        ];
        let v = decide(&images, &pulled, &keep(&["reg/app"]));
        assert!(v.remove.is_empty());
    }

    #[test]
    fn an_image_a_container_uses_stays_by_id_or_reference() {
        let images = [
            image("sha256:a", &["reg/app:1"]),
            image("sha256:b", &["reg/app:2"]),
        ];
        let pulled = [
            pulled("reg/app:1", "sha256:a", "web"),
            pulled("reg/app:2", "sha256:b", "web"),
        ];
        let mut k = keep(&[]);
        k.container_images.insert("sha256:a".into());
        k.container_images.insert("reg/app:2".into());
        assert!(decide(&images, &pulled, &k).remove.is_empty());
    }

    #[test]
    fn announced_images_and_digest_references_stay() {
        let mut img = image("sha256:a", &["reg/app:9"]);
        img.digests = vec!["reg/app@sha256:feed".into()];
        let pulled = [pulled("reg/app:9", "sha256:a", "web")];
        assert!(
            decide(&[img.clone()], &pulled, &keep(&["reg/app@sha256:feed"]))
                .remove
                .is_empty()
        );
        assert!(decide(&[img.clone()], &pulled, &keep(&["reg/app:9"]))
            .remove
            .is_empty());
        assert_eq!(decide(&[img], &pulled, &keep(&[])).remove.len(), 1);
    }

    #[test]
    fn untagged_images_stay_and_their_records_are_forgotten() {
        let images = [image("sha256:a", &[])];
        let v = decide(
            &images,
            &[pulled("reg/app:1", "sha256:a", "web")],
            &keep(&[]),
        );
        assert!(v.remove.is_empty());
        assert_eq!(v.forget, ["reg/app:1"]);
    }

    #[test]
    fn references_are_compared_in_docker_canonical_form() {
        assert_eq!(normalize("nginx"), "nginx:latest");
        assert_eq!(normalize("docker.io/library/nginx:1"), "nginx:1");
        assert_eq!(normalize("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize("localhost:5000/app:2"), "localhost:5000/app:2");
        assert_eq!(normalize("app@sha256:ab"), "app@sha256:ab");
        let images = [image("sha256:a", &["localhost:5000/app:latest"])];
        let v = decide(
            &images,
            &[pulled("localhost:5000/app", "sha256:a", "web")],
            &keep(&[]),
        );
        assert_eq!(removed_ids(&v), ["sha256:a"]);
    }

    fn spec(image: &str) -> fleet_model::DepartmentSpec {
        fleet_model::DepartmentSpec::from_toml("t", &format!("id = \"web\"\nimage = \"{image}\"\n"))
            .unwrap()
    }

    /// The task on the fake engine: the store's record decides, the spec
    /// history and announcements protect, a fulfilled announcement is cleared.
    #[tokio::test]
    async fn one_collection_removes_only_the_unused_image_it_pulled() {
        let fake = crate::fake_runtime::FakeRuntime::new();
        for image in [
            "reg/app:1",
            "reg/app:2",
            "reg/app:3",
            "reg/app:4",
            "other:1",
        ] {
            fake.add_image(image);
        }
        let store = Arc::new(Store::open_in_memory().unwrap());
        for image in ["reg/app:1", "reg/app:2", "reg/app:3", "reg/app:4"] {
            let id = fake.image_id(image).await.unwrap().unwrap();
            store.record_pulled(image, &id, "web").unwrap();
        }
        store.put_spec(&spec("reg/app:2")).unwrap();
        store.put_spec(&spec("reg/app:3")).unwrap();
        store.announce_image("web", "reg/app:4").unwrap();
        let collector = Collector {
            runtime: Arc::new(fake.clone()),
            store: store.clone(),
            events: EventLog::new(store.clone()),
            counters: Arc::new(GcCounters::default()),
            settings: GcSettings::from_config(&Default::default()),
        };
        let removed = collector.collect_once().await.unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].references, ["reg/app:1"]);
        let left: Vec<String> = fake
            .list_images()
            .await
            .unwrap()
            .into_iter()
            .flat_map(|i| i.tags)
            .collect();
        assert_eq!(left, ["other:1", "reg/app:2", "reg/app:3", "reg/app:4"]);
        assert!(store
            .pulled_images()
            .unwrap()
            .iter()
            .all(|p| p.reference != "reg/app:1"));
        assert_eq!(collector.counters.removed.load(Ordering::Relaxed), 1);
        // A second run finds nothing more; the announcement still holds 4.
        assert!(collector.collect_once().await.unwrap().is_empty());
        // The update to 4 fulfils the announcement; 2 is now nobody's.
        store.put_spec(&spec("reg/app:4")).unwrap();
        let removed = collector.collect_once().await.unwrap();
        assert_eq!(removed[0].references, ["reg/app:2"]);
        assert!(store.announced_images().unwrap().is_empty());
    }

    #[test]
    fn pressure_has_hysteresis() {
        assert!(!pressure(false, 89.9, 90, 80));
        assert!(pressure(false, 90.0, 90, 80));
        assert!(pressure(true, 85.0, 90, 80));
        assert!(!pressure(true, 80.0, 90, 80));
        assert!(!pressure(false, 85.0, 90, 80));
        assert_eq!(used_percent(0, 0), 0.0);
        assert_eq!(used_percent(200, 50), 75.0);
        assert_eq!(used_percent(100, 500), 0.0);
    }
}
