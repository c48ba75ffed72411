//! The emulator's synthetic live camera.
//!
//! A [`Camera`] renders frames in Rust, encodes them with GStreamer's `x264enc` in real time and
//! hands out each finished fragment (a group of pictures starting with an IDR frame) through a
//! callback, ready for the emulator's fMP4 writer:
//!
//! ```text
//! appsrc (I420, rendered here: moving gradient and box, barcode strip of the frame number)
//!   ! textoverlay (stream name, frame number, producer time; text set per buffer by a pad probe)
//!   ! x264enc (zerolatency, ultrafast, IDR exactly every `frames_per_fragment` frames)
//!   ! h264parse ! video/x-h264,stream-format=avc,alignment=au
//!   ! appsink (pulled synchronously after every push: one access unit per frame)
//! ```
//!
//! Frame `n` has the producer time `start + n / fps` and is pushed when the wall clock reaches
//! that time, so frames whose time is already past (the `history` before "now") are encoded as
//! fast as the machine allows and the rest in real time.
//!
//! Every picture carries a [`barcode`](super::barcode) of its frame number in a strip across the
//! top, and below it a line of text such as `cam-1  #000123  2026-11-21T10:00:00.040Z`.
//!
//! The code is split by concern: [`config`] checks a [`CameraConfig`], [`timing`] computes
//! the producer time, PTS and decode time of each frame, [`render`] draws the pictures,
//! [`pipeline`] builds and watches the GStreamer pipeline and [`worker`] is the camera thread's
//! loop that paces, pushes, pulls and assembles fragments.

mod config;
mod pipeline;
mod render;
mod timing;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use parking_lot::{Condvar, Mutex};
use tracing::{error, info, warn};

use crate::error::{Error, ErrorKind, Result};
use crate::mp4::{Sample, VideoTrack};

pub(crate) use self::config::CameraConfig;
use self::config::{validate, validate_size};
use self::pipeline::Pipeline;
use self::render::{Layout, Renderer};
use self::timing::{Timing, label};
use self::worker::Worker;

/// Longest wait between two checks of the wall clock while pacing (a stop wakes it at once).
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// One finished fragment: `frames_per_fragment` encoded frames, the first an IDR frame.
#[derive(Clone, Debug)]
pub(crate) struct EncodedFragment {
    /// Fragment counter: 0, 1, 2, … without gaps.
    pub index: u64,
    /// Global frame number of the fragment's first frame.
    pub first_frame: u64,
    /// Producer time of the fragment's first frame (`start + first_frame / fps`).
    pub producer_start: SystemTime,
    /// Duration of the fragment: frame count / fps.
    pub duration: Duration,
    /// Decode time (timescale ticks) of the first frame; continuous across fragments and
    /// resolution changes.
    pub decode_time: u64,
    /// The track the samples belong to: the same `Arc` until the codec data changes.
    pub track: Arc<VideoTrack>,
    /// The encoded frames in decode order.
    pub samples: Vec<Sample>,
}

/// One encoded access unit, handed out as soon as the encoder produced it (before its fragment
/// is complete): what a live `GetMedia` connection streams.
#[derive(Clone, Debug)]
pub(crate) struct LiveSample {
    /// The camera's counter of the fragment the frame belongs to ([`EncodedFragment::index`]).
    pub fragment: u64,
    /// Producer time of that fragment's first frame.
    pub fragment_start: SystemTime,
    /// The frame's producer time.
    pub producer_time: SystemTime,
    /// The track of the fragment.
    pub track: Arc<VideoTrack>,
    /// The access unit.
    pub sample: Sample,
}

/// What the camera hands out, in order: every access unit as it is encoded (decode order), and
/// each fragment once all its access units are out.
#[derive(Clone, Debug)]
pub(crate) enum CameraEvent {
    /// An access unit.
    Sample(LiveSample),
    /// A finished fragment.
    Fragment(EncodedFragment),
}

/// A running synthetic camera: a thread that renders, encodes and delivers fragments.
///
/// Dropping it stops it like [`Camera::stop`].
pub(crate) struct Camera {
    /// State shared with the camera thread.
    shared: Arc<Shared>,
    /// The camera thread, until it is joined.
    thread: Option<JoinHandle<()>>,
}

/// State shared between [`Camera`] and its thread.
struct Shared {
    /// Set to ask the thread to stop.
    stop: Mutex<bool>,
    /// Wakes the thread when `stop` is set.
    wake: Condvar,
    /// Resolution requested by [`Camera::set_resolution`], applied at the next fragment boundary.
    resolution: Mutex<Option<(u32, u32)>>,
    /// Number of frames encoded so far.
    frames: AtomicU64,
    /// The error that ended the camera thread, if any.
    last_error: Mutex<Option<String>>,
    /// Test hook: makes the thread post an error message on the pipeline's bus.
    #[cfg(test)]
    inject_error: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Whether a stop was requested.
    fn stopping(&self) -> bool {
        *self.stop.lock()
    }

    /// Sleeps until the wall clock reaches `target` (returns `true`) or a stop is requested
    /// (returns `false`). Returns at once when `target` is already past.
    fn wait_until(&self, target: SystemTime) -> bool {
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            match target.duration_since(SystemTime::now()) {
                Ok(remaining) if !remaining.is_zero() => {
                    // Bounded so that a wall-clock step is noticed soon.
                    self.wake.wait_for(&mut stop, remaining.min(MAX_SLEEP));
                }
                _ => return true,
            }
        }
    }
}

/// A pipeline error with `message`.
fn pipeline_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Pipeline, message)
}

impl Camera {
    /// Starts the camera thread. `on_event` is called (from the camera thread) for every access
    /// unit and every finished fragment, in order; while it runs, the camera does not encode, so
    /// it should return quickly.
    ///
    /// Fails when the configuration is out of range or the pipeline cannot be built or started.
    pub fn start(
        cfg: CameraConfig,
        on_event: impl FnMut(CameraEvent) + Send + 'static,
    ) -> Result<Camera> {
        validate(&cfg)?;
        gst::init().map_err(|e| pipeline_error(format!("GStreamer init: {e}")))?;
        let timing = Timing::new(cfg.start, cfg.rate, cfg.decode_time_base);
        // The label's length with an 8-digit frame number.
        let label_chars = label(&cfg.name, 10_000_000, cfg.start).chars().count();
        let layout = Layout::new(cfg.width, cfg.height, label_chars);
        let renderer = Renderer::new(cfg.width, cfg.height, cfg.rate, layout)?;
        let pipe = Pipeline::build(&cfg, timing, &renderer.caps()?)?;
        pipe.apply_layout(&layout);
        if let Err(e) = pipe.pipeline.set_state(gst::State::Playing) {
            pipe.check_bus(&cfg.name)?;
            return Err(pipeline_error(format!(
                "camera {}: cannot start the pipeline: {e}",
                cfg.name
            )));
        }
        info!(
            camera = cfg.name.as_str(),
            "camera {}x{} at {} fps, {} frames per fragment, {} kbit/s, {:?} of history",
            cfg.width,
            cfg.height,
            cfg.rate,
            cfg.frames_per_fragment,
            cfg.bitrate_kbps,
            cfg.history
        );
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            resolution: Mutex::new(None),
            frames: AtomicU64::new(0),
            last_error: Mutex::new(None),
            #[cfg(test)]
            inject_error: std::sync::atomic::AtomicBool::new(false),
        });
        let mut worker = Worker {
            name: cfg.name.clone(),
            frames_per_fragment: u64::from(cfg.frames_per_fragment),
            timing,
            pipe,
            renderer,
            label_chars,
            shared: shared.clone(),
            on_event,
            last_caps: None,
            track: None,
            open: std::collections::VecDeque::new(),
            lag: if cfg.b_frames == 0 {
                0
            } else {
                u64::from(cfg.b_frames) + 2
            },
            offsets: cfg.offsets,
            next_index: 0,
            max_frames: cfg.max_frames,
        };
        let thread = std::thread::Builder::new()
            .name(format!("camera-{}", cfg.name))
            .spawn(move || {
                if let Err(e) = worker.run() {
                    error!(camera = worker.name.as_str(), "camera stopped: {e}");
                    *worker.shared.last_error.lock() = Some(e.to_string());
                }
                // Dropping the worker sets the pipeline to Null.
            })
            .map_err(|e| {
                pipeline_error(format!("camera {}: cannot spawn thread: {e}", cfg.name))
            })?;
        Ok(Camera {
            shared,
            thread: Some(thread),
        })
    }

    /// Changes the resolution starting at the next fragment boundary: the next fragment starts
    /// with an IDR frame and carries a new [`VideoTrack`] with new codec data; decode times stay
    /// continuous. A size that is odd or out of range is ignored with a warning.
    pub fn set_resolution(&self, width: u32, height: u32) {
        if let Err(e) = validate_size(width, height) {
            warn!("camera: set_resolution ignored: {e}");
            return;
        }
        *self.shared.resolution.lock() = Some((width, height));
    }

    /// Number of frames encoded so far (for diagnostics).
    pub fn frames_encoded(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// The error that ended the camera thread (a GStreamer bus error, a push failure, …), if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// Whether the camera thread is still running (it ends on an error or a stop).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops and joins the camera thread, which sets the pipeline to `Null`. A fragment still
    /// being assembled is dropped. Also done on drop.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Asks the thread to stop and joins it.
    fn shutdown(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("camera thread panicked");
            *self.shared.last_error.lock() = Some("camera thread panicked".to_owned());
        }
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
