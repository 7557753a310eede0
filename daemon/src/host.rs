//! Host resources, sampled in the background (sysinfo) so that readers of
//! `/v1/node` and `/metrics` never wait on a refresh.

use fleet_model::api::HostResources;
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Clone, Default)]
pub struct HostSampler {
    latest: Arc<RwLock<HostSample>>,
}

#[derive(Debug, Clone, Default)]
pub struct HostSample {
    pub resources: HostResources,
    pub cpu_usage_percent: f32,
    pub load_average_5m: f64,
    pub load_average_15m: f64,
}

impl HostSampler {
    pub fn start(interval: Duration) -> Self {
        let sampler = Self::default();
        let latest = sampler.latest.clone();
        let mut system = sysinfo::System::new();
        refresh(&mut system, &latest);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                refresh(&mut system, &latest);
            }
        });
        sampler
    }

    pub fn snapshot(&self) -> HostResources {
        self.sample().resources
    }

    pub fn sample(&self) -> HostSample {
        self.latest.read().map(|s| s.clone()).unwrap_or_default()
    }
}

fn refresh(system: &mut sysinfo::System, latest: &RwLock<HostSample>) {
    system.refresh_memory();
    system.refresh_cpu_usage();
    let load = sysinfo::System::load_average();
    let sample = HostSample {
        resources: HostResources {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_total_bytes: system.total_memory(),
            memory_available_bytes: system.available_memory(),
            load_average_1m: load.one,
        },
        cpu_usage_percent: system.global_cpu_usage(),
        load_average_5m: load.five,
        load_average_15m: load.fifteen,
    };
    if let Ok(mut guard) = latest.write() {
        *guard = sample;
    }
}

/// Total memory, read once at start for the capacity check.
pub fn total_memory_bytes() -> u64 {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    system.total_memory()
}
