//! What the department containers use (CPU, memory) and how full the disks
//! under the state directory and Docker's data root are, sampled in the
//! background every `stats_interval` into a cache. `/metrics`, `/v1/usage` and
//! `agentctl top` read the cache, so a scrape never waits on Docker (a stats
//! call takes one to two seconds per container on a busy engine).

use crate::runtime::ContainerStats;
use crate::supervisor::board::DeptView;
use crate::supervisor::Shared;
use fleet_model::api::{DepartmentUsage, DeptState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A stats call slower than this is abandoned; the previous sample stays.
const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// The latest sample of one department's current container.
#[derive(Debug, Clone)]
pub struct Sample {
    pub container_id: String,
    pub stats: ContainerStats,
    /// Share of one core between this sample and the previous one of the same
    /// container.
    pub cpu_ratio: Option<f64>,
    pub taken: Instant,
    pub at_ms: i64,
}

/// Space on the filesystem holding one of the daemon's directories.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSample {
    /// `state` (the state directory) or `docker` (Docker's data root): a
    /// bounded label, where the path itself is not.
    pub volume: &'static str,
    pub path: PathBuf,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Default)]
struct Inner {
    samples: BTreeMap<String, Sample>,
    disks: Vec<DiskSample>,
}

/// Figures about the collection itself, for `/metrics` and the benchmark.
#[derive(Default)]
pub struct CollectorCounters {
    pub runs: AtomicU64,
    pub errors: AtomicU64,
    /// Duration of the last run, microseconds.
    pub last_duration_micros: AtomicU64,
}

#[derive(Clone, Default)]
pub struct UsageCache {
    inner: Arc<RwLock<Inner>>,
    pub counters: Arc<CollectorCounters>,
}

impl UsageCache {
    /// Starts the collector on `shared`'s board and runtime.
    pub fn start(shared: Arc<Shared>) -> Self {
        let cache = Self::default();
        let collector = cache.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(shared.config.stats_interval);
            // After a stall (Docker hanging), one run, not a burst.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut data_root = None;
            loop {
                ticker.tick().await;
                if shared.shutting_down() {
                    return;
                }
                collector.collect(&shared, &mut data_root).await;
            }
        });
        cache
    }

    /// The samples of the containers running now, by the board: a container
    /// that exited or was replaced since its sample shows nothing rather than
    /// stale figures until the next collection.
    pub fn current(&self, board: &BTreeMap<String, DeptView>) -> BTreeMap<String, Sample> {
        let Ok(inner) = self.inner.read() else {
            return BTreeMap::new();
        };
        inner
            .samples
            .iter()
            .filter(|(id, s)| {
                board.get(*id).is_some_and(|v| {
                    running(v) && v.container_id.as_deref() == Some(s.container_id.as_str())
                })
            })
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect()
    }

    pub fn disks(&self) -> Vec<DiskSample> {
        self.inner
            .read()
            .map(|i| i.disks.clone())
            .unwrap_or_default()
    }

    async fn collect(&self, shared: &Shared, data_root: &mut Option<PathBuf>) {
        let started = Instant::now();
        let board = shared.board.all();
        let running: Vec<(String, String)> = board
            .iter()
            .filter(|(_, v)| running(v))
            .filter_map(|(id, v)| v.container_id.clone().map(|c| (id.clone(), c)))
            .collect();
        let runtime = &shared.runtime;
        let results =
            futures_util::future::join_all(running.into_iter().map(|(id, container)| async move {
                let result = tokio::time::timeout(STATS_TIMEOUT, runtime.stats(&container)).await;
                (id, container, result)
            }))
            .await;

        if data_root.is_none() {
            // Asked until Docker answers; it does not move while the engine runs.
            *data_root = runtime.data_root().await.ok().flatten();
        }
        let mut dirs = vec![("state", shared.config.state_dir.clone())];
        if let Some(root) = data_root.clone() {
            dirs.push(("docker", root));
        }
        let disks = tokio::task::spawn_blocking(move || {
            dirs.into_iter()
                .filter_map(|(volume, path)| disk_sample(volume, &path))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();

        let now = Instant::now();
        let at_ms = unix_ms();
        let mut errors = 0;
        if let Ok(mut inner) = self.inner.write() {
            let mut next = BTreeMap::new();
            for (id, container, result) in results {
                let previous = inner.samples.get(&id);
                match result {
                    Ok(Ok(stats)) => {
                        let cpu_ratio =
                            previous
                                .filter(|p| p.container_id == container)
                                .and_then(|p| {
                                    let secs = now.duration_since(p.taken).as_secs_f64();
                                    (secs > 0.0).then(|| {
                                        ((stats.cpu_seconds - p.stats.cpu_seconds) / secs).max(0.0)
                                    })
                                });
                        next.insert(
                            id,
                            Sample {
                                container_id: container,
                                stats,
                                cpu_ratio,
                                taken: now,
                                at_ms,
                            },
                        );
                    }
                    Ok(Err(e)) => {
                        errors += 1;
                        tracing::debug!(department = %id, error = %e, "No container stats this round.");
                        if let Some(p) = previous.filter(|p| p.container_id == container) {
                            next.insert(id, p.clone());
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        tracing::debug!(department = %id, "Container stats timed out.");
                        if let Some(p) = previous.filter(|p| p.container_id == container) {
                            next.insert(id, p.clone());
                        }
                    }
                }
            }
            // Departments gone or not running drop out here.
            inner.samples = next;
            inner.disks = disks;
        }
        let c = &self.counters;
        c.runs.fetch_add(1, Ordering::Relaxed);
        c.errors.fetch_add(errors, Ordering::Relaxed);
        c.last_duration_micros
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// The `/v1/usage` rows: every department on the board, with its sample
    /// when it has one.
    pub fn usage(&self, shared: &Shared) -> Vec<DepartmentUsage> {
        let board = shared.board.all();
        let samples = self.current(&board);
        board
            .into_iter()
            .map(|(id, v)| {
                let sample = samples.get(&id);
                DepartmentUsage {
                    restarts: v.restarts(),
                    state: v.state,
                    health: v.health,
                    cpu_ratio: sample.and_then(|s| s.cpu_ratio),
                    cpu_seconds: sample.map(|s| s.stats.cpu_seconds),
                    memory_bytes: sample.map(|s| s.stats.memory_bytes),
                    memory_limit_bytes: sample.map(|s| s.stats.memory_limit_bytes),
                    sampled_at_ms: sample.map(|s| s.at_ms),
                    id,
                }
            })
            .collect()
    }
}

/// Whether the department's container runs, as its task last saw it (the
/// same test as `fleet_agent_department_up`).
pub fn running(v: &DeptView) -> bool {
    v.started_at.is_some() && v.state != DeptState::Stopped
}

// statvfs field widths differ between platforms (32-bit c_ulong, u64 here).
#[allow(clippy::unnecessary_cast)]
fn disk_sample(volume: &'static str, path: &Path) -> Option<DiskSample> {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let unit = s.fragment_size() as u64;
            Some(DiskSample {
                volume,
                path: path.to_path_buf(),
                total_bytes: (s.blocks() as u64).saturating_mul(unit),
                available_bytes: (s.blocks_available() as u64).saturating_mul(unit),
            })
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "Cannot stat the filesystem.");
            None
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_of_a_temp_dir_has_room() {
        let dir = std::env::temp_dir();
        let d = disk_sample("state", &dir).expect("statvfs of the temp dir");
        assert!(d.total_bytes > 0 && d.available_bytes <= d.total_bytes);
    }
}
