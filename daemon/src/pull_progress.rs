//! Bytes and rate of an image pull, from Docker's pull stream. Pure: the pull
//! task feeds it each message and the time, and publishes what it answers.

use fleet_model::api::Progress;
use std::collections::BTreeMap;

/// One message of Docker's `POST /images/create` stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullEvent {
    /// The layer, for per-layer messages.
    pub layer: Option<String>,
    pub status: String,
    pub current: Option<u64>,
    pub total: Option<u64>,
}

impl PullEvent {
    /// The human line Docker's CLI would print for it.
    pub fn line(&self) -> String {
        let mut line = String::new();
        if let Some(id) = &self.layer {
            line.push_str(id);
            line.push_str(": ");
        }
        line.push_str(&self.status);
        if let (Some(current), Some(total)) = (self.current, self.total) {
            line.push_str(&format!(" {current}/{total}"));
        }
        line
    }
}

#[derive(Debug, Clone, Default)]
struct Layer {
    downloaded: u64,
    size: Option<u64>,
    /// Downloaded (or already present, which moves nothing).
    done: bool,
    present: bool,
}

/// What a pull moved so far, per layer.
#[derive(Debug, Clone, Default)]
pub struct PullTracker {
    layers: BTreeMap<String, Layer>,
}

impl PullTracker {
    pub fn observe(&mut self, event: &PullEvent) {
        let Some(id) = &event.layer else { return };
        let status = event.status.as_str();
        // Docker also sends per-image lines with an id (`Pulling from x`,
        // the tag's digest): only layer states count.
        let is_layer_state = matches!(
            status,
            "Pulling fs layer"
                | "Waiting"
                | "Downloading"
                | "Verifying Checksum"
                | "Download complete"
                | "Extracting"
                | "Pull complete"
                | "Already exists"
                | "Retrying"
        ) || status.starts_with("Retrying");
        if !is_layer_state {
            return;
        }
        let layer = self.layers.entry(id.clone()).or_default();
        match status {
            "Downloading" => {
                layer.downloaded = event.current.unwrap_or(layer.downloaded);
                layer.size = event.total.filter(|t| *t > 0).or(layer.size);
            }
            "Download complete" | "Verifying Checksum" | "Extracting" | "Pull complete" => {
                layer.done = true;
                if let Some(size) = layer.size {
                    layer.downloaded = size;
                }
            }
            "Already exists" => {
                layer.done = true;
                layer.present = true;
            }
            _ => {}
        }
    }

    /// The progress `elapsed_seconds` after the pull of `image` began; none
    /// before the engine named a layer (it is still resolving the tag).
    pub fn progress(&self, image: &str, elapsed_seconds: f64) -> Option<Progress> {
        if self.layers.is_empty() {
            return None;
        }
        let fetched: Vec<&Layer> = self.layers.values().filter(|l| !l.present).collect();
        let done_bytes: u64 = fetched.iter().map(|l| l.downloaded).sum();
        // Docker learns a layer's size only when its download starts.
        let total_bytes = fetched
            .iter()
            .map(|l| l.size.or(if l.done { Some(l.downloaded) } else { None }))
            .sum::<Option<u64>>()
            .filter(|_| !fetched.is_empty());
        let layers_done = fetched.iter().filter(|l| l.done).count();
        let present = self.layers.len() - fetched.len();
        let mut detail = format!("{layers_done} of {} layers downloaded", fetched.len());
        if present > 0 {
            detail.push_str(&format!(", {present} already present"));
        }
        Some(Progress {
            operation: "pull".into(),
            subject: image.to_string(),
            done_bytes,
            total_bytes,
            bytes_per_second: if elapsed_seconds > 0.0 {
                done_bytes as f64 / elapsed_seconds
            } else {
                0.0
            },
            elapsed_seconds,
            detail: Some(detail),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(layer: &str, status: &str, current: Option<u64>, total: Option<u64>) -> PullEvent {
        PullEvent {
            layer: Some(layer.into()),
            status: status.into(),
            current,
            total,
        }
    }

    /// A pull as Docker streams it: one layer already present, two fetched,
    /// the second's size unknown until its download starts.
    #[test]
    fn counts_downloaded_bytes_and_knows_the_total_once_every_size_is_known() {
        let mut t = PullTracker::default();
        t.observe(&PullEvent {
            layer: Some("2".into()),
            status: "Pulling from agent".into(),
            ..Default::default()
        });
        for e in [
            ev("a", "Already exists", None, None),
            ev("b", "Pulling fs layer", None, None),
            ev("c", "Pulling fs layer", None, None),
            ev("b", "Downloading", Some(1000), Some(4000)),
        ] {
            t.observe(&e);
        }
        let p = t.progress("img:2", 2.0).unwrap();
        assert_eq!(p.done_bytes, 1000);
        assert_eq!(p.total_bytes, None, "c's size is not known yet");
        assert_eq!(p.bytes_per_second, 500.0);
        assert_eq!(
            p.detail.as_deref(),
            Some("0 of 2 layers downloaded, 1 already present")
        );
        for e in [
            ev("c", "Downloading", Some(500), Some(2000)),
            ev("b", "Downloading", Some(3000), Some(4000)),
        ] {
            t.observe(&e);
        }
        let p = t.progress("img:2", 4.0).unwrap();
        assert_eq!((p.done_bytes, p.total_bytes), (3500, Some(6000)));
        assert_eq!(
            p.line(),
            "3.4KiB of 5.9KiB (58%), 875B/s, 0 of 2 layers downloaded, 1 already present"
        );
        for e in [
            ev("b", "Download complete", None, None),
            ev("c", "Verifying Checksum", None, None),
            ev("b", "Extracting", Some(10), Some(9000)),
            ev("c", "Pull complete", None, None),
        ] {
            t.observe(&e);
        }
        let p = t.progress("img:2", 5.0).unwrap();
        assert_eq!((p.done_bytes, p.total_bytes), (6000, Some(6000)));
        assert_eq!(
            p.detail.as_deref(),
            Some("2 of 2 layers downloaded, 1 already present")
        );
    }

    #[test]
    fn an_image_with_every_layer_present_moves_nothing() {
        let mut t = PullTracker::default();
        t.observe(&ev("a", "Already exists", None, None));
        let p = t.progress("img", 1.0).unwrap();
        assert_eq!(
            (p.done_bytes, p.total_bytes, p.bytes_per_second),
            (0, None, 0.0)
        );
        assert!(PullTracker::default().progress("img", 0.0).is_none());
    }
}
