//! [`UriFrameSource`]: the frame API of [`KvsHlsFrameSource`](super::KvsHlsFrameSource) for
//! RTSP cameras, HLS URLs and files, decoded by GStreamer without going through KVS.
//!
//! ```text
//!            ┌────────────── control task (tokio) ──────────────┐
//!            │ build pipeline → PLAYING → wait for: error, EOS,  │  backoff + reconnect on errors,
//!            │ stall (no frame for stall_timeout), stop          │  stalls and live EOS; files end
//!            └───────────────────────┬──────────────────────────┘  (or loop) at EOS
//!                                    ▼
//!  urisourcebin ── rtspsrc (TCP/UDP, latency, NTP reference meta) → parsebin (depay → parse) → decoder
//!               ├─ souphttpsrc → hlsdemux → parsebin (demux → parse) → decoder
//!               └─ filesrc → parsebin (demux → parse) → decoder   (crate::decode::uri_decode_bin)
//!                                    ▼ shared tail (crate::decode::add_tail)
//!            [target-fps probe] videoconvert → videoscale → [jpegenc] → appsink
//!                                    ▼ zero-copy Frame; RTSP: producer time = sender NTP time
//!            bounded queue (Block | DropOldest | LatestOnly) → frames() / stream()
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};

use super::{CommonOptions, common_setters, sleep_unless_stopped, stopped};
use super::{Core, FrameStream, Frames, Pushed, Queue, SourceState, SourceStats, TaskGuard};
use crate::backoff::BackoffPolicy;
use crate::decode::{self, DecodeConfig, DecoderDrop, FrameSink, Stamp, TailHooks};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{Frame, PixelFormat};
use crate::metrics::FrameSourceMetrics;
use crate::redact::redact_url;
use crate::source::{DeliveryPolicy, DropReason};

mod connection;
mod options;
mod target;

use connection::run;
pub use options::{EndOfStream, RtspTransport, UriFrameSourceBuilder, UriKind};
use target::Target;

/// Decoded frames from an RTSP camera, an HLS URL or a file, with the API of
/// [`KvsHlsFrameSource`](super::KvsHlsFrameSource): the same [`Frame`], pixel formats,
/// `target_fps`, key-frame-only mode, delivery policies, reconnect with backoff, stall
/// watchdog, stats, state, metrics, iterator and stream.
///
/// ```no_run
/// use kvs_frames::{PixelFormat, UriFrameSource};
///
/// let source = UriFrameSource::builder("front-entrance", "rtsp://admin:secret@10.0.0.5/live")
///     .pixel_format(PixelFormat::Bgr)
///     .build()?;
/// for item in source.frames() {
///     let (frame, ts) = item?; // ts: the camera's NTP time once RTCP sender reports arrived
///     tracing::info!("{}x{} at {:?}", frame.width(), frame.height(), ts);
/// }
/// # Ok::<(), kvs_frames::Error>(())
/// ```
///
/// What it does: `urisourcebin` (with `rtspsrc`, `souphttpsrc` + `hlsdemux` or `filesrc`),
/// `parsebin` and the video decoder (in the demuxer's thread) decode the URI into the crate's shared GStreamer tail (conversion, scaling, optional JPEG
/// encoding, zero-copy frames) and a bounded queue. Errors, stalls (no frame for
/// `stall_timeout` while the reader keeps up) and the end of a live stream tear the pipeline
/// down and build a new one after a jittered exponential backoff; fatal errors (not
/// authorized, unsupported media, a missing plugin) end the iterator with that error. At the
/// end of a file or an HLS VOD the iterator ends (or starts again, with
/// [`EndOfStream::Loop`]). A file is never re-read after an error (that would repeat frames):
/// the error ends the iterator.
///
/// Timestamps: `pts()` is the media time of the current connection (it starts again after a
/// reconnect); for RTSP, `producer_time()` is the sender's NTP wall-clock time of the frame,
/// from RTCP sender reports — None until the first report arrives after each connect (a few
/// seconds) and for HLS URLs and files. The iterator's timestamp is the producer time when
/// known, else the emit (wall) time.
///
/// Credentials in the URI (`rtsp://user:password@host/…`) are passed to the source element as
/// properties, never in its location, and are redacted in every log line, error, stat and
/// `Debug` output.
pub struct UriFrameSource {
    ctx: Arc<Ctx>,
    core: Arc<Core>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for UriFrameSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UriFrameSource")
            .field("camera_id", &self.ctx.camera_id)
            .field("uri", &self.ctx.display)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl UriFrameSource {
    /// A builder for camera `camera_id` (the metrics label) reading `uri`: `rtsp://…`,
    /// `rtsps://…`, `http(s)://…m3u8`, `file://…` or a file path.
    pub fn builder(camera_id: &str, uri: &str) -> UriFrameSourceBuilder {
        UriFrameSourceBuilder::new(camera_id, uri)
    }

    /// Blocking iterator of `Result<(Frame, timestamp)>`.
    pub fn frames(&self) -> Frames<'_> {
        Frames { core: &self.core }
    }

    /// Async stream of the same items (share the source between an iterator and a stream and
    /// each frame goes to one of them).
    pub fn stream(&self) -> FrameStream {
        FrameStream {
            core: Arc::clone(&self.core),
        }
    }

    /// The camera id.
    pub fn camera_id(&self) -> &str {
        &self.ctx.camera_id
    }

    /// The URI, credentials redacted.
    pub fn uri(&self) -> &str {
        &self.ctx.display
    }

    /// What kind of URI this is.
    pub fn kind(&self) -> UriKind {
        self.ctx.kind
    }

    /// Current state.
    pub fn state(&self) -> SourceState {
        self.core.state()
    }

    /// Counters and state. For a URI source, `sessions` counts connections opened (the file
    /// opened, the RTSP session set up), `pipelines_built` the pipelines built (the same
    /// number); the fragment, playlist and URL-refresh counters stay 0.
    pub fn stats(&self) -> SourceStats {
        let mut stats = self.core.snapshot();
        stats.pipelines_built = self.ctx.pipelines_built.load(Ordering::Relaxed);
        stats
    }

    /// Healthy = connected and a frame delivered within the last 30 s (or none expected yet).
    pub fn is_healthy(&self) -> bool {
        self.core.is_healthy()
    }

    /// Stops reading: the task ends, the pipeline is released, iterators end. Also done on drop.
    pub fn stop(&self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        self.ctx.stop_notify.notify_waiters();
        // First the queue (a streaming thread blocked in a full `Block` queue lets go), then
        // the pipeline.
        self.core.queue.close();
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
        let pipeline = self.ctx.pipeline.lock().take();
        if let Some(pipeline) = pipeline {
            // An RTSP teardown may take a moment: off the caller's thread (a second at most).
            super::teardown(&self.ctx.camera_id, move || {
                let _ = pipeline.set_state(gst::State::Null);
            });
        }
        if self.core.state() != SourceState::Error {
            self.ctx.set_state(SourceState::Disconnected);
        }
    }
}

impl Drop for UriFrameSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the control task needs from the builder.
struct Options {
    target: Target,
    end_of_stream: EndOfStream,
    decode: DecodeConfig,
    rtsp_transport: RtspTransport,
    rtsp_latency: Duration,
    realtime: bool,
    stall_timeout: Duration,
    backoff: BackoffPolicy,
}

/// State shared by the source handle, its task and the pipeline callbacks.
struct Ctx {
    camera_id: String,
    /// The URI, redacted.
    display: String,
    kind: UriKind,
    core: Arc<Core>,
    metrics: Option<FrameSourceMetrics>,
    stop: AtomicBool,
    stop_notify: Notify,
    sequence: AtomicU64,
    /// Last time a frame was decoded (or dropped by target_fps), or the watch was reset.
    last_progress: Mutex<Instant>,
    /// Frames decoded by the current connection.
    connection_frames: AtomicU64,
    /// The running pipeline, for `stop()`.
    pipeline: Mutex<Option<gst::Pipeline>>,
    pipelines_built: AtomicU64,
}

impl Ctx {
    fn set_state(&self, state: SourceState) {
        if self.core.state() != state {
            tracing::debug!(camera = %self.camera_id, state = state.as_str(), "state");
        }
        self.core.set_state(state);
        if let Some(m) = &self.metrics {
            m.state(&self.camera_id, state);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn reset_progress(&self) {
        *self.last_progress.lock() = Instant::now();
    }

    async fn sleep(&self, d: Duration) -> Result<()> {
        sleep_unless_stopped(&self.stop, &self.stop_notify, d).await
    }
}

/// What the pipeline tells the control task.
enum Event {
    Error(Error),
    Eos,
}

struct Sink(Arc<Ctx>);

impl FrameSink for Sink {
    fn frame(&self, mut frame: Frame) {
        let ctx = &self.0;
        ctx.reset_progress();
        if ctx.connection_frames.fetch_add(1, Ordering::Relaxed) == 0 {
            {
                let mut stats = ctx.core.stats.lock();
                stats.consecutive_errors = 0;
                stats.reconnecting_since = None;
            }
            if !ctx.stopped() {
                ctx.set_state(SourceState::Connected);
            }
        }
        frame.sequence = ctx.sequence.fetch_add(1, Ordering::Relaxed);
        let producer_time = frame.producer_time;
        let emitted = frame.emitted;
        {
            // Noted before the frame becomes visible to the reader (who counts it delivered).
            let mut stats = ctx.core.stats.lock();
            stats.last_frame_producer_time = producer_time.or(stats.last_frame_producer_time);
            stats.last_frame_at = Some(emitted);
        }
        if let Some(m) = &ctx.metrics {
            // The last-frame gauge gets the frame's timestamp (producer time, else emit time),
            // so that staleness alerts work for sources without producer time.
            m.frame(&ctx.camera_id, Some(frame.timestamp()));
        }
        match ctx.core.queue.push(frame) {
            Pushed::Queued { evicted } if evicted > 0 => {
                ctx.core.stats.lock().frames_dropped_queue_full += evicted;
                if let Some(m) = &ctx.metrics {
                    m.dropped(&ctx.camera_id, DropReason::QueueFull, evicted);
                }
            }
            Pushed::Queued { .. } | Pushed::Closed | Pushed::Unconverted => {}
        }
    }

    fn dropped(&self, why: DecoderDrop) {
        let ctx = &self.0;
        ctx.reset_progress();
        let reason = ctx.core.stats.lock().count_decoder_drop(why);
        if let Some(m) = &ctx.metrics {
            m.dropped(&ctx.camera_id, reason, 1);
        }
    }

    fn error(&self, _error: Error) {
        // Errors reach the control task through the connection's event channel.
    }
}
