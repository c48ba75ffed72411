//! Frame sources: [`KvsHlsFrameSource`] (KVS over HLS), [`UriFrameSource`] (RTSP, HLS URLs,
//! files), and what every source shares: the
//! delivery queue and its [`DeliveryPolicy`], [`SourceState`], [`SourceStats`], the blocking
//! [`Frames`] iterator and the async [`FrameStream`].

mod kvs_getmedia;
mod kvs_hls;
pub(crate) mod queue;
mod set;
mod uri;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

pub use kvs_getmedia::{GetMediaStart, KvsGetMediaFrameSource, KvsGetMediaFrameSourceBuilder};
pub use kvs_hls::{
    Container, DiscontinuityMode, KvsHlsFrameSource, KvsHlsFrameSourceBuilder, PlaybackMode,
    TimestampSelector,
};
pub use queue::DeliveryPolicy;
pub(crate) use queue::{Pushed, Queue};
pub use set::{SetFrames, SetItem, SetMember, SetStats, SetStream, SourceSet};
pub use uri::{EndOfStream, RtspTransport, UriFrameSource, UriFrameSourceBuilder, UriKind};

use crate::backoff::BackoffPolicy;
use crate::decode::{DecodeConfig, DecoderThreads};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{ColorConversion, Frame, PixelFormat};
use crate::metrics::FrameSourceMetrics;

/// Connection state of a source. The numbers are the values of the
/// `kvs_hls_connection_state` gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SourceState {
    /// Not started, or stopped.
    #[default]
    Disconnected = 0,
    /// Opening the first session.
    Connecting = 1,
    /// Frames are flowing (or the playlist is being followed).
    Connected = 2,
    /// Waiting out a backoff after an error, or opening a new session after one.
    Reconnecting = 3,
    /// Ended by a fatal error (see [`SourceStats::last_error`]).
    Error = 4,
}

impl SourceState {
    fn from_u8(v: u8) -> SourceState {
        match v {
            1 => SourceState::Connecting,
            2 => SourceState::Connected,
            3 => SourceState::Reconnecting,
            4 => SourceState::Error,
            _ => SourceState::Disconnected,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Disconnected => "disconnected",
            SourceState::Connecting => "connecting",
            SourceState::Connected => "connected",
            SourceState::Reconnecting => "reconnecting",
            SourceState::Error => "error",
        }
    }
}

/// Why a decoded frame was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The queue was full and the policy (`DropOldest`, `LatestOnly`) evicted it.
    QueueFull,
    /// Dropped to honour `target_fps`.
    TargetFps,
    /// Older than `max_frame_age` when decoded (before colour conversion).
    TooOld,
}

impl DropReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TargetFps => "target_fps",
            DropReason::TooOld => "too_old",
        }
    }
}

/// A snapshot of a source's counters and state.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    /// Current state.
    pub state: SourceState,
    /// Frames the reader took (from the iterator or the stream). Frames dropped from the queue
    /// are not delivered: delivered + dropped (both reasons) = decoded.
    pub frames_delivered: u64,
    /// Frames dropped because the reader was behind (policy `DropOldest`/`LatestOnly`).
    pub frames_dropped_queue_full: u64,
    /// Frames dropped to honour `target_fps`.
    pub frames_dropped_target_fps: u64,
    /// Frames dropped because their producer time was more than `max_frame_age` ago when they
    /// were decoded.
    pub frames_dropped_too_old: u64,
    /// LIVE fragments not fetched because they ended more than `max_frame_age` ago (after an
    /// outage the reader goes on at the live edge instead of reading through its backlog).
    pub fragments_too_old: u64,
    /// Media fragments downloaded.
    pub fragments_fetched: u64,
    /// Bytes of media fragments and init segments downloaded.
    pub bytes_fetched: u64,
    /// Media playlist requests.
    pub playlist_polls: u64,
    /// Streaming sessions opened (the first one included).
    pub sessions: u64,
    /// Sessions opened to replace one that was expiring or was refused (403).
    pub url_refreshes: u64,
    /// Reconnections after an error or a stall.
    pub reconnects: u64,
    /// Times the first connection found no fragment yet (a camera that had not started
    /// sending) and waited about a second for it: not reconnects, not read errors.
    pub waits_for_first_fragment: u64,
    /// Errors while reading (each failed request, stall or decode error).
    pub read_errors: u64,
    /// Decode errors (the pipeline was rebuilt after each).
    pub decode_errors: u64,
    /// Fragments that left the LIVE playlist window before they were fetched (the reader was
    /// away longer than the window lasts). Inside a session counted exactly from the media
    /// sequence; across sessions estimated from the gap in program date time.
    pub fragments_skipped: u64,
    /// Steps of the producer clock between consecutive fragments: program date times that go
    /// back, or (LIVE) forward by more than the wall time that passed. Frames are neither lost
    /// nor repeated for them.
    pub clock_steps: u64,
    /// HLS sessions refused (403) before they were due to expire: revoked, or closed by KVS
    /// because a sixth session of the stream was created (another reader). Each was replaced at
    /// once.
    pub sessions_lost: u64,
    /// Decode pipelines built (1 + rebuilds).
    pub pipelines_built: u64,
    /// Errors in a row without a fragment in between.
    pub consecutive_errors: u32,
    /// When the current outage began (the first of the current run of consecutive errors);
    /// None while frames flow.
    pub reconnecting_since: Option<SystemTime>,
    /// The most recent backoff delays, oldest first (at most 32).
    pub backoff_history: Vec<Duration>,
    /// The last error (redacted), fatal or not.
    pub last_error: Option<String>,
    /// Producer time of the newest delivered frame.
    pub last_frame_producer_time: Option<SystemTime>,
    /// Wall time of the newest delivered frame.
    pub last_frame_at: Option<SystemTime>,
    /// Frames waiting in the queue.
    pub queue_len: usize,
}

impl SourceStats {
    /// Every dropped frame, whatever the reason.
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped_queue_full
            + self.frames_dropped_target_fps
            + self.frames_dropped_too_old
    }

    /// Counts a frame the decoder's tail dropped; the reason for the metrics.
    pub(crate) fn count_decoder_drop(&mut self, why: crate::decode::DecoderDrop) -> DropReason {
        match why {
            crate::decode::DecoderDrop::TargetFps => {
                self.frames_dropped_target_fps += 1;
                DropReason::TargetFps
            }
            crate::decode::DecoderDrop::TooOld => {
                self.frames_dropped_too_old += 1;
                DropReason::TooOld
            }
        }
    }
}

/// The options every frame source has, validated in one place.
/// The default bound of a source's queue in bytes (see `queue_bytes`).
pub(crate) const DEFAULT_QUEUE_BYTES: usize = 32 << 20;

#[derive(Clone)]
pub(crate) struct CommonOptions {
    pub camera_id: String,
    pub pixel_format: PixelFormat,
    pub resize: Option<(u32, u32)>,
    pub resize_mode: crate::frame::ResizeMode,
    pub target_fps: Option<f64>,
    pub key_frames_only: bool,
    pub max_frame_age: Option<Duration>,
    pub conversion: ColorConversion,
    pub decoder_threads: DecoderThreads,
    pub queue_capacity: usize,
    pub queue_bytes: usize,
    pub backoff: BackoffPolicy,
    pub metrics: Option<FrameSourceMetrics>,
    pub runtime: Option<tokio::runtime::Handle>,
}

impl CommonOptions {
    pub fn new(camera_id: &str) -> Self {
        CommonOptions {
            camera_id: camera_id.to_owned(),
            pixel_format: PixelFormat::Bgr,
            resize: None,
            resize_mode: crate::frame::ResizeMode::Stretch,
            target_fps: None,
            key_frames_only: false,
            max_frame_age: None,
            conversion: ColorConversion::Simd,
            decoder_threads: DecoderThreads::Auto,
            queue_capacity: 30,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            backoff: BackoffPolicy::default(),
            metrics: None,
            runtime: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.camera_id.is_empty()
            || self.camera_id.len() > 128
            || self.camera_id.chars().any(char::is_control)
        {
            return Err(Error::invalid_config(
                "camera_id",
                format!("{:?}", self.camera_id),
                "must be 1-128 printable characters",
            ));
        }
        self.pixel_format.validate()?;
        if let Some((w, h)) = self.resize
            && (!(16..=7680).contains(&w)
                || !(16..=4320).contains(&h)
                || !w.is_multiple_of(2)
                || !h.is_multiple_of(2))
        {
            return Err(Error::invalid_config(
                "resize",
                format!("{w}x{h}"),
                "width and height must be even, 16-7680 by 16-4320",
            ));
        }
        if let crate::frame::ResizeMode::Letterbox { .. } = self.resize_mode
            && !crate::decode::pads_letterbox(self.conversion, self.pixel_format)
        {
            return Err(Error::invalid_config(
                "resize_mode",
                format!(
                    "Letterbox with {} and {:?} colour conversion",
                    self.pixel_format, self.conversion
                ),
                "letterbox padding is done by the SIMD converter: use bgr, rgb, bgra, rgba or \
                 gray8 with ColorConversion::Simd, or ResizeMode::Fit",
            ));
        }
        if self.resize_mode != crate::frame::ResizeMode::Stretch && self.resize.is_none() {
            return Err(Error::invalid_config(
                "resize_mode",
                format!("{:?}", self.resize_mode),
                "needs resize(width, height): the size to fit into",
            ));
        }
        if let Some(fps) = self.target_fps
            && !(fps.is_finite() && fps > 0.0 && fps <= 240.0)
        {
            return Err(Error::invalid_config(
                "target_fps",
                fps,
                "must be more than 0 and at most 240",
            ));
        }
        if let Some(age) = self.max_frame_age
            && !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&age)
        {
            return Err(Error::invalid_config(
                "max_frame_age",
                format!("{age:?}"),
                "must be between 100 ms and 1 h",
            ));
        }
        if let DecoderThreads::Fixed(n) = self.decoder_threads
            && !(1..=64).contains(&n)
        {
            return Err(Error::invalid_config(
                "decoder_threads",
                n,
                "must be between 1 and 64",
            ));
        }
        if !(1..=10_000).contains(&self.queue_capacity) {
            return Err(Error::invalid_config(
                "queue_capacity",
                self.queue_capacity,
                "must be between 1 and 10000",
            ));
        }
        if !(1 << 20..=1 << 34).contains(&self.queue_bytes) {
            return Err(Error::invalid_config(
                "queue_bytes",
                self.queue_bytes,
                "must be between 1 MiB and 16 GiB",
            ));
        }
        self.backoff.validate("backoff")
    }

    /// Checks that GStreamer has `head`'s elements and the shared tail's for the pixel format
    /// (a missing one is named with its Debian package).
    pub fn require_elements(&self, head: &[&str]) -> Result<()> {
        let mut all = head.to_vec();
        all.extend(crate::decode::tail_elements(self.pixel_format));
        crate::elements::require(&all)
    }

    pub fn decode_config(&self) -> DecodeConfig {
        DecodeConfig {
            name: self.camera_id.clone(),
            pixel_format: self.pixel_format,
            resize: self.resize,
            resize_mode: self.resize_mode,
            target_fps: self.target_fps,
            key_frames_only: self.key_frames_only,
            max_frame_age: self.max_frame_age,
            conversion: self.conversion,
            decoder_threads: self.decoder_threads,
        }
    }

    /// The given runtime, else the current multi-thread runtime, else the crate's shared one.
    pub fn runtime_handle(&self) -> Result<tokio::runtime::Handle> {
        if let Some(h) = &self.runtime {
            return Ok(h.clone());
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => Ok(h),
            _ => Ok(shared_runtime()?.handle().clone()),
        }
    }
}

fn shared_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("kvs-frames")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot start the shared runtime: {e}"),
            )
        })
}

/// The setters of [`CommonOptions`], for builders that keep them in a `common` field.
macro_rules! common_setters {
    () => {
        /// Pixel format of delivered frames (default BGR), or [`PixelFormat::Jpeg`].
        #[must_use]
        pub fn pixel_format(mut self, format: PixelFormat) -> Self {
            self.common.pixel_format = format;
            self
        }
        /// Scale frames to `width` × `height` (even numbers, 16–7680 × 16–4320), as
        /// [`resize_mode`](Self::resize_mode) says (default: stretched to exactly that size).
        /// Each frame's [`geometry`](crate::Frame::geometry) maps its pixels back to the
        /// decoded picture.
        #[must_use]
        pub fn resize(mut self, width: u32, height: u32) -> Self {
            self.common.resize = Some((width, height));
            self
        }
        /// How [`resize`](Self::resize) treats the aspect ratio: [`ResizeMode::Stretch`]
        /// (default), [`ResizeMode::Fit`] (inside the size, aspect kept) or
        /// [`ResizeMode::Letterbox`] (fit, then padded with a colour to exactly the size).
        ///
        /// [`ResizeMode::Stretch`]: crate::ResizeMode::Stretch
        /// [`ResizeMode::Fit`]: crate::ResizeMode::Fit
        /// [`ResizeMode::Letterbox`]: crate::ResizeMode::Letterbox
        #[must_use]
        pub fn resize_mode(mut self, mode: crate::ResizeMode) -> Self {
            self.common.resize_mode = mode;
            self
        }
        /// Deliver at most `fps` frames per second of video (0 < fps ≤ 240); the others are
        /// dropped after decoding and before colour conversion.
        #[must_use]
        pub fn target_fps(mut self, fps: f64) -> Self {
            self.common.target_fps = Some(fps);
            self
        }
        /// Decode only key frames: one frame per fragment or GOP, at a fraction of the CPU.
        #[must_use]
        pub fn key_frames_only(mut self, enabled: bool) -> Self {
            self.common.key_frames_only = enabled;
            self
        }
        /// Stay at the live edge: frames whose producer time is more than `age` ago when they
        /// are decoded are dropped before colour conversion (counted as
        /// `frames_dropped_too_old`, metric reason `too_old`), and a LIVE KVS reader that comes
        /// back from an outage skips the fragments that ended more than `age` ago instead of
        /// reading through them (`fragments_too_old`). 100 ms – 1 h; default none (every frame
        /// is delivered, however late). Frames without a producer time are never dropped.
        /// KVS sources accept it with LIVE playback only. The producer's clock must be right
        /// (NTP): frames of a camera whose clock is behind by more than `age` are all dropped,
        /// which the drop counter shows.
        #[must_use]
        pub fn max_frame_age(mut self, age: std::time::Duration) -> Self {
            self.common.max_frame_age = Some(age);
            self
        }
        /// How YUV becomes BGR, RGB, BGRA, RGBA or GRAY8 (default
        /// [`ColorConversion::Simd`](crate::ColorConversion::Simd): SIMD kernels into pooled
        /// buffers, a third cheaper per frame than GStreamer's `videoconvert`, which stays the
        /// fallback for what they do not cover and is available as
        /// [`ColorConversion::Gstreamer`](crate::ColorConversion::Gstreamer)).
        #[must_use]
        pub fn color_conversion(mut self, conversion: $crate::frame::ColorConversion) -> Self {
            self.common.conversion = conversion;
            self
        }
        /// Threads of each video decoder (default [`DecoderThreads::Auto`](crate::DecoderThreads::Auto):
        /// one per decoder once the process decodes as many streams as it has cores).
        #[must_use]
        pub fn decoder_threads(mut self, threads: $crate::DecoderThreads) -> Self {
            self.common.decoder_threads = threads;
            self
        }
        /// Frames the queue holds, 1–10000 (default 30). `LatestOnly` always holds one.
        #[must_use]
        pub fn queue_capacity(mut self, capacity: usize) -> Self {
            self.common.queue_capacity = capacity;
            self
        }
        /// Bytes of frames the queue holds at most, 1 MiB–16 GiB (default 32 MiB; one frame
        /// always fits), whichever of this and [`queue_capacity`](Self::queue_capacity) is
        /// reached first. The default keeps a reader that falls behind from holding 187 MB of
        /// 1080p BGR frames: 30 frames at 360p, 12 at 720p, 5 at 1080p, 1 at 4K (BGR).
        #[must_use]
        pub fn queue_bytes(mut self, bytes: usize) -> Self {
            self.common.queue_bytes = bytes;
            self
        }
        /// Reconnect backoff (default: 5 s, ×2, cap 60 s, jitter 0.8–1.2, retried for as long as
        /// the errors are transient; `max_consecutive_errors(Some(n))` gives up after `n` in a
        /// row).
        #[must_use]
        pub fn backoff(mut self, policy: BackoffPolicy) -> Self {
            self.common.backoff = policy;
            self
        }
        /// Record metrics in these collectors (see [`FrameSourceMetrics::register`]); one
        /// registration serves every source.
        #[must_use]
        pub fn metrics(mut self, metrics: FrameSourceMetrics) -> Self {
            self.common.metrics = Some(metrics);
            self
        }
        /// Run the source's task on this runtime (default: the current multi-thread runtime,
        /// else a runtime the crate shares between all its sources).
        #[must_use]
        pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
            self.common.runtime = Some(handle);
            self
        }
    };
}
pub(crate) use common_setters;

/// What the sources share with their iterators and streams.
pub(crate) struct Core {
    pub queue: Queue,
    state: AtomicU8,
    pub stats: Mutex<SourceStats>,
    /// Where frames the reader takes are counted (`kvs_hls_frames_total`), by camera.
    deliveries: Option<(crate::metrics::FrameSourceMetrics, String)>,
}

impl Core {
    pub fn new(queue: Queue) -> Self {
        Core {
            queue,
            state: AtomicU8::new(SourceState::Disconnected as u8),
            stats: Mutex::new(SourceStats::default()),
            deliveries: None,
        }
    }

    /// Counts the frames the reader takes in `metrics` too, under `camera`.
    pub fn counting_into(
        mut self,
        metrics: Option<crate::metrics::FrameSourceMetrics>,
        camera: &str,
    ) -> Self {
        self.deliveries = metrics.map(|m| (m, camera.to_owned()));
        self
    }

    /// The reader took a frame (iterator or stream): it is delivered. Frames the queue drops
    /// never get here, so delivered + dropped = decoded.
    fn taken(&self, frame: &Frame) {
        self.stats.lock().frames_delivered += 1;
        if let Some((metrics, camera)) = &self.deliveries {
            metrics.delivered(camera, frame.age());
        }
    }

    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: SourceState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Connected, and a frame delivered within the last 30 s (or none expected yet).
    pub fn is_healthy(&self) -> bool {
        self.state() == SourceState::Connected
            && self
                .stats
                .lock()
                .last_frame_at
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < Duration::from_secs(30))
    }

    pub fn snapshot(&self) -> SourceStats {
        let mut stats = self.stats.lock().clone();
        stats.state = self.state();
        stats.queue_len = self.queue.len();
        stats
    }
}

/// Armed by a source's control task: when the task ends without having ended the queue — it
/// panicked, or its runtime shut down and dropped it — the guard ends the queue with an
/// [`ErrorKind::Internal`] error, so that `frames()` and `stream()` never wait forever.
pub(crate) struct TaskGuard {
    core: Arc<Core>,
    on_end: Option<Box<dyn FnOnce(Error) + Send>>,
}

impl TaskGuard {
    /// `on_end` records the error and ends the queue (the source's `fail`, unless the source
    /// was stopped: then the task ends before `stop()` has closed the queue).
    pub fn new(core: Arc<Core>, on_end: impl FnOnce(Error) + Send + 'static) -> Self {
        TaskGuard {
            core,
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.core.queue.is_ended() {
            return;
        }
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "was dropped (its tokio runtime shut down)"
        };
        if let Some(on_end) = self.on_end.take() {
            on_end(Error::new(
                ErrorKind::Internal,
                format!("the source's control task {why}: the source has stopped"),
            ));
        }
    }
}

/// How long `stop()` waits for the blocking part of a teardown (GStreamer state changes,
/// thread joins) when it is called outside a tokio runtime.
const TEARDOWN_WAIT: Duration = Duration::from_millis(700);

/// Runs blocking teardown work (a pipeline to NULL, a thread join) on a thread of its own, so
/// that it never blocks a tokio worker; outside a runtime, waits for it for at most
/// [`TEARDOWN_WAIT`] (it normally takes milliseconds), so that `stop()` and `Drop` always
/// return within a second.
/// The error of an operation cut short by `stop()`.
pub(crate) fn stopped() -> Error {
    Error::new(ErrorKind::Stopped, "the source was stopped")
}

/// Sleeps `d`, unless the source is stopped first (`stop` set, or `notify` woken by `stop()`).
pub(crate) async fn sleep_unless_stopped(
    stop: &std::sync::atomic::AtomicBool,
    notify: &tokio::sync::Notify,
    d: Duration,
) -> Result<()> {
    let notified = notify.notified();
    if stop.load(Ordering::SeqCst) {
        return Err(stopped());
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = notified => Err(stopped()),
    }
}

pub(crate) fn teardown(name: &str, work: impl FnOnce() + Send + 'static) {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name(format!("kvs-frames-stop-{name}"))
        .spawn(move || {
            work();
            let _ = done.send(());
        });
    match spawned {
        Ok(_) => {
            if tokio::runtime::Handle::try_current().is_err()
                && wait.recv_timeout(TEARDOWN_WAIT).is_err()
            {
                tracing::debug!(source = name, "teardown continues in the background");
            }
        }
        Err(e) => tracing::warn!(source = name, error = %e, "cannot start the teardown thread"),
    }
}

/// Blocking iterator over `(frame, timestamp)`; see
/// [`KvsHlsFrameSource::frames`]. It ends after a fatal error has been yielded, after the end
/// of an on-demand range, or when the source is stopped.
pub struct Frames<'a> {
    core: &'a Core,
}

impl Iterator for Frames<'_> {
    type Item = Result<(Frame, SystemTime)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.core.queue.pop(None) {
            Ok(Some(Ok(frame))) => {
                self.core.taken(&frame);
                let ts = frame.timestamp();
                Some(Ok((frame, ts)))
            }
            Ok(Some(Err(e))) => Some(Err(e)),
            Ok(None) | Err(()) => None,
        }
    }
}

impl Frames<'_> {
    /// The next item, waiting at most `timeout`; `None` on time-out *or* end (check
    /// the source's `state()` to tell them apart).
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<(Frame, SystemTime)>> {
        match self.core.queue.pop(Some(timeout)) {
            Ok(Some(Ok(frame))) => {
                self.core.taken(&frame);
                let ts = frame.timestamp();
                Some(Ok((frame, ts)))
            }
            Ok(Some(Err(e))) => Some(Err(e)),
            Ok(None) | Err(()) => None,
        }
    }
}

/// Async stream of `(frame, timestamp)`, the same items as [`Frames`]; see
/// [`KvsHlsFrameSource::stream`].
pub struct FrameStream {
    core: Arc<Core>,
}

impl futures_util::Stream for FrameStream {
    type Item = Result<(Frame, SystemTime)>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.core.queue.poll_pop(cx).map(|item| {
            item.map(|r| {
                r.map(|frame| {
                    self.core.taken(&frame);
                    let ts = frame.timestamp();
                    (frame, ts)
                })
            })
        })
    }
}

impl std::fmt::Debug for FrameStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_ends_the_queue_when_the_task_panics_or_is_dropped() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let core = Arc::new(Core::new(Queue::new(
            4,
            DEFAULT_QUEUE_BYTES,
            DeliveryPolicy::Block,
        )));
        let guarded = |core: &Arc<Core>| {
            let c = Arc::clone(core);
            TaskGuard::new(Arc::clone(core), move |e| c.queue.fail(e))
        };
        let guard = guarded(&core);
        let task = runtime.spawn(async move {
            let _guard = guard;
            let values: Vec<u64> = Vec::new();
            // A panic inside the task (an index out of bounds).
            values[usize::from(values.is_empty())]
        });
        assert!(runtime.block_on(task).unwrap_err().is_panic());
        match core.queue.pop(Some(Duration::from_secs(1))) {
            Ok(Some(Err(e))) => {
                assert_eq!(e.kind(), ErrorKind::Internal);
                assert!(e.to_string().contains("panicked"), "{e}");
            }
            other => panic!("the queue did not end: {:?}", other.map(|o| o.is_some())),
        }
        assert!(matches!(core.queue.pop(Some(Duration::ZERO)), Ok(None)));

        // A task dropped by its runtime's shutdown.
        let core = Arc::new(Core::new(Queue::new(
            4,
            DEFAULT_QUEUE_BYTES,
            DeliveryPolicy::Block,
        )));
        let guard = guarded(&core);
        runtime.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        drop(runtime);
        match core.queue.pop(Some(Duration::from_secs(1))) {
            Ok(Some(Err(e))) => assert!(e.to_string().contains("runtime"), "{e}"),
            other => panic!("the queue did not end: {:?}", other.map(|o| o.is_some())),
        }

        // A task that ended the queue itself (or a stopped source): nothing is added.
        let core = Arc::new(Core::new(Queue::new(
            4,
            DEFAULT_QUEUE_BYTES,
            DeliveryPolicy::Block,
        )));
        core.queue.finish();
        drop(guarded(&core));
        assert!(matches!(core.queue.pop(Some(Duration::ZERO)), Ok(None)));
    }
}
