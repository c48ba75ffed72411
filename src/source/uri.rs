//! [`UriFrameSource`]: the frame API of [`KvsHlsFrameSource`](super::KvsHlsFrameSource) for
//! RTSP cameras, HLS URLs and files, decoded by GStreamer without going through KVS.
//!
//! ```text
//!            ┌────────────── control task (tokio) ──────────────┐
//!            │ build pipeline → PLAYING → wait for: error, EOS,  │  backoff + reconnect on errors,
//!            │ stall (no frame for stall_timeout), stop          │  stalls and live EOS; files end
//!            └───────────────────────┬──────────────────────────┘  (or loop) at EOS
//!                                    ▼
//!  uridecodebin ── rtspsrc (TCP/UDP, latency, NTP reference meta) → depay → parse → decoder
//!               ├─ souphttpsrc → hlsdemux → demux → parse → decoder
//!               └─ filesrc → demux → parse → decoder
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

use super::{CommonOptions, common_setters};
use super::{Core, FrameStream, Frames, Pushed, Queue, SourceState, SourceStats, TaskGuard};
use crate::backoff::BackoffPolicy;
use crate::decode::{self, DecodeConfig, DecoderDrop, FrameSink, Stamp, TailHooks};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{Frame, PixelFormat};
use crate::metrics::FrameSourceMetrics;
use crate::redact::redact_url;
use crate::source::{DeliveryPolicy, DropReason};

/// What kind of URI a source reads, from its scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UriKind {
    /// `rtsp://` or `rtsps://`: a live camera (or relay), read with `rtspsrc`.
    Rtsp,
    /// `http://` or `https://`: an HLS playlist (`…m3u8`, live or VOD), read with
    /// `souphttpsrc` and `hlsdemux`. Other media that `uridecodebin` plays over HTTP work too.
    Http,
    /// `file://` or a plain path: a local media file (MP4, MKV, MPEG-TS, …).
    File,
}

impl UriKind {
    /// Lower-case name (`rtsp`, `http`, `file`).
    pub fn as_str(self) -> &'static str {
        match self {
            UriKind::Rtsp => "rtsp",
            UriKind::Http => "http",
            UriKind::File => "file",
        }
    }
}

/// How RTSP media travels (`rtspsrc`'s `protocols`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection (default): no packet loss, passes NAT and
    /// firewalls, the usual choice for analytics.
    #[default]
    Tcp,
    /// RTP over UDP: lowest latency on a clean LAN; lost packets show as decode artefacts.
    Udp,
    /// UDP, falling back to TCP when no UDP packet arrives (`rtspsrc`'s own default).
    Auto,
}

impl RtspTransport {
    /// The `protocols` flags of `rtspsrc`.
    fn protocols(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
            RtspTransport::Auto => "udp+tcp",
        }
    }
}

/// What the source does when the stream ends (end-of-stream reaches the decoder's output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndOfStream {
    /// A live source ended unexpectedly: reconnect with backoff, like after an error (default
    /// for RTSP). Counted in `reconnects` and `read_errors`.
    Reconnect,
    /// The iterator ends after the last frame (default for files and HTTP).
    Finish,
    /// Start again from the beginning, at once (a new pipeline; `pts` starts again too): for
    /// test feeds and demos from a file.
    Loop,
}

impl EndOfStream {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndOfStream::Reconnect => "reconnect",
            EndOfStream::Finish => "finish",
            EndOfStream::Loop => "loop",
        }
    }
}

/// A parsed, validated URI: what GStreamer gets, what logs show, and the credentials apart.
#[derive(Clone)]
struct Target {
    kind: UriKind,
    /// The URI given to `uridecodebin`, without credentials.
    uri: String,
    /// The URI as the caller wrote it, credentials redacted: for logs, errors, Debug.
    display: String,
    user: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("kind", &self.kind)
            .field("uri", &self.display)
            .finish_non_exhaustive()
    }
}

fn invalid_uri(display: &str, reason: &str) -> Error {
    Error::invalid_config("uri", format!("{display:?}"), reason)
}

/// Percent-decoding of URL user-info (`%40` → `@`); invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    fn parse(raw: &str) -> Result<Target> {
        let display = redact_url(raw.trim());
        let text = raw.trim();
        if text.is_empty() {
            return Err(invalid_uri(&display, "must not be empty"));
        }
        let scheme = text
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
        let Some(scheme) = scheme else {
            return Self::file(std::path::Path::new(text), display);
        };
        let kind = match scheme.as_str() {
            "rtsp" | "rtsps" => UriKind::Rtsp,
            "http" | "https" => UriKind::Http,
            "file" => UriKind::File,
            _ => {
                return Err(invalid_uri(
                    &display,
                    "unsupported scheme: use rtsp://, rtsps://, http://, https://, file:// or a file path",
                ));
            }
        };
        let mut url = url::Url::parse(text)
            .map_err(|e| invalid_uri(&display, &format!("not a valid URL: {e}")))?;
        if kind == UriKind::File {
            let path = url
                .to_file_path()
                .map_err(|()| invalid_uri(&display, "not a local file URL"))?;
            return Self::file(&path, display);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid_uri(&display, "has no host"));
        }
        let user = (!url.username().is_empty()).then(|| percent_decode(url.username()));
        let password = url.password().map(percent_decode);
        // Credentials go to the source element as properties, never in its location, so
        // GStreamer's own logs and messages do not carry them.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Target {
            kind,
            uri: url.to_string(),
            display,
            user,
            password,
        })
    }

    fn file(path: &std::path::Path, display: String) -> Result<Target> {
        let meta = std::fs::metadata(path)
            .map_err(|e| invalid_uri(&display, &format!("cannot read the file: {e}")))?;
        if !meta.is_file() {
            return Err(invalid_uri(&display, "is not a regular file"));
        }
        let absolute = std::fs::canonicalize(path)
            .map_err(|e| invalid_uri(&display, &format!("cannot resolve the path: {e}")))?;
        let uri = url::Url::from_file_path(&absolute)
            .map_err(|()| invalid_uri(&display, "cannot be turned into a file URI"))?;
        Ok(Target {
            kind: UriKind::File,
            uri: uri.to_string(),
            display,
            user: None,
            password: None,
        })
    }
}

/// Builder of a [`UriFrameSource`]; every option is validated by [`build`](Self::build).
#[derive(Clone)]
pub struct UriFrameSourceBuilder {
    uri: String,
    rtsp_transport: RtspTransport,
    rtsp_latency: Duration,
    end_of_stream: Option<EndOfStream>,
    realtime: bool,
    stall_timeout: Duration,
    delivery: Option<DeliveryPolicy>,
    common: CommonOptions,
}

impl std::fmt::Debug for UriFrameSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UriFrameSourceBuilder")
            .field("camera_id", &self.common.camera_id)
            .field("uri", &redact_url(&self.uri))
            .field("pixel_format", &self.common.pixel_format)
            .finish_non_exhaustive()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl UriFrameSourceBuilder {
    fn new(camera_id: &str, uri: &str) -> Self {
        UriFrameSourceBuilder {
            uri: uri.to_owned(),
            rtsp_transport: RtspTransport::Tcp,
            rtsp_latency: Duration::from_millis(200),
            end_of_stream: None,
            realtime: false,
            stall_timeout: Duration::from_secs(10),
            delivery: None,
            common: CommonOptions::new(camera_id),
        }
    }

    setter!(
        /// RTSP lower transport (default TCP). Ignored for other URIs.
        rtsp_transport: RtspTransport
    );
    setter!(
        /// RTSP jitter-buffer latency, 0–10 s (default 200 ms): how long packets may wait to
        /// be reordered; more absorbs network jitter, less lowers latency. Ignored for other
        /// URIs.
        rtsp_latency: Duration
    );
    /// What happens at end-of-stream (default: [`EndOfStream::Reconnect`] for RTSP,
    /// [`EndOfStream::Finish`] for HTTP and files).
    #[must_use]
    pub fn end_of_stream(mut self, action: EndOfStream) -> Self {
        self.end_of_stream = Some(action);
        self
    }
    setter!(
        /// Deliver frames at the media's own pace (the appsink synchronises on the clock)
        /// instead of as fast as they decode (default false). For files and HLS VOD, to
        /// simulate a live camera; live RTSP is paced by the camera anyway.
        realtime: bool
    );
    setter!(
        /// Reconnect when no frame has been decoded for this long although the reader keeps up,
        /// 1 s–600 s (default 10 s). It also bounds how long a connection may take to deliver
        /// its first frame.
        stall_timeout: Duration
    );
    /// Delivery policy (default: `DropOldest` when the source reconnects at end-of-stream,
    /// i.e. RTSP; `Block` for files and HTTP, so that nothing is dropped).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    common_setters!();

    fn validate(&self) -> Result<Target> {
        self.common.validate()?;
        let target = Target::parse(&self.uri)?;
        if self.rtsp_latency > Duration::from_secs(10) {
            return Err(Error::invalid_config(
                "rtsp_latency",
                format!("{:?}", self.rtsp_latency),
                "must be at most 10 s",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.stall_timeout) {
            return Err(Error::invalid_config(
                "stall_timeout",
                format!("{:?}", self.stall_timeout),
                "must be between 1s and 600s",
            ));
        }
        Ok(target)
    }

    /// Validates every option (a file must exist), checks that GStreamer, a source element for
    /// the URI's scheme and the other elements the pipeline needs are installed, and starts
    /// reading in the background.
    pub fn build(self) -> Result<UriFrameSource> {
        let target = self.validate()?;
        // What uridecodebin plugs for each kind (H.264 and H.265 decoders, demuxers).
        let head: &[&str] = match target.kind {
            UriKind::Rtsp => &[
                "uridecodebin",
                "rtspsrc",
                "rtpjitterbuffer",
                "rtph264depay",
                "h264parse",
                "avdec_h264",
            ],
            UriKind::Http => &[
                "uridecodebin",
                "souphttpsrc",
                "hlsdemux",
                "typefind",
                "h264parse",
                "avdec_h264",
            ],
            UriKind::File => &[
                "uridecodebin",
                "filesrc",
                "typefind",
                "qtdemux",
                "h264parse",
                "avdec_h264",
            ],
        };
        self.common.require_elements(head)?;
        // The element uridecodebin will pick for the scheme (rtspsrc, souphttpsrc, filesrc, …).
        if let Err(e) = gst::Element::make_from_uri(gst::URIType::Src, &target.uri, None) {
            return Err(Error::new(
                ErrorKind::Pipeline,
                format!(
                    "no GStreamer source element for {}: {e} (install gstreamer1.0-plugins-good)",
                    target.display
                ),
            ));
        }
        let end_of_stream = self.end_of_stream.unwrap_or(match target.kind {
            UriKind::Rtsp => EndOfStream::Reconnect,
            UriKind::Http | UriKind::File => EndOfStream::Finish,
        });
        let policy = self.delivery.unwrap_or(match end_of_stream {
            EndOfStream::Reconnect => DeliveryPolicy::DropOldest,
            EndOfStream::Finish | EndOfStream::Loop => DeliveryPolicy::Block,
        });
        let core = Arc::new(
            Core::new(Queue::new(self.common.queue_capacity, policy))
                .counting_into(self.common.metrics.clone(), &self.common.camera_id),
        );
        let ctx = Arc::new(Ctx {
            camera_id: self.common.camera_id.clone(),
            display: target.display.clone(),
            kind: target.kind,
            core: Arc::clone(&core),
            metrics: self.common.metrics.clone(),
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            sequence: AtomicU64::new(0),
            last_progress: Mutex::new(Instant::now()),
            connection_frames: AtomicU64::new(0),
            pipeline: Mutex::new(None),
            pipelines_built: AtomicU64::new(0),
        });
        if let Some(m) = &ctx.metrics {
            m.init_camera(&ctx.camera_id);
        }
        let handle = self.common.runtime_handle()?;
        ctx.set_state(SourceState::Connecting);
        let opts = Options {
            target,
            end_of_stream,
            decode: self.common.decode_config(),
            rtsp_transport: self.rtsp_transport,
            rtsp_latency: self.rtsp_latency,
            realtime: self.realtime,
            stall_timeout: self.stall_timeout,
            backoff: self.common.backoff,
        };
        tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, kind = ctx.kind.as_str(), "URI source starting");
        let task = handle.spawn(run(Arc::clone(&ctx), opts));
        Ok(UriFrameSource {
            ctx,
            core,
            task: Mutex::new(Some(task)),
        })
    }
}

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
/// What it does: `uridecodebin` (with `rtspsrc`, `souphttpsrc` + `hlsdemux` or `filesrc`)
/// decodes the URI into the crate's shared GStreamer tail (conversion, scaling, optional JPEG
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
        let notified = self.stop_notify.notified();
        if self.stopped() {
            return Err(stopped());
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = notified => Err(stopped()),
        }
    }
}

fn stopped() -> Error {
    Error::new(ErrorKind::Stopped, "the source was stopped")
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
        let age = frame.age();
        {
            // Noted before the frame becomes visible to the reader (who counts it delivered).
            let mut stats = ctx.core.stats.lock();
            stats.last_frame_producer_time = producer_time.or(stats.last_frame_producer_time);
            stats.last_frame_at = Some(emitted);
        }
        if let Some(m) = &ctx.metrics {
            // The last-frame gauge gets the frame's timestamp (producer time, else emit time),
            // so that staleness alerts work for sources without producer time.
            m.frame(&ctx.camera_id, Some(frame.timestamp()), age);
        }
        match ctx.core.queue.push(frame) {
            Pushed::Queued { evicted } if evicted > 0 => {
                ctx.core.stats.lock().frames_dropped_queue_full += evicted;
                if let Some(m) = &ctx.metrics {
                    m.dropped(&ctx.camera_id, DropReason::QueueFull, evicted);
                }
            }
            Pushed::Queued { .. } | Pushed::Closed => {}
        }
    }

    fn dropped(&self, why: DecoderDrop) {
        let ctx = &self.0;
        ctx.reset_progress();
        match why {
            DecoderDrop::TargetFps => {
                ctx.core.stats.lock().frames_dropped_target_fps += 1;
                if let Some(m) = &ctx.metrics {
                    m.dropped(&ctx.camera_id, DropReason::TargetFps, 1);
                }
            }
        }
    }

    fn error(&self, _error: Error) {
        // Errors reach the control task through the connection's event channel.
    }
}

/// Classifies a GStreamer error of a URI pipeline.
fn classify(kind: UriKind, err: &gst::message::Error) -> Error {
    let gerr = err.error();
    let debug = decode::error_debug(err);
    let message = format!(
        "{} (from {}{}{})",
        gerr.message(),
        decode::error_source(err),
        if debug.is_empty() { "" } else { ": " },
        debug
    );
    // rtspsrc could not SETUP the stream (typically 461 Unsupported Transport: a camera that
    // serves only UDP, or only TCP); uridecodebin then reports "missing a plug-in", which would
    // send users looking for packages. The camera may also be full for a while: transient.
    if kind == UriKind::Rtsp && debug.contains("gst_rtspsrc_setup_streams") {
        return Error::new(
            ErrorKind::Network,
            format!(
                "the RTSP server refused to set up the stream: the transport may be unsupported \
                 (try another rtsp_transport, e.g. RtspTransport::Auto): {message}"
            ),
        );
    }
    let resource = gerr.kind::<gst::ResourceError>();
    let stream = gerr.kind::<gst::StreamError>();
    let error_kind = if matches!(resource, Some(gst::ResourceError::NotAuthorized))
        || debug.contains("401")
            && (debug.contains("Unauthorized") || debug.contains("Unauthorised"))
    {
        ErrorKind::NotAuthorized
    } else if resource.is_some() {
        match kind {
            UriKind::File => ErrorKind::Io,
            // Refused, reset, not found (a relay without a publisher answers 404), read
            // failures: the camera may come back.
            UriKind::Rtsp | UriKind::Http => ErrorKind::Network,
        }
    } else if matches!(
        stream,
        Some(
            gst::StreamError::TypeNotFound
                | gst::StreamError::WrongType
                | gst::StreamError::NotImplemented
                | gst::StreamError::Format
        )
    ) {
        ErrorKind::UnsupportedMedia
    } else {
        // Decode (transient) or Pipeline (a missing plugin or decoder), as for KVS sources.
        Error::from(gerr.clone()).kind()
    };
    Error::new(error_kind, message)
}

/// How a connection ended without an error.
enum End {
    /// End-of-stream with `Finish`.
    Finished,
    /// End-of-stream with `Loop`.
    Loop,
}

/// The NTP time of RTP packets leaving `rtspsrc`, with their PTS: frames whose decoded buffers
/// lost the reference-timestamp meta get `ntp + (pts − pts_ref)` from the newest pair.
type NtpAnchor = Arc<Mutex<Option<(gst::ClockTime, SystemTime)>>>;

/// The NTP time of a frame at `pts` from an anchor `(pts_ref, ntp_ref)` seen on the RTP
/// packets (for decoders that do not carry the reference-timestamp meta through).
fn extrapolate(anchor: (gst::ClockTime, SystemTime), pts: Duration) -> Option<SystemTime> {
    let (pts_ref, ntp_ref) = anchor;
    let pts_ref = Duration::from_nanos(pts_ref.nseconds());
    if pts >= pts_ref {
        ntp_ref.checked_add(pts - pts_ref)
    } else {
        ntp_ref.checked_sub(pts_ref - pts)
    }
}

/// Builds one connection's pipeline: uridecodebin → shared tail.
fn build_pipeline(
    ctx: &Arc<Ctx>,
    opts: &Options,
    events: mpsc::UnboundedSender<Event>,
) -> Result<gst::Pipeline> {
    let number = ctx.pipelines_built.load(Ordering::Relaxed) + 1;
    let pipeline = gst::Pipeline::with_name(&format!("kvs-frames-uri-{}-{number}", ctx.camera_id));
    let source = crate::elements::make_with("uridecodebin", |b| {
        b.property("uri", opts.target.uri.as_str())
    })?;
    pipeline.add(&source).map_err(Error::from)?;

    // Configure the source element uridecodebin creates for the URI.
    let anchor: NtpAnchor = Arc::new(Mutex::new(None));
    let setup_anchor = Arc::clone(&anchor);
    let user = opts.target.user.clone();
    let password = opts.target.password.clone();
    let rtsps = opts.target.uri.starts_with("rtsps:");
    let protocols = if rtsps {
        format!("{}+tls", opts.rtsp_transport.protocols())
    } else {
        opts.rtsp_transport.protocols().to_owned()
    };
    let latency = u32::try_from(opts.rtsp_latency.as_millis()).unwrap_or(u32::MAX);
    source.connect("source-setup", false, move |values| {
        let element = values.get(1).and_then(|v| v.get::<gst::Element>().ok())?;
        let has = |name: &str| element.find_property(name).is_some();
        if has("protocols") && has("latency") {
            // rtspsrc
            element.set_property_from_str("protocols", &protocols);
            element.set_property("latency", latency);
            if has("add-reference-timestamp-meta") {
                element.set_property("add-reference-timestamp-meta", true);
            }
            let anchor = Arc::clone(&setup_anchor);
            element.connect_pad_added(move |_, pad| {
                let anchor = Arc::clone(&anchor);
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    if let Some(buffer) = info.buffer()
                        && let (Some(pts), Some(ntp)) =
                            (buffer.pts(), decode::ntp_reference(buffer))
                    {
                        *anchor.lock() = Some((pts, ntp));
                    }
                    gst::PadProbeReturn::Ok
                });
            });
        }
        if let Some(user) = &user
            && has("user-id")
        {
            element.set_property("user-id", user.as_str());
        }
        if let Some(password) = &password
            && has("user-pw")
        {
            element.set_property("user-pw", password.as_str());
        }
        None
    });

    let stamp: Stamp = Box::new(move |pts, reference| {
        let ntp = reference.or_else(|| extrapolate((*anchor.lock())?, pts?));
        (ntp, None)
    });
    let sink: Arc<dyn FrameSink> = Arc::new(Sink(Arc::clone(ctx)));
    let eos_events = events.clone();
    decode::add_tail(
        &pipeline,
        &source,
        &opts.decode,
        &sink,
        TailHooks {
            stamp,
            on_eos: Box::new(move || {
                let _ = eos_events.send(Event::Eos);
            }),
        },
    )?;
    if opts.realtime
        && let Some(appsink) = pipeline.by_name("sink")
    {
        appsink.set_property("sync", true);
    }
    let kind = opts.target.kind;
    let failed = AtomicBool::new(false);
    decode::on_bus_error(&pipeline, move |err| {
        // The first error of a pipeline is the cause; the rest follow from it.
        if !failed.swap(true, Ordering::SeqCst) {
            let _ = events.send(Event::Error(classify(kind, err)));
        }
    })?;
    Ok(pipeline)
}

/// Releases a pipeline off the async threads (an RTSP teardown may take a moment).
async fn release(pipeline: gst::Pipeline) {
    let _ = tokio::task::spawn_blocking(move || {
        let _ = pipeline.set_state(gst::State::Null);
    })
    .await;
}

/// One connection: builds and starts a pipeline, then waits for its end.
async fn connection(ctx: &Arc<Ctx>, opts: &Options) -> Result<End> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pipeline = build_pipeline(ctx, opts, tx)?;
    ctx.connection_frames.store(0, Ordering::Relaxed);
    ctx.reset_progress();
    {
        let mut slot = ctx.pipeline.lock();
        if ctx.stopped() {
            return Err(stopped());
        }
        *slot = Some(pipeline.clone());
    }
    ctx.pipelines_built.fetch_add(1, Ordering::Relaxed);
    ctx.core.stats.lock().sessions += 1;
    tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, "connecting");
    // State changes may block (a source element opening its input): off the async threads.
    let starting = pipeline.clone();
    let starting_ctx = Arc::clone(ctx);
    let started = tokio::task::spawn_blocking(move || {
        let started = starting.set_state(gst::State::Playing);
        // stop() may have released the pipeline while it was starting (or aborted this task):
        // it must not stay PLAYING.
        if starting_ctx.stopped() {
            let _ = starting.set_state(gst::State::Null);
        }
        started
    })
    .await
    .unwrap_or(Err(gst::StateChangeError));
    let result = match started {
        // A source that fails at once (a file it cannot open) posts its error synchronously.
        Err(_) => Err(match rx.try_recv() {
            Ok(Event::Error(e)) => e,
            _ => Error::new(
                ErrorKind::Pipeline,
                format!("the pipeline for {} does not start", ctx.display),
            ),
        }),
        Ok(_) => watch(ctx, opts, &mut rx).await,
    };
    let mine = {
        let mut slot = ctx.pipeline.lock();
        let mine = slot.as_ref() == Some(&pipeline);
        if mine {
            *slot = None;
        }
        mine
    };
    if mine {
        release(pipeline).await;
    }
    result
}

/// Waits for an error, end-of-stream, a stall or stop.
async fn watch(
    ctx: &Arc<Ctx>,
    opts: &Options,
    rx: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<End> {
    loop {
        let notified = ctx.stop_notify.notified();
        if ctx.stopped() {
            return Err(stopped());
        }
        tokio::select! {
            event = rx.recv() => match event {
                Some(Event::Error(e)) => return Err(e),
                Some(Event::Eos) => {
                    return match opts.end_of_stream {
                        EndOfStream::Finish => Ok(End::Finished),
                        EndOfStream::Loop => Ok(End::Loop),
                        EndOfStream::Reconnect => Err(Error::new(
                            ErrorKind::Network,
                            "the live stream ended (end-of-stream): reconnecting",
                        )),
                    };
                }
                None => return Err(Error::new(ErrorKind::Internal, "the pipeline's event channel closed")),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let idle = ctx.last_progress.lock().elapsed();
                if idle > opts.stall_timeout && !ctx.core.queue.is_full() {
                    let what = if ctx.connection_frames.load(Ordering::Relaxed) == 0 {
                        "no frame since connecting"
                    } else {
                        "no frame decoded"
                    };
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!("{what} for {:?} (stall)", opts.stall_timeout),
                    ));
                }
            }
            _ = notified => return Err(stopped()),
        }
    }
}

fn fail(ctx: &Ctx, error: Error) {
    tracing::error!(camera = %ctx.camera_id, uri = %ctx.display, %error, "source failed");
    ctx.core.stats.lock().last_error = Some(error.to_string());
    ctx.set_state(SourceState::Error);
    ctx.core.queue.fail(error);
}

async fn run(ctx: Arc<Ctx>, opts: Options) {
    // Whatever ends this task (a panic, a runtime shutdown), the iterator ends too.
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| {
        if !guard_ctx.stopped() {
            fail(&guard_ctx, e);
        }
    });
    let mut failures: u32 = 0;
    loop {
        if ctx.stopped() {
            return;
        }
        let result = connection(&ctx, &opts).await;
        if ctx.connection_frames.load(Ordering::Relaxed) > 0 {
            failures = 0;
        }
        let error = match result {
            Ok(End::Finished) => {
                tracing::info!(camera = %ctx.camera_id, uri = %ctx.display, "end of stream");
                // The state first: a reader that sees the end sees why.
                ctx.set_state(SourceState::Disconnected);
                ctx.core.queue.finish();
                return;
            }
            Ok(End::Loop) => {
                tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, "end of stream: starting again");
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Stopped => return,
            Err(e) => e.context(format!("camera {}, {}", ctx.camera_id, ctx.display)),
        };
        {
            let mut stats = ctx.core.stats.lock();
            stats.read_errors += 1;
            stats.last_error = Some(error.to_string());
            if error.kind() == ErrorKind::Decode {
                stats.decode_errors += 1;
            }
        }
        if let Some(m) = &ctx.metrics {
            m.read_error(&ctx.camera_id);
        }
        if !error.is_transient() {
            fail(&ctx, error);
            return;
        }
        if ctx.kind == UriKind::File {
            // Reading the file again would repeat its frames.
            fail(
                &ctx,
                error.context("a file is not read again after an error"),
            );
            return;
        }
        failures += 1;
        {
            let mut stats = ctx.core.stats.lock();
            stats.consecutive_errors = failures;
            if stats.reconnecting_since.is_none() {
                stats.reconnecting_since = Some(SystemTime::now());
            }
        }
        if opts.backoff.exhausted(failures) {
            fail(
                &ctx,
                error.context(format!("giving up after {failures} consecutive errors")),
            );
            return;
        }
        let delay = opts.backoff.delay(failures);
        tracing::warn!(camera = %ctx.camera_id, %error, ?delay, attempt = failures, "reconnecting after backoff");
        ctx.set_state(SourceState::Reconnecting);
        {
            let mut stats = ctx.core.stats.lock();
            stats.reconnects += 1;
            stats.backoff_history.push(delay);
            if stats.backoff_history.len() > 32 {
                stats.backoff_history.remove(0);
            }
        }
        if let Some(m) = &ctx.metrics {
            m.reconnect(&ctx.camera_id);
        }
        if ctx.sleep(delay).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_classified_and_credentials_kept_apart() {
        let t = Target::parse("rtsp://admin:p%40ss@10.0.0.5:554/live?x=1").unwrap();
        assert_eq!(t.kind, UriKind::Rtsp);
        assert_eq!(t.uri, "rtsp://10.0.0.5:554/live?x=1");
        assert_eq!(t.user.as_deref(), Some("admin"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert!(!t.display.contains("p%40ss"), "{}", t.display);
        let t = Target::parse("HTTPS://cdn.example.com/live/index.m3u8").unwrap();
        assert_eq!(t.kind, UriKind::Http);
        assert_eq!(t.user, None);
        for bad in [
            "",
            "  ",
            "ftp://host/x",
            "rtsp://",
            "http://:80/x.m3u8",
            "/no/such/file.mp4",
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad}: {err}");
            assert_eq!(err.invalid_option(), Some("uri"), "{bad}");
        }
        let err = Target::parse("ftp://user:hunter2@host/x").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn frames_without_the_meta_are_placed_from_the_newest_anchor() {
        let ntp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let anchor = (gst::ClockTime::from_mseconds(4_000), ntp);
        assert_eq!(
            extrapolate(anchor, Duration::from_millis(4_040)),
            Some(ntp + Duration::from_millis(40))
        );
        assert_eq!(
            extrapolate(anchor, Duration::from_millis(3_960)),
            Some(ntp - Duration::from_millis(40))
        );
    }

    #[test]
    fn ntp_times_map_to_unix_time() {
        let unix = Duration::from_secs(1_700_000_000);
        let ntp = (unix + Duration::from_secs(2_208_988_800)).as_nanos() as u64;
        assert_eq!(
            decode::ntp_to_system_time(ntp),
            Some(SystemTime::UNIX_EPOCH + unix)
        );
        assert_eq!(decode::ntp_to_system_time(5), None);
    }
}
