//! Prometheus metrics of frame sources, registered in a registry the application owns.
//!
//! The six `kvs_hls_*` names below are a compatibility promise (existing dashboards use them):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `kvs_hls_frames_total` | counter | `camera_id` |
//! | `kvs_hls_reconnects_total` | counter | `camera_id` |
//! | `kvs_hls_url_refreshes_total` | counter | `camera_id` |
//! | `kvs_hls_read_errors_total` | counter | `camera_id` |
//! | `kvs_hls_last_frame_timestamp` | gauge (producer time, Unix seconds) | `camera_id` |
//! | `kvs_hls_connection_state` | gauge (0 disconnected, 1 connecting, 2 connected, 3 reconnecting, 4 error) | `camera_id` |
//! | `kvs_hls_frames_dropped_total` | counter | `camera_id`, `reason` (`queue_full`, `target_fps`, `too_old`) |
//! | `kvs_hls_fragments_total` | counter | `camera_id` |
//! | `kvs_hls_fragment_bytes_total` | counter | `camera_id` |
//! | `kvs_hls_fragment_fetch_seconds` | histogram | `camera_id` |
//! | `kvs_hls_frame_age_seconds` | histogram (emit time − producer time, of delivered frames) | `camera_id` |
//! | `kvs_hls_fragments_skipped_total` | counter (fragments that left the LIVE window unfetched) | `camera_id` |
//! | `kvs_hls_clock_steps_total` | counter (producer clock steps between fragments) | `camera_id` |
//! | `kvs_hls_sessions_lost_total` | counter (sessions refused before their expiry) | `camera_id` |
//!
//! The crate re-exports the `prometheus` it is built with as [`kvs_frames::prometheus`]
//! (`crate::prometheus`): build the registry from it and no version of your own has to match
//! the crate's. [`encode_text`] renders a registry for a `/metrics` handler.
//!
//! ```
//! use kvs_frames::prometheus::Registry;
//!
//! let registry = Registry::new();
//! let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry)?;
//! // KvsHlsFrameSource::builder(…).metrics(metrics.clone()) for every source sharing the registry.
//! # let _ = metrics;
//! let body = kvs_frames::metrics::encode_text(&registry)?; // the body of GET /metrics
//! # let _ = body;
//! # Ok::<(), kvs_frames::Error>(())
//! ```
//!
//! [`kvs_frames::prometheus`]: crate::prometheus

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::error::{Error, ErrorKind, Result};
use crate::source::{DropReason, SourceState};

/// The collectors, cheap to clone; register once per registry and give a clone to every
/// source.
#[derive(Clone)]
pub struct FrameSourceMetrics {
    frames: IntCounterVec,
    reconnects: IntCounterVec,
    url_refreshes: IntCounterVec,
    read_errors: IntCounterVec,
    last_frame: GaugeVec,
    state: IntGaugeVec,
    dropped: IntCounterVec,
    fragments: IntCounterVec,
    bytes: IntCounterVec,
    fetch_seconds: prometheus::HistogramVec,
    frame_age: prometheus::HistogramVec,
    skipped: IntCounterVec,
    clock_steps: IntCounterVec,
    sessions_lost: IntCounterVec,
}

impl std::fmt::Debug for FrameSourceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSourceMetrics").finish_non_exhaustive()
    }
}

/// The content type of [`encode_text`]'s output (Prometheus text format 0.0.4), for the
/// `Content-Type` header of a `/metrics` response.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Every metric family of `registry` in the Prometheus text exposition format (what a
/// `/metrics` endpoint answers; serve it with [`TEXT_CONTENT_TYPE`]).
///
/// Fails only if a collector in the registry produced an invalid family (an error of the
/// collector's author, named in the message).
pub fn encode_text(registry: &Registry) -> Result<String> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot encode the metrics: {e}"),
            )
        })?;
    String::from_utf8(out).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("the metrics text is not UTF-8: {e}"),
        )
    })
}

fn prom(e: prometheus::Error) -> Error {
    Error::new(
        ErrorKind::InvalidConfig,
        format!(
            "cannot register the kvs_hls metrics: {e} (register them once per registry and share the FrameSourceMetrics)"
        ),
    )
}

impl FrameSourceMetrics {
    /// Creates the collectors and registers them in `registry`. Fails if they are already
    /// registered there.
    pub fn register(registry: &Registry) -> Result<Self> {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["camera_id"]).map_err(prom)
        };
        let m = FrameSourceMetrics {
            frames: counter("kvs_hls_frames_total", "Frames delivered to the reader")?,
            reconnects: counter(
                "kvs_hls_reconnects_total",
                "Reconnections after errors or stalls",
            )?,
            url_refreshes: counter(
                "kvs_hls_url_refreshes_total",
                "HLS streaming session URLs refreshed before expiry or after a 403",
            )?,
            read_errors: counter(
                "kvs_hls_read_errors_total",
                "Errors while reading the stream",
            )?,
            last_frame: GaugeVec::new(
                Opts::new(
                    "kvs_hls_last_frame_timestamp",
                    "Producer time of the newest delivered frame, Unix seconds",
                ),
                &["camera_id"],
            )
            .map_err(prom)?,
            state: IntGaugeVec::new(
                Opts::new(
                    "kvs_hls_connection_state",
                    "0 disconnected, 1 connecting, 2 connected, 3 reconnecting, 4 error",
                ),
                &["camera_id"],
            )
            .map_err(prom)?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "kvs_hls_frames_dropped_total",
                    "Decoded frames not delivered, by reason",
                ),
                &["camera_id", "reason"],
            )
            .map_err(prom)?,
            fragments: counter("kvs_hls_fragments_total", "Media fragments downloaded")?,
            bytes: counter(
                "kvs_hls_fragment_bytes_total",
                "Bytes downloaded: media fragments and init segments",
            )?,
            fetch_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "kvs_hls_fragment_fetch_seconds",
                    "Time to download one fragment",
                )
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["camera_id"],
            )
            .map_err(prom)?,
            frame_age: HistogramVec::new(
                HistogramOpts::new(
                    "kvs_hls_frame_age_seconds",
                    "Emit time minus producer time of delivered frames",
                )
                .buckets(vec![
                    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0,
                ]),
                &["camera_id"],
            )
            .map_err(prom)?,
            skipped: counter(
                "kvs_hls_fragments_skipped_total",
                "Fragments that left the LIVE playlist window before they were fetched",
            )?,
            clock_steps: counter(
                "kvs_hls_clock_steps_total",
                "Steps of the producer clock between consecutive fragments",
            )?,
            sessions_lost: counter(
                "kvs_hls_sessions_lost_total",
                "HLS sessions refused before their expiry (revoked, or closed by a sixth session)",
            )?,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 14] = [
            Box::new(m.frames.clone()),
            Box::new(m.reconnects.clone()),
            Box::new(m.url_refreshes.clone()),
            Box::new(m.read_errors.clone()),
            Box::new(m.last_frame.clone()),
            Box::new(m.state.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.fragments.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.fetch_seconds.clone()),
            Box::new(m.frame_age.clone()),
            Box::new(m.skipped.clone()),
            Box::new(m.clock_steps.clone()),
            Box::new(m.sessions_lost.clone()),
        ];
        for c in collectors {
            registry.register(c).map_err(prom)?;
        }
        Ok(m)
    }

    /// Creates every series of `camera_id` at zero so that dashboards see the camera at once.
    pub(crate) fn init_camera(&self, camera: &str) {
        let _ = self.frames.with_label_values(&[camera]);
        let _ = self.reconnects.with_label_values(&[camera]);
        let _ = self.url_refreshes.with_label_values(&[camera]);
        let _ = self.read_errors.with_label_values(&[camera]);
        let _ = self.fragments.with_label_values(&[camera]);
        let _ = self.bytes.with_label_values(&[camera]);
        let _ = self.skipped.with_label_values(&[camera]);
        let _ = self.clock_steps.with_label_values(&[camera]);
        let _ = self.sessions_lost.with_label_values(&[camera]);
        for reason in [
            DropReason::QueueFull,
            DropReason::TargetFps,
            DropReason::TooOld,
        ] {
            let _ = self.dropped.with_label_values(&[camera, reason.as_str()]);
        }
        self.state.with_label_values(&[camera]).set(0);
    }

    /// A frame the reader took, with its age when it left the decoder: the age histogram
    /// counts exactly the delivered frames.
    pub(crate) fn delivered(&self, camera: &str, age: Option<Duration>) {
        self.frames.with_label_values(&[camera]).inc();
        if let Some(age) = age {
            self.frame_age
                .with_label_values(&[camera])
                .observe(age.as_secs_f64());
        }
    }

    /// A decoded frame entering the queue: the last-frame gauge.
    pub(crate) fn frame(&self, camera: &str, producer_time: Option<SystemTime>) {
        if let Some(t) = producer_time.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            self.last_frame
                .with_label_values(&[camera])
                .set(t.as_secs_f64());
        }
    }

    pub(crate) fn dropped(&self, camera: &str, reason: DropReason, n: u64) {
        self.dropped
            .with_label_values(&[camera, reason.as_str()])
            .inc_by(n);
    }

    pub(crate) fn reconnect(&self, camera: &str) {
        self.reconnects.with_label_values(&[camera]).inc();
    }

    pub(crate) fn url_refresh(&self, camera: &str) {
        self.url_refreshes.with_label_values(&[camera]).inc();
    }

    pub(crate) fn read_error(&self, camera: &str) {
        self.read_errors.with_label_values(&[camera]).inc();
    }

    pub(crate) fn fragments_skipped(&self, camera: &str, n: u64) {
        self.skipped.with_label_values(&[camera]).inc_by(n);
    }

    pub(crate) fn clock_step(&self, camera: &str) {
        self.clock_steps.with_label_values(&[camera]).inc();
    }

    pub(crate) fn session_lost(&self, camera: &str) {
        self.sessions_lost.with_label_values(&[camera]).inc();
    }

    pub(crate) fn state(&self, camera: &str, state: SourceState) {
        self.state.with_label_values(&[camera]).set(state as i64);
    }

    /// An init segment was downloaded: its bytes count with the fragments' (as in the stats).
    pub(crate) fn init_segment(&self, camera: &str, bytes: usize) {
        self.bytes.with_label_values(&[camera]).inc_by(bytes as u64);
    }

    pub(crate) fn fragment(&self, camera: &str, bytes: usize, fetch: Duration) {
        self.fragments.with_label_values(&[camera]).inc();
        self.bytes.with_label_values(&[camera]).inc_by(bytes as u64);
        self.fetch_seconds
            .with_label_values(&[camera])
            .observe(fetch.as_secs_f64());
    }
}
