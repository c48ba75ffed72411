//! [`KvsHlsFrameSource`]: live (or archived) KVS video as decoded frames with producer
//! timestamps.
//!
//! ```text
//!            ┌──────────────── control task (tokio) ────────────────┐
//!  KVS  ◀──  │ GetDataEndpoint (cached) → GetHLSStreamingSessionURL │  refresh before expiry / on 403
//!            │ master → media playlist, polled ~1/s                  │  backoff + reconnect on errors
//!  HLS  ◀──  │ new fragments, in order, once: init + fMP4            │  stall watchdog
//!            │ tfdt rebased: fragment PDT − first PDT                │
//!            └───────────────────────────┬──────────────────────────┘
//!                                        ▼ (2 fragments in flight)
//!            decoder thread: appsrc → parsebin → avdec_* → videoconvert → videoscale → appsink
//!                                        ▼ zero-copy Frame, producer time = epoch + PTS
//!            bounded queue (Block | DropOldest | LatestOnly) → frames() / stream()
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types as am;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{CommonOptions, common_setters, sleep_unless_stopped, stopped};
use super::{Core, FrameStream, Frames, Pushed, Queue, SourceState, SourceStats, TaskGuard};
use crate::backoff::BackoffPolicy;
use crate::decode::{Decoder, DecoderDrop, FragmentInput, FrameSink};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{FragmentId, Frame, PixelFormat};
use crate::hls::{self, MediaPlaylist, Segment, fmp4};
use crate::kvs::{KvsClient, StreamId};
use crate::metrics::FrameSourceMetrics;
use crate::source::{DeliveryPolicy, DropReason};

mod options;
mod reader;

pub(crate) use options::{ClientSource as SharedClientSource, client_setters};
pub use options::{
    Container, DiscontinuityMode, KvsHlsFrameSourceBuilder, PlaybackMode, TimestampSelector,
};
use reader::run;
pub(crate) use reader::{confirm_stream_gone, fail};

/// Live (or archived) video of one KVS stream as decoded frames with producer timestamps.
///
/// ```no_run
/// use kvs_frames::{KvsHlsFrameSource, PixelFormat};
///
/// let source = KvsHlsFrameSource::builder("front-entrance", "my-kvs-stream")
///     .region("us-east-1")
///     .pixel_format(PixelFormat::Bgr)
///     .build()?;
/// for item in source.frames() {
///     let (frame, ts) = item?; // ts: producer time (camera clock) when the playlist has it
///     tracing::info!("{}x{} at {:?}", frame.width(), frame.height(), ts);
/// }
/// # Ok::<(), kvs_frames::Error>(())
/// ```
///
/// What it does: GetDataEndpoint (cached) → GetHLSStreamingSessionURL → follows the media
/// playlist itself (about once a second) → downloads each new fragment once, in order → decodes
/// with GStreamer → a bounded queue. Sessions are replaced `refresh_margin` before they expire,
/// and at once after a 403, without restarting the decoder; fragments are matched across
/// sessions by their program date time, so nothing is lost or repeated. Transient errors and
/// stalls reconnect with jittered exponential backoff; fatal ones (stream deleted, not
/// authorized, invalid argument, unsupported media) end the iterator with that error.
///
/// Timestamps: a frame's producer time is its fragment's `EXT-X-PROGRAM-DATE-TIME` plus the
/// frame's offset inside the fragment. The iterator's timestamp is that producer time, or the
/// emit (wall) time when the playlist carries no program date time
/// (`display_timestamps(false)`).
pub struct KvsHlsFrameSource {
    ctx: Arc<Ctx>,
    core: Arc<Core>,
    decoder: Arc<Decoder>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for KvsHlsFrameSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvsHlsFrameSource")
            .field("camera_id", &self.ctx.camera_id)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl KvsHlsFrameSource {
    /// A builder for camera `camera_id` (the metrics label) reading KVS stream `stream` (a name,
    /// or an ARN starting with `arn:`).
    pub fn builder(camera_id: &str, stream: impl Into<StreamId>) -> KvsHlsFrameSourceBuilder {
        KvsHlsFrameSourceBuilder::new(camera_id, stream.into())
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

    /// Current state.
    pub fn state(&self) -> SourceState {
        self.core.state()
    }

    /// Counters and state.
    pub fn stats(&self) -> SourceStats {
        let mut stats = self.core.snapshot();
        stats.pipelines_built = self.decoder.pipelines_built();
        stats
    }

    /// Healthy = connected and a frame delivered within the last 30 s (or none expected yet).
    pub fn is_healthy(&self) -> bool {
        self.core.is_healthy()
    }

    /// Stops reading: the task ends, the pipeline is released, iterators end. Also done on drop.
    pub fn stop(&self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        self.core.queue.close();
        self.ctx.stop_notify.notify_waiters();
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
        self.decoder.stop();
        if self.core.state() != SourceState::Error {
            self.ctx.set_state(SourceState::Disconnected);
        }
    }
}

impl Drop for KvsHlsFrameSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// State shared by the source handle, its task and the decoder callbacks (also the GetMedia
/// source's).
pub(crate) struct Ctx {
    pub(crate) camera_id: String,
    pub(crate) core: Arc<Core>,
    pub(crate) metrics: Option<FrameSourceMetrics>,
    pub(crate) stop: AtomicBool,
    pub(crate) stop_notify: Notify,
    pub(crate) sequence: AtomicU64,
    /// Last time a frame was decoded (or the watch was reset).
    pub(crate) last_progress: Mutex<Instant>,
    pub(crate) decode_failed: Mutex<Option<Error>>,
    /// Wakes the control task early (decode error).
    pub(crate) wake: Notify,
    /// Set by the stall watchdog when it fired: the error it caused is a stall.
    pub(crate) stalled: AtomicBool,
}

impl Ctx {
    /// The context of a new source with `core`, its metrics registered.
    pub(crate) fn new(common: &CommonOptions, core: Arc<Core>) -> Arc<Ctx> {
        let ctx = Arc::new(Ctx {
            camera_id: common.camera_id.clone(),
            core,
            metrics: common.metrics.clone(),
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            sequence: AtomicU64::new(0),
            last_progress: Mutex::new(Instant::now()),
            decode_failed: Mutex::new(None),
            wake: Notify::new(),
            stalled: AtomicBool::new(false),
        });
        if let Some(m) = &ctx.metrics {
            m.init_camera(&ctx.camera_id);
        }
        ctx
    }

    /// Counts a failed request, stall or decode error.
    pub(crate) fn count_read_error(&self, error: &Error) {
        {
            let mut stats = self.core.stats.lock();
            stats.read_errors += 1;
            stats.last_error = Some(error.to_string());
        }
        if let Some(m) = &self.metrics {
            m.read_error(&self.camera_id);
        }
    }

    /// Notes the `failures`-th consecutive failure (and since when the source reconnects).
    pub(crate) fn note_failure(&self, failures: u32) {
        let mut stats = self.core.stats.lock();
        stats.consecutive_errors = failures;
        if stats.reconnecting_since.is_none() {
            stats.reconnecting_since = Some(SystemTime::now());
        }
    }

    /// Enters Reconnecting and counts a reconnect after `delay` (stats, backoff history,
    /// metrics).
    pub(crate) fn note_reconnect(&self, delay: Duration) {
        self.set_state(SourceState::Reconnecting);
        {
            let mut stats = self.core.stats.lock();
            stats.reconnects += 1;
            stats.backoff_history.push(delay);
            if stats.backoff_history.len() > 32 {
                stats.backoff_history.remove(0);
            }
        }
        if let Some(m) = &self.metrics {
            m.reconnect(&self.camera_id);
        }
    }

    pub(crate) fn set_state(&self, state: SourceState) {
        if self.core.state() != state {
            tracing::debug!(camera = %self.camera_id, state = state.as_str(), "state");
        }
        self.core.set_state(state);
        if let Some(m) = &self.metrics {
            m.state(&self.camera_id, state);
        }
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn reset_progress(&self) {
        *self.last_progress.lock() = Instant::now();
    }

    pub(crate) async fn sleep(&self, d: Duration) -> Result<()> {
        sleep_unless_stopped(&self.stop, &self.stop_notify, d).await
    }
}

pub(crate) struct Sink(pub(crate) Arc<Ctx>);

impl FrameSink for Sink {
    fn frame(&self, mut frame: Frame) {
        let ctx = &self.0;
        ctx.reset_progress();
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
            m.frame(&ctx.camera_id, producer_time);
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

    fn error(&self, error: Error) {
        let ctx = &self.0;
        *ctx.decode_failed.lock() = Some(error);
        ctx.wake.notify_one();
    }
}
